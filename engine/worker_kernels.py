"""The worker's per-frame steps as compiled loops (numba), over the arrays of engine/frame_queue.py.

Queued frames are rows of an int64 table in arrival order, columns ``REC .. DUE``; records
still holding unreleased ring space are rows of another, indexed by serial number modulo
its length, columns ``END .. RATE``. ``st`` holds the queue's counters (``N_PENDING ..``).
A record is read in place, through three views of the input ring's data area: u32 and i64
words for its header and FRAME_META items (transport/records.py), f32 for model inputs.

Written in Python (a tuple, a deque and a dict entry per frame, numpy calls per batch) these
steps cost the workers ~2 us more per frame (docs/bench-history.md, run 15).
"""

from __future__ import annotations

import numpy as np

from engine.compiled import compiled
from transport import records

REC, OFF, SEQ, SLOT, FRESH, DUE = range(6)  # a queued frame: record serial, f32 index of its input, ...
PENDING_COLUMNS = 6
END, LEFT, ENQ, RATE = range(4)  # a record: ring position after it, frames not yet answered, ...
RECORD_COLUMNS = 4
N_PENDING, FIRST, NEXT, QUEUED_SLOTS, ACTIVATED, WINDOW_FRAMES, WINDOW_ID, WINDOW_SLOTS, BATCH_ID = range(9)
COUNTERS = 9
# The record format as plain ints: numba takes module globals as constants.
_HEADER_BYTES, _META_BYTES = records.FRAMES_HEADER.size, records.FRAME_META.itemsize
_KIND_FRAME_SET, _FLAG_FRESH = records.KIND_FRAME_SET, records.FLAG_FRESH
NEVER = 1 << 62  # the due time of a frame that may not be shed


# ``done[slot]`` packs two things into one word, so that one store commits both:
# (seq + 1) << 1 for the slot's last frame whose state is committed (a replay after a crash
# skips the frames before it), and the parity of the state buffer that state is in (the next
# frame reads it and writes the other). The parity is not the seq's: the front-end numbers a
# frame it sheds at intake but never sends it, so a stream's seqs can skip.
@compiled
def committed_seq(done: np.ndarray, slot: int | np.integer) -> int:
    return done[slot] >> 1


@compiled
def current_parity(done: np.ndarray, slot: int | np.integer) -> int:
    return done[slot] & 1


@compiled
def take_record(w32: np.ndarray, w64: np.ndarray, body: int, end: int, done: np.ndarray, rates: np.ndarray,
                frame_ns: np.ndarray, st: np.ndarray, pending: np.ndarray, recs: np.ndarray, queued: np.ndarray,
                since: np.ndarray, seen: np.ndarray) -> int:
    """Queue the frames of the FRAMES record whose payload starts at byte ``body`` (``end``:
    the ring position after it), skipping those whose state is already committed (``seq <
    done[slot]``: a replay after a crash). A FRAMES record's frame i is due ``shed_after_ms``
    after its arrival plus i frame durations of its stream's audio; a FRAME_SET's frames are
    all due together. Returns the frames skipped, or -1 (nothing taken) should either table be
    full."""
    h = body >> 2
    count, width, rate = np.int64(w32[h + 1]), np.int64(w32[h + 2]), np.int64(w32[h + 3])
    enqueued, shed_after_ms = w64[(body >> 3) + 2], np.int64(w32[h + 6])
    n_recs = recs.shape[0]
    if st[NEXT] - st[FIRST] == n_recs or st[N_PENDING] + count > pending.shape[0]:
        return -1
    step = 0
    if w32[h] != _KIND_FRAME_SET:
        for r in range(rates.shape[0]):
            if rates[r] == rate:
                step = frame_ns[r]
    due = enqueued + shed_after_ms * 1_000_000 if shed_after_ms else NEVER
    serial = st[NEXT]
    st[NEXT] = serial + 1
    rec = recs[serial % n_recs]
    rec[END] = end
    rec[ENQ] = enqueued
    rec[RATE] = rate
    meta = body + _HEADER_BYTES
    inputs = (meta + count * _META_BYTES) >> 2
    first = n = st[N_PENDING]
    for i in range(count):
        m = (meta + i * _META_BYTES) >> 2
        seq, slot, flags = w64[m >> 1], np.int64(w32[m + 2]), np.int64(w32[m + 3])
        if seq < committed_seq(done, slot):
            continue
        row = pending[n]
        row[REC] = serial
        row[OFF] = inputs + i * width
        row[SEQ] = seq
        row[SLOT] = slot
        row[FRESH] = (flags & _FLAG_FRESH) != 0
        row[DUE] = due + i * step
        n += 1
        if queued[slot] == 0:
            st[QUEUED_SLOTS] += 1
            since[slot] = st[ACTIVATED]
            st[ACTIVATED] += 1
        queued[slot] += 1
        if seen[slot] != st[WINDOW_ID]:
            seen[slot] = st[WINDOW_ID]
            st[WINDOW_SLOTS] += 1
    rec[LEFT] = n - first
    st[WINDOW_FRAMES] += n - first
    st[N_PENDING] = n
    return count - (n - first)


