"""Streaming speech segmentation: per-frame Silero probabilities -> start/end events.

This replays silero-vad's offline ``get_speech_timestamps_from_probs`` (6.2.3,
``use_max_poss_sil_at_max_speech=True``, ``min_silence_at_max_speech=98``) one
frame at a time. The raw segmentation (threshold/neg_threshold hysteresis,
min_silence, min_speech, max_speech cuts at the longest pause) is identical;
only the padding step, which upstream runs over the finished list, has to be
decided as events go out. Sample offsets count from the stream start (or the
last ``reset()``/``finish()``); frame k covers samples [k*W, (k+1)*W) with W =
512 at 16 kHz and 256 at 8 kHz.

When events are emitted:
  * START once the segment is certain to pass the min_speech filter: at the
    first frame where (temp_end, or cur_sample + 1 if not in a pause) - start >
    min_speech, i.e. about min_speech_duration_ms after the onset, at the onset
    frame itself when min_speech_duration_ms=0. (cur_sample + 1 because
    finish(n) must be given n > cur_sample: the last frame held audio.)
  * END when the pause reaches min_silence_duration_ms, or at the frame where
    max_speech_duration_s is exceeded (with the next segment's START there
    too when it is already certain; those offsets lie in the past).
  * finish(n) closes an open segment at n, as upstream does at end of audio.
    Segments that fail min_speech produce no events at all.

Differences from offline get_speech_timestamps (same probabilities, same params):
  1. Gaps shorter than 2*speech_pad. Offline gives each neighbour half of the
     gap; here the first END went out as raw_end + speech_pad before the next
     segment existed, so the next START is max(raw_start - speech_pad, that
     END): the segments touch, never overlap, and the earlier one keeps the
     whole pad. Between pause-separated segments this needs 2*speech_pad_ms >
     min_silence_duration_ms + one frame; with min_silence >= 2*speech_pad
     (the defaults) it never happens.
  2. A max_speech cut at a pause knows both sides, so it halves short gaps
     exactly like offline. Offline would instead pad against the next
     *surviving* segment if the one restarted after the cut is later dropped
     by min_speech; that END has already been sent.
  3. A max_speech cut with no pause >= 98 ms cuts at the current frame; its END
     is cut + min(speech_pad, W/2). That equals offline when speech resumes on
     the next frame (the usual case: there was no pause) or when speech_pad <=
     W/2 samples; otherwise it is earlier than offline by at most
     speech_pad - W/2 samples.
  4. Offline clamps the last END to the audio length; an END sent before the
     length is known is not clamped, so it can lie past the final sample when
     the stream ends less than speech_pad after it (needs speech_pad_ms >
     min_silence_duration_ms, or a max_speech cut in a partial last frame).
  5. An END is never earlier than its START (only reachable when speech_pad is
     longer than a whole segment), so absurd pads give empty, not inverted,
     segments.
"""
from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

_FRAME_SIZES = {16000: 512, 8000: 256}
_MIN_SILENCE_AT_MAX_SPEECH_MS = 98  # upstream default; not a knob here
_NO_EVENTS: tuple[SpeechEvent, ...] = ()


def _real(key: str, value: object, *, allow_inf: bool = False) -> float:
    # bool is an int subclass and would silently mean 0/1.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    out = float(value)
    if math.isnan(out) or (math.isinf(out) and not allow_inf):
        raise ValueError(f"{key}: expected a finite number, got {value!r}")
    return out


