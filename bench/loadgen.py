"""Load-generator processes: replay many microphones, paced, and account for every frame.

A load process (``load_main``) lives for a whole bench run and replays one *point* at a time
when its parent (bench/replay.py) sends it a :class:`LoadPlan`. Per point it

1. opens its streams: ``device`` shape = one DEALER socket (one connection) per stream,
   ``gateway`` shape = one DEALER socket carrying all of this process's streams; the
   per-frame baseline server gets one TCP connection per stream (device shape only);
2. on ``go`` replays audio from WAV files (stream g loops file g mod n, from its own random
   frame-aligned offset), ``chunk_frames`` 512-sample frames per message:

   * ``realtime``: stream i sends chunk k at ``t0 + phase_i + k * chunk_period`` (absolute
     schedule, random phase in [0, period), so nothing drifts and nothing bunches). The
     gateway shape sends on ``tick_ms`` ticks one AUDIO message carrying every stream whose
     chunk is due. The send-time error against the schedule is recorded per chunk.
   * ``max``: closed loop, ``window`` chunks in flight per stream; a reply (or error, or
     time-out) releases the next chunk of that stream at once.

3. matches each reply to its chunk by (stream id, chunk_seq); latency = arrival of the
   result - the moment the chunk's message (and so its last sample) left this process;
4. every ``window_s`` (on the absolute grid ``t0 + j * window_s``) sends the window's
   counters and raw latencies to the parent; on ``stop`` stops sending, waits up to the
   time-out for what is in flight, reports the remainder, closes its streams.

Frame accounting (frames, not messages): ``sent = answered + refused + timed_out`` once a
point has drained. ``answered`` includes ``shed`` frames (the engine's overload policy
answered them with NaN, without inference). ``refused``: an ERROR reply for the chunk, by
error code. ``timed_out``: no reply within ``timeout_ms``; a reply arriving later is counted
``late`` and not answered. ``lost = shed + refused + timed_out`` (an unanswered or unusable
frame), and ``unexplained = sent - answered_ok - lost`` must be 0.

Fault injection for tests: ``unopened_streams`` extra streams are scheduled like the others
but never OPENed, so the engine refuses each of their frames (UNKNOWN_STREAM).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import struct
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from transport import protocol as P

FRAME_MS = 32.0  # a 512-sample frame at 16 kHz, a 256-sample frame at 8 kHz
_FRAME_SAMPLES = {16000: 512, 8000: 256}
_AUDIO_MSG = struct.Struct("<2sBBIIIII")  # header + one AUDIO item header
_ITEM = P.AUDIO_ITEM
_RESULT = P.RESULT_ITEM
_RESULT_SIZE = P.RESULT_ITEM.size
_EVENT_SIZE = P.EVENT_ITEM.size
_ERROR = P.ERROR_BODY
_F32 = struct.Struct("<f")
_PF_HEAD = struct.Struct("<II")
_GATEWAY_MSG_BYTES = 256 * 1024  # split a gateway tick's message above this (engine limit: 1 MiB)
_HOUSEKEEPING_NS = 20_000_000
_MAX_TIMED_OUT_KEYS = 1_000_000
_EPOLLIN, _EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
# Plain ints: bit operations on pyzmq's / the protocol's enum members go through enum.__and__
# and cost more than the rest of a frame's bookkeeping.
_ZMQ_POLLIN, _NOBLOCK = int(zmq.POLLIN), int(zmq.NOBLOCK)
_RESULTS, _ERROR_MSG, _OPENED = int(P.MsgType.RESULTS), int(P.MsgType.ERROR), int(P.MsgType.OPENED)
_AUDIO, _INT16 = int(P.MsgType.AUDIO), int(P.DType.INT16)
_FINAL, _SHED = int(P.ResultFlag.FINAL), int(P.ResultFlag.SHED)


@dataclass(frozen=True)
class LoadPlan:
    """One point for one load process."""

    target: str  # "ringserve" | "per-frame"
    endpoint: str
    shape: str  # "device" | "gateway"
    pace: str  # "realtime" | "max"
    first_stream: int  # global index of this process's first stream (stream id = index + 1)
    streams: int
    chunk_frames: int = 1
    window: int = 2  # chunks in flight per stream, max pace
    tick_ms: float = 4.0  # gateway shape, realtime pace
    timeout_ms: float = 2000.0
    window_s: float = 2.0
    seed: int = 1
    curve: tuple[str, str] | None = None  # (server public key file, client secret key file)
    unopened_streams: int = 0
    open_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class AudioFile:
    name: str
    rate: int
    samples: int
    data: bytes  # int16 PCM of the whole file + a copy of its start (so any chunk is one slice)


def load_audio(audio_dir: Path, max_files: int = 64, chunk_samples_max: int = 512 * 64) -> list[AudioFile]:
    """Every *.wav in ``audio_dir`` (sorted; 16 or 8 kHz after clients.wav's conversions)."""
    from clients.wav import read_wav

    paths = sorted(Path(audio_dir).glob("*.wav"))[:max_files]
    if not paths:
        raise FileNotFoundError(f"no .wav files in {audio_dir}")
    files = []
    for path in paths:
        audio = read_wav(str(path))
        pcm = np.ascontiguousarray(audio.samples, dtype="<i2")
        frame = _FRAME_SAMPLES[audio.sample_rate]
        pcm = pcm[: len(pcm) // frame * frame]
        if len(pcm) < frame:
            continue
        reps = 1 + -(-chunk_samples_max // len(pcm))
        tail = np.tile(pcm, reps)[:chunk_samples_max]
        files.append(AudioFile(path.name, audio.sample_rate, len(pcm), pcm.tobytes() + tail.tobytes()))
    if not files:
        raise FileNotFoundError(f"no usable .wav files (at least one 32 ms frame) in {audio_dir}")
    return files


class _Window:
    """Counters of one reporting window (frames unless named otherwise)."""

    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.shed = 0
        self.refused: Counter[str] = Counter()
        self.timed_out = 0
        self.late = 0
        self.unexpected = 0  # replies matching nothing this process sent
        self.other_errors: Counter[str] = Counter()  # ERRORs not about a pending chunk
        self.lat = array("f")  # ms, one per answered chunk
        self.lateness = array("f")  # ms behind the absolute schedule, one per sent chunk (realtime)

    def export(self, in_flight: int) -> dict[str, Any]:
        return {"sent": self.sent, "answered": self.answered, "shed": self.shed, "refused": dict(self.refused),
                "timed_out": self.timed_out, "late": self.late, "unexpected": self.unexpected,
                "other_errors": dict(self.other_errors), "in_flight": in_flight,
                "lat": self.lat.tobytes(), "lateness": self.lateness.tobytes()}


class _Stop(Exception):
    pass


class _Quit(Exception):
    pass


class _Run:
    """One point: transport setup, the pacing loop, accounting, drain, close."""

    def __init__(self, plan: LoadPlan, files: list[AudioFile], ctx: zmq.Context, conn: Connection) -> None:
        if plan.shape not in ("device", "gateway"):
            raise ValueError(f"shape must be device or gateway, not {plan.shape!r}")
        if plan.pace not in ("realtime", "max"):
            raise ValueError(f"pace must be realtime or max, not {plan.pace!r}")
        if plan.target == "per-frame" and (plan.shape != "device" or plan.unopened_streams):
            raise ValueError("the per-frame baseline speaks the device shape only")
        self.plan = plan
        self.ctx = ctx
        self.conn = conn
        self.n_open = plan.streams
        self.n = plan.streams + plan.unopened_streams
        rng = np.random.default_rng([plan.seed, plan.first_stream])
        self.sid = [plan.first_stream + s + 1 for s in range(self.n)]
        self.file = [files[(plan.first_stream + s) % len(files)] for s in range(self.n)]
        self.chunk_samples = [plan.chunk_frames * _FRAME_SAMPLES[f.rate] for f in self.file]
        self.pos = [int(rng.integers(0, f.samples // _FRAME_SAMPLES[f.rate])) * _FRAME_SAMPLES[f.rate]
                    for f in self.file]
        self.period_ns = int(plan.chunk_frames * FRAME_MS * 1e6)
        self.phase = [int(p) for p in rng.integers(0, self.period_ns, self.n)]
        self.timeout_ns = int(plan.timeout_ms * 1e6)
        self.pending: dict[int, int] = {}  # (sid << 32 | chunk_seq) -> send time (ns)
        self.deadlines: deque[tuple[int, int]] = deque()  # (deadline ns, key), in send order
        self.timed_out_keys: set[int] = set()
        self.next_seq = [1] * self.n
        self.window = _Window()
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int, int], None]] = {}  # TCP connections
        self.zmq_by_fd: dict[int, zmq.Socket] = {}
        self.sent_socks: list[zmq.Socket] = []  # device sockets sent on since the last check
        self.socks: list[Any] = []
        self.closed_streams = 0
        self.gateway_parts: list[bytes] = []
        self.gateway_bytes = 0
        self.gateway_due: list[tuple[int, int, int]] = []
        self.gateway = plan.shape == "gateway" and plan.target == "ringserve"
        self._opening: dict[str, Any] | None = None
        self.stopping = False
        self.draining = False

    # ---- setup -----------------------------------------------------------------------------
    def open(self) -> dict[str, Any]:
        if self.plan.target == "per-frame":
            return self._open_tcp()
        return self._open_zmq()

    def _zmq_socket(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
            sock.setsockopt(option, value)
        if self.plan.curve is not None:
            from transport.security import enable_client_curve

            enable_client_curve(sock, *self.plan.curve)
        sock.connect(self.plan.endpoint)
        return sock

    def _open_zmq(self) -> dict[str, Any]:
        plan = self.plan
        params = {"sample_rate": 16000, "dtype": "int16", **plan.open_params}
        if plan.shape == "device":
            self.socks = [self._zmq_socket() for _ in range(self.n)]
        else:
            self.socks = [self._zmq_socket()] * self.n
        for s, sock in enumerate(self.socks):
            fd = sock.getsockopt(zmq.FD)
            if fd not in self.zmq_by_fd:
                self.zmq_by_fd[fd] = sock
                self.ep.register(fd, _EPOLLIN)
        failures: Counter[str] = Counter()
        opening = self._opening = {"opened": 0, "failures": failures}
        for s in range(self.n_open):
            self.socks[s].send(P.encode_open(self.sid[s], self.sid[s], {**params, "sample_rate": self.file[s].rate}))
        deadline = time.monotonic() + 30 + 0.01 * self.n
        while opening["opened"] + sum(failures.values()) < self.n_open and time.monotonic() < deadline:
            self._poll(0.2)
            self._drain_zmq(list({id(x): x for x in self.socks}.values()))
        self._opening = None
        return {"opened": opening["opened"], "failures": dict(failures), "wanted": self.n_open}

    def _drain_zmq(self, socks: list[zmq.Socket]) -> None:
        """Receive everything waiting on ``socks``: one zmq_poll per round for all of them
        (cheaper than a ZMQ_EVENTS getsockopt per socket, which pyzmq routes through an enum)."""
        poll, on_zmq, clock = zmq.zmq_poll, self._on_zmq, time.monotonic_ns
        while socks:
            ready = poll([(sock, _ZMQ_POLLIN) for sock in socks], 0)
            socks = []
            for sock, _ in ready:
                msg: bytes = sock.recv(_NOBLOCK, copy=True)
                on_zmq(msg, clock())
                socks.append(sock)

    def _check_sent(self) -> None:
        """A send may consume a socket's wake-up signal for a reply that is already queued
        (ZMQ_FD is edge-like): look at every socket sent on, once per batch of sends."""
        if self.sent_socks:
            socks, self.sent_socks = self.sent_socks, []
            self._drain_zmq(list(dict.fromkeys(socks)))

    def _open_tcp(self) -> dict[str, Any]:
        from bench.per_frame_server import HELLO, HELLO_OK

        host, _, port = self.plan.endpoint.removeprefix("tcp://").rpartition(":")
        failures: Counter[str] = Counter()
        opened = 0
        self._tcp_in: list[bytearray] = []
        self._tcp_out: list[bytearray] = []
        self._fd_stream: dict[int, int] = {}
        for s in range(self.n_open):
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(HELLO + struct.pack("<I", self.file[s].rate))
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
            self.handlers[sock.fileno()] = self._on_tcp
            self.ep.register(sock.fileno(), _EPOLLIN)
        return {"opened": opened, "failures": dict(failures), "wanted": self.n_open}

    # ---- sending ---------------------------------------------------------------------------
    def _next_pcm(self, s: int) -> bytes:
        p, cs, f = self.pos[s], self.chunk_samples[s], self.file[s]
        pcm = f.data[2 * p:2 * (p + cs)]
        p += cs
        self.pos[s] = p - f.samples if p >= f.samples else p
        return pcm

    def _track(self, s: int, seq: int, now: int) -> None:
        key = (self.sid[s] << 32) | seq
        self.pending[key] = now
        self.deadlines.append((now + self.timeout_ns, key))
        self.window.sent += self.plan.chunk_frames

    def send_chunk(self, s: int, seq: int, due: int) -> None:
        """Send (device, per-frame) or queue for this tick (gateway) chunk ``seq`` of stream s;
        ``due``: its time on the absolute schedule (0 in max pace)."""
        pcm = self._next_pcm(s)
        sid = self.sid[s]
        if self.gateway:
            self.gateway_parts.append(_ITEM.pack(sid, seq, _INT16, len(pcm)))
            self.gateway_parts.append(pcm)
            self.gateway_bytes += _ITEM.size + len(pcm)
            self.gateway_due.append((s, seq, due))
            if self.gateway_bytes >= _GATEWAY_MSG_BYTES:
                self.flush()
            return
        if self.plan.target == "per-frame":
            msg = _PF_HEAD.pack(4 + len(pcm), seq) + pcm
            now = time.monotonic_ns()
            self._tcp_send(s, msg)
            self._track(s, seq, now)
            if due:
                self.window.lateness.append((now - due) * 1e-6)
            return
        sock = self.socks[s]
        msg = _AUDIO_MSG.pack(b"RS", 1, _AUDIO, seq, sid, seq, _INT16, len(pcm)) + pcm
        now = time.monotonic_ns()
        sock.send(msg, copy=True)
        self._track(s, seq, now)
        if due:
            self.window.lateness.append((now - due) * 1e-6)
        self.sent_socks.append(sock)

    def flush(self) -> None:
        """Gateway shape: one AUDIO message carrying every chunk queued since the last flush."""
        if not self.gateway_parts:
            return
        sock = self.socks[0]
        msg = P.header(P.MsgType.AUDIO) + b"".join(self.gateway_parts)
        now = time.monotonic_ns()
        sock.send(msg, copy=True)
        lateness = self.window.lateness
        for s, seq, due in self.gateway_due:
            self._track(s, seq, now)
            if due:
                lateness.append((now - due) * 1e-6)
        self.gateway_parts = []
        self.gateway_due = []
        self.gateway_bytes = 0
        self.sent_socks.append(sock)

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

    # ---- receiving -------------------------------------------------------------------------
    def _answer(self, key: int, frames: int, now: int) -> bool:
        sent = self.pending.pop(key, None)
        if sent is None:
            if key in self.timed_out_keys:
                self.timed_out_keys.discard(key)
                self.window.late += frames
            else:
                self.window.unexpected += 1
            return False
        if now - sent > self.timeout_ns:  # came after its time-out, before the next scan noticed
            self.window.timed_out += frames
            self.window.late += frames
            self._released(key >> 32)
            return False
        self.window.answered += frames
        self.window.lat.append((now - sent) * 1e-6)
        return True

    def _on_zmq(self, msg: bytes, now: int) -> None:
        kind = msg[3]
        if kind == _RESULTS:
            offset, end = P.HEADER.size, len(msg)
            while offset < end:
                sid, seq, _, n_frames, n_events, flags = _RESULT.unpack_from(msg, offset)
                body = offset + _RESULT_SIZE
                offset = body + 4 * n_frames + _EVENT_SIZE * n_events
                if flags & _FINAL:
                    self.closed_streams += 1
                    continue
                if self._answer((sid << 32) | seq, n_frames, now):
                    if flags & _SHED:
                        shed = 0
                        for i in range(n_frames):
                            value = _F32.unpack_from(msg, body + 4 * i)[0]
                            shed += value != value
                        self.window.shed += shed
                    self._released(sid)
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
            key = (sid << 32) | seq
            if self.pending.pop(key, None) is not None:
                self.window.refused[name] += self.plan.chunk_frames
                self._released(sid)
            else:
                self.window.other_errors[name] += 1
        elif kind == _OPENED:
            opening = self._opening
            if opening is not None:
                opening["opened"] += 1
        else:
            self.window.unexpected += 1

    def _on_tcp(self, events: int, fd: int) -> None:
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
            del self.handlers[fd]
            self.window.other_errors["disconnected"] += 1
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
            if self._answer((sid << 32) | seq, (body_len - 4) // 4, now):
                self._released(sid)
        del buf[:offset]

    def _released(self, sid: int) -> None:
        """Max pace: a chunk of stream ``sid`` came back (or failed): send its next one."""
        if self.plan.pace == "max" and not self.stopping:
            s = sid - 1 - self.plan.first_stream
            seq = self.next_seq[s]
            self.next_seq[s] = seq + 1
            self.send_chunk(s, seq, 0)

    def _poll(self, timeout_s: float) -> None:
        self._check_sent()
        ready = []
        for fd, events in self.ep.poll(max(timeout_s, 0.0)):
            sock = self.zmq_by_fd.get(fd)
            if sock is not None:
                ready.append(sock)
                continue
            handler = self.handlers.get(fd)
            if handler is not None:
                handler(events, fd)
        if ready:
            self._drain_zmq(ready)
        while self.sent_socks:  # max pace: replies released more chunks
            self._check_sent()

    def _expire(self, now: int) -> None:
        deadlines, pending = self.deadlines, self.pending
        while deadlines and deadlines[0][0] <= now:
            _, key = deadlines.popleft()
            if pending.pop(key, None) is not None:
                self.window.timed_out += self.plan.chunk_frames
                if len(self.timed_out_keys) < _MAX_TIMED_OUT_KEYS:
                    self.timed_out_keys.add(key)
                self._released(key >> 32)

    # ---- the loop --------------------------------------------------------------------------
    def _control(self) -> None:
        """Between windows: a ``stop`` from the parent ends the sending phase."""
        try:
            while self.conn.poll(0):
                cmd = self.conn.recv()
                if cmd[0] == "stop":
                    raise _Stop
                if cmd[0] == "quit":
                    raise _Quit
        except (EOFError, OSError):
            raise _Quit from None

    def _report(self, index: int) -> None:
        window, self.window = self.window, _Window()
        self.conn.send(("window", index, window.export(len(self.pending))))

    def run(self, t0: int) -> None:
        plan = self.plan
        window_ns = int(plan.window_s * 1e9)
        next_report = t0 + window_ns
        report_index = 0
        next_house = t0
        tick_ns = int(plan.tick_ms * 1e6) if plan.shape == "gateway" else 0
        gateway = self.gateway
        order = sorted(range(self.n), key=self.phase.__getitem__)
        base = [t0 + self.phase[s] for s in order]
        idx = cycle = 0
        n = len(order)
        period = self.period_ns
        next_due = base[0]
        if plan.pace == "max":
            for s in range(self.n):
                for _ in range(plan.window):
                    seq = self.next_seq[s]
                    self.next_seq[s] = seq + 1
                    self.send_chunk(s, seq, 0)
            self.flush()
            next_due = 1 << 62
        send = self.send_chunk

        def send_due(limit: int) -> None:
            """Every chunk due at or before ``limit`` (on the absolute schedule) goes now."""
            nonlocal idx, cycle, next_due
            if next_due > limit:
                return
            while next_due <= limit:
                send(order[idx], cycle + 1, next_due)
                idx += 1
                if idx == n:
                    idx = 0
                    cycle += 1
                next_due = base[idx] + cycle * period
            if gateway:
                self.flush()

        try:
            while True:
                now = time.monotonic_ns()
                if now >= next_report:
                    # A window holds the chunks due in it, even when a stall made them leave
                    # after its end: their lateness records the stall.
                    send_due(next_report - 1)
                    self._report(report_index)
                    report_index += 1
                    next_report += window_ns
                if now >= next_house:
                    next_house = now + _HOUSEKEEPING_NS
                    self._expire(now)
                    self._control()
                if now >= next_due:
                    send_due(now)
                elif gateway and plan.pace == "max":
                    self.flush()
                wake = min(next_report, next_house)
                if next_due < wake:
                    wake = next_due if not tick_ns else t0 + -(-(next_due - t0) // tick_ns) * tick_ns
                self._poll((wake - time.monotonic_ns()) / 1e9)
        except _Stop:
            pass
        self.stopping = True
        self.flush()
        # Drain: wait for every chunk in flight, up to the time-out.
        while self.pending:
            now = time.monotonic_ns()
            self._expire(now)
            if not self.pending:
                break
            self._poll(min(0.02, (self.deadlines[0][0] - now) / 1e9 if self.deadlines else 0.02))
        self._report(report_index)

    def close(self, timeout: float = 10.0) -> dict[str, Any]:
        closed_wanted = 0
        if self.plan.target == "ringserve":
            for s in range(self.n_open):
                self.socks[s].send(P.encode_stream_op(P.MsgType.CLOSE, self.sid[s], self.sid[s]))
            closed_wanted = self.n_open
            self.stopping = True
            deadline = time.monotonic() + timeout
            self.closed_streams = 0
            while self.closed_streams < closed_wanted and time.monotonic() < deadline:
                self._poll(0.05)
                self._drain_zmq(list({id(x): x for x in self.socks}.values()))  # see _check_sent
        late = self.window.export(len(self.pending))
        result = {"closed": self.closed_streams if self.plan.target == "ringserve" else self.n_open,
                  "close_wanted": closed_wanted if self.plan.target == "ringserve" else self.n_open,
                  "after_close": {"late": late["late"], "unexpected": late["unexpected"],
                                  "other_errors": late["other_errors"]}}
        self.shutdown()
        return result

    def shutdown(self) -> None:
        for sock in {id(s): s for s in self.socks}.values():
            try:
                sock.close(0) if isinstance(sock, zmq.Socket) else sock.close()
            except (OSError, zmq.ZMQError):
                pass
        self.socks = []
        self.ep.close()


def load_main(index: int, audio_dir: str, conn: Connection, nice: int = 0) -> None:
    """Entry point of a load process: load the audio once, then run points until ``quit``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    if nice:
        try:
            os.nice(nice)
        except OSError as exc:
            conn.send(("failed", f"nice {nice}: {exc} (a negative niceness needs privileges)"))
            return
    from bench.procinfo import raise_nofile_limit

    raise_nofile_limit()
    try:
        files = load_audio(Path(audio_dir))
    except Exception as exc:  # report, do not hang the parent
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    ctx = zmq.Context(io_threads=1)
    ctx.setsockopt(zmq.MAX_SOCKETS, 65536)
    conn.send(("idle", {"pid": os.getpid(), "files": [f.name for f in files]}))
    try:
        while True:
            try:
                cmd = conn.recv()
            except (EOFError, OSError):
                return
            if cmd[0] == "quit":
                return
            if cmd[0] != "point":
                continue
            run = None
            try:
                run = _Run(cmd[1], files, ctx, conn)
                conn.send(("ready", run.open()))
                cmd = conn.recv()
                if cmd[0] == "go":
                    run.run(int(cmd[1]))
                    conn.send(("done", run.close()))
                else:
                    run.shutdown()
                    conn.send(("done", {"aborted": True}))
                    if cmd[0] == "quit":
                        return
            except _Quit:
                if run is not None:
                    run.shutdown()
                return
            except Exception as exc:  # report, do not hang the parent
                if run is not None:
                    run.shutdown()
                import traceback

                try:
                    conn.send(("failed", "".join(traceback.format_exception_only(type(exc), exc)).strip()))
                except OSError as send_exc:
                    if send_exc.errno != errno.EPIPE:
                        raise
                    return
    finally:
        ctx.term()