@compiled
def pick(st: np.ndarray, pending: np.ndarray, recs: np.ndarray, queued: np.ndarray, since: np.ndarray,
         stamp: np.ndarray, max_batch: int, now_ns: int, run: np.ndarray, stale: np.ndarray) -> tuple[int, int, int]:
    """The next batch: the oldest queued frame of each stream (frame k+1 needs k's state), all
    at the sample rate of the first (model inputs of one width). When more streams wait than
    a batch holds, those queued longest without a break go first (``since``: when a stream's
    queue last stopped being empty), as a dict of per-stream queues would order them: a
    stream served one frame at a time keeps its place, so frames are not all run just before
    their shed time, which oldest-frame-first would do under overload. Frames past their
    due time go to ``stale`` (shed), the rest to ``run``; the queue keeps the others in
    order. Returns (run, stale, sample rate)."""
    n_recs = recs.shape[0]
    first_pass = st[BATCH_ID] + 1
    second_pass = first_pass + 1
    st[BATCH_ID] = second_pass
    n = st[N_PENDING]
    want = 0
    order = np.empty(min(n, st[QUEUED_SLOTS]), np.int64)
    streams = 0
    for i in range(n):  # each stream's oldest frame at the batch's rate
        slot = pending[i, SLOT]
        if stamp[slot] != first_pass:
            stamp[slot] = first_pass
            rate = recs[pending[i, REC] % n_recs, RATE]
            if want == 0:
                want = rate
            if rate == want:
                order[streams] = since[slot]
                streams += 1
    if streams > max_batch:
        last = np.partition(order[:streams], max_batch - 1)[max_batch - 1]
    else:
        last = 1 << 62
    kept = n_run = n_stale = 0
    for i in range(n):
        row = pending[i]
        slot = row[SLOT]
        if stamp[slot] != second_pass:
            stamp[slot] = second_pass  # also when not taken: none of its later frames may pass it
            if since[slot] <= last and recs[row[REC] % n_recs, RATE] == want:
                queued[slot] -= 1
                if queued[slot] == 0:
                    st[QUEUED_SLOTS] -= 1
                if row[DUE] < now_ns:
                    stale[n_stale] = row
                    n_stale += 1
                else:
                    run[n_run] = row
                    n_run += 1
                continue
        if kept != i:
            pending[kept] = row
        kept += 1
    st[N_PENDING] = kept
    return n_run, n_stale, want


@compiled
def gather(f32: np.ndarray, run: np.ndarray, states: np.ndarray, done: np.ndarray, recs: np.ndarray, started_ns: int,
           audio: np.ndarray, state: np.ndarray, buckets_us: np.ndarray, queue_hist: np.ndarray) -> float:
    """The batch's model inputs and states (zero for a stream's first frame: FRESH). How long
    each frame queued before the batch started goes into ``queue_hist`` (the first bucket
    whose bound it does not exceed, the last for none); returns their sum in microseconds."""
    width = audio.shape[1]
    n_recs = recs.shape[0]
    total_us = 0.0
    for i in range(audio.shape[0]):
        row = run[i]
        src, dst = f32[row[OFF]:row[OFF] + width], audio[i]
        for c in range(width):
            dst[c] = src[c]
        into = state[i]
        if row[FRESH]:
            for c in range(into.shape[0]):
                into[c] = 0.0
        else:
            held = states[row[SLOT], current_parity(done, row[SLOT])]
            for c in range(into.shape[0]):
                into[c] = held[c]
        waited_us = max(started_ns - recs[row[REC] % n_recs, ENQ], 0) / 1000.0
        total_us += waited_us
        b = 0
        while b < buckets_us.shape[0] and buckets_us[b] < waited_us:
            b += 1
        queue_hist[b] += 1
    return total_us


@compiled
def put_results(run: np.ndarray, states: np.ndarray, done: np.ndarray, new_state: np.ndarray, probs: np.ndarray,
                out: np.ndarray) -> None:
    """Each frame's new state into the buffer it did not read (its next frame reads it once
    ``finish`` commits it), its result into the RESULTS record."""
    for i in range(probs.shape[0]):
        row = run[i]
        src, dst = new_state[i], states[row[SLOT], 1 - current_parity(done, row[SLOT])]
        for c in range(dst.shape[0]):
            dst[c] = src[c]
        item = out[i]
        item.seq = row[SEQ]
        item.slot = row[SLOT]
        item.prob = probs[i]


@compiled
def put_shed(stale: np.ndarray, states: np.ndarray, done: np.ndarray, out: np.ndarray) -> None:
    """Shed frames: each stream's state passes through unchanged (as if the model never saw
    the frame), its result is NaN (the front-end reports it to the client as shed)."""
    nan = np.float32(np.nan)
    for i in range(out.shape[0]):
        row = stale[i]
        parity = current_parity(done, row[SLOT])
        src, dst = states[row[SLOT], parity], states[row[SLOT], 1 - parity]
        if row[FRESH]:
            for c in range(dst.shape[0]):
                dst[c] = 0.0
        else:
            for c in range(dst.shape[0]):
                dst[c] = src[c]
        item = out[i]
        item.seq = row[SEQ]
        item.slot = row[SLOT]
        item.prob = nan


@compiled
def finish(rows: np.ndarray, done: np.ndarray, recs: np.ndarray, st: np.ndarray) -> int:
    """Mark the frames' states committed (after their results are published: one store each,
    the seq and the buffer that now holds the state) and return the ring position up to which
    every record is answered, or -1 if that did not move."""
    n_recs = recs.shape[0]
    for i in range(rows.shape[0]):
        slot = rows[i, SLOT]
        done[slot] = ((rows[i, SEQ] + 1) << 1) | (1 - current_parity(done, slot))
        recs[rows[i, REC] % n_recs, LEFT] -= 1
    return released(recs, st)


@compiled
def released(recs: np.ndarray, st: np.ndarray) -> int:
    n_recs = recs.shape[0]
    position = -1
    while st[FIRST] != st[NEXT] and recs[st[FIRST] % n_recs, LEFT] == 0:
        position = recs[st[FIRST] % n_recs, END]
        st[FIRST] += 1
    return position
