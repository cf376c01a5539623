"""A load process's streams to the per-frame baseline server (bench/per_frame_server.py): one
TCP connection per stream (device shape only), one length-prefixed frame per message, its
probabilities back on the same connection. Replies are matched to their chunks in the
:class:`~bench.load_ledger.Ledger`."""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench.load_audio import StreamAudio
from bench.load_ledger import Ledger
from bench.load_plan import LoadPlan
from bench.load_socket import Connection, Connections

_PF_HEAD = struct.Struct("<II")


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
        self.connections = Connections()
        self.conns: list[Connection] = []  # by stream

    def open(self) -> dict[str, Any]:
        from bench.per_frame_server import HELLO, HELLO_OK

        host, _, port = self.plan.endpoint.removeprefix("tcp://").rpartition(":")
        failures: Counter[str] = Counter()
        opened = 0
        socks = []
        for s in range(self.n_open):
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(HELLO + struct.pack("<I", self.audio.file[s].rate))
            socks.append(sock)
        for s, sock in enumerate(socks):
            conn = Connection(sock, s)
            self.conns.append(conn)
            reply, failure = b"", ""
            try:
                while len(reply) < 4:
                    part = sock.recv(4 - len(reply))
                    if not part:
                        break
                    reply += part
            except OSError as exc:
                failure = type(exc).__name__
            if failure or reply != HELLO_OK:  # closed: its chunks fail to send and time out
                failures[failure or "refused"] += 1
                sock.close()
                continue
            opened += 1
            self.connections.add(conn)
        return {"opened": opened, "failures": dict(failures), "wanted": self.n_open}

    def send(self, s: int, seq: int, due: int) -> None:
        """Send chunk ``seq`` of stream s; ``due``: its time on the absolute schedule (0 in max pace)."""
        pcm = self.audio.next_pcm(s)
        msg = _PF_HEAD.pack(4 + len(pcm), seq) + pcm
        now = time.monotonic_ns()
        self.connections.send(self.conns[s], msg)
        self.ledger.sent((self.sid[s] << 32) | seq, now, due)

    def flush(self) -> None:
        """Nothing is batched on these connections."""

    def poll(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for replies and take in every one that came."""
        closed = self.connections.poll(timeout_s, self._on_data)
        if closed:  # the server closed them: what is in flight times out
            self.ledger.window.other_errors["disconnected"] += closed

    def _on_data(self, conn: Connection, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = conn.inbox
        buf += data
        sid = self.sid[conn.index]
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
        self.connections.close()
        self.conns = []
