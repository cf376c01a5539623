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

import numpy as np

from engine import vad_kernels as K

_FRAME_SIZES = {16000: 512, 8000: 256}
_MIN_SILENCE_AT_MAX_SPEECH_MS = 98  # upstream default; not a knob here
_NO_EVENTS: tuple[SpeechEvent, ...] = ()  # shared: the hot path allocates nothing


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
    """One stream's machine: its state and limits are rows of arrays (engine/vad_kernels.py),
    its own or, for the engine's streams, the stream table's (``state``, ``limits``)."""

    __slots__ = ("_events", "_limits", "_state", "frame_size", "params", "sample_rate")

    def __init__(self, params: VadParams, sample_rate: int, state: np.ndarray | None = None,
                 limits: np.ndarray | None = None) -> None:
        if sample_rate not in _FRAME_SIZES:
            raise ValueError(f"sample_rate must be one of {sorted(_FRAME_SIZES)}, got {sample_rate!r}")
        self.params, self.sample_rate = params, sample_rate
        self.frame_size = w = _FRAME_SIZES[sample_rate]
        self._state = np.zeros(K.N_STATE, np.int64) if state is None else state
        self._limits = np.zeros(K.N_LIMITS, np.float64) if limits is None else limits
        self._events = np.zeros((K.MAX_EVENTS, 3), np.int64)
        sr, lim = sample_rate, self._limits
        # Upstream's own float expressions, so every comparison rounds the same way.
        lim[K.THR], lim[K.NEG] = params.threshold, params.effective_neg_threshold
        lim[K.MIN_SPEECH] = sr * params.min_speech_duration_ms / 1000
        lim[K.PAD] = pad = sr * params.speech_pad_ms / 1000
        lim[K.MAX_SPEECH] = sr * params.max_speech_duration_s - w - 2 * pad
        lim[K.MIN_SILENCE] = sr * params.min_silence_duration_ms / 1000
        lim[K.MIN_SIL_MAX] = sr * _MIN_SILENCE_AT_MAX_SPEECH_MS / 1000
        lim[K.WIDTH] = w
        self.reset()

    def reset(self) -> None:
        K.reset(self._state)

    @property
    def in_speech(self) -> bool:
        return bool(self._state[K.STARTED])

    @property
    def unconfirmed_onset(self) -> int | None:
        """The sample where speech began if its START has not gone out yet (min_speech may
        still drop it), else None: a client keeping audio for utterances keeps it from there."""
        st = self._state
        return int(st[K.START]) if st[K.TRIGGERED] and not st[K.STARTED] else None

    def quiet(self) -> tuple[float, float, int]:
        """Which next frames would change nothing but the frame count: those with a
        probability in [lo, hi) and a frame index below ``until``. A caller may skip pushing
        them (engine/lane.py does, for most frames) and seek() to the next frame it pushes."""
        lo, hi, until = K.quiet(self._state, self._limits)
        return lo, hi, until

    def seek(self, frame: int) -> None:
        """The next push() is frame ``frame``: every frame skipped since the last push was
        quiet() (checked by the caller, not here)."""
        self._state[K.FRAME] = frame

    def push(self, probability: float) -> tuple[SpeechEvent, ...]:
        return self._wrap(K.push(self._state, self._limits, probability, self._events))

    def finish(self, audio_length_samples: int) -> tuple[SpeechEvent, ...]:
        if audio_length_samples < 0:
            raise ValueError(f"audio_length_samples must be >= 0, got {audio_length_samples}")
        return self._wrap(K.finish(self._state, self._limits, audio_length_samples, self._events))

    def _wrap(self, n: int) -> tuple[SpeechEvent, ...]:
        if not n:
            return _NO_EVENTS
        return tuple(SpeechEvent(EventKind(kind), sample, frame) for kind, sample, frame in self._events[:n].tolist())
