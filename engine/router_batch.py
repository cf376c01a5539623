"""A ROUTER socket's messages read, and results sent, in compiled calls: libzmq's C API from numba.

Read one at a time through pyzmq, a device's message costs the front-end 4-5 us of Python
before it is looked at (an events check, two ``recv`` calls, a ``zmq.Frame``) where libzmq's
own work is ~0.7 us; in the device shape, one message a frame, reading was a fifth of the
front-end loop's time. Here one call reads up to a budget of messages into one buffer, through
the very libzmq (and socket) pyzmq uses, so polling, sending and closing stay pyzmq's: ~3 us
less of the front-end's CPU a device frame (docs/bench-history.md, runs 30-31).

The front-end keeps every rule it had: a message of more than one frame is reported as such
(its other frames read and dropped), and the buffer always has room for the largest message
the socket admits (``ZMQ_MAXMSGSIZE``), so nothing is cut short.

Results go back the same way (``ResultSender``): each client's reply items of a results
record as one RESULTS message, its routing id from an array, two ``zmq_send`` calls. Through
pyzmq the two sends and the bytes around them cost 2.6-3.1 us a reply, compiled 0.5-0.7 (a
micro-benchmark of 20 replies to 20 of 300 clients). What a send can fail with is the
caller's to handle, per message, as before: EAGAIN (the client's high-water mark) and
EHOSTUNREACH (it is gone), both decided on the routing id. In the engine the front-end's user
CPU fell ~1.3 us a device frame: 25.8 against 27.1 on average over four alternating pairs of
30 s holds of 352 device streams (docs/bench-history.md, run 32).
"""

from __future__ import annotations

import errno
import re
from typing import Any

import llvmlite.binding as llvm
import numpy as np
import zmq
from numba import types

from engine.compiled import compiled


def _load_libzmq() -> None:
    """Make the libzmq pyzmq uses (a second copy would not know pyzmq's sockets) the one these
    loops call: the shared library this process mapped (PyPI's wheels), or pyzmq's own
    extension where libzmq is linked into it."""
    import zmq.backend.cython._zmq as backend

    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        mapped = sorted(set(re.findall(r"(/\S*/libzmq[^/\s]*\.so[^/\s]*)", maps.read())),
                        key=lambda path: "pyzmq" not in path)
    for path in [*mapped, backend.__file__]:
        llvm.load_library_permanently(path)
        if llvm.address_of_symbol("zmq_recv"):
            return
    raise ImportError(f"pyzmq {zmq.__version__} exports no libzmq C API to this process (looked in {mapped} and "
                      f"{backend.__file__}): install pyzmq's wheel from PyPI, or build it against a shared libzmq")


_load_libzmq()
_zmq_recv: Any = types.ExternalFunction("zmq_recv", types.intc(types.voidptr, types.voidptr, types.size_t, types.intc))
_zmq_getsockopt: Any = types.ExternalFunction(
    "zmq_getsockopt", types.intc(types.voidptr, types.intc, types.voidptr, types.voidptr))
_zmq_send: Any = types.ExternalFunction("zmq_send", types.intc(types.voidptr, types.voidptr, types.size_t, types.intc))
_zmq_errno: Any = types.ExternalFunction("zmq_errno", types.intc())
_DONTWAIT, _RCVMORE, _SNDMORE = int(zmq.DONTWAIT), int(zmq.RCVMORE), int(zmq.SNDMORE)
_IDENTITY_MAX = 255  # a ROUTER's routing ids are 1-255 bytes
BATCH_BYTES = 256 * 1024  # a batch ends once this much is read: handling it takes a while


@compiled
def _read(sock: int, buf: np.ndarray, spans: np.ndarray, budget: int, largest: int,
          more: np.ndarray) -> tuple[int, int]:
    """Messages into ``buf``: spans[i] = (identity at, its size, message at, its size, frames).
    Stops at ``budget`` messages, or when ``buf`` has no room left for a routing id and a
    message of ``largest`` bytes. Returns (messages read, 0, or libzmq's errno once a read
    failed: EAGAIN when none waits)."""
    n = at = 0
    room = len(buf) - _IDENTITY_MAX - largest
    while n < budget and at <= room:
        got = _zmq_recv(sock, buf[at:].ctypes.data, _IDENTITY_MAX, _DONTWAIT)
        if got < 0:
            return n, _zmq_errno()
        spans[n, 0], spans[n, 1] = at, got
        at += got
        # A ROUTER hands over whole messages, the routing id first: the rest is there.
        got = _zmq_recv(sock, buf[at:].ctypes.data, largest, _DONTWAIT)
        if got < 0:
            return n, _zmq_errno()
        spans[n, 2], spans[n, 3], spans[n, 4] = at, got, 1
        at += got
        more[1] = 8
        while _zmq_getsockopt(sock, _RCVMORE, more.ctypes.data, more[1:].ctypes.data) == 0 and more[0]:
            _zmq_recv(sock, buf[at:].ctypes.data, 0, _DONTWAIT)  # refused whole: not kept
            spans[n, 4] += 1
            more[1] = 8
        n += 1
    return n, 0