@dataclass(frozen=True)
class VadParams:
    threshold: float = 0.5
    neg_threshold: float | None = None  # None -> max(threshold - 0.15, 0.01)
    min_silence_duration_ms: float = 100
    speech_pad_ms: float = 30
    min_speech_duration_ms: float = 250
    max_speech_duration_s: float = math.inf

    def __post_init__(self) -> None:
        if not 0 < _real("threshold", self.threshold) < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold!r}")
        if self.neg_threshold is not None and not (
            0 < _real("neg_threshold", self.neg_threshold) <= self.threshold
        ):
            raise ValueError(
                f"neg_threshold must be None or in (0, threshold={self.threshold}], "
                f"got {self.neg_threshold!r}"
            )
        for key in ("min_silence_duration_ms", "speech_pad_ms", "min_speech_duration_ms"):
            if _real(key, getattr(self, key)) < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {getattr(self, key)!r}")
        if not _real("max_speech_duration_s", self.max_speech_duration_s, allow_inf=True) > 0:
            raise ValueError(
                f"max_speech_duration_s must be > 0 (inf = no limit), got {self.max_speech_duration_s!r}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> VadParams:
        known = [f.name for f in fields(cls)]
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown VAD parameter {key!r}; known: {', '.join(known)}")
            if value is None and key == "neg_threshold":
                changes[key] = None
            elif value is None and key == "max_speech_duration_s":
                changes[key] = math.inf  # to_dict() writes inf as None: JSON has no inf
            else:
                changes[key] = _real(key, value, allow_inf=key == "max_speech_duration_s")
        return replace(cls(), **changes)

    def to_dict(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {f.name: getattr(self, f.name) for f in fields(self)}
        if math.isinf(self.max_speech_duration_s):
            out["max_speech_duration_s"] = None
        return out

    @property
    def effective_neg_threshold(self) -> float:
        if self.neg_threshold is None:
            return max(self.threshold - 0.15, 0.01)
        return self.neg_threshold


class EventKind(enum.IntEnum):
    START = 1
    END = 2


@dataclass(frozen=True, slots=True)
class SpeechEvent:
    kind: EventKind
    sample: int  # padded offset in samples from the stream start (or last reset)
    frame: int  # frame whose push() emitted it; for finish(), the last pushed frame


class SpeechSegmenter:
    __slots__ = ("params", "sample_rate", "frame_size", "_thr", "_neg", "_min_speech", "_pad",
                 "_max_speech", "_min_silence", "_min_sil_max", "_frame", "_triggered", "_start",
                 "_temp_end", "_best_end", "_best_dur", "_started", "_last_start", "_last_end")

    def __init__(self, params: VadParams, sample_rate: int) -> None:
        if sample_rate not in _FRAME_SIZES:
            raise ValueError(f"sample_rate must be one of {sorted(_FRAME_SIZES)}, got {sample_rate!r}")
        self.params, self.sample_rate = params, sample_rate
        self.frame_size = w = _FRAME_SIZES[sample_rate]
        sr = sample_rate
        # Same float expressions as upstream so every comparison rounds the same way.
        self._thr = params.threshold
        self._neg = params.effective_neg_threshold
        self._min_speech = sr * params.min_speech_duration_ms / 1000
        self._pad = sr * params.speech_pad_ms / 1000
        self._max_speech = sr * params.max_speech_duration_s - w - 2 * self._pad
        self._min_silence = sr * params.min_silence_duration_ms / 1000
        self._min_sil_max = sr * _MIN_SILENCE_AT_MAX_SPEECH_MS / 1000
        self.reset()

    def reset(self) -> None:
        self._frame = 0
        self._triggered = self._started = False
        self._start = self._temp_end = self._best_end = self._best_dur = 0
        self._last_start = self._last_end = 0

    @property
    def in_speech(self) -> bool:
        return self._started

    def push(self, probability: float) -> tuple[SpeechEvent, ...]:
        i = self._frame
        self._frame = i + 1
        cur = i * self.frame_size
        speech = probability >= self._thr
        if speech and self._temp_end:
            sil = cur - self._temp_end
            # Upstream keeps every pause and takes max() at the cut (first wins
            # ties); keeping only the longest is the same answer in O(1).
            if sil > self._min_sil_max and sil > self._best_dur:
                self._best_end, self._best_dur = self._temp_end, sil
            self._temp_end = 0
        if not self._triggered:
            if not speech:
                return _NO_EVENTS
            self._triggered, self._start = True, cur
            return self._start_if_certain(i, cur)
        events = _NO_EVENTS
        if cur - self._start > self._max_speech:
            events = self._cut(i, cur)
            if not self._triggered:
                return events
        if probability < self._neg:
            if not self._temp_end:
                self._temp_end = cur
            if cur - self._temp_end >= self._min_silence:
                end = self._temp_end
                if self._started or end - self._start > self._min_speech:
                    events += self._close(i, int(end + self._pad))
                self._triggered = self._started = False
                self._temp_end = self._best_dur = 0
                return events
        return events + self._start_if_certain(i, cur) if not self._started else events

    def finish(self, audio_length_samples: int) -> tuple[SpeechEvent, ...]:
        if audio_length_samples < 0:
            raise ValueError(f"audio_length_samples must be >= 0, got {audio_length_samples}")
        events = _NO_EVENTS
        if self._triggered and (
            self._started or audio_length_samples - self._start > self._min_speech
        ):
            # Upstream ends the open segment at the audio length; min(n, n + pad) == n.
            events = self._close(self._frame - 1, audio_length_samples)
        self.reset()
        return events

    def _start_if_certain(self, i: int, cur: int) -> tuple[SpeechEvent, ...]:
        # Earliest possible end: the pause already under way, else the next
        # frame's pause or finish(n > cur); min_speech can no longer drop it.
        if (self._temp_end or cur + 1) - self._start > self._min_speech:
            return (self._emit_start(i),)
        return _NO_EVENTS

    def _emit_start(self, i: int) -> SpeechEvent:
        self._started = True
        self._last_start = max(int(max(0, self._start - self._pad)), self._last_end)
        return SpeechEvent(EventKind.START, self._last_start, i)

    def _close(self, i: int, end: int) -> tuple[SpeechEvent, ...]:
        head = _NO_EVENTS if self._started else (self._emit_start(i),)
        self._started = False
        self._last_end = max(end, self._last_start)
        return head + (SpeechEvent(EventKind.END, self._last_end, i),)

    def _cut(self, i: int, cur: int) -> tuple[SpeechEvent, ...]:
        # max_speech exceeded: upstream appends this segment whatever its length.
        if self._best_dur:
            end, dur = self._best_end, self._best_dur
            # Upstream's test reads `next_start < prev_end + cur_sample`: always
            # true in practice, but replicated rather than assumed.
            resumes = dur < cur
            pad = dur // 2 if resumes and dur < 2 * self._pad else self._pad
            events = self._close(i, int(end + pad))
            self._triggered, self._start = resumes, end + dur
        else:
            # Speech usually resumes on the next frame, where offline would
            # split the one-frame gap in half.
            events = self._close(i, int(cur + min(self._pad, self.frame_size // 2)))
            self._triggered = False
        self._temp_end = self._best_dur = 0
        return events
