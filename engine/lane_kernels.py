"""The lane's intake as compiled loops (numba): one native call per step of a message.

A frame set's intake done as numpy is ~60 calls per message, and on a busy box each costs
~2.5 us (every wake-up finds caches that the workers' onnxruntime just used): the front-end
then spends several microseconds per frame in call overhead, not in work. These loops do
the same steps over every item of a message in one call each. They are compiled once
(``cache=True`` keeps the machine code under ``__pycache__``) and ``warm_up`` loads them
before the daemon takes clients, so no client waits on the compiler.

Verdicts (``admit``): what happens to each item of a frame set.
"""

from __future__ import annotations

import numpy as np
from engine import vad_kernels as vad
from engine.compiled import compiled

NOT_IN_LANE = -1
GO = 0
LATE = 1  # shed at intake: older than its stream's shed_after_ms
QUEUE_FULL = 2  # shed at intake: its worker's queue is full
REFUSED = 3  # its worker's queue is full and the stream asked never to be shed


@compiled
def lane_fits(fits: np.ndarray, slots: np.ndarray, on: np.ndarray, shape: np.ndarray, next_seq: np.ndarray,
              expected_seq: np.ndarray, shape_key: int, limit: int, in_lane: np.ndarray) -> int:
    """``in_lane[i]``: item i's stream is in the lane, takes this shape and has room in flight.
    Returns how many items fit but their stream is not in the lane (it may be promoted)."""
    outside = 0
    for i in range(slots.shape[0]):
        s = slots[i]
        if not fits[i]:
            in_lane[i] = False
        elif not on[s]:
            in_lane[i] = False
            outside += 1
        else:
            in_lane[i] = shape[s] == shape_key and next_seq[s] - expected_seq[s] < limit
    return outside


@compiled
def admit(in_lane: np.ndarray, slots: np.ndarray, audio_ns: np.ndarray, ns_per_sample: np.ndarray,
          clock_ns: np.ndarray, shed_after_ms: np.ndarray, worker: np.ndarray, room: np.ndarray, samples: int,
          now_ns: int, drained_ns: int, fresh_ns: int, arrived: np.ndarray, verdict: np.ndarray,
          keys: np.ndarray, groups: np.ndarray, counts: np.ndarray) -> tuple[int, int]:
    """Each lane item's arrival (StreamTable.arrival: its stream's audio clock moves on), and
    its verdict; ``keys[i]`` = worker << 32 | shed_after_ms, the record a GO item goes in
    (-1 otherwise), and the records: ``groups[:g]`` their keys in order of first use,
    ``counts[:g]`` their items. Returns (items that go, g)."""
    fresh = now_ns - drained_ns <= fresh_ns
    going = n_groups = 0
    for i in range(slots.shape[0]):
        keys[i] = -1
        if not in_lane[i]:
            verdict[i] = NOT_IN_LANE
            continue
        s = slots[i]
        audio = audio_ns[s] + samples * ns_per_sample[s]
        audio_ns[s] = audio
        if fresh:
            clock_ns[s] = now_ns - audio
            at = now_ns
        else:
            at = min(now_ns, max(drained_ns, clock_ns[s] + audio))
        arrived[i] = at
        shed_after = shed_after_ms[s]
        if shed_after > 0 and now_ns - at > 1_000_000 * shed_after:
            verdict[i] = LATE
        elif not room[worker[s]]:
            verdict[i] = QUEUE_FULL if shed_after > 0 else REFUSED
        else:
            verdict[i] = GO
            key = worker[s] << 32 | shed_after
            keys[i] = key
            going += 1
            g = 0  # a handful of records: one per worker, unless streams chose other deadlines
            while g < n_groups and groups[g] != key:
                g += 1
            if g == n_groups:
                groups[g] = key
                counts[g] = 0
                n_groups += 1
            counts[g] += 1
    return going, n_groups


@compiled
def by_client(conns: np.ndarray, words: np.ndarray, out_conns: np.ndarray, out_words: np.ndarray,
              bounds: np.ndarray) -> int:
    """Reply items grouped by client, in order within each: 1 if every item is one client's
    (nothing copied), else the groups' count k, the items copied to ``out_words`` sorted by
    client (``out_conns``) and group g being items ``bounds[g]:bounds[g + 1]``."""
    n = conns.shape[0]
    same = True
    for i in range(1, n):
        if conns[i] != conns[0]:
            same = False
            break
    if same:
        return 1
    order = np.argsort(conns, kind="mergesort")
    k = 0
    for j in range(n):
        i = order[j]
        out_conns[j] = conns[i]
        out_words[j] = words[i]
        if j == 0 or out_conns[j] != out_conns[j - 1]:
            bounds[k] = j
            k += 1
    bounds[k] = n
    return k


