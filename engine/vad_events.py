"""Streaming speech segmentation: per-frame Silero probabilities -> start/end events.

Replays silero-vad's offline get_speech_timestamps_from_probs (6.2.3, with
use_max_poss_sil_at_max_speech=True, min_silence_at_max_speech=98) one frame
at a time. The raw segmentation (threshold/neg_threshold hysteresis,
min_silence, min_speech, max_speech cuts at the longest pause) is identical;
only the padding, which offline applies to the finished list, must be decided
as events go out. Offsets count from the stream start (or reset()/finish());
frame k holds samples [k*W, (k+1)*W), W = 512 at 16 kHz, 256 at 8 kHz;
finish(n) expects n > (frames pushed - 1) * W, as offline has.

When events go out:
  * START once min_speech can no longer drop the segment: at the first frame
    where (pause start if in a pause, else cur_sample + 1) - start >
    min_speech: min_speech_duration_ms after the onset, at once if it is 0.
  * END when the pause reaches min_silence_duration_ms, or at the frame that
    exceeds max_speech_duration_s (a frame later for a cut without a pause,
    see 3); the restarted segment's START follows once it is certain.
  * finish(n) closes an open segment at n, as offline does at end of audio.
    Segments dropped by min_speech produce no events.

Differences from offline get_speech_timestamps (same probabilities and params):
  1. Offline gives each neighbour half of a gap shorter than 2*speech_pad.
     Here the first END already went out as raw end + speech_pad, so the next
     START is max(raw start - speech_pad, that END): the segments touch and
     never overlap, and the earlier one keeps its whole pad. Between segments
     split by a pause this needs 2*speech_pad_ms > min_silence_duration_ms +
     one frame, so never with min_silence >= 2*speech_pad (as the defaults).
  2. A max_speech cut at a pause knows both sides and halves a short gap like
     offline, except when the restarted segment is later dropped by
     min_speech: offline then pads against the next surviving segment.
  3. A max_speech cut with no pause >= 98 ms, at frame sample c, sends its END
     one frame later, once it is known whether speech restarts at once:
     c + min(speech_pad, W/2) if it does, else c + min(speech_pad, W).
     Offline agrees whenever speech_pad <= W (32 ms; the default is 30),
     except, for speech_pad > W/2, if min_speech drops the restarted segment.
  4. Offline clamps the last END to the audio length. An END sent at the end
     of a pause cannot be, so it lies past the final sample if the stream
     stops less than speech_pad after the speech did (this needs
     speech_pad_ms > min_silence_duration_ms).
  5. An END is never before its START. If 1 pushes a short segment's START
     past its own padded end, it becomes empty ([x, x] at the previous END)
     where offline has a halved gap; the segment count stays the same.
"""
from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

_FRAME_SIZES = {16000: 512, 8000: 256}
_MIN_SILENCE_AT_MAX_SPEECH_MS = 98  # upstream default; not a knob here
_NO_EVENTS: tuple[SpeechEvent, ...] = ()  # shared: the hot path allocates nothing
_FOREVER = 1 << 62
_NEVER_QUIET = (math.inf, math.inf, 0)


