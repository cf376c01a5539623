"""The device shape at realtime pace over plain ZMTP sockets, its per-frame work compiled
(bench/load_device_kernels.py): the frames due are sent, and the replies that came are read
and matched to them, in one native call each. Everything else — connecting, opening and
closing streams, ERROR and OPENED replies, ZMTP commands, a socket that takes only part of a
message, a closed connection — is the Python link's (bench/load_zmtp.py), one stream at a
time, with the chunks in flight in the same arrays (:class:`~bench.load_gateway.GatewayLedger`).
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable

import numpy as np
import zmq

from bench import load_device_kernels as kernels
from bench.load_audio import StreamAudio
from bench.load_gateway import GatewayLedger, GatewayLink
from bench.load_kernels import LATENCIES
from bench.load_plan import LoadPlan
from bench.load_socket import Connection
from bench.load_zmtp import _ZmtpTransport
from transport import protocol as P

_INT16 = int(P.DType.INT16)
_EPOLLIN = select.EPOLLIN
_INBOX = 1024  # a stream's partial ZMTP frame kept between reads; a longer one is Python's
_REPLIES = 1 << 14  # replies taken per call before their counts are folded into the window


class ZmtpDeviceLink(_ZmtpTransport, GatewayLink):
    """One plain ZMTP connection per stream, one frame per message, sent on the schedule."""

    def __init__(self, plan: LoadPlan, ctx: zmq.Context, sid: list[int], n_open: int, audio: StreamAudio,
                 ledger: GatewayLedger, released: Callable[[int], None]) -> None:
        super().__init__(plan, ctx, sid, n_open, audio, ledger, released)
        n = self.n
        self.fds = np.full(n, -1, np.intc)
        self.blocked = np.zeros(n, np.bool_)  # its socket holds an outbox: its frames go through Python
        self.python_reads = np.zeros(n, np.bool_)  # Python's parser holds part of a frame of it
        self.inbox = np.zeros((n, _INBOX), np.uint8)
        self.inbox_len = np.zeros(n, np.int64)
        self.buf = np.zeros(_INBOX + kernels.READ_BYTES, np.uint8)
        self.ready = np.zeros(n, np.int64)
        self.lateness = np.zeros(n, np.float32)
        self.latency = np.zeros(_REPLIES, np.float32)
        self.unmatched = np.zeros((_REPLIES, 2), np.int64)
        self.counts = np.zeros(LATENCIES + 1, np.int64)
        self.clock = np.zeros(2, np.int64)
        self.stop = np.zeros(4, np.int64)
        self._warm_up_device()

    def _warm_up_device(self) -> None:
        """Compile (or load from numba's cache) the loops now, not on the first frame: nothing
        is due, nothing ready."""
        self._send_due(0, np.array([0, 0, 1 << 62], np.int64))
        self._read_replies(0, 0)

    def _connect(self) -> None:
        super()._connect()
        self.fds[:] = [conn.fd for conn in self.conns]

    def _send_message(self, s: int, msg: bytes | memoryview) -> None:
        super()._send_message(s, msg)
        self.blocked[s] = bool(self.conns[s].outbox)

    def send_due(self, limit: int) -> int:
        while self.state[2] <= limit:
            self._send_due(limit, self.state)
        return int(self.state[2])

    def _send_due(self, limit: int, state: np.ndarray) -> None:
        """The chunks due by ``limit`` from schedule place ``state``, up to the first that a
        socket did not take whole (bench/load_device_kernels.py)."""
        ledger = self.gateway_ledger
        count, end, taken = kernels.send_due(
            state, limit, self.order, self.base, self.period, self.sids, self.pos, self.chunk_samples,
            self.file_samples, self.file_start, self.pcm, _INT16, self.fds, self.blocked, self.out, self.out16,
            self.tick_streams, self.tick_seqs, self.tick_due, ledger.chunks, ledger.sent_ns, self.lateness, self.clock)
        if count:  # their time-outs are checked from now on (take_replies judges each exactly)
            ledger.sent_chunks(count, self.tick_streams, self.tick_seqs, self.lateness, time.monotonic_ns())
        if end:  # the last chunk's socket did not take all of it: the rest waits in its outbox
            s = int(self.tick_streams[count - 1])
            conn = self.conns[s]
            self.connections.send(conn, bytes(self.message[1 + taken:end]))
            self.blocked[s] = bool(conn.outbox)

    def poll(self, timeout_s: float) -> None:
        live, python_reads, ready = self.connections.live, self.python_reads, self.ready
        k, closed, rest = 0, 0, []
        for fd, events in self.connections.ep.poll(max(timeout_s, 0.0)):
            conn = live.get(fd)
            if conn is None:
                continue
            if events == _EPOLLIN and not python_reads[conn.index]:
                ready[k] = conn.index
                k += 1
            else:
                rest.append((conn, events))
        if k:
            closed += self._take_replies(k)
        for conn, events in rest:
            closed += self._serve(conn, events)
        if closed:  # the engine closed them: what is in flight times out
            self.ledger.window.other_errors["disconnected"] += closed

    def _take_replies(self, k: int) -> int:
        """The replies on the sockets of streams ready[:k]; returns how many were closed."""
        start, closed = 0, 0
        while start < k:
            start, stopped_on, at, end = self._read_replies(k, start)
            if stopped_on == kernels.PYTHON_DATA:
                conn = self.conns[int(self.ready[start - 1])]
                self._on_data(conn, self.buf[at:end].tobytes())
                self.python_reads[conn.index] = bool(conn.inbox)
            elif stopped_on == kernels.PYTHON_SOCKET:
                closed += self._serve(self.conns[int(self.ready[start - 1])], _EPOLLIN)
        return closed

    def _read_replies(self, k: int, start: int) -> list[int]:
        """One call of take_replies over ready[start:k], its counts folded into the window;
        returns where it stopped (``stop``)."""
        ledger = self.gateway_ledger
        kernels.take_replies(self.ready[:k], start, self.fds, self.inbox, self.inbox_len, self.buf, ledger.first_sid,
                             ledger.timeout_ns, ledger.chunks, ledger.sent_ns, self.latency, self.counts,
                             self.unmatched, self.clock, self.stop)
        self.closed_streams += ledger.count_results(self.counts, self.latency, self.unmatched)
        return self.stop.tolist()

    def _serve(self, conn: Connection, events: int) -> int:
        """One connection's events the Python way (bench/load_socket.py), after the partial
        frame the compiled reads kept for it."""
        s = conn.index
        if self.inbox_len[s]:
            conn.inbox += self.inbox[s, :self.inbox_len[s]].tobytes()
            self.inbox_len[s] = 0
        closed = self.connections.serve(conn, events, self._on_data)
        self.python_reads[s] = bool(conn.inbox)
        self.blocked[s] = bool(conn.outbox)
        return closed