@compiled
def uniform_items(heads: np.ndarray, dtype: int, nbytes: int) -> bool:
    """Every AUDIO item header (rows of words: stream, chunk, dtype, nbytes) says ``dtype``
    and ``nbytes``."""
    for i in range(heads.shape[0]):
        if heads[i, 2] != dtype or heads[i, 3] != nbytes:
            return False
    return True


@compiled
def _take_seq(s: int, next_seq: np.ndarray, chunk_seq: np.ndarray, request_id: np.ndarray, arrived_ns: np.ndarray,
              its_chunk_seq: int, its_request_id: int, its_arrival: int) -> int:
    """Stream slot ``s``'s next seq, its chunk's ids and arrival kept in flight; returns the seq."""
    seq = next_seq[s]
    next_seq[s] = seq + 1
    k = seq % chunk_seq.shape[1]
    chunk_seq[s, k] = its_chunk_seq
    request_id[s, k] = its_request_id
    arrived_ns[s, k] = its_arrival
    return seq


@compiled
def fill_frame_set(key: int, keys: np.ndarray, slots: np.ndarray, flat: np.ndarray, stride: int, n_samples: int,
                   scale: np.float32,
                   chunk_seqs: np.ndarray, request_ids: np.ndarray, arrived: np.ndarray, now_s: float,
                   buffers: np.ndarray, next_seq: np.ndarray, chunk_seq: np.ndarray, request_id: np.ndarray,
                   arrived_ns: np.ndarray, fresh: np.ndarray, samples_in: np.ndarray, last_active: np.ndarray,
                   flag_fresh: int, meta: np.ndarray, audio: np.ndarray) -> int:
    """The items with ``keys[i] == key`` into one FRAME_SET record, in order (``meta``: its
    FRAME_META items as [count, 4] uint32 words: seq low and high, slot, flags; ``audio``: the
    model inputs). Item i's samples are ``flat[i * stride:][:n_samples]``. Each item gets its
    stream's next sequence number, its chunk's ids and arrival kept in flight, and its model
    input [context | frame] (int16 scaled by ``scale``; 0: float32 taken as is); each stream's
    context moves on to its frame's end. Returns the earliest arrival among them."""
    context = audio.shape[1] - n_samples
    j = 0
    earliest = 1 << 62
    for i in range(slots.shape[0]):
        if keys[i] != key:
            continue
        s = slots[i]
        seq = _take_seq(s, next_seq, chunk_seq, request_id, arrived_ns, chunk_seqs[i], request_ids[i], arrived[i])
        earliest = min(earliest, arrived[i])
        meta[j, 0] = seq & 0xFFFFFFFF
        meta[j, 1] = seq >> 32
        meta[j, 2] = s
        meta[j, 3] = flag_fresh if fresh[s] else 0
        fresh[s] = False
        samples_in[s] += n_samples
        last_active[s] = now_s
        # Loops over slices: they compile to vector copies, where indexing the whole arrays
        # in the loop does not (~10x slower).
        row, kept, frame_in = audio[j], buffers[s, :context], flat[i * stride:i * stride + n_samples]
        head, tail = row[:context], row[context:]
        for c in range(context):
            head[c] = kept[c]
        if scale:
            for c in range(n_samples):
                tail[c] = frame_in[c] * scale
        else:
            for c in range(n_samples):
                tail[c] = frame_in[c]
        last = row[n_samples:]
        for c in range(context):
            kept[c] = last[c]
        j += 1
    return earliest


@compiled
def hold_shed(verdict: np.ndarray, slots: np.ndarray, flat: np.ndarray, stride: int, n_samples: int, context: int,
              scale: np.float32, chunk_seqs: np.ndarray, request_ids: np.ndarray, arrived: np.ndarray, now_s: float,
              buffers: np.ndarray, next_seq: np.ndarray, expected_seq: np.ndarray, chunk_seq: np.ndarray,
              request_id: np.ndarray, arrived_ns: np.ndarray, unsent: np.ndarray, samples_in: np.ndarray,
              last_active: np.ndarray, head_seqs: np.ndarray, head_slots: np.ndarray) -> int:
    """Shedding at intake without leaving the lane: each LATE or QUEUE_FULL item takes its
    stream's next seq, in flight like a frame sent to a worker but marked ``unsent`` (answer
    answers it, shed, once the frames before it are answered); its audio still becomes its
    stream's context. Those with nothing before them in flight go to ``head_seqs`` /
    ``head_slots``, to be answered now; returns their count."""
    in_flight = chunk_seq.shape[1]
    gain = scale if scale else np.float32(1.0)
    heads = 0
    for i in range(slots.shape[0]):
        if verdict[i] != LATE and verdict[i] != QUEUE_FULL:
            continue
        s = slots[i]
        seq = _take_seq(s, next_seq, chunk_seq, request_id, arrived_ns, chunk_seqs[i], request_ids[i], arrived[i])
        unsent[s, seq % in_flight] = True
        samples_in[s] += n_samples
        last_active[s] = now_s
        kept, frame_in = buffers[s, :context], flat[i * stride:i * stride + n_samples]
        if n_samples >= context:
            tail = frame_in[n_samples - context:]
            for c in range(context):
                kept[c] = tail[c] * gain
        else:
            for c in range(context - n_samples):
                kept[c] = kept[c + n_samples]
            for c in range(n_samples):
                kept[context - n_samples + c] = frame_in[c] * gain
        if expected_seq[s] == seq:
            head_seqs[heads] = seq
            head_slots[heads] = s
            heads += 1
    return heads


