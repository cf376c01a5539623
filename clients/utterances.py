"""Utterance audio with bounded memory: keep only what a current or future event can need.

A stream opened with ``keep_audio=True`` keeps the samples it sends; at each ``end``
event it hands the application the utterance: samples ``[start.sample, end.sample)``,
the padded span the engine's events name. Everything older than the first sample that
any current or future utterance can start at is dropped as soon as results show it.

What can still be needed (engine/vad_events.py)
===============================================

Let W be the frame size, p = speech_pad_ms * sr / 1000, ``P`` the samples the results
received so far cover (frames * W) and ``last_end`` the last END's sample. An engine
START for a segment whose first speech frame starts at sample ``s`` has the sample
``max(int(max(0, s - p)), last_end)``, and goes out once min_speech can no longer drop
the segment. So the client keeps from ``keep_from``, the smallest of

* the START sample of the utterance under way (START received, END not yet), and of an
  utterance whose END waits for padding not yet sent (only when
  speech_pad_ms > min_silence_duration_ms + one frame);
* the earliest START a *future* event can carry:
  ``max(int(max(0, s - p)), last_end)`` where ``s`` is the onset of the segment the
  engine is weighing (a frame >= threshold whose START min_speech has not yet
  confirmed or dropped), or ``s = P`` (the next frame) when there is none.

To know ``s`` the client replays the engine's segmenter on the probabilities it
receives (``SpeechSegmenter`` with the parameters from the OPENED reply) and checks
that it emits exactly the engine's events; if it ever does not (a different engine
version), it logs a warning and falls back to the nominal window, assuming
``s >= P - W - min_speech``, which a pending onset with a hovering pause (see below) can
break (its utterance is then delivered with ``truncated=True``).

The bound
=========

A chunk's audio enters the keeper when its result arrives (so a chunk the engine refused
never shifts the offsets); until then it is held by the chunk in flight, at most
``window`` chunks per stream. In the keeper, ``sent`` (samples appended) exceeds ``P`` by
less than a frame, the partial frame the engine buffers. ``kept_samples - (sent - P)``,
the look-back, never exceeds:

* ``p + 1`` when no segment is open or pending (silence);
* ``p + min_speech + W`` while an onset waits for min_speech without a pause
  (START goes out at the first frame where ``cur + 1 - s > min_speech``);
* while an utterance is open, or a pending onset is in a pause whose probabilities
  stay between neg_threshold and threshold (such a pause never ends the segment and
  ``s`` stays put: the engine's START may then lie arbitrarily far back, exactly as
  offline get_speech_timestamps would place it), the length of that segment so far
  plus p + 1. With ``max_speech_duration_s`` = M s finite the engine cuts every segment
  once ``cur - s > M*sr - W - 2p``, so at most ``M*sr + W - p + 1``:
  :meth:`UtteranceKeeper.lookback_bound` returns ``max(p + 1, p + min_speech + W,
  M*sr + W - p + 1)``. Without max_speech_duration_s, memory follows the longest
  utterance: set it for a hard bound.

One exception: when speech_pad_ms > min_silence_duration_ms + one frame, an END can point
past the audio sent so far; the utterance (and its audio) then waits until that much has
been sent, or is delivered ``truncated`` at close.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from clients.results import Event, Utterance

log = logging.getLogger("ringserve.client")


class UtteranceKeeper:
    """The audio of one stream's epoch, trimmed to what utterances can still need."""

    def __init__(self, stream_id: int, np_dtype: np.dtype[Any], sample_rate: int, frame: int,
                 vad: dict[str, Any]) -> None:
        self.stream_id = stream_id
        self.sample_rate = sample_rate
        self.frame = frame
        self.np_dtype = np_dtype
        self.vad = dict(vad)
        sr = sample_rate
        self.pad = sr * float(vad.get("speech_pad_ms") or 0) / 1000
        self.min_speech = sr * float(vad.get("min_speech_duration_ms") or 0) / 1000
        max_speech = vad.get("max_speech_duration_s")
        self.max_speech = math.inf if max_speech is None else sr * float(max_speech)
        self.mirror: Any = None
        self.mirror_ok = False
        self._make_mirror()
        self.buf = np.zeros(max(4 * frame, 1 << 14), np_dtype)
        self.lo = self.hi = 0  # kept samples are buf[lo:hi]
        self.first = 0  # epoch sample index of buf[lo]
        self.sent = 0  # epoch samples appended
        self.processed = 0  # epoch samples covered by results (frames * W)
        self.last_end = 0
        self.open: Event | None = None
        self.waiting: list[tuple[Event, Event]] = []
        self.max_lookback = 0  # high-water mark of kept_samples - (sent - processed)
        self.truncated = 0

    def _make_mirror(self) -> None:
        try:
            from engine.vad_events import SpeechSegmenter, VadParams

            self.mirror = SpeechSegmenter(VadParams.from_mapping(self.vad), self.sample_rate)
            self.mirror_ok = hasattr(self.mirror, "unconfirmed_onset")
        except Exception as exc:  # noqa: BLE001 - any failure means: no mirror, nominal window
            log.warning("stream %d: cannot replay the engine's segmenter (%s); utterances use the "
                        "nominal keep window", self.stream_id, exc)
            self.mirror, self.mirror_ok = None, False

    # ---- state ------------------------------------------------------------------------
    @property
    def kept_samples(self) -> int:
        return self.hi - self.lo

    def lookback_bound(self) -> float:
        """Documented bound on ``kept_samples - (sent - processed)`` (module docstring)."""
        quiet = max(self.pad + 1, self.pad + self.min_speech + self.frame)
        if math.isinf(self.max_speech):
            return math.inf
        return max(quiet, self.max_speech + self.frame - self.pad + 1)

    def reset(self) -> None:
        """A new epoch: offsets restart at 0; an open utterance is dropped."""
        self.lo = self.hi = self.first = self.sent = self.processed = self.last_end = 0
        self.open = None
        self.waiting.clear()
        self._make_mirror()

    # ---- input ------------------------------------------------------------------------
    def append(self, samples: np.ndarray) -> None:
        n = len(samples)
        if self.hi + n > len(self.buf):
            kept = self.hi - self.lo
            size = len(self.buf)
            while kept + n > size:
                size *= 2
            if size > 4 * max(kept + n, 1 << 14):  # shrink after a long utterance is gone
                size = max(2 * (kept + n), 1 << 14)
            if size != len(self.buf):
                grown = np.empty(size, self.np_dtype)
                grown[:kept] = self.buf[self.lo:self.hi]
                self.buf = grown
            else:
                self.buf[:kept] = self.buf[self.lo:self.hi]
            self.lo, self.hi = 0, kept
        self.buf[self.hi:self.hi + n] = samples
        self.hi += n
        self.sent += n

    def on_chunk(self, samples: np.ndarray | None, probs: np.ndarray, events: list[Event],
                 final: bool = False) -> list[Utterance]:
        """Account a result item: the chunk's audio (appended only now, once the engine has
        accepted it: a chunk the engine refused is never part of the epoch's offsets), its
        frames and events; returns the utterances now complete."""
        if samples is not None and len(samples):
            self.append(samples)
        if self.mirror is not None and self.mirror_ok:
            mine: list[tuple[int, int, int]] = []
            for p in probs.tolist():
                mine.extend((int(e.kind), e.sample, e.frame) for e in self.mirror.push(p))
            if final:
                mine.extend((int(e.kind), e.sample, e.frame) for e in self.mirror.finish(self.sent))
            theirs = [(1 if e.kind == "start" else 2, e.sample, e.frame) for e in events]
            if mine != theirs:
                log.warning("stream %d: the engine's events %s differ from the replayed segmenter's %s "
                            "(different engine version?); utterances now use the nominal keep window",
                            self.stream_id, theirs, mine)
                self.mirror_ok = False
        self.processed += len(probs) * self.frame
        for event in events:
            if event.kind == "start":
                self.open = event
            else:
                start = self.open if self.open is not None else event
                self.waiting.append((start, event))
                self.open = None
                self.last_end = event.sample
        out = self._deliver(final)
        if final:
            self.open = None
        self._trim()
        return out

    # ---- output -----------------------------------------------------------------------
    def _deliver(self, final: bool) -> list[Utterance]:
        out = []
        while self.waiting and (final or self.waiting[0][1].sample <= self.sent):
            start, end = self.waiting.pop(0)
            lo, hi = max(start.sample, self.first), max(min(end.sample, self.sent), start.sample)
            truncated = lo > start.sample or hi < end.sample
            a = self.lo + lo - self.first
            audio = self.buf[a:a + max(0, hi - lo)].copy()
            if truncated:
                self.truncated += 1
            out.append(Utterance(self.stream_id, start, end, audio, self.sample_rate, truncated))
        return out

    def keep_from(self) -> int:
        """The first epoch sample any current or future utterance can need."""
        candidates = [self.waiting[0][0].sample] if self.waiting else []
        if self.open is not None:
            candidates.append(self.open.sample)
        m = self.mirror
        if m is not None and self.mirror_ok:
            onset = m.unconfirmed_onset
            if onset is None:
                onset = self.processed
            candidates.append(max(int(max(0, onset - self.pad)), self.last_end))
        else:
            nominal = self.processed - self.frame - self.min_speech - self.pad - 1
            candidates.append(max(int(max(0, nominal)), self.last_end))
        return min(min(candidates), self.sent)

    def _trim(self) -> None:
        keep = self.keep_from()
        if keep > self.first:
            drop = min(keep - self.first, self.hi - self.lo)
            self.lo += drop
            self.first += drop
        lookback = self.kept_samples - (self.sent - self.processed)
        if lookback > self.max_lookback:
            self.max_lookback = lookback
