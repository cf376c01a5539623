"""Each connection's stream ids and their slots, as sorted arrays.

A gateway's message names hundreds of its streams; a dict lookup each is a few hundred
nanoseconds of Python per item, ~0.7 us per frame on a busy front-end. Kept sorted, the whole
message is looked up in one compiled call. Streams open and close rarely, so keeping the
arrays sorted (an insert or delete each time) costs nothing that matters.
"""

from __future__ import annotations

import numpy as np

from engine.compiled import compiled


class SlotIndex:
    """One connection's open streams: ``ids`` sorted, ``slots[k]`` the slot of ``ids[k]``."""

    __slots__ = ("ids", "slots")

    def __init__(self) -> None:
        self.ids = np.empty(0, np.uint32)
        self.slots = np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, stream_id: int, slot: int) -> None:
        at = int(np.searchsorted(self.ids, stream_id))
        self.ids, self.slots = np.insert(self.ids, at, stream_id), np.insert(self.slots, at, slot)

    def remove(self, stream_id: int) -> None:
        at = int(np.searchsorted(self.ids, stream_id))
        self.ids, self.slots = np.delete(self.ids, at), np.delete(self.slots, at)


@compiled
def lookup(ids_sorted: np.ndarray, slots_sorted: np.ndarray, ids: np.ndarray, stamps: np.ndarray, stamp: int,
           out: np.ndarray) -> bool:
    """``out[i]``: the slot of stream ``ids[i]``, -1 if it is not open. False (and ``out``
    incomplete) if an open stream is named twice. ``stamps`` (one word per slot, never equal
    to ``stamp`` before this call) marks the slots seen."""
    n = ids_sorted.shape[0]
    for i in range(ids.shape[0]):
        x = ids[i]
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) >> 1
            if ids_sorted[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        if lo < n and ids_sorted[lo] == x:
            s = slots_sorted[lo]
            if stamps[s] == stamp:
                return False
            stamps[s] = stamp
            out[i] = s
        else:
            out[i] = -1
    return True
