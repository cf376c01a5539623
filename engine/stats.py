"""Counters each process keeps in shared memory, one writer per block, no locks.

Every worker owns one ``WorkerStats`` block: it alone writes it (plain u64 stores, a
handful per *batch*, never per frame), and the front-end reads all blocks when someone
asks for stats. A torn read can at worst show one batch's worth of skew, which is fine for
monitoring and keeps locks off the hot path.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

# Histogram bucket upper bounds in microseconds (Prometheus-style "le"); last is +Inf.
BUCKETS_US = np.array([50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000],
                      dtype=np.float64)
N_BUCKETS = len(BUCKETS_US) + 1
_BOUNDS_US = BUCKETS_US.tolist()

# Word indexes. DELAY_US is a gauge: the batching wait the worker uses now (worker.py gather).
FRAMES, EXECUTIONS, COMPUTE_NS, QUEUE_NS, BUSY_NS, REPLAYED, STARTED_NS, SHED, DELAY_US = range(9)
N_COUNTERS = 9
WORKER_STATS_BYTES = 8 * (N_COUNTERS + 2 * N_BUCKETS)


class WorkerStats:
    def __init__(self, buf: memoryview) -> None:
        words = np.frombuffer(buf, np.uint64, N_COUNTERS + 2 * N_BUCKETS)
        self.counters = words[:N_COUNTERS]
        self.queue_hist = words[N_COUNTERS:N_COUNTERS + N_BUCKETS]
        self.compute_hist = words[N_COUNTERS + N_BUCKETS:]

    def release(self) -> None:
        """Drop the views into shared memory so the segment can be unmapped."""
        del self.counters, self.queue_hist, self.compute_hist

    def record_batch(self, frames: int, compute_ns: int, queued_us: float) -> None:
        """One batch: its frames, its time, and how long its frames queued in all (their
        waits are already in ``queue_hist``: engine/frame_queue.py counts them as it gathers)."""
        c = self.counters
        c[FRAMES] += frames
        c[EXECUTIONS] += 1
        c[COMPUTE_NS] += compute_ns
        c[QUEUE_NS] += int(queued_us * 1000)
        self.compute_hist[bisect.bisect_left(_BOUNDS_US, compute_ns / 1000)] += 1

    def snapshot(self) -> dict[str, Any]:
        c = [int(v) for v in self.counters]
        return {
            "frames": c[FRAMES],
            "executions": c[EXECUTIONS],
            "compute_s": c[COMPUTE_NS] / 1e9,
            "queue_s": c[QUEUE_NS] / 1e9,
            "busy_s": c[BUSY_NS] / 1e9,
            "replayed_frames": c[REPLAYED],
            "shed_frames": c[SHED],
            "batch_delay_us": c[DELAY_US],
            "queue_hist": [int(v) for v in self.queue_hist],
            "compute_hist": [int(v) for v in self.compute_hist],
        }
