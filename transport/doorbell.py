"""A doorbell wakes a consumer that has gone to sleep on an empty ring.

It is a Linux eventfd: one 8-byte write to ring, one read to clear, and its fd can sit in
a ``zmq.Poller`` beside the ROUTER socket or in ``select`` beside a death pipe. It pickles
across ``spawn`` like a ``multiprocessing.Connection`` does, by handing the fd to the child
through ``multiprocessing.reduction.DupFd``.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from multiprocessing import reduction
from typing import Any

_ONE = (1).to_bytes(8, "little")

# A lock round trip executes a locked instruction, which is a full memory barrier on x86
# and arm. Python exposes no cheaper fence. Only the Dekker-style "publish, then look at the
# sleeping flag" check needs it: TSO already keeps store->store and load->load order.
_FENCE_LOCK = threading.Lock()


def full_fence() -> None:
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


class Doorbell:
    def __init__(self, fd: int | None = None) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if fd is None else fd

    def fileno(self) -> int:
        return self.fd

    def ring(self) -> None:
        try:
            os.write(self.fd, _ONE)
        except BlockingIOError:
            pass  # counter saturated: the consumer is already certain to wake

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def wait(self, timeout: float | None, *also: int) -> list[int]:
        """Block until rung (or one of ``also`` is readable); returns the ready fds."""
        while True:
            try:
                ready, _, _ = select.select([self.fd, *also], [], [], timeout)
            except OSError as exc:  # pragma: no cover - EINTR is retried by Python itself
                if exc.errno == errno.EINTR:
                    continue
                raise
            if self.fd in ready:
                self.clear()
            return ready

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_doorbell, (reduction.DupFd(self.fd),))


def _rebuild_doorbell(dup: Any) -> Doorbell:
    return Doorbell(dup.detach())
