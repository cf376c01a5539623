"""The load over plain sockets that speak ZMTP 3.0 (RFC 23, NULL mechanism), as a
microcontroller's firmware would: in the device shape one connection per stream and one frame
per message, in the gateway shape one connection carrying every stream.

Why not libzmq here: a DEALER per stream costs the load process about as much per frame as
the engine's whole front-end does (a mailbox command to libzmq's I/O thread on every send,
a ZMQ_EVENTS check after it, each a few system calls; docs/benchmarks.md), and the bench
shares the engine's cores. A plain socket costs one send() and one recv() per message, as the
per-frame baseline's load (bench/load_tcp.py) does; the gateway's one DEALER cost the load
process ~0.4 us a frame more than its plain socket does (its I/O thread's wake-ups). The engine
sees the same bytes on the wire from either; ``--link libzmq`` keeps the DEALERs (and CURVE
needs them).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import zmq

from bench.load_audio import StreamAudio
from bench.load_gateway import GatewayLink
from bench.load_ledger import Ledger
from bench.load_plan import LoadPlan
from bench.load_socket import Connection, Connections
from bench.load_zmq import ZmqLink

# Greeting: signature, version 3.0, mechanism NULL, as-server 0, filler (RFC 23 section 3).
GREETING = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + bytes(32)
_FLAG_MORE, _FLAG_LONG, _FLAG_COMMAND = 0x01, 0x02, 0x04
_LONG_HEAD = struct.Struct(">BQ")
_PROPERTY_VALUE = struct.Struct(">I")


def command(name: bytes, body: bytes = b"") -> bytes:
    data = bytes([len(name)]) + name + body
    return bytes([_FLAG_COMMAND, len(data)]) + data if len(data) < 256 else _LONG_HEAD.pack(
        _FLAG_COMMAND | _FLAG_LONG, len(data)) + data


def ready(socket_type: bytes) -> bytes:
    return command(b"READY", bytes([11]) + b"Socket-Type" + _PROPERTY_VALUE.pack(len(socket_type)) + socket_type)


def message_frame(payload: bytes | memoryview) -> bytes:
    """One frame, the last of its message."""
    if len(payload) < 256:
        return bytes([0, len(payload)]) + payload
    return _LONG_HEAD.pack(_FLAG_LONG, len(payload)) + payload


class ZmtpError(Exception):
    """The peer does not speak ZMTP 3 with the NULL mechanism (a CURVE daemon, or no ZeroMQ)."""


def handshake(sock: socket.socket) -> None:
    """Greetings both ways, then READY, as libzmq itself does: libzmq 4.3.5 drops a peer whose
    READY came in the same segment as its greeting (HANDSHAKE_FAILED_PROTOCOL, ZMTP_UNEXPECTED_COMMAND)."""
    sock.sendall(GREETING)
    greeting = b""
    while len(greeting) < len(GREETING):
        part = sock.recv(len(GREETING) - len(greeting))
        if not part:
            raise ZmtpError(f"the peer closed the connection during the ZMTP greeting (got {greeting!r}); "
                            "a daemon that requires CURVE does that to a NULL peer: give --curve")
        greeting += part
    if greeting[0] != 0xFF or greeting[9] & 1 != 1 or greeting[10] < 3 or greeting[12:32].rstrip(b"\0") != b"NULL":
        raise ZmtpError(f"the peer's greeting is not ZMTP 3 with the NULL mechanism: {greeting[:32]!r} "
                        "(a daemon with CURVE needs --curve)")
    sock.sendall(ready(b"DEALER"))


class ZmtpConnection(Connection):
    """One connection after its handshake: frames in, split into messages; commands (the
    peer's READY, PING) are taken here, PONG queued in ``outbox``."""

    def messages(self, data: bytes) -> list[bytes]:
        buf = self.inbox
        buf += data
        offset = 0
        out: list[bytes] = []
        end = len(buf)
        while end - offset >= 2:
            flags = buf[offset]
            if flags & _FLAG_LONG:
                if end - offset < 9:
                    break
                size, head = _LONG_HEAD.unpack_from(buf, offset)[1], 9
            else:
                size, head = buf[offset + 1], 2
            if end - offset < head + size:
                break
            body = bytes(buf[offset + head:offset + head + size])
            offset += head + size
            if flags & _FLAG_COMMAND:
                if body[1:1 + body[0]] == b"ERROR":
                    raise ZmtpError(f"the peer refused the connection: {body!r}")
                if body[1:1 + body[0]] == b"PING":  # PONG carries the PING's context back
                    self.outbox += command(b"PONG", body[1 + body[0] + 2:])
            elif flags & _FLAG_MORE:
                raise ZmtpError("the engine sent a multi-frame message; ringserve replies are one frame")
            else:
                out.append(body)
        del buf[:offset]
        return out


def dial(endpoint: str) -> socket.socket:
    """A connected plain socket to a ``tcp://`` or ``ipc://`` endpoint, its ZMTP handshake done."""
    if endpoint.startswith("ipc://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(endpoint.removeprefix("ipc://"))
    else:
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    handshake(sock)
    return sock


class _ZmtpTransport(ZmqLink):
    """A :class:`ZmqLink`'s connections as plain sockets: one per stream (device), or one for
    every stream (gateway). Replies go through the same ``_on_message``, so accounting is
    identical to libzmq's."""

    def __init__(self, plan: LoadPlan, ctx: zmq.Context, sid: list[int], n_open: int, audio: StreamAudio,
                 ledger: Ledger, released: Callable[[int], None]) -> None:
        if plan.curve is not None:
            raise ValueError("the ZMTP link speaks the NULL mechanism only: CURVE needs libzmq")
        super().__init__(plan, ctx, sid, n_open, audio, ledger, released)
        self.conns: list[ZmtpConnection] = []  # stream s's connection
        self.connections = Connections()

    def _connect(self) -> None:
        for s in range(self.n if not self.gateway else 1):
            conn = ZmtpConnection(dial(self.plan.endpoint), s)
            self.conns.append(conn)
            self.connections.add(conn)
        if self.gateway:
            self.conns *= self.n

    def _send_message(self, s: int, msg: bytes | memoryview) -> None:
        self.connections.send(self.conns[s], message_frame(msg))

    def poll(self, timeout_s: float) -> None:
        closed = self.connections.poll(timeout_s, self._on_data)
        if closed:  # the engine closed them: what is in flight times out
            self.ledger.window.other_errors["disconnected"] += closed

    def _on_data(self, conn: Connection, data: bytes) -> None:
        now = time.monotonic_ns()
        for msg in self.conns[conn.index].messages(data):
            self._on_message(msg, now)

    def _wait(self, timeout_s: float) -> None:
        self.poll(timeout_s)

    def shutdown(self) -> None:
        self.connections.close()
        self.conns = []
        self.ep.close()


class ZmtpLink(_ZmtpTransport):
    """The device shape: one connection per stream, one frame per message."""


class ZmtpGatewayLink(_ZmtpTransport, GatewayLink):
    """The gateway shape: one connection carrying every stream, one message per tick."""
