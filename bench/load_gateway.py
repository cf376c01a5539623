"""The gateway shape at realtime pace with its per-chunk work compiled (bench/load_kernels.py):
a tick's AUDIO message built, and a RESULTS message matched to the chunks in flight, in one
native call each. Everything else — connecting, opening and closing streams, ERROR replies —
is :class:`~bench.load_zmq.ZmqLink`'s; the accounting is the :class:`~bench.load_ledger.Ledger`'s,
with the chunks in flight held in arrays (:class:`GatewayLedger`)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np
import zmq

from bench import load_kernels as kernels
from bench.load_audio import StreamAudio
from bench.load_ledger import MAX_TIMED_OUT_KEYS, Ledger
from bench.load_plan import LoadPlan
from bench.load_zmq import GATEWAY_MSG_BYTES, ZmqLink
from transport import protocol as P

_RESULTS, _INT16 = int(P.MsgType.RESULTS), int(P.DType.INT16)


class GatewayLedger(Ledger):
    """The compiled links' ledger (the gateway's, and the device's: bench/load_device.py).
    Chunk ``seq`` of stream index s in flight: ``chunks[s, seq % w] == seq`` (see
    bench/load_kernels.py); time-outs are checked per batch sent (a tick's message, or the device
    frames of one send call). ``timed_out_keys`` holds stream index << 32 | seq (the Ledger's
    hold stream id << 32 | seq)."""

    def __init__(self, chunk_frames: int, timeout_ms: float, streams: int, first_sid: int, period_ns: int) -> None:
        super().__init__(chunk_frames, timeout_ms, lambda sid: None)
        # Room for every chunk a stream can have in flight before its time-out (twice over).
        w = 2 * (self.timeout_ns // period_ns + 2)
        self.chunks = np.zeros((streams, w), np.int64)
        self.sent_ns = np.zeros((streams, w), np.int64)
        self.first_sid = first_sid
        self.ticks: deque[tuple[int, np.ndarray, np.ndarray]] = deque()  # (deadline, streams, seqs)
        self.flying = 0
        self._lateness = np.empty(streams, np.float32)
        self._latency = np.empty(streams, np.float32)
        self._unmatched = np.empty((streams, 2), np.int64)
        self._counts = np.zeros(kernels.LATENCIES + 1, np.int64)
        self._timed_out = np.empty(streams, np.int64)

    def sent_tick(self, count: int, streams: np.ndarray, seqs: np.ndarray, due: np.ndarray, now: int) -> None:
        kernels.mark_sent(count, streams, seqs, due, now, self.chunks, self.sent_ns, self._lateness)
        self.sent_chunks(count, streams, seqs, self._lateness, now)

    def sent_chunks(self, count: int, streams: np.ndarray, seqs: np.ndarray, lateness: np.ndarray, last: int) -> None:
        """``count`` chunks put in flight (``chunks``, ``sent_ns``), the last of them at ``last``."""
        self.window.sent += count * self.chunk_frames
        self.window.lateness.frombytes(lateness[:count].tobytes())
        self.ticks.append((last + self.timeout_ns, streams[:count].copy(), seqs[:count].copy()))
        self.flying += count

    def take_results(self, msg: bytes, now: int) -> int:
        """A RESULTS message: its items counted; returns how many streams it closed (FINAL)."""
        counts = self._counts
        items = len(msg) // (P.RESULT_ITEM.size + 4)  # the most this message can hold
        if items > len(self._latency):  # the loops write without bounds checks
            self._latency = np.empty(items, np.float32)
            self._unmatched = np.empty((items, 2), np.int64)
        kernels.take_results(np.frombuffer(msg, np.uint8), now, self.first_sid, self.timeout_ns, self.chunks,
                             self.sent_ns, self._latency, counts, self._unmatched)
        return self.count_results(counts, self._latency, self._unmatched)

    def count_results(self, counts: np.ndarray, latency: np.ndarray, unmatched_keys: np.ndarray) -> int:
        """What take_results' loops counted, into the window (``counts`` zeroed); returns how
        many streams were closed (FINAL)."""
        answered_frames, shed, timed_out, late, unmatched, final, latencies = counts.tolist()
        counts[:] = 0
        window = self.window
        window.answered += answered_frames
        window.shed += shed
        window.timed_out += timed_out
        window.late += late
        for key, frames in unmatched_keys[:unmatched].tolist():
            if key in self.timed_out_keys:  # a chunk given up on: its reply came after all
                self.timed_out_keys.discard(key)
                window.late += frames
            else:
                window.unexpected += 1
        if latencies:
            window.lat.frombytes(latency[:latencies].tobytes())
        self.flying -= latencies + timed_out // self.chunk_frames  # a latency per chunk answered
        return final

    def refuse(self, key: int, name: str) -> bool:
        """As Ledger.refuse (``key``: stream id << 32 | seq)."""
        s, seq = (key >> 32) - self.first_sid, key & 0xFFFFFFFF
        w = self.chunks.shape[1]
        if 0 <= s < len(self.chunks) and seq and self.chunks[s, seq % w] == seq:
            self.chunks[s, seq % w] = 0
            self.flying -= 1
            self.window.refused[name] += self.chunk_frames
            return True
        self.window.other_errors[name] += 1
        return False

    def expire(self, now: int) -> None:
        ticks = self.ticks
        while ticks and ticks[0][0] <= now:
            _, streams, seqs = ticks.popleft()
            timed_out = kernels.expire(len(streams), streams, seqs, self.chunks, self._timed_out)
            if timed_out:
                self.window.timed_out += timed_out * self.chunk_frames
                self.flying -= timed_out
                if len(self.timed_out_keys) < MAX_TIMED_OUT_KEYS:
                    self.timed_out_keys.update(self._timed_out[:timed_out].tolist())

    def in_flight(self) -> int:
        return self.flying

    def next_deadline(self) -> int | None:
        return self.ticks[0][0] if self.ticks else None


class GatewayLink(ZmqLink):
    """One DEALER carrying every stream; ``send_due`` sends the tick's message."""

    def __init__(self, plan: LoadPlan, ctx: zmq.Context, sid: list[int], n_open: int, audio: StreamAudio,
                 ledger: GatewayLedger, released: Callable[[int], None]) -> None:
        super().__init__(plan, ctx, sid, n_open, audio, ledger, released)
        self.gateway_ledger = ledger
        n = len(sid)
        files = list({id(f): f for f in audio.file}.values())
        starts, at = {}, 0
        for f in files:
            starts[id(f)] = at
            at += len(f.data)
        self.pcm = np.frombuffer(b"".join(f.data for f in files), np.int16)
        self.file_start = np.array([starts[id(f)] for f in audio.file], np.int64)
        self.file_samples = np.array([f.samples for f in audio.file], np.int64)
        self.chunk_samples = np.array(audio.chunk_samples, np.int64)
        self.pos = np.array(audio.pos, np.int64)
        self.sids = np.array(sid, np.int64)
        self.message = bytearray(GATEWAY_MSG_BYTES + P.AUDIO_ITEM.size + 2 * int(self.chunk_samples.max()))
        self.out = np.frombuffer(self.message, np.uint8)
        self.out16 = np.frombuffer(self.message, np.int16)
        self.out[:P.HEADER.size] = np.frombuffer(P.header(P.MsgType.AUDIO), np.uint8)
        self.tick_streams, self.tick_seqs, self.tick_due = (np.empty(n, np.int64) for _ in range(3))
        self.state = np.zeros(3, np.int64)
        self.order = self.base = np.zeros(0, np.int64)
        self.period = 0
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile (or load from numba's cache) the loops for these arrays now, not on the
        first tick, which would leave a second late."""
        nothing_due = np.array([0, 0, 1 << 62], np.int64)
        kernels.build_tick(nothing_due, 0, GATEWAY_MSG_BYTES, self.order, self.base, self.period, self.sids, self.pos,
                           self.chunk_samples, self.file_samples, self.file_start, self.pcm, _INT16, self.out,
                           self.out16, P.HEADER.size, self.tick_streams, self.tick_seqs, self.tick_due)
        ledger = self.gateway_ledger
        ledger.sent_tick(0, self.tick_streams, self.tick_seqs, self.tick_due, 0)
        ledger.expire(1 << 62)
        ledger.take_results(P.header(P.MsgType.RESULTS), 0)

    def schedule(self, order: list[int], base: list[int], period: int) -> None:
        """Stream ``order[i]`` sends chunk k at ``base[i] + k * period`` (bench/load_pacer.py)."""
        self.order, self.base, self.period = np.array(order, np.int64), np.array(base, np.int64), period
        self.state[:] = (0, 0, base[0])

    def send_due(self, limit: int) -> int:
        """Every chunk due at or before ``limit``, in one message (more above
        GATEWAY_MSG_BYTES); returns when the next one is due."""
        while self.state[2] <= limit:
            end, count = kernels.build_tick(self.state, limit, GATEWAY_MSG_BYTES, self.order, self.base, self.period,
                                            self.sids, self.pos, self.chunk_samples, self.file_samples,
                                            self.file_start, self.pcm, _INT16, self.out, self.out16, P.HEADER.size,
                                            self.tick_streams, self.tick_seqs, self.tick_due)
            now = time.monotonic_ns()
            self._send_message(0, memoryview(self.message)[:end])
            self.gateway_ledger.sent_tick(count, self.tick_streams, self.tick_seqs, self.tick_due, now)
        return int(self.state[2])

    def _on_message(self, msg: bytes, now: int) -> None:
        if msg[3] == _RESULTS:
            self.closed_streams += self.gateway_ledger.take_results(msg, now)
        else:
            super()._on_message(msg, now)
