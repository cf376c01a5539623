"""Per-stream bookkeeping in the front-end: framing on the way in, ordering on the way out.

A stream's LSTM state lives in shared memory (engine/layout.py); everything here is
bookkeeping only the front-end touches, so none of it needs locks or must survive a worker.
"""

from __future__ import annotations

import array
import collections
import functools
from dataclasses import dataclass, field

import numpy as np

from engine.vad_events import SpeechEvent, SpeechSegmenter

_INT16_SCALE = np.float32(1.0 / 32768.0)  # a power of two: identical to "/ 32768.0"
# A message read within this long of the front-end finding its socket empty waited at most
# this long: its read time is its arrival time (see StreamTable.arrival).
FRESH_NS = 20_000_000


@dataclass(slots=True)
class PendingChunk:
    """A client request whose reply waits for every frame up to ``end_seq``."""

    chunk_seq: int
    request_id: int
    end_seq: int
    first_frame: int = -1
    probs: array.array = field(default_factory=functools.partial(array.array, "f"))
    events: list[tuple[int, int, int]] = field(default_factory=list)
    kind: str = "audio"  # "audio" | "reset" | "close"
    shed: int = 0  # frames of this chunk shed under overload (NaN probability)
    shed_at_intake: int = 0  # of those, frames the front-end shed without sending them to a worker
    arrived: float = 0.0  # time.monotonic() when the request arrived (estimated, see StreamTable.arrival)
    # Its one frame holds a seq but was shed at intake in the lane (engine/lane.py) and never sent
    # to a worker: no result comes for it; it is answered, shed, once the frames before it are.
    unsent: bool = False


class Stream:
    __slots__ = ("identity", "stream_id", "slot", "worker", "rate", "frame", "context", "dtype",
                 "buf", "buf_len", "next_seq", "expected_seq", "frame_base", "fresh", "segmenter",
                 "samples_in", "samples_out", "chunks", "closing", "last_active", "shed_after_ms",
                 "ns_per_sample", "audio_ns", "clock_ns", "row")

    def __init__(self, identity: bytes, stream_id: int, slot: int, worker: int, rate: int,
                 frame: int, context: int, dtype: int, segmenter: SpeechSegmenter, first_seq: int,
                 now: float, row: np.ndarray) -> None:
        self.identity = identity
        self.stream_id = stream_id
        self.slot = slot
        self.worker = worker
        self.rate = rate
        self.frame = frame
        self.context = context
        self.dtype = dtype
        # The buffer is the slot's row of the table's sample matrix (so frame sets can gather
        # and scatter every stream's context at once, engine/frame_sets.py) until a chunk
        # needs more room; then a private array, until the frame-set path moves it back.
        self.row = row
        self.buf = row
        row[:context] = 0.0
        self.buf_len = context  # the first `context` samples are history (zeros at start)
        self.next_seq = first_seq  # seq of the next frame sent to the worker
        self.expected_seq = first_seq  # seq of the next result the front-end waits for
        self.frame_base = first_seq  # seq of frame 0 (moves on reset)
        self.fresh = True
        self.segmenter = segmenter
        self.samples_in = 0  # samples received since open/reset (input side)
        self.samples_out = 0  # samples covered by results delivered since open/reset
        self.chunks: collections.deque[PendingChunk] = collections.deque()
        self.closing = False
        self.last_active = now
        self.shed_after_ms = 0  # overload deadline for this stream's frames; 0: never shed
        self.ns_per_sample = 1_000_000_000 // rate
        self.audio_ns = 0  # audio received since open, as a duration (reset does not rewind it)
        self.clock_ns = int(now * 1e9)  # when a real-time sender started: audio at t sent at clock_ns + t

    @property
    def in_flight(self) -> int:
        return self.next_seq - self.expected_seq

    def append(self, samples: np.ndarray) -> int:
        """Add PCM (int16 or float32, already validated); returns how many frames are complete."""
        n = len(samples)
        need = self.buf_len + n
        if need > len(self.buf):
            grown = np.empty(max(need, 2 * len(self.buf)), np.float32)
            grown[:self.buf_len] = self.buf[:self.buf_len]
            self.buf = grown
        dest = self.buf[self.buf_len:need]
        if samples.dtype.kind == "i":
            np.multiply(samples, _INT16_SCALE, out=dest)
        else:
            dest[:] = samples
        self.buf_len = need
        self.samples_in += n
        return (self.buf_len - self.context) // self.frame

    def pad_final(self) -> int:
        """Zero-pad a trailing partial frame (as OnnxWrapper.audio_forward does); frames added."""
        partial = (self.buf_len - self.context) % self.frame
        if partial == 0:
            return 0
        self.append(np.zeros(self.frame - partial, np.float32))
        self.samples_in -= self.frame - partial  # padding is not audio the client sent
        return 1

    def take_frames(self, count: int, out: np.ndarray) -> None:
        """Copy ``count`` model inputs (context + frame each) into ``out`` and keep the rest."""
        width = self.context + self.frame
        if count == 1:
            out[:] = self.buf[:width]
        else:  # overlapping windows: frame i starts `frame` samples after frame i-1
            out[:] = np.ndarray((count, width), np.float32, self.buf, 0, (self.frame * 4, 4))
        self.drop_frames(count)

    def drop_frames(self, count: int) -> None:
        """Consume ``count`` complete frames without running them (shed at intake)."""
        used = count * self.frame
        keep = self.buf_len - used
        self.buf[:keep] = self.buf[used:self.buf_len]
        self.buf_len = keep

    def discard_pending(self) -> None:
        """Reset: forget buffered samples and history; the next frame starts from zero state."""
        self.buf[:self.context] = 0.0
        self.buf_len = self.context
        self.fresh = True
        self.samples_in = 0

    def on_result(self, prob: float) -> list[SpeechEvent] | tuple[SpeechEvent, ...]:
        """Account one in-order result; returns the speech events it produced."""
        chunk = self.chunks[0]
        if chunk.first_frame < 0:
            chunk.first_frame = self.expected_seq - self.frame_base
        chunk.probs.append(prob)
        self.expected_seq += 1
        self.samples_out += self.frame
        return self.segmenter.push(prob)
