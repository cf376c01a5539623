"""A load process's streams to the per-frame baseline server (bench/per_frame_server.py): one
TCP connection per stream (device shape only), one length-prefixed frame per message, its
probabilities back on the same connection. Replies are matched to their chunks in the
:class:`~bench.load_ledger.Ledger`."""

from __future__ import annotations

import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench.load_audio import StreamAudio
from bench.load_ledger import Ledger
from bench.load_plan import LoadPlan

_PF_HEAD = struct.Struct("<II")
_EPOLLIN, _EPOLLOUT = select.EPOLLIN, select.EPOLLOUT


class PerFrameLink:
    """Streams ``sid``, every one opened. ``released(sid)``: a chunk of that stream was answered."""

    def __init__(self, plan: LoadPlan, sid: list[int], audio: StreamAudio, ledger: Ledger,
                 released: Callable[[int], None]) -> None:
        self.plan = plan
        self.sid = sid
        self.n_open = len(sid)
        self.audio = audio
        self.ledger = ledger
        self.released = released
        self.ep = select.epoll()
        self.socks: list[socket.socket] = []
        self.live: set[int] = set()  # connections still registered with the epoll
        self._tcp_in: list[bytearray] = []
        self._tcp_out: list[bytearray] = []
        self._fd_stream: dict[int, int] = {}

    def open(self) -> dict[str, Any]:
        from bench.per_frame_server import HELLO, HELLO_OK

        host, _, port = self.plan.endpoint.removeprefix("tcp://").rpartition(":")
        failures: Counter[str] = Counter()
        opened = 0
        for s in range(self.n_open):
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(HELLO + struct.pack("<I", self.audio.file[s].rate))
            self.socks.append(sock)
        for s, sock in enumerate(self.socks):
            reply = b""
            try:
                while len(reply) < 4:
                    part = sock.recv(4 - len(reply))
                    if not part:
                        break
                    reply += part
            except OSError as exc:
                failures[type(exc).__name__] += 1
                continue
            if reply != HELLO_OK:
                failures["refused"] += 1
                continue
            opened += 1
            sock.setblocking(False)
            self._tcp_in.append(bytearray())
            self._tcp_out.append(bytearray())
            self._fd_stream[sock.fileno()] = s
            self.live.add(sock.fileno())
            self.ep.register(sock.fileno(), _EPOLLIN)
        return {"opened": opened, "failures": dict(failures), "wanted": self.n_open}

    def send(self, s: int, seq: int, due: int) -> None:
        """Send chunk ``seq`` of stream s; ``due``: its time on the absolute schedule (0 in max pace)."""
        pcm = self.audio.next_pcm(s)
        msg = _PF_HEAD.pack(4 + len(pcm), seq) + pcm
        now = time.monotonic_ns()
        self._tcp_send(s, msg)
        self.ledger.sent((self.sid[s] << 32) | seq, now, due)

    def flush(self) -> None:
        """Nothing is batched on these connections."""

    def _tcp_send(self, s: int, msg: bytes) -> None:
        sock, out = self.socks[s], self._tcp_out[s]
        if out:
            out += msg
            return
        try:
            sent = sock.send(msg)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the server closed it: the chunk times out
        if sent < len(msg):
            out += msg[sent:]
            self.ep.modify(sock.fileno(), _EPOLLIN | _EPOLLOUT)

    def poll(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for replies and take in every one that came."""
        for fd, events in self.ep.poll(max(timeout_s, 0.0)):
            if fd in self.live:
                self._on_ready(events, fd)

    def _on_ready(self, events: int, fd: int) -> None:
        s = self._fd_stream[fd]
        sock = self.socks[s]
        if events & _EPOLLOUT:
            out = self._tcp_out[s]
            try:
                sent = sock.send(out)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = len(out)
            del out[:sent]
            if not out:
                self.ep.modify(fd, _EPOLLIN)
        if not events & (_EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the server closed the connection: what is in flight times out
            self.ep.unregister(fd)
            self.live.discard(fd)
            self.ledger.window.other_errors["disconnected"] += 1
            return
        now = time.monotonic_ns()
        buf = self._tcp_in[s]
        buf += data
        sid = self.sid[s]
        offset = 0
        while len(buf) - offset >= 8:
            body_len, seq = _PF_HEAD.unpack_from(buf, offset)
            if len(buf) - offset < 4 + body_len:
                break
            offset += 4 + body_len
            if self.ledger.answer((sid << 32) | seq, (body_len - 4) // 4, now):
                self.released(sid)
        del buf[:offset]

    def close_streams(self, timeout: float) -> tuple[int, int]:
        """A connection is the stream: nothing to close before the sockets (streams closed, to close)."""
        return self.n_open, self.n_open

    def shutdown(self) -> None:
        for sock in self.socks:
            try:
                sock.close()
            except OSError:
                pass
        self.socks = []
        self.ep.close()
