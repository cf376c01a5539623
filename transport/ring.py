"""Single-producer single-consumer ring of variable-length records in shared memory.

Layout (all counters 8-byte aligned, each on its own 64-byte cache line so the producer's
and the consumer's writes never share a line)::

    [0]    head      bytes ever written (producer-owned)
    [64]   tail      bytes ever released (consumer-owned)
    [128]  sleeping  1 while the consumer is blocked on the doorbell (consumer-owned)
    [192]  capacity
    [256]  data[capacity]

A record is an 8-byte length word then the payload, padded to 8 bytes. A record that
does not fit before the end of the data area is preceded by a WRAP word and starts again
at offset 0. head/tail are monotonic 64-bit counters (index = counter mod capacity), so
"empty" is head == tail and no slot flags are needed.

The consumer reads with a private cursor and releases space separately (``release``):
a worker keeps records unreleased until their results are published, so a replacement
worker finds every unfinished record still in the ring after a crash.

Ordering: payload bytes are stored before the head counter; on x86-64 (TSO) stores are
not reordered with other stores, nor loads with loads, so publishing needs no fence there.
The sleeping-flag handshake does need a full fence on both sides (a store followed by a
load of another location *is* reordered on x86).
"""

from __future__ import annotations

import platform
import time
from typing import Callable

from transport.doorbell import Doorbell, full_fence
from transport.shm import Segment

HEADER_BYTES = 256
_HEAD, _TAIL, _SLEEPING, _CAPACITY = 0, 8, 16, 24  # indexes into the header as u64 words
_WRAP = 0xFFFF_FFFF_FFFF_FFFF
_STRONG_ORDER = platform.machine() in ("x86_64", "AMD64", "i686")


def _noop() -> None:
    pass


# On weakly ordered CPUs (aarch64) publish and observe need real fences as well.
_publish_fence: Callable[[], None] = _noop if _STRONG_ORDER else full_fence


def ring_bytes(capacity: int) -> int:
    return HEADER_BYTES + capacity


class RecordTooLarge(ValueError):
    pass


class Ring:
    """One end of a ring. The same class serves both ends; each end uses its own half."""

    def __init__(self, segment: Segment, doorbell: Doorbell, offset: int = 0,
                 capacity: int | None = None) -> None:
        self.segment = segment
        self.doorbell = doorbell
        self._words = segment.buf[offset:offset + HEADER_BYTES].cast("Q")
        if capacity is not None:
            if capacity % 8 or capacity < 64:
                raise ValueError("ring capacity must be a multiple of 8 bytes and >= 64")
            self._words[_CAPACITY] = capacity
        self.capacity = int(self._words[_CAPACITY])
        self.data = segment.buf[offset + HEADER_BYTES:offset + HEADER_BYTES + self.capacity]
        self._len_words = self.data.cast("Q")
        self.max_record = self.capacity // 2 - 16
        self.cursor = int(self._words[_TAIL])  # consumer's private read position
        self._reserved = 0

    # ---- producer -------------------------------------------------------------------
    def reserve(self, nbytes: int) -> memoryview | None:
        """Room for one record of ``nbytes``, or None when the ring is full right now."""
        if nbytes > self.max_record:
            raise RecordTooLarge(f"record of {nbytes} bytes exceeds ring limit {self.max_record}")
        words = self._words
        head = words[_HEAD]
        pos = head % self.capacity
        need = 8 + ((nbytes + 7) & ~7)
        skip = self.capacity - pos if pos + need > self.capacity else 0
        if self.capacity - (head - words[_TAIL]) < skip + need:
            return None
        if skip:
            self._len_words[pos >> 3] = _WRAP
            pos = 0
        self._len_words[pos >> 3] = nbytes
        self._reserved = skip + need
        return self.data[pos + 8:pos + 8 + nbytes]

    def commit(self) -> None:
        """Publish the reserved record and wake the consumer if it sleeps."""
        _publish_fence()
        self._words[_HEAD] = self._words[_HEAD] + self._reserved
        self._reserved = 0
        full_fence()
        if self._words[_SLEEPING]:
            self.doorbell.ring()

    def write(self, payload: bytes | bytearray | memoryview) -> bool:
        view = self.reserve(len(payload))
        if view is None:
            return False
        view[:] = payload
        self.commit()
        return True

    def head_position(self) -> int:
        return int(self._words[_HEAD])

    def tail_position(self) -> int:
        return int(self._words[_TAIL])

    def free_bytes(self) -> int:
        return self.capacity - (self._words[_HEAD] - self._words[_TAIL])

    # ---- consumer -------------------------------------------------------------------
    def next_record(self) -> tuple[memoryview, int] | None:
        """The record at the cursor and the position after it, or None if none is ready.

        Advances the private cursor; space is only given back by ``release``.
        """
        span = self.next_record_span()
        if span is None:
            return None
        offset, length, end = span
        self.cursor = end
        return self.data[offset:offset + length], end

    def next_record_span(self) -> tuple[int, int, int] | None:
        """Where the record at the cursor is: (its payload's offset in ``data``, its length,
        the position after it), or None if none is ready. The cursor stays: a consumer that
        reads records in place (engine/frame_queue.py) moves it itself."""
        cursor = self.cursor
        if cursor == self._words[_HEAD]:
            return None
        _publish_fence()
        pos = cursor % self.capacity
        length = int(self._len_words[pos >> 3])
        if length == _WRAP:
            cursor += self.capacity - pos
            pos = 0
            length = int(self._len_words[0])
        return pos + 8, length, cursor + 8 + ((length + 7) & ~7)

    def release(self, position: int) -> None:
        """Give back all space before ``position`` (a value returned by next_record)."""
        _publish_fence()  # the record reads must not pass this store (arm reorders load->store)
        self._words[_TAIL] = position

    def release_all_read(self) -> None:
        _publish_fence()
        self._words[_TAIL] = self.cursor

    def has_data(self) -> bool:
        return self.cursor != self._words[_HEAD]

    def pending_bytes(self) -> int:
        return int(self._words[_HEAD] - self.cursor)

    def rewind_to_tail(self) -> None:
        """Restart reading at the oldest unreleased record (a replacement consumer)."""
        self.cursor = int(self._words[_TAIL])

    def prepare_sleep(self) -> bool:
        """Announce sleep; False if data arrived meanwhile (then do not block)."""
        self._words[_SLEEPING] = 1
        full_fence()
        if self.cursor != self._words[_HEAD]:
            self._words[_SLEEPING] = 0
            return False
        return True

    def end_sleep(self) -> None:
        self._words[_SLEEPING] = 0

    def wait(self, spin_s: float, timeout: float | None, *also: int) -> list[int]:
        """Spin up to ``spin_s`` for data, then block on the doorbell (or ``also`` fds)."""
        if self.has_data():
            return []
        deadline = time.perf_counter() + spin_s
        while time.perf_counter() < deadline:
            if self.has_data():
                return []
        if not self.prepare_sleep():
            return []
        try:
            return self.doorbell.wait(timeout, *also)
        finally:
            self.end_sleep()

    def close(self) -> None:
        self._len_words.release()
        self.data.release()
        self._words.release()
