"""The gateway load's per-chunk work as compiled loops (numba): a tick's message, and the
matching of a RESULTS message's items to the chunks in flight.

The load process shares the machine with the engine it measures, so its CPU per frame lowers
the capacity it finds. Done as Python per chunk (a slice, a struct, a dict entry, a list
append each way) it cost ~5.5 us per frame; numpy per tick does not help, its calls cost
more on every cold wake-up than the bytecode they replace (docs/bench-history.md, run 12).

In flight, chunk ``seq`` of stream ``s`` is ``pending[s, seq % W] == seq`` and its send time
``sent_ns[s, seq % W]``. A reply that matches no chunk in flight is handed back to the caller,
which knows the chunks that timed out (a reply may come any time after): late, or unexpected.
"""

from __future__ import annotations

import numpy as np
from engine.compiled import compiled

from transport import protocol as P

# RESULTS counters (``counts``): what one message's items did (UNEXPECTED: items unmatched).
ANSWERED, SHED, TIMED_OUT, LATE, UNEXPECTED, FINAL, LATENCIES = range(7)
# The wire's sizes and flags, as plain ints: numba takes module globals as constants.
_HEADER, _ITEM, _RESULT, _EVENT = P.HEADER.size, P.AUDIO_ITEM.size, P.RESULT_ITEM.size, P.EVENT_ITEM.size
_FINAL, _SHED = int(P.ResultFlag.FINAL), int(P.ResultFlag.SHED)


@compiled
def _put_u32(out: np.ndarray, at: int, value: int) -> None:
    out[at] = value & 0xFF
    out[at + 1] = (value >> 8) & 0xFF
    out[at + 2] = (value >> 16) & 0xFF
    out[at + 3] = (value >> 24) & 0xFF


@compiled
def _get_u32(msg: np.ndarray, at: int) -> int:
    return int(msg[at]) | int(msg[at + 1]) << 8 | int(msg[at + 2]) << 16 | int(msg[at + 3]) << 24


@compiled
def build_tick(state: np.ndarray, limit: int, max_bytes: int, order: np.ndarray, base: np.ndarray, period: int,
               sid: np.ndarray, pos: np.ndarray, chunk_samples: np.ndarray, file_samples: np.ndarray,
               file_start: np.ndarray, audio: np.ndarray, dtype: int, out: np.ndarray, out16: np.ndarray, at: int,
               tick_streams: np.ndarray, tick_seqs: np.ndarray, tick_due: np.ndarray) -> tuple[int, int]:
    """Every chunk due at or before ``limit`` on the absolute schedule, appended to ``out``
    from byte ``at`` as AUDIO items, until the message would pass ``max_bytes``.
    ``state`` = [idx, cycle, next_due]: the schedule's place, moved on. ``audio``: every
    file's int16 samples (each with a copy of its start, so no chunk wraps), ``file_start[s]``
    the byte where stream s's file begins in it, ``pos[s]`` its next sample; ``out16``:
    ``out`` as int16 (every item starts at an even byte).
    Returns (end of the message, chunks in it, at most ``len(tick_streams)``); chunk j is
    ``tick_streams[j]`` / ``tick_seqs[j]``, due at ``tick_due[j]``."""
    idx, cycle, next_due = state[0], state[1], state[2]
    n = order.shape[0]
    count = 0
    while next_due <= limit:
        s = order[idx]
        cs = chunk_samples[s]
        if count and (at + _ITEM + 2 * cs > max_bytes or count == tick_streams.shape[0]):
            break  # the rest in the next message (a stalled process may owe several chunks a stream)
        seq = cycle + 1
        _put_u32(out, at, sid[s])
        _put_u32(out, at + 4, seq)
        _put_u32(out, at + 8, dtype)
        _put_u32(out, at + 12, 2 * cs)
        # A loop over two slices: it compiles to a vector copy (0.025 us a chunk), where a
        # slice assignment (0.14) or a loop indexing the whole arrays (0.34) do not.
        src, dst = file_start[s] // 2 + pos[s], (at + _ITEM) // 2
        target, source = out16[dst:dst + cs], audio[src:src + cs]
        for c in range(cs):
            target[c] = source[c]
        at += _ITEM + 2 * cs
        p = pos[s] + cs
        pos[s] = p - file_samples[s] if p >= file_samples[s] else p
        tick_streams[count], tick_seqs[count], tick_due[count] = s, seq, next_due
        count += 1
        idx += 1
        if idx == n:
            idx = 0
            cycle += 1
        next_due = base[idx] + cycle * period
    state[0], state[1], state[2] = idx, cycle, next_due
    return at, count


