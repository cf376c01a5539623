"""A load process's streams to a ringserve daemon over ZeroMQ: one DEALER socket (one
connection) per stream in the ``device`` shape, one DEALER carrying every stream in the
``gateway`` shape, whose chunks due on a tick go out as one AUDIO message. Replies are
matched to their chunks in the :class:`~bench.load_ledger.Ledger`."""

from __future__ import annotations

import select
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import zmq

from bench.load_audio import StreamAudio
from bench.load_ledger import Ledger
from bench.load_plan import LoadPlan
from transport import protocol as P

_AUDIO_MSG = struct.Struct("<2sBBIIIII")  # header + one AUDIO item header
_ITEM = P.AUDIO_ITEM
_RESULT = P.RESULT_ITEM
_RESULT_SIZE = P.RESULT_ITEM.size
_EVENT_SIZE = P.EVENT_ITEM.size
_ERROR = P.ERROR_BODY
_F32 = struct.Struct("<f")
GATEWAY_MSG_BYTES = 256 * 1024  # split a gateway tick's message above this (engine limit: 1 MiB)
_EPOLLIN = select.EPOLLIN
# Plain ints: bit operations on pyzmq's / the protocol's enum members go through enum.__and__
# and cost more than the rest of a frame's bookkeeping.
_ZMQ_POLLIN, _NOBLOCK = int(zmq.POLLIN), int(zmq.NOBLOCK)
_RESULTS, _ERROR_MSG, _OPENED = int(P.MsgType.RESULTS), int(P.MsgType.ERROR), int(P.MsgType.OPENED)
_AUDIO, _INT16 = int(P.MsgType.AUDIO), int(P.DType.INT16)
_FINAL, _SHED = int(P.ResultFlag.FINAL), int(P.ResultFlag.SHED)


