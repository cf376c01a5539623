"""Where things live in shared memory; one place so the daemon and workers agree.

Per worker, one segment: [input ring][output ring][WorkerStats]. Once for the engine, the
state table: for every stream slot, two state buffers (double-buffered, see
transport/records.py) and a ``done`` word: up to which seq the slot's frames have their state
committed, and which buffer holds it (engine/worker_kernels.py). The table outlives any
worker, which is what lets a replacement worker carry on a crashed worker's streams exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.stats import WORKER_STATS_BYTES
from transport.ring import ring_bytes


@dataclass(frozen=True)
class WorkerLayout:
    in_capacity: int
    out_capacity: int

    @property
    def out_offset(self) -> int:
        return ring_bytes(self.in_capacity)

    @property
    def stats_offset(self) -> int:
        return self.out_offset + ring_bytes(self.out_capacity)

    @property
    def total(self) -> int:
        return self.stats_offset + WORKER_STATS_BYTES


@dataclass(frozen=True)
class StateLayout:
    slots: int
    state_floats: int

    @property
    def state_bytes(self) -> int:
        return self.slots * 2 * self.state_floats * 4

    @property
    def total(self) -> int:
        return self.state_bytes + self.slots * 8

    def views(self, buf: memoryview) -> tuple[np.ndarray, np.ndarray]:
        """(states [slots, 2, state_floats] f32, done [slots] u64)."""
        states = np.frombuffer(buf, np.float32, self.slots * 2 * self.state_floats, 0)
        done = np.frombuffer(buf, np.uint64, self.slots, self.state_bytes)
        return states.reshape(self.slots, 2, self.state_floats), done
