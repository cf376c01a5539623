"""A worker's queue of frames: taken from its input ring, batched, answered, released.

Frames wait in arrival order; a batch takes each stream's oldest (one frame per stream:
frame k+1 needs k's state). Ring space goes back only for records whose every frame got its
state committed (``finish``), which is what lets a replacement worker re-read what a crashed
one left unfinished (engine/worker.py). The loops are compiled (engine/worker_kernels.py);
this class owns their arrays and says what each step means.
"""

from __future__ import annotations

import numpy as np

from engine import worker_kernels as K
from engine.models.base import StreamingModel
from engine.stats import BUCKETS_US
from transport import records
from transport.doorbell import Doorbell
from transport.ring import Ring, ring_bytes
from transport.shm import Segment


def model_input_samples(model: StreamingModel, rate: int) -> int:
    return model.context_samples(rate) + model.frame_samples(rate)


class FrameQueue:
    def __init__(self, ring: Ring, states: np.ndarray, done: np.ndarray, max_batch: int,
                 model: StreamingModel) -> None:
        self.ring = ring  # the input ring, whose consumer this queue is
        self._w32 = np.frombuffer(ring.data, np.uint32)
        self._w64 = np.frombuffer(ring.data, np.int64)
        self._f32 = np.frombuffer(ring.data, np.float32)
        self.states = states
        self._done = done.view(np.int64)  # u64 mixed with i64 would make numba compute in floats
        self.max_batch = max_batch
        self._rates = np.array(model.sample_rates, np.int64)
        self._frame_ns = np.array([1_000_000_000 * model.frame_samples(rate) // rate for rate in model.sample_rates],
                                  np.int64)
        # Sized so that everything the ring can hold fits: a frame takes at least its meta
        # and the smallest model input, a record at least that and its header.
        frame_bytes = records.FRAME_META.itemsize + 4 * min(model_input_samples(model, r) for r in model.sample_rates)
        self._pending = np.zeros((ring.capacity // frame_bytes + 1, K.PENDING_COLUMNS), np.int64)
        self._recs = np.zeros((ring.capacity // (8 + records.FRAMES_HEADER.size + frame_bytes) + 1,
                               K.RECORD_COLUMNS), np.int64)
        self._st = np.zeros(K.COUNTERS, np.int64)
        slots = len(done)
        self._queued = np.zeros(slots, np.int64)
        self._since = np.zeros(slots, np.int64)
        self._stamp = np.zeros(slots, np.int64)
        self._seen = np.full(slots, -1, np.int64)
        self.run = np.zeros((max_batch, K.PENDING_COLUMNS), np.int64)
        self.stale = np.zeros((max_batch, K.PENDING_COLUMNS), np.int64)

    def take(self) -> int:
        """Queue the records waiting in the ring, read in place; returns the frames skipped as
        already committed (a replay after a crash). A record left with nothing to run is
        released with the ones before it."""
        ring, replayed = self.ring, 0
        while (span := ring.next_record_span()) is not None:
            body, _, end = span
            skipped = K.take_record(self._w32, self._w64, body, end, self._done, self._rates, self._frame_ns,
                                    self._st, self._pending, self._recs, self._queued, self._since, self._seen)
            if skipped < 0:  # the tables hold all the ring can, so this cannot be; if it were, later
                break
            ring.cursor = end
            replayed += skipped
        if replayed:
            self._release(K.released(self._recs, self._st))
        return replayed

    @property
    def frames(self) -> int:
        return int(self._st[K.N_PENDING])

    @property
    def streams(self) -> int:
        """Streams with a frame queued: the most a batch could hold now."""
        return int(self._st[K.QUEUED_SLOTS])

    def oldest_enqueued_ns(self) -> int:
        return int(self._recs[self._pending[0, K.REC] % len(self._recs), K.ENQ])

    def pick(self, now_ns: int) -> tuple[int, int, int]:
        """The next batch into ``run`` and ``stale`` (frames past their shed time); returns
        (frames to run, frames to shed, their sample rate)."""
        n_run, n_stale, rate = K.pick(self._st, self._pending, self._recs, self._queued, self._since, self._stamp,
                                      self.max_batch, now_ns, self.run, self.stale)
        return n_run, n_stale, rate

    def gather(self, n: int, width: int, started_ns: int,
               queue_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """The first ``n`` of ``run``: (model inputs, states, microseconds they queued in all);
        each one's wait counted in ``queue_hist`` (engine/stats.py's buckets)."""
        audio = np.empty((n, width), np.float32)
        state = np.empty((n, self.states.shape[2]), np.float32)
        queued_us = K.gather(self._f32, self.run, self.states, self._done, self._recs, started_ns, audio, state,
                             BUCKETS_US, queue_hist.view(np.int64))
        return audio, state, queued_us

    def put_results(self, new_state: np.ndarray, probs: np.ndarray, out: np.ndarray) -> None:
        """The run frames' new states and results (``out``: a RESULTS record's items)."""
        K.put_results(self.run, self.states, self._done, np.ascontiguousarray(new_state, np.float32),
                      np.ascontiguousarray(probs, np.float32), out)

    def put_shed(self, out: np.ndarray) -> None:
        """The stale frames' states carried over unchanged, their results NaN."""
        K.put_shed(self.stale, self.states, self._done, out)

    def finish(self, rows: np.ndarray) -> None:
        """After the results of ``rows`` are published: their states are committed, and the
        ring space of every record whose frames all are is released."""
        self._release(K.finish(rows, self._done, self._recs, self._st))

    def _release(self, position: int) -> None:
        if position >= 0:
            self.ring.release(position)

    def window(self) -> tuple[int, int]:
        """(frames queued, streams they came from) since the last call."""
        st = self._st
        frames, streams = int(st[K.WINDOW_FRAMES]), int(st[K.WINDOW_SLOTS])
        st[K.WINDOW_FRAMES] = st[K.WINDOW_SLOTS] = 0
        st[K.WINDOW_ID] += 1
        return frames, streams


def warm_up(model: StreamingModel) -> None:
    """Compile (or load from numba's cache) the queue's loops before the worker says it is
    ready: one FRAMES record per sample rate through a scratch ring, one frame run and one
    shed, with the same array types as the real ring and state table."""
    rates = model.sample_rates
    segment = Segment.private(ring_bytes(1 << 16))
    ring = Ring(segment, Doorbell(), 0, 1 << 16)
    for slot, rate in enumerate(rates):
        width = model_input_samples(model, rate)
        view = ring.reserve(records.frames_record_bytes(1, width))
        assert view is not None
        records.FRAMES_HEADER.pack_into(view, 0, records.KIND_FRAMES, 1, width, rate, 0, 1)
        meta, _ = records.frames_views(view, 1, width)
        meta[0] = (0, slot, records.FLAG_FRESH)
        del meta, view
        ring.commit()
    states = np.zeros((len(rates), 2, model.state_floats), np.float32)
    queue = FrameQueue(ring, states, np.zeros(len(rates), np.uint64), 4, model)
    queue.take()
    out = np.zeros(1, records.RESULT)
    n_run, _, rate = queue.pick(0)  # not yet due: run
    hist = np.zeros(len(BUCKETS_US) + 1, np.uint64)
    audio, state, _ = queue.gather(n_run, model_input_samples(model, rate), 0, hist)
    queue.put_results(state, audio[:, 0], out)
    queue.finish(queue.run[:n_run])
    _, n_stale, _ = queue.pick(K.NEVER)  # overdue: shed
    queue.put_shed(out[:n_stale])
    queue.finish(queue.stale[:n_stale])
    queue.window()
    del queue  # its views of the ring, before the ring and segment let go of the memory
    ring.close()
    ring.doorbell.close()
    segment.close()
