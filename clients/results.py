"""What the clients hand to the application: results, events, utterances, resets.

Offsets and times
=================

``sample`` offsets count samples of the stream's *epoch*: from the stream's open, or
from its last reset (``stream.reset()``, or the client reopening it after a daemon
restart or an idle expiry, see :class:`StreamReset`). ``frame`` k covers epoch samples
``[k*W, (k+1)*W)`` with W = ``frame_samples`` (512 at 16 kHz, 256 at 8 kHz).

``base_sample`` is how many samples the application had submitted to the stream before
the epoch began (0 in the first epoch), so ``stream_sample = base_sample + sample`` is
an offset into everything the application ever sent on that stream object, across
resets; ``stream_seconds`` is the same in seconds.

``received_at`` is the wall-clock time (``time.time()``) at which the result carrying
the item arrived at the client; ``seconds`` is the audio-time offset within the epoch.
For a live source the wall-clock time of the audio itself is about
``received_at - latency``, less the capture delay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Event:
    """A speech ``start`` or ``end``; ``sample`` already includes speech_pad_ms."""

    kind: str  # "start" | "end"
    sample: int  # padded offset in samples from the start of the epoch
    frame: int  # the frame whose result produced the event
    sample_rate: int
    stream_id: int = field(default=0, compare=False)
    received_at: float = field(default=0.0, compare=False)  # time.time() when it arrived
    epoch: int = 0
    base_sample: int = 0  # samples submitted to the stream before this epoch

    @property
    def seconds(self) -> float:
        """Audio time of the event within its epoch."""
        return self.sample / self.sample_rate

    @property
    def stream_sample(self) -> int:
        """Offset into all the audio submitted to the stream, across resets."""
        return self.base_sample + self.sample

    @property
    def stream_seconds(self) -> float:
        return self.stream_sample / self.sample_rate


@dataclass(frozen=True, slots=True)
class Result:
    """One frame's speech probability (NaN when the engine shed the frame under overload)."""

    frame: int
    probability: float
    events: tuple[Event, ...] = ()
    received_at: float = field(default=0.0, compare=False)  # time.time() when it arrived
    latency: float = field(default=0.0, compare=False)  # s from sending the chunk that completed it
    epoch: int = 0

    @property
    def shed(self) -> bool:
        return self.probability != self.probability


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream's engine state was reset: offsets start at 0 again.

    ``reason``: ``"reset"`` (the application called ``reset()``), ``"reconnect"`` (the
    client lost the daemon, reconnected and reopened the stream with the same
    parameters) or ``"expired"`` (the engine closed the idle stream and the client
    reopened it when audio came again).

    From this point on, ``sample`` 0 is the first sample of the first chunk submitted
    after the reset; ``base_sample`` is the number of samples the application had
    submitted before it, so ``stream_sample`` offsets continue across the reset.
    ``lost_samples`` / ``lost_chunks`` count audio submitted before the reset whose
    results never came (its chunks raised :class:`~clients.errors.StreamResetError`);
    that audio was not analysed, and an utterance that was open is dropped.
    """

    stream_id: int
    reason: str
    epoch: int
    base_sample: int
    lost_samples: int = 0
    lost_chunks: int = 0
    received_at: float = field(default=0.0, compare=False)

    kind = "reset"  # so that an event loop can switch on .kind for Event and StreamReset alike


@dataclass(frozen=True, eq=False)
class Utterance:
    """One speech segment with its audio: samples ``[start.sample, end.sample)`` of the epoch.

    ``audio`` has the stream's dtype (int16 or float32) and is exactly what was sent.
    ``truncated`` is True when part of that span is missing: the stream was closed before
    the END's padding was sent (the audio then stops at the last sample sent), or the
    client's keep window had already dropped the start (see clients/utterances.py).
    """

    stream_id: int
    start: Event
    end: Event
    audio: np.ndarray
    sample_rate: int
    truncated: bool = False

    @property
    def start_sample(self) -> int:
        return self.start.sample

    @property
    def end_sample(self) -> int:
        return self.end.sample

    @property
    def duration(self) -> float:
        return (self.end.sample - self.start.sample) / self.sample_rate