@compiled
def answer(seqs: np.ndarray, slots: np.ndarray, probs: np.ndarray, on: np.ndarray, expected_seq: np.ndarray,
           next_seq: np.ndarray, unsent: np.ndarray, samples_out: np.ndarray, frame: np.ndarray,
           frame_base: np.ndarray, quiet_lo: np.ndarray, quiet_hi: np.ndarray, quiet_until: np.ndarray,
           vad_state: np.ndarray, vad_limits: np.ndarray, stream_id: np.ndarray, chunk_seq: np.ndarray,
           conn: np.ndarray, arrived_ns: np.ndarray, buckets_s: np.ndarray, now_s: float, shed_flag: int,
           words: np.ndarray, floats: np.ndarray, mine: np.ndarray, conns: np.ndarray, scratch: np.ndarray,
           events: np.ndarray, hist: np.ndarray, counts: np.ndarray) -> float:
    """Lane.answer's loop: each result of a lane stream that comes in order (``mine[i]``) moves
    its stream on and becomes a reply item (``words``/``floats``: REPLY_ITEM items as [n, 7]
    words, ``conns`` their clients); a NaN result (the worker shed the frame) is flagged
    ``shed_flag``. The frames shed at intake that follow it in its stream (``unsent``: they
    hold a seq but never went to a worker) are answered after it, as shed. A frame that may
    move the stream's speech-event machine (vad_kernels.quiet) is pushed through it. Items
    without events fill the buffers from the front, those with events from the back, their
    events counted in the item and written as rows (item, kind, frame, sample) of ``events``.
    Each answered chunk's wait, arrival to now, goes into ``hist`` (bisect_left over
    ``buckets_s``). ``counts``: items without events, items with events, event rows, items
    shed, of them unsent, results answered. Returns the seconds waited."""
    in_flight = chunk_seq.shape[1]
    j = n_events = n_shed = n_unsent = n_mine = 0
    back = words.shape[0]
    waited = 0.0
    nan = np.float32(np.nan)
    for i in range(seqs.shape[0]):
        s, seq, prob = slots[i], seqs[i], probs[i]
        if not (on[s] and expected_seq[s] == seq):
            mine[i] = False
            continue
        mine[i] = True
        n_mine += 1
        while True:
            k = seq % in_flight
            expected_seq[s] = seq + 1
            samples_out[s] += frame[s]
            first = seq - frame_base[s]
            got = 0
            if not (quiet_lo[s] <= prob < quiet_hi[s] and first < quiet_until[s]):  # NaN: never quiet
                st, lim = vad_state[s], vad_limits[s]
                st[vad.FRAME] = first
                got = vad.push(st, lim, prob, scratch)
                quiet_lo[s], quiet_hi[s], quiet_until[s] = vad.quiet(st, lim)
            if got:
                back -= 1
                at = back
                for e in range(got):
                    events[n_events, 0] = at
                    events[n_events, 1] = scratch[e, 0]  # kind
                    events[n_events, 2] = scratch[e, 2]  # frame
                    events[n_events, 3] = scratch[e, 1]  # sample
                    n_events += 1
            else:
                at = j
                j += 1
            flags = 0
            if prob != prob:
                flags = shed_flag
                n_shed += 1
            words[at, 0] = stream_id[s]
            words[at, 1] = chunk_seq[s, k]
            words[at, 2] = first & 0xFFFFFFFF
            words[at, 3] = first >> 32
            words[at, 4] = 1
            words[at, 5] = got | flags << 16
            floats[at, 6] = prob
            conns[at] = conn[s]
            wait = now_s - arrived_ns[s, k] / 1e9
            waited += wait
            b = 0
            while b < buckets_s.shape[0] and buckets_s[b] < wait:
                b += 1
            hist[b] += 1
            if unsent[s, k]:
                unsent[s, k] = False
                n_unsent += 1
            seq += 1
            if seq == next_seq[s] or not unsent[s, seq % in_flight]:
                break
            prob = nan
    counts[0], counts[1], counts[2], counts[3], counts[4], counts[5] = (j, words.shape[0] - back, n_events, n_shed,
                                                                      n_unsent, n_mine)
    return waited