class RouterReader:
    """Batches of one ROUTER's messages as (routing id, message, frames) triples."""

    def __init__(self, router: zmq.Socket, budget: int = 64) -> None:
        largest = router.getsockopt(zmq.MAXMSGSIZE)
        if not isinstance(largest, int) or largest < 0:
            raise ValueError("the ROUTER needs a ZMQ_MAXMSGSIZE: its reader's buffer is sized for it")
        self.router = router
        self.largest = largest
        self.buf = np.empty(BATCH_BYTES + _IDENTITY_MAX + largest, np.uint8)
        self.view = self.buf.data
        self.spans = np.zeros((budget, 5), np.int64)
        self.more = np.zeros(2, np.int64)  # RCVMORE's value, and its size for getsockopt

    def read(self, budget: int) -> tuple[list[tuple[bytes, bytes, int]], bool]:
        """Up to ``budget`` messages, and whether the socket was found empty."""
        n, error = _read(self.router.underlying, self.buf, self.spans, min(budget, len(self.spans)), self.largest,
                         self.more)
        if error not in (0, errno.EAGAIN, errno.EINTR):
            raise zmq.ZMQError(error)
        view = self.view
        return [(bytes(view[at:at + size]), bytes(view[msg_at:msg_at + msg_size]), frames)
                for at, size, msg_at, msg_size, frames in self.spans[:n].tolist()], error == errno.EAGAIN


@compiled
def _send(sock: int, header: np.ndarray, items: np.ndarray, item_size: int, bounds: np.ndarray, runs: int,
          conns: np.ndarray, ids: np.ndarray, id_sizes: np.ndarray, message: np.ndarray, errors: np.ndarray) -> int:
    """Run r, items ``bounds[r]:bounds[r + 1]`` (rows of ``item_size`` bytes in ``items``, all
    for client ``conns[bounds[r]]``), as one message: ``header``, then the items, to that
    client's routing id (``ids``/``id_sizes`` rows). errors[r]: 0, or libzmq's errno. Returns
    how many runs failed."""
    head = header.shape[0]
    message[:head] = header
    failed = 0
    for r in range(runs):
        first, end = bounds[r], bounds[r + 1]
        conn = conns[first]
        size = head + (end - first) * item_size
        message[head:size] = items[first * item_size:end * item_size]
        errors[r] = 0
        # ROUTER_MANDATORY decides on the routing id; after a refusal the body is not sent (the
        # socket would take it for a routing id of its own).
        if (_zmq_send(sock, ids[conn].ctypes.data, id_sizes[conn], _DONTWAIT | _SNDMORE) < 0
                or _zmq_send(sock, message.ctypes.data, size, _DONTWAIT) < 0):
            errors[r] = _zmq_errno()
            failed += 1
    return failed


class RoutingIds:
    """Clients' routing ids by a small int (a connection number the caller hands out), as
    arrays a compiled loop can read."""

    def __init__(self, capacity: int = 64) -> None:
        self.ids = np.zeros((capacity, _IDENTITY_MAX), np.uint8)
        self.sizes = np.zeros(capacity, np.int64)

    def set(self, conn: int, identity: bytes) -> None:
        if conn >= len(self.sizes):
            grown = max(conn + 1, 2 * len(self.sizes))
            self.ids = np.concatenate([self.ids, np.zeros((grown - len(self.sizes), _IDENTITY_MAX), np.uint8)])
            self.sizes = np.concatenate([self.sizes, np.zeros(grown - len(self.sizes), np.int64)])
        self.ids[conn, :len(identity)] = np.frombuffer(identity, np.uint8)
        self.sizes[conn] = len(identity)

    def __getitem__(self, conn: int) -> bytes:
        return self.ids[conn, :self.sizes[conn]].tobytes()


class ResultSender:
    """RESULTS messages, one per run of one client's reply items, sent on a ROUTER."""

    def __init__(self, router: zmq.Socket, header: bytes) -> None:
        self.router = router
        self.header = np.frombuffer(header, np.uint8)
        self.message = np.empty(len(header) + 64 * 1024, np.uint8)
        self.errors = np.zeros(64, np.int32)

    def send(self, items: np.ndarray, item_size: int, bounds: np.ndarray, runs: int, conns: np.ndarray,
             ids: RoutingIds) -> list[tuple[int, int]]:
        """``items``: the reply items' bytes, ``item_size`` each (see _send). Returns (conn,
        errno) of each run not sent."""
        if len(self.message) < len(self.header) + len(items):
            self.message = np.empty(len(self.header) + 2 * len(items), np.uint8)
        if len(self.errors) < runs:
            self.errors = np.zeros(2 * runs, np.int32)
        if not _send(self.router.underlying, self.header, items, item_size, bounds, runs, conns, ids.ids, ids.sizes,
                     self.message, self.errors):
            return []
        return [(int(conns[bounds[r]]), int(self.errors[r])) for r in np.flatnonzero(self.errors[:runs]).tolist()]


def warm_up() -> None:
    """Compile (or load from the cache) the loops now, not on a client's first message: a read
    of no socket reads nothing, a send of no run sends nothing."""
    _read(0, np.zeros(_IDENTITY_MAX + 1, np.uint8), np.zeros((1, 5), np.int64), 0, 1, np.zeros(2, np.int64))
    ids = RoutingIds(1)
    _send(0, np.zeros(8, np.uint8), np.zeros(28, np.uint8), 28, np.zeros(2, np.int64), 0, np.zeros(1, np.int64),
          ids.ids, ids.sizes, np.zeros(64, np.uint8), np.zeros(1, np.int32))