@compiled
def mark_sent(count: int, tick_streams: np.ndarray, tick_seqs: np.ndarray, tick_due: np.ndarray, now: int,
              pending: np.ndarray, sent_ns: np.ndarray, lateness: np.ndarray) -> None:
    """The tick's chunks left at ``now``: in flight from now; ``lateness[j]``: ms behind schedule."""
    w = pending.shape[1]
    for j in range(count):
        s, seq = tick_streams[j], tick_seqs[j]
        pending[s, seq % w] = seq
        sent_ns[s, seq % w] = now
        lateness[j] = (now - tick_due[j]) * 1e-6


@compiled
def expire(count: int, tick_streams: np.ndarray, tick_seqs: np.ndarray, pending: np.ndarray,
           timed_out: np.ndarray) -> int:
    """A tick's chunks whose time-out has passed: those still in flight are no longer, and
    their keys (stream << 32 | seq, stream as an index) go into ``timed_out``. Returns how many."""
    w = pending.shape[1]
    n = 0
    for j in range(count):
        s, seq = tick_streams[j], tick_seqs[j]
        if pending[s, seq % w] == seq:
            pending[s, seq % w] = 0
            timed_out[n] = s << 32 | seq
            n += 1
    return n


@compiled
def take_results(msg: np.ndarray, now: int, first_sid: int, timeout_ns: int, pending: np.ndarray,
                 sent_ns: np.ndarray, latency: np.ndarray, counts: np.ndarray, unmatched: np.ndarray) -> int:
    """A RESULTS message's items (after its header) against the chunks in flight:
    ``counts`` += what they did (ANSWERED, SHED and TIMED_OUT/LATE in frames, FINAL in streams
    closed); each answered chunk's latency (ms) into ``latency`` from ``counts[LATENCIES]`` on;
    an item matching no chunk in flight goes into ``unmatched`` as (key, frames) from
    ``counts[UNEXPECTED]`` on (key: stream << 32 | seq, stream as an index, -1 if none of ours).
    Returns the number of chunks answered."""
    n_streams, w = pending.shape
    at, end = _HEADER, msg.shape[0]
    answered = 0
    while at + _RESULT <= end:
        stream_id, seq = _get_u32(msg, at), _get_u32(msg, at + 4)
        n_frames = _get_u32(msg, at + 16)
        n_events = int(msg[at + 20]) | int(msg[at + 21]) << 8
        flags = int(msg[at + 22]) | int(msg[at + 23]) << 8
        body = at + _RESULT
        at = body + 4 * n_frames + _EVENT * n_events
        if flags & _FINAL:  # the stream's CLOSE answered
            counts[FINAL] += 1
            continue
        s = stream_id - first_sid
        ours = 0 <= s < n_streams
        if not ours or not seq or pending[s, seq % w] != seq:
            unmatched[counts[UNEXPECTED], 0] = s << 32 | seq if ours else -1
            unmatched[counts[UNEXPECTED], 1] = n_frames
            counts[UNEXPECTED] += 1
        elif now - sent_ns[s, seq % w] > timeout_ns:  # came after its time-out, before expire() noticed
            pending[s, seq % w] = 0
            counts[TIMED_OUT] += n_frames
            counts[LATE] += n_frames
        else:
            pending[s, seq % w] = 0
            counts[ANSWERED] += n_frames
            latency[counts[LATENCIES]] = (now - sent_ns[s, seq % w]) * 1e-6
            counts[LATENCIES] += 1
            answered += 1
            if flags & _SHED:  # its NaN probabilities are the shed frames
                for i in range(n_frames):
                    bits = _get_u32(msg, body + 4 * i)
                    counts[SHED] += (bits & 0x7F800000) == 0x7F800000 and (bits & 0x7FFFFF) != 0
    return answered
