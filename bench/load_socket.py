"""A load process's plain stream sockets (TCP or Unix), many per process, watched by one epoll.

A send the socket buffer cannot take whole keeps the rest in the connection's ``outbox``,
sent when epoll says the socket is writable again; a peer that closes the connection is
forgotten, and what was in flight on it times out in the ledger. Used by the per-frame
baseline's load (bench/load_tcp.py) and the ZMTP device load (bench/load_zmtp.py).
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable

_EPOLLIN, _EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR


class Connection:
    """One socket; ``index``: the stream it carries; ``inbox``: received bytes not yet parsed."""

    __slots__ = ("sock", "fd", "index", "inbox", "outbox")

    def __init__(self, sock: socket.socket, index: int = 0) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.index = index
        self.inbox = bytearray()
        self.outbox = bytearray()  # what a full socket buffer did not take yet


class Connections:
    def __init__(self) -> None:
        self.ep = select.epoll()
        self.live: dict[int, Connection] = {}  # by fd: the connections still open
        self.every: list[Connection] = []

    def add(self, conn: Connection) -> None:
        conn.sock.setblocking(False)
        self.every.append(conn)
        self.live[conn.fd] = conn
        self.ep.register(conn.fd, _EPOLLIN)

    def send(self, conn: Connection, data: bytes) -> None:
        if conn.outbox:
            conn.outbox += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the peer closed it: what is in flight times out
        if sent < len(data):
            conn.outbox += data[sent:]
            self.ep.modify(conn.fd, _EPOLLIN | _EPOLLOUT)

    def _flush(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = len(conn.outbox)
        del conn.outbox[:sent]
        self.ep.modify(conn.fd, (_EPOLLIN | _EPOLLOUT) if conn.outbox else _EPOLLIN)

    def poll(self, timeout_s: float, on_data: Callable[[Connection, bytes], None]) -> int:
        """Wait up to ``timeout_s``; hand what each readable connection received to
        ``on_data`` (which may queue a reply in its outbox). Returns how many connections the
        peer closed in the meantime."""
        closed = 0
        for fd, events in self.ep.poll(max(timeout_s, 0.0)):
            conn = self.live.get(fd)
            if conn is not None:
                closed += self.serve(conn, events, on_data)
        return closed

    def serve(self, conn: Connection, events: int, on_data: Callable[[Connection, bytes], None]) -> int:
        """One connection's epoll ``events``; returns 1 if the peer closed it."""
        if events & _EPOLLOUT:
            self._flush(conn)
        if not events & _READABLE:
            return 0
        try:
            data = conn.sock.recv(1 << 16)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""
        if not data:
            self.ep.unregister(conn.fd)
            del self.live[conn.fd]
            return 1
        on_data(conn, data)
        if conn.outbox and not events & _EPOLLOUT:
            self._flush(conn)
        return 0

    def close(self) -> None:
        for conn in self.every:
            try:
                conn.sock.close()
            except OSError:
                pass
        self.every = []
        self.live = {}
        self.ep.close()
