"""The device load's per-frame work as compiled loops (numba), the system calls included: the
frames due sent, each on its stream's socket, and the replies read and matched to them.

A device's frame is its own message on its own connection, so in Python each cost the load
process a message built, a ``send``, an epoll entry, a ``recv``, a ZMTP parse and a ledger entry:
~18 us of user CPU a frame on a 2-vCPU EPYC VM, on the cores of the engine it measures. Here
libc's ``send`` and ``recv`` are called from the loops themselves: ~14 us with two load
processes, ~9 with one, mostly Python once per wake-up rather than per frame (perf: libpython
18 % of the process, the kernel's TCP work 63 %; docs/bench-history.md, runs 30-31). What is not the common case — a socket that takes only part of a message, a
reply that is not a RESULTS message, a ZMTP command, a closed connection — goes back to the
Python link, which handles it as the pure-Python load does (bench/load_zmtp.py).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np
from engine.compiled import compiled
from numba import types

from bench.load_kernels import LATENCIES, UNEXPECTED, _put_u32, build_tick, mark_sent, take_results
from transport import protocol as P

_send: Any = types.ExternalFunction("send", types.intp(types.intc, types.voidptr, types.size_t, types.intc))
_recv: Any = types.ExternalFunction("recv", types.intp(types.intc, types.voidptr, types.size_t, types.intc))
_clock_gettime: Any = types.ExternalFunction("clock_gettime", types.intc(types.intc, types.voidptr))
_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_MONOTONIC = time.CLOCK_MONOTONIC
_HEADER, _ITEM, _AUDIO, _RESULTS = P.HEADER.size, P.AUDIO_ITEM.size, int(P.MsgType.AUDIO), int(P.MsgType.RESULTS)
_MAGIC0, _MAGIC1, _VERSION = P.MAGIC[0], P.MAGIC[1], P.VERSION
_ZMTP_MORE, _ZMTP_LONG, _ZMTP_COMMAND = 0x01, 0x02, 0x04
# A message is built at byte 1 of ``out``: a ZMTP long-frame head (9 bytes; a frame holds at least
# 256 samples, so never a short one), the header, one item: its samples start on an even byte.
_FRAME_AT = 1
_ITEM_AT = _FRAME_AT + 9 + _HEADER
READ_BYTES = 4096  # a socket's read per call: epoll reports it again if more waits
_READ_ITEMS = READ_BYTES // P.RESULT_ITEM.size + 1  # the most one read can hold
# What a call of take_replies stopped on (``stop[1]``).
DONE, PYTHON_DATA, PYTHON_SOCKET = 0, 1, 2


@compiled
def _now(clock: np.ndarray) -> int:
    _clock_gettime(_MONOTONIC, clock.ctypes.data)
    return clock[0] * 1_000_000_000 + clock[1]


@compiled
def send_due(state: np.ndarray, limit: int, order: np.ndarray, base: np.ndarray, period: int, sid: np.ndarray,
             pos: np.ndarray, chunk_samples: np.ndarray, file_samples: np.ndarray, file_start: np.ndarray,
             audio: np.ndarray, dtype: int, fds: np.ndarray, blocked: np.ndarray, out: np.ndarray, out16: np.ndarray,
             streams: np.ndarray, seqs: np.ndarray, dues: np.ndarray, pending: np.ndarray, sent_ns: np.ndarray,
             lateness: np.ndarray, clock: np.ndarray) -> tuple[int, int, int]:
    """Every chunk due at or before ``limit`` (``state`` and the audio as in build_tick), each
    sent as one AUDIO message on its stream's socket and put in flight (``pending``/``sent_ns``
    as in take_results; ``lateness`` in ms). Stops after a chunk whose stream is ``blocked`` or
    whose socket did not take all of it: out[1:end] is its message, of which ``taken`` bytes went.
    Returns (chunks, end or 0, taken); chunk j is ``streams[j]`` / ``seqs[j]``, due at ``dues[j]``."""
    count = 0
    while state[2] <= limit and count < streams.shape[0]:
        end, _ = build_tick(state, limit, out.shape[0], order, base, period, sid, pos, chunk_samples, file_samples,
                            file_start, audio, dtype, out, out16, _ITEM_AT, streams[count:count + 1],
                            seqs[count:count + 1], dues[count:count + 1])
        s, seq = streams[count], seqs[count]
        size = end - _FRAME_AT - 9
        out[_FRAME_AT] = _ZMTP_LONG
        for b in range(8):
            out[_FRAME_AT + 1 + b] = (size >> (56 - 8 * b)) & 0xFF
        at = _FRAME_AT + 9
        out[at], out[at + 1], out[at + 2], out[at + 3] = _MAGIC0, _MAGIC1, _VERSION, _AUDIO
        _put_u32(out, at + 4, seq)
        mark_sent(1, streams[count:count + 1], seqs[count:count + 1], dues[count:count + 1], _now(clock), pending,
                  sent_ns, lateness[count:count + 1])
        count += 1
        if blocked[s]:
            return count, end, 0
        sent = _send(fds[s], out[_FRAME_AT:].ctypes.data, end - _FRAME_AT, _FLAGS)
        if sent != end - _FRAME_AT:
            return count, end, max(sent, 0)
    return count, 0, 0


@compiled
def take_replies(ready: np.ndarray, start: int, fds: np.ndarray, inbox: np.ndarray, inbox_len: np.ndarray,
                 buf: np.ndarray, first_sid: int, timeout_ns: int, pending: np.ndarray, sent_ns: np.ndarray,
                 latency: np.ndarray, counts: np.ndarray, unmatched: np.ndarray, clock: np.ndarray,
                 stop: np.ndarray) -> None:
    """Read the sockets of streams ``ready[start:]`` and take their RESULTS messages
    (take_results' ``counts``, ``latency`` and ``unmatched``; a partial frame waits in the
    stream's ``inbox``). Stops early on a stream whose data or socket needs Python: ``stop`` =
    [index in ``ready`` to go on from, DONE / PYTHON_DATA (``buf[stop[2]:stop[3]]`` is that
    stream's data from there) / PYTHON_SOCKET (its read failed), at, end], or when
    ``latency`` or ``unmatched`` could not hold another read's items."""
    for r in range(start, ready.shape[0]):
        if counts[LATENCIES] + _READ_ITEMS > latency.shape[0] or counts[UNEXPECTED] + _READ_ITEMS > unmatched.shape[0]:
            stop[0], stop[1] = r, DONE
            return
        s = ready[r]
        kept = inbox_len[s]
        buf[:kept] = inbox[s, :kept]
        got = _recv(fds[s], buf[kept:].ctypes.data, READ_BYTES, _FLAGS)
        if got <= 0:
            stop[0], stop[1] = r + 1, PYTHON_SOCKET
            return
        now = _now(clock)
        end, at = kept + got, 0
        inbox_len[s] = 0
        while end - at >= 2:
            flags = buf[at]
            head, size = 2, int(buf[at + 1])
            if flags & _ZMTP_LONG:
                if end - at < 9:
                    break
                head, size = 9, 0
                for b in range(8):
                    size = size << 8 | int(buf[at + 1 + b])
            if end - at < head + size:
                break
            if flags & (_ZMTP_MORE | _ZMTP_COMMAND) or size < _HEADER or buf[at + head + 3] != _RESULTS:
                stop[0], stop[1], stop[2], stop[3] = r + 1, PYTHON_DATA, at, end
                return
            take_results(buf[at + head:at + head + size], now, first_sid, timeout_ns, pending, sent_ns, latency,
                         counts, unmatched)
            at += head + size
        if end - at > inbox.shape[1]:
            stop[0], stop[1], stop[2], stop[3] = r + 1, PYTHON_DATA, at, end
            return
        inbox[s, :end - at] = buf[at:end]
        inbox_len[s] = end - at
    stop[0], stop[1] = ready.shape[0], DONE