def _check(key: str, value: object, ok: Callable[[float], bool], allowed: str,
           allow_inf: bool = False) -> float:
    # bool is an int subclass (True would mean 1) and NaN fails every range
    # test silently, so both are rejected before the range is checked.
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value)
            or (math.isinf(value) and not allow_inf) or not ok(float(value))):
        raise ValueError(f"{key} must be {allowed}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class VadParams:
    threshold: float = 0.5
    neg_threshold: float | None = None  # None -> max(threshold - 0.15, 0.01)
    min_silence_duration_ms: float = 100
    speech_pad_ms: float = 30
    min_speech_duration_ms: float = 250
    max_speech_duration_s: float = math.inf

    def __post_init__(self) -> None:
        thr = _check("threshold", self.threshold, lambda v: 0 < v < 1, "in (0, 1)")
        clean = {"threshold": thr}
        if self.neg_threshold is not None:
            clean["neg_threshold"] = _check("neg_threshold", self.neg_threshold,
                                            lambda v: 0 < v <= thr, f"None or in (0, threshold={thr}]")
        for key in ("min_silence_duration_ms", "speech_pad_ms", "min_speech_duration_ms"):
            clean[key] = _check(key, getattr(self, key), lambda v: v >= 0, "a finite number >= 0")
        clean["max_speech_duration_s"] = _check("max_speech_duration_s", self.max_speech_duration_s,
                                                lambda v: v > 0, "> 0 (inf = no limit)", allow_inf=True)
        for key, value in clean.items():  # plain floats, not numpy scalars: to_dict() stays JSON-safe
            object.__setattr__(self, key, value)

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> VadParams:
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                raise ValueError(f"unknown VAD parameter {key!r}; known: {', '.join(known)}")
        changes: dict[str, Any] = dict(values)  # __post_init__ checks each value
        if "max_speech_duration_s" in changes and changes["max_speech_duration_s"] is None:
            changes["max_speech_duration_s"] = math.inf  # to_dict() writes None: JSON has no inf
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
    __slots__ = ("_best_dur", "_best_end", "_frame", "_last_end", "_last_start", "_max_speech",
                 "_min_sil_max", "_min_silence", "_min_speech", "_neg", "_pad", "_pending", "_start",
                 "_started", "_temp_end", "_thr", "_triggered", "frame_size", "params", "sample_rate")

    def __init__(self, params: VadParams, sample_rate: int) -> None:
        if sample_rate not in _FRAME_SIZES:
            raise ValueError(f"sample_rate must be one of {sorted(_FRAME_SIZES)}, got {sample_rate!r}")
        self.params, self.sample_rate = params, sample_rate
        self.frame_size = w = _FRAME_SIZES[sample_rate]
        sr = sample_rate
        # Upstream's own float expressions, so every comparison rounds the same way.
        self._thr, self._neg = params.threshold, params.effective_neg_threshold
        self._min_speech = sr * params.min_speech_duration_ms / 1000
        self._pad = sr * params.speech_pad_ms / 1000
        self._max_speech = sr * params.max_speech_duration_s - w - 2 * self._pad
        self._min_silence = sr * params.min_silence_duration_ms / 1000
        self._min_sil_max = sr * _MIN_SILENCE_AT_MAX_SPEECH_MS / 1000
        self.reset()

    def reset(self) -> None:
        self._frame = self._start = self._temp_end = self._best_end = self._best_dur = 0
        self._last_start = self._last_end = 0
        self._pending = -1  # sample of a pause-less max_speech cut whose END waits a frame
        self._triggered = self._started = False

    @property
    def in_speech(self) -> bool:
        return self._started

    def quiet(self) -> tuple[float, float, int]:
        """Which next frames would change nothing but the frame count: those with a
        probability in [lo, hi) and a frame index below ``until``. A caller may skip pushing
        them (engine/lane.py does, for most frames) and seek() to the next frame it pushes."""
        if self._pending >= 0 or (self._triggered and (not self._started or self._temp_end)):
            return _NEVER_QUIET
        if not self._triggered:  # silence: nothing happens below the threshold
            return -math.inf, self._thr, _FOREVER
        # Speech under way with no pause: nothing happens at or above neg_threshold until the
        # frame whose sample passes max_speech (push's `cur - self._start > self._max_speech`).
        if math.isinf(self._max_speech):
            return self._neg, math.inf, _FOREVER
        w, start, longest = self.frame_size, self._start, self._max_speech
        until = max(0, math.floor((start + longest) / w))  # a guess, made exact below
        while not until * w - start > longest:
            until += 1
        while until > 0 and (until - 1) * w - start > longest:
            until -= 1
        return self._neg, math.inf, until

    def seek(self, frame: int) -> None:
        """The next push() is frame ``frame``: every frame skipped since the last push was
        quiet() (checked by the caller, not here)."""
        self._frame = frame

    def push(self, probability: float) -> tuple[SpeechEvent, ...]:
        i = self._frame
        self._frame = i + 1
        cur = i * self.frame_size
        speech = probability >= self._thr
        events = _NO_EVENTS if self._pending < 0 else self._end_cut(i, speech)
        if speech and self._temp_end:
            sil = cur - self._temp_end
            # Upstream keeps every pause and takes max() at the cut (first one
            # wins ties); keeping only the longest gives the same answer in O(1).
            if sil > self._min_sil_max and sil > self._best_dur:
                self._best_end, self._best_dur = self._temp_end, sil
            self._temp_end = 0
        if not self._triggered:
            if not speech:
                return events
            self._triggered, self._start = True, cur
            return events + self._start_if_certain(i, cur)
        if cur - self._start > self._max_speech:
            events += self._cut(i, cur)
            if not self._triggered:
                return events
        if probability < self._neg:
            if not self._temp_end:
                self._temp_end = cur
            if cur - self._temp_end >= self._min_silence:
                end = self._temp_end
                if self._started or end - self._start > self._min_speech:
                    events += self._close(i, int(end + self._pad))
                self._triggered = False
                self._temp_end = self._best_dur = 0
                return events
        return events if self._started else events + self._start_if_certain(i, cur)

    def finish(self, audio_length_samples: int) -> tuple[SpeechEvent, ...]:
        n, i = audio_length_samples, self._frame - 1
        if n < 0:
            raise ValueError(f"audio_length_samples must be >= 0, got {n}")
        events = _NO_EVENTS
        if self._pending >= 0:  # nothing follows the cut: plain pad, clamped like offline
            events = self._close(i, int(min(n, self._pending + self._pad)))
        elif self._triggered and (self._started or n - self._start > self._min_speech):
            events = self._close(i, n)  # offline ends it at n; min(n, n + pad) == n
        self.reset()
        return events

    def _start_if_certain(self, i: int, cur: int) -> tuple[SpeechEvent, ...]:
        # Earliest possible end: the pause under way, else the next frame's
        # pause or finish(n > cur). Past min_speech from there, it stays.
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
        # max_speech exceeded: offline keeps this segment whatever its length.
        self._temp_end = 0
        if not self._best_dur:  # no pause to cut at: cut here, END waits a frame
            self._pending, self._triggered = cur, False
            return _NO_EVENTS if self._started else (self._emit_start(i),)
        end, dur = self._best_end, self._best_dur
        self._best_dur = 0
        # Upstream restarts iff `next_start < prev_end + cur_sample`, i.e.
        # dur < cur: always in practice, but replicated rather than assumed.
        restarts = dur < cur
        events = self._close(i, end + dur // 2 if restarts and dur < 2 * self._pad
                             else int(end + self._pad))
        self._triggered, self._start = restarts, end + dur
        return events

    def _end_cut(self, i: int, speech: bool) -> tuple[SpeechEvent, ...]:
        # Offline halves the gap to the next segment if it is under 2*pad: a
        # one-frame gap if speech restarts now, else at least two frames.
        cut, self._pending = self._pending, -1
        w = self.frame_size
        return self._close(i, cut + w // 2 if speech and w < 2 * self._pad
                           else int(cut + min(self._pad, w)))
