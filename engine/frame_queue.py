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
from engine.stats import BUCKETS_US
from transport import records

_NEVER = 1 << 62  # the due time of a frame that may not be shed


class FrameQueue:
    def __init__(self, ring_data: memoryview, states: np.ndarray, done: np.ndarray, max_batch: int,
                 frame_ns_by_rate: dict[int, int], min_input_samples: int) -> None:
        capacity = len(ring_data)
        self._w32 = np.frombuffer(ring_data, np.uint32)
        self._w64 = np.frombuffer(ring_data, np.int64)
        self._f32 = np.frombuffer(ring_data, np.float32)
        self.states = states
        self._done = done.view(np.int64)  # u64 mixed with i64 would make numba compute in floats
        self.max_batch = max_batch
        self._rates = np.array(list(frame_ns_by_rate), np.int64)
        self._frame_ns = np.array(list(frame_ns_by_rate.values()), np.int64)
        # Sized so that everything the ring can hold fits: a frame takes at least its meta
        # and the smallest model input, a record at least that and its header.
        frame_bytes = records.FRAME_META.itemsize + 4 * min_input_samples
        self._pending = np.zeros((capacity // frame_bytes + 1, K.PENDING_COLUMNS), np.int64)
        self._recs = np.zeros((capacity // (8 + records.FRAMES_HEADER.size + frame_bytes) + 1, K.RECORD_COLUMNS),
                              np.int64)
        self._st = np.zeros(K.COUNTERS, np.int64)
        slots = len(done)
        self._queued = np.zeros(slots, np.int64)
        self._since = np.zeros(slots, np.int64)
        self._stamp = np.zeros(slots, np.int64)
        self._seen = np.full(slots, -1, np.int64)
        self.run = np.zeros((max_batch, K.PENDING_COLUMNS), np.int64)
        self.stale = np.zeros((max_batch, K.PENDING_COLUMNS), np.int64)

    def take(self, cursor: int, head: int) -> tuple[int, int, int]:
        """Queue the records between the ring positions ``cursor`` and ``head``. Returns (the
        cursor after them, frames skipped as already committed, ring position now free or -1)."""
        cursor, replayed = K.take_records(self._w32, self._w64, cursor, head, self._done, self._rates,
                                          self._frame_ns, records.KIND_FRAME_SET, records.FLAG_FRESH, _NEVER,
                                          self._st, self._pending, self._recs, self._queued, self._since,
                                          self._seen)
        return cursor, replayed, K.released(self._recs, self._st) if replayed else -1

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
        queued_us = K.gather(self._f32, self.run, self.states, self._recs, started_ns, audio, state, BUCKETS_US,
                             queue_hist.view(np.int64))
        return audio, state, queued_us

    def put_results(self, new_state: np.ndarray, probs: np.ndarray, out: np.ndarray) -> None:
        """The run frames' new states and results (``out``: a RESULTS record's items)."""
        K.put_results(self.run, self.states, np.ascontiguousarray(new_state, np.float32),
                      np.ascontiguousarray(probs, np.float32), out)

    def put_shed(self, out: np.ndarray) -> None:
        """The stale frames' states carried over unchanged, their results NaN."""
        K.put_shed(self.stale, self.states, out)

    def finish(self, rows: np.ndarray) -> int:
        """After the results of ``rows`` are published: their states are committed. Returns
        the ring position now free, or -1."""
        return int(K.finish(rows, self._done, self._recs, self._st))

    def window(self) -> tuple[int, int]:
        """(frames queued, streams they came from) since the last call."""
        st = self._st
        frames, streams = int(st[K.WINDOW_FRAMES]), int(st[K.WINDOW_SLOTS])
        st[K.WINDOW_FRAMES] = st[K.WINDOW_SLOTS] = 0
        st[K.WINDOW_ID] += 1
        return frames, streams


def warm_up(frame_ns_by_rate: dict[int, int], input_samples: dict[int, int], state_floats: int) -> None:
    """Compile (or load from numba's cache) the queue's loops before the worker says it is
    ready: one FRAMES record per sample rate through a scratch ring, one frame run and one
    shed, with the same array types as the real ring and state table."""
    ring = bytearray(1 << 16)
    position = 0
    for seq, rate in enumerate(frame_ns_by_rate):
        width = input_samples[rate]
        size = records.frames_record_bytes(1, width)
        ring[position:position + 8] = size.to_bytes(8, "little")
        records.FRAMES_HEADER.pack_into(ring, position + 8, records.KIND_FRAMES, 1, width, rate, 0, 1)
        meta = np.frombuffer(ring, records.FRAME_META, 1, position + 8 + records.FRAMES_HEADER.size)
        meta["seq"], meta["slot"], meta["flags"] = 0, seq, records.FLAG_FRESH
        del meta
        position += 8 + ((size + 7) & ~7)
    slots = len(frame_ns_by_rate)
    states = np.zeros((slots, 2, state_floats), np.float32)
    queue = FrameQueue(memoryview(ring), states, np.zeros(slots, np.uint64), 4, frame_ns_by_rate,
                       min(input_samples.values()))
    queue.take(0, position)
    out = np.zeros(1, records.RESULT)
    n_run, _, rate = queue.pick(0)  # not yet due: run
    audio, state, _ = queue.gather(n_run, input_samples[rate], 0, np.zeros(len(BUCKETS_US) + 1, np.uint64))
    queue.put_results(state, audio[:, 0], out)
    queue.finish(queue.run[:n_run])
    _, n_stale, _ = queue.pick(_NEVER)  # overdue: shed
    queue.put_shed(out[:n_stale])
    queue.finish(queue.stale[:n_stale])
    queue.window()