class ZmqLink:
    """Streams ``sid`` (the first ``n_open`` of them opened; the rest never are, and the engine
    refuses their frames). ``released(sid)``: a chunk of that stream was answered or refused."""

    def __init__(self, plan: LoadPlan, ctx: zmq.Context, sid: list[int], n_open: int, audio: StreamAudio,
                 ledger: Ledger, released: Callable[[int], None]) -> None:
        self.plan = plan
        self.ctx = ctx
        self.sid = sid
        self.n = len(sid)
        self.n_open = n_open
        self.audio = audio
        self.ledger = ledger
        self.released = released
        self.ep = select.epoll()
        self.zmq_by_fd: dict[int, zmq.Socket] = {}
        self.sent_socks: list[zmq.Socket] = []  # device sockets sent on since the last check
        self.socks: list[zmq.Socket] = []
        self.closed_streams = 0
        self.gateway_parts: list[bytes] = []
        self.gateway_bytes = 0
        self.gateway_due: list[tuple[int, int, int]] = []
        self.gateway = plan.shape == "gateway"
        self._opening: dict[str, Any] | None = None

    # ---- setup -----------------------------------------------------------------------------
    def _zmq_socket(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
            sock.setsockopt(option, value)
        if self.plan.curve is not None:
            from transport.security import enable_client_curve

            enable_client_curve(sock, *self.plan.curve)
        sock.connect(self.plan.endpoint)
        return sock

    def _connect(self) -> None:
        if self.plan.shape == "device":
            self.socks = [self._zmq_socket() for _ in range(self.n)]
        else:
            self.socks = [self._zmq_socket()] * self.n
        for sock in self.socks:
            fd = cast(int, sock.getsockopt(zmq.FD))
            if fd not in self.zmq_by_fd:
                self.zmq_by_fd[fd] = sock
                self.ep.register(fd, _EPOLLIN)

    def open(self) -> dict[str, Any]:
        params = {"sample_rate": 16000, "dtype": "int16", **self.plan.open_params}
        self._connect()
        failures: Counter[str] = Counter()
        opening = self._opening = {"opened": 0, "failures": failures}
        for s in range(self.n_open):
            rate = self.audio.file[s].rate
            self._send_message(s, P.encode_open(self.sid[s], self.sid[s], {**params, "sample_rate": rate}))
        deadline = time.monotonic() + 30 + 0.01 * self.n
        while opening["opened"] + sum(failures.values()) < self.n_open and time.monotonic() < deadline:
            self._wait(0.2)
        self._opening = None
        return {"opened": opening["opened"], "failures": dict(failures), "wanted": self.n_open}

    def _unique_socks(self) -> list[zmq.Socket]:
        return list({id(x): x for x in self.socks}.values())

    def _send_message(self, s: int, msg: bytes | memoryview) -> None:
        """Send one message on stream s's connection (the gateway's: any s)."""
        sock = self.socks[s]
        sock.send(msg, copy=True)
        self.sent_socks.append(sock)

    def _wait(self, timeout_s: float) -> None:
        """Outside the paced loop: poll, then look at every socket (see _check_sent)."""
        self.poll(timeout_s)
        self._drain(self._unique_socks())

    # ---- sending ---------------------------------------------------------------------------
    def _audio_message(self, s: int, seq: int) -> bytes:
        """Stream s's chunk ``seq`` as a device sends it: an AUDIO message of one item."""
        pcm = self.audio.next_pcm(s)
        return _AUDIO_MSG.pack(b"RS", 1, _AUDIO, seq, self.sid[s], seq, _INT16, len(pcm)) + pcm

    def send(self, s: int, seq: int, due: int) -> None:
        """Send (device) or queue for this tick (gateway) chunk ``seq`` of stream s; ``due``:
        its time on the absolute schedule (0 in max pace)."""
        sid = self.sid[s]
        if self.gateway:
            pcm = self.audio.next_pcm(s)
            self.gateway_parts.append(_ITEM.pack(sid, seq, _INT16, len(pcm)))
            self.gateway_parts.append(pcm)
            self.gateway_bytes += _ITEM.size + len(pcm)
            self.gateway_due.append((s, seq, due))
            if self.gateway_bytes >= GATEWAY_MSG_BYTES:
                self.flush()
            return
        msg = self._audio_message(s, seq)
        now = time.monotonic_ns()
        self._send_message(s, msg)
        self.ledger.sent((sid << 32) | seq, now, due)

    def flush(self) -> None:
        """Gateway shape: one AUDIO message carrying every chunk queued since the last flush."""
        if not self.gateway_parts:
            return
        msg = P.header(P.MsgType.AUDIO) + b"".join(self.gateway_parts)
        now = time.monotonic_ns()
        self._send_message(0, msg)
        sent, sid = self.ledger.sent, self.sid
        for s, seq, due in self.gateway_due:
            sent((sid[s] << 32) | seq, now, due)
        self.gateway_parts = []
        self.gateway_due = []
        self.gateway_bytes = 0

    # ---- receiving -------------------------------------------------------------------------
    def poll(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for replies and take in every one that came."""
        self._check_sent()
        ready = []
        for fd, _events in self.ep.poll(max(timeout_s, 0.0)):
            sock = self.zmq_by_fd.get(fd)
            if sock is not None:
                ready.append(sock)
        if ready:
            self._drain(ready)
        while self.sent_socks:  # max pace: replies released more chunks
            self._check_sent()

    def _drain(self, socks: list[zmq.Socket]) -> None:
        """Receive everything waiting on ``socks``: one zmq_poll per round for all of them
        (cheaper than a ZMQ_EVENTS getsockopt per socket, which pyzmq routes through an enum)."""
        poll, on_message, clock = zmq.zmq_poll, self._on_message, time.monotonic_ns
        while socks:
            ready = poll([(sock, _ZMQ_POLLIN) for sock in socks], 0)
            socks = []
            for sock, _ in ready:
                msg: bytes = sock.recv(_NOBLOCK, copy=True)
                on_message(msg, clock())
                socks.append(sock)

    def _check_sent(self) -> None:
        """A send may consume a socket's wake-up signal for a reply that is already queued
        (ZMQ_FD is edge-like): look at every socket sent on, once per batch of sends."""
        if self.sent_socks:
            socks, self.sent_socks = self.sent_socks, []
            self._drain(list(dict.fromkeys(socks)))

    def _on_message(self, msg: bytes, now: int) -> None:
        kind = msg[3]
        ledger = self.ledger
        if kind == _RESULTS:
            offset, end = P.HEADER.size, len(msg)
            while offset < end:
                sid, seq, _, n_frames, n_events, flags = _RESULT.unpack_from(msg, offset)
                body = offset + _RESULT_SIZE
                offset = body + 4 * n_frames + _EVENT_SIZE * n_events
                if flags & _FINAL:
                    self.closed_streams += 1
                    continue
                if ledger.answer((sid << 32) | seq, n_frames, now):
                    if flags & _SHED:
                        shed = 0
                        for i in range(n_frames):
                            value = _F32.unpack_from(msg, body + 4 * i)[0]
                            shed += value != value
                        ledger.window.shed += shed
                    self.released(sid)
        elif kind == _ERROR_MSG:
            sid, seq, code = _ERROR.unpack_from(msg, P.HEADER.size)
            try:
                name = P.ErrorCode(code).name
            except ValueError:
                name = f"CODE_{code}"
            opening = self._opening
            if opening is not None and seq == 0:
                opening["failures"][name] += 1
                return
            if ledger.refuse((sid << 32) | seq, name):
                self.released(sid)
        elif kind == _OPENED:
            opening = self._opening
            if opening is not None:
                opening["opened"] += 1
        else:
            ledger.window.unexpected += 1

    # ---- the end ---------------------------------------------------------------------------
    def close_streams(self, timeout: float) -> tuple[int, int]:
        """CLOSE every opened stream and wait (up to ``timeout``) for their final results:
        (streams closed, streams to close)."""
        for s in range(self.n_open):
            self._send_message(s, P.encode_stream_op(P.MsgType.CLOSE, self.sid[s], self.sid[s]))
        closed_wanted = self.n_open
        deadline = time.monotonic() + timeout
        self.closed_streams = 0
        while self.closed_streams < closed_wanted and time.monotonic() < deadline:
            self._wait(0.05)
        return self.closed_streams, closed_wanted

    def shutdown(self) -> None:
        for sock in self._unique_socks():
            try:
                sock.close(0)
            except (OSError, zmq.ZMQError):
                pass
        self.socks = []
        self.ep.close()
