"""One whole frame for each of many streams, taken in bulk.

Taken item by item (StreamTable.audio_item) a frame costs the front-end tens of microseconds
of Python, and the front-end is one process: its cost per frame caps what any number of
workers can serve. Frames that all have one size and dtype form an array, so validation,
int16 scaling, the 64-sample context of every stream and the records to the workers are a
few calls for all of them, and so is the per-stream bookkeeping of streams in the lane
(engine/lane.py: sequence numbers, frames in flight, the audio clock): the loops over the
items are compiled (engine/lane_kernels.py), one call per step of a message. The frames go to
each worker as one FRAME_SET record (transport/records.py). Two traffic shapes give such frames:

- a gateway multiplexes its microphones and sends, every tick, one message holding the next
  frame of each stream that is due (``take_frame_set``);
- devices each send one frame per message, and a busy front-end reads many of them at once
  (engine/device_frames.py).

Items that do not fit the common case — a stream with a partial frame buffered, a chunk that
is not exactly one frame, an unknown or closing stream, NaN samples, a stream at its in-flight
limit, a stream's second frame in the same set — go through the item-by-item path after the
set (their streams leave the lane first), which produces their results or errors exactly as
before.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Callable, cast

import numpy as np

from engine import lane_kernels as kernels
from engine import slot_index
from engine.lane import IN_FLIGHT, REPLY_ITEM, Lane, shape_key
from engine.stats import N_BUCKETS
from engine.streams import FRESH_NS
from engine.vad_events import SpeechSegmenter, VadParams
from transport import protocol as P
from transport import records
from transport.protocol import ErrorCode

if TYPE_CHECKING:
    from engine.control import Outlet, StreamTable

# Below this many frames the numpy set-up costs more than it saves.
MIN_ITEMS = 4
_INT16_SCALE = np.float32(1.0 / 32768.0)
_HEAD_WORDS = P.AUDIO_ITEM.size // 4


class Frames:
    """n one-frame chunks of one dtype and size, and where each came from."""

    __slots__ = ("identities", "request_ids", "ids", "chunk_seqs", "pcm", "flat", "stride", "dtype", "locate", "held")

    def __init__(self, identities: list[bytes], request_ids: list[int], ids: list[int], chunk_seqs: list[int],
                 flat: np.ndarray, stride: int, samples: int, dtype: int, locate: Callable[[int], tuple[bytes, int]],
                 held: frozenset[int] = frozenset()) -> None:
        self.identities = identities
        self.request_ids = request_ids
        self.ids = ids
        self.chunk_seqs = chunk_seqs
        # Item i's samples are flat[i * stride:i * stride + samples] (the wire's dtype); the
        # compiled loops copy from the contiguous ``flat``, numpy reads the [n, samples] ``pcm``.
        self.flat, self.stride = flat, stride
        size, n = flat.itemsize, (len(flat) - samples) // stride + 1
        self.pcm = np.ndarray((n, samples), flat.dtype, flat, 0, (stride * size, size))
        self.dtype = dtype
        self.locate = locate  # item i -> (message, offset of its PCM), for the item-by-item path
        self.held = held  # items that must take the item-by-item path whatever their stream's state


def take_frame_set(table: StreamTable, identity: bytes, request_id: int, msg: bytes) -> bool:
    """Take ``msg`` (an AUDIO message) in bulk; False if it has not the frame-set shape and
    nothing of it was used. A message that names an open stream twice, or whose items differ
    in size, or a client with no stream open, is not taken here."""
    base = P.HEADER.size
    if len(msg) - base < MIN_ITEMS * P.AUDIO_ITEM.size:
        return False
    _, _, dtype, nbytes = P.AUDIO_ITEM.unpack_from(msg, base)
    shape = table.frame_shapes.get((dtype, nbytes))
    stride = P.AUDIO_ITEM.size + nbytes
    n, rest = divmod(len(msg) - base, stride)
    if shape is None or rest or not MIN_ITEMS <= n <= table.max_items_per_message:
        return False
    heads = np.ndarray((n, _HEAD_WORDS), "<u4", msg, base, (stride, 4))
    # Every item claiming the first one's size is what makes this walk the same as the
    # item-by-item parser's: item i's header is then at base + i * stride.
    if not kernels.uniform_items(heads, dtype, nbytes):
        return False
    streams = table.connections.get(identity)
    if streams is None:
        return False  # no stream open: every item is an error, from the item-by-item path
    slots = np.empty(n, np.intp)
    table.lookups += 1
    if not slot_index.lookup(streams.ids, streams.slots, heads[:, 0], table.slot_stamps, table.lookups, slots):
        return False
    np_dtype, samples = P.NUMPY_DTYPES[dtype], shape[1]
    step = stride // np_dtype.itemsize
    flat = np.frombuffer(msg, np_dtype, (n - 1) * step + samples, base + P.AUDIO_ITEM.size)
    frames = Frames([identity] * n, [request_id] * n, heads[:, 0].tolist(), heads[:, 1].tolist(), flat, step,
                    samples, dtype, lambda i: (msg, base + i * stride + P.AUDIO_ITEM.size))
    take_frames(table, frames, slots)
    return True


def take_frames(table: StreamTable, frames: Frames, slots: np.ndarray) -> None:
    """Every frame of a lane stream (engine/lane.py) in bulk, one record per worker; then, in
    order, the rest item by item. ``slots[i]``: item i's stream's slot, -1 if it is not open
    (intp; overwritten)."""
    pcm, dtype = frames.pcm, frames.dtype
    n, samples = pcm.shape
    rate, _ = table.frame_shapes[(dtype, samples * pcm.itemsize)]
    context = table.context_samples[rate]
    width = context + samples
    lane = table.lane
    fits = slots >= 0
    if frames.held:
        fits[list(frames.held)] = False
    if dtype == P.DType.FLOAT32:
        fits &= np.isfinite(pcm).all(axis=1)
    slots[~fits] = 0  # a valid index; these items are not taken
    shape, limit = shape_key(dtype, rate), min(table.max_in_flight, IN_FLIGHT)
    in_lane = np.empty(n, np.bool_)
    if kernels.lane_fits(fits, slots, lane.on, lane.shape, lane.next_seq, lane.expected_seq, shape, limit, in_lane):
        for i in np.flatnonzero(fits & ~lane.on[slots]).tolist():
            stream = table.by_slot[int(slots[i])]
            assert stream is not None
            if lane.eligible(stream) and stream.dtype == dtype and stream.rate == rate:
                lane.promote(stream)
                in_lane[i] = stream.next_seq - stream.expected_seq < limit

    now_ns = time.monotonic_ns()
    out = table.out()
    room = np.array([out.room_for(w, records.frames_record_bytes(n, width))
                     for w in range(len(table.worker_load))], np.bool_)
    arrived, verdict, keys = np.empty(n, np.int64), np.empty(n, np.int8), np.empty(n, np.int64)
    groups, counts = np.empty(n, np.int64), np.empty(n, np.int64)
    going, n_groups = kernels.admit(in_lane, slots, lane.audio_ns, lane.ns_per_sample, lane.clock_ns,
                                    lane.shed_after_ms, lane.worker, room, samples, now_ns, table.drained_ns, FRESH_NS,
                                    arrived, verdict, keys, groups, counts)
    if going < n and (verdict > kernels.GO).any():
        _turned_away(table, frames, slots, verdict, arrived, context, now_ns)
    if going:
        _send(table, frames, going, keys, groups[:n_groups].tolist(), counts[:n_groups].tolist(), slots, arrived,
              width, rate, now_ns)
    if going < n:
        for i in (verdict == kernels.NOT_IN_LANE).nonzero()[0].tolist():  # in arrival order
            msg, offset = frames.locate(i)
            try:
                table.audio_item(frames.identities[i], frames.request_ids[i], frames.ids[i], frames.chunk_seqs[i],
                                 dtype, msg, offset, samples * pcm.itemsize)
            except P.ProtocolError as exc:
                table.error(frames.identities[i], frames.request_ids[i], frames.ids[i], frames.chunk_seqs[i],
                            exc.code, str(exc))


def _send(table: StreamTable, frames: Frames, going: int, keys: np.ndarray, groups: list[int], counts: list[int],
          slots: np.ndarray, arrived: np.ndarray, width: int, rate: int, now_ns: int) -> None:
    """The frames that go to the workers: one FRAME_SET record per (worker, shed deadline)."""
    lane = table.lane
    scale = _INT16_SCALE if frames.dtype == P.DType.INT16 else np.float32(0.0)
    samples, stride = frames.pcm.shape[1], frames.stride
    chunk_seqs = np.array(frames.chunk_seqs, np.uint32)
    request_ids = np.array(frames.request_ids, np.uint32)
    now_s = now_ns / 1e9
    out = table.out()
    for key, count in zip(groups, counts):
        def fill(meta: np.ndarray, audio: np.ndarray, key: int = key) -> int:
            return int(kernels.fill_frame_set(
                key, keys, slots, frames.flat, stride, samples, scale, chunk_seqs, request_ids, arrived, now_s,
                table.buffers, lane.next_seq, lane.chunk_seq, lane.request_id, lane.arrived_ns, lane.fresh,
                lane.samples_in, lane.last_active, records.FLAG_FRESH, meta.view(np.uint32).reshape(-1, 4), audio))

        out.write_frame_set(key >> 32, count, width, rate, key & 0xFFFFFFFF, fill)
    table.counters["frames_in"] += going
    table.counters["frames_in_frame_sets"] += going


def _turned_away(table: StreamTable, frames: Frames, slots: np.ndarray, verdict: np.ndarray, arrived: np.ndarray,
                 context: int, now_ns: int) -> None:
    """Lane frames that do not go to a worker. Shed at intake (late, or their worker's queue is
    full), they stay in the lane: each takes its stream's next seq, unsent, and is answered,
    shed, in its stream's order (kernels.hold_shed, Lane.answer), so an overload's shedding
    costs no more per frame than serving. Refused (a stream that asked never to be shed, whose
    worker's queue is full): an error each."""
    lane, counters = table.lane, table.counters
    n = len(slots)
    late, full, refused = (int(np.count_nonzero(verdict == v)) for v in (kernels.LATE, kernels.QUEUE_FULL,
                                                                           kernels.REFUSED))
    for i in (verdict == kernels.REFUSED).nonzero()[0].tolist() if refused else ():
        counters["frames_refused_overloaded"] += 1
        table.error(frames.identities[i], frames.request_ids[i], frames.ids[i], frames.chunk_seqs[i],
                    ErrorCode.OVERLOADED, "the engine is overloaded: this chunk was not used; retry later, or add workers")
    if not late + full:
        return
    scale = _INT16_SCALE if frames.dtype == P.DType.INT16 else np.float32(0.0)
    head_seqs, head_slots = np.empty(n, np.int64), np.empty(n, np.intp)
    heads = kernels.hold_shed(verdict, slots, frames.flat, frames.stride, frames.pcm.shape[1], context, scale,
                              np.array(frames.chunk_seqs, np.uint32), np.array(frames.request_ids, np.uint32),
                              arrived, now_ns / 1e9, table.buffers, lane.next_seq, lane.expected_seq, lane.chunk_seq,
                              lane.request_id, lane.arrived_ns, lane.unsent, lane.samples_in, lane.last_active,
                              head_seqs, head_slots)
    lane.n_unsent += late + full
    counters["frames_in"] += late + full
    counters["frames_shed_at_intake"] += late + full
    counters["frames_shed_queue_full"] += full
    if heads:
        table.answer_lane(head_seqs[:heads], head_slots[:heads], np.full(heads, np.nan, np.float32))


def warm_up() -> None:
    """Compile (or load from numba's cache) each variant of the intake loops the front-end
    calls — int16 and float32 frames, a gateway's strided message and devices' joined ones —
    so that no client's first frames wait for the compiler (seconds on a fresh install)."""
    n, samples, context = MIN_ITEMS, 512, 64
    lane = Lane(n)
    slots = np.arange(n, dtype=np.intp)
    in_lane = np.ones(n, np.bool_)
    kernels.lane_fits(in_lane, slots, lane.on, lane.shape, lane.next_seq, lane.expected_seq, 0, 1, in_lane)
    arrived, verdict, keys = np.zeros(n, np.int64), np.empty(n, np.int8), np.zeros(n, np.int64)
    in_lane[:] = False
    kernels.admit(in_lane, slots, lane.audio_ns, lane.ns_per_sample, lane.clock_ns, lane.shed_after_ms, lane.worker,
                  np.ones(1, np.bool_), samples, 0, 0, 0, arrived, verdict, keys, np.empty(n, np.int64),
                  np.empty(n, np.int64))
    # A stream's own calls of its speech-event machine (the lane's are compiled into answer).
    segmenter = SpeechSegmenter(VadParams(max_speech_duration_s=1.0), samples * 1000 // 32)
    for prob in (0.9, 0.9, math.nan, 0.1):
        segmenter.push(prob)
    segmenter.quiet()
    segmenter.finish(4 * samples)
    reply = np.zeros((n, REPLY_ITEM.itemsize // 4), np.uint32)  # Lane._queue's grouping of reply items
    kernels.by_client(np.arange(n, dtype=np.int64), reply, np.empty(n, np.int64), np.empty_like(reply),
                      np.empty(n + 1, np.int64))
    # No stream is in this lane: nothing is answered, nothing goes out.
    lane.answer(np.zeros(n, np.int64), slots, np.zeros(n, np.float32), cast("Outlet", None),
                np.zeros(N_BUCKETS, np.int64), Counter())
    ids = np.zeros(n, np.uint32)
    for dtype in (np.dtype(np.int16), np.dtype(np.float32)):
        item = P.AUDIO_ITEM.size + samples * dtype.itemsize
        message = bytes(P.HEADER.size + n * item)
        heads = np.ndarray((n, _HEAD_WORDS), "<u4", message, P.HEADER.size, (item, 4))
        kernels.uniform_items(heads, 0, 0)
        slot_index.lookup(np.arange(n, dtype=np.uint32), np.arange(n, dtype=np.int64), heads[:, 0],
                          np.zeros(n, np.int64), 1, np.empty(n, np.intp))
        for flat in (np.frombuffer(message, dtype, n * samples, P.HEADER.size + P.AUDIO_ITEM.size),
                     np.frombuffer(message, dtype, n * samples)):
            kernels.fill_frame_set(0, keys, slots, flat, samples, samples, np.float32(0.0), ids, ids, arrived, 0.0,
                                   np.zeros((n, context + samples), np.float32), lane.next_seq, lane.chunk_seq,
                                   lane.request_id, lane.arrived_ns, lane.fresh, lane.samples_in, lane.last_active,
                                   records.FLAG_FRESH, np.zeros((n, 4), np.uint32),
                                   np.zeros((n, context + samples), np.float32))
            verdict[:] = kernels.NOT_IN_LANE  # nothing shed: compiled, nothing moves
            kernels.hold_shed(verdict, slots, flat, samples, samples, context, np.float32(0.0), ids, ids, arrived, 0.0,
                              np.zeros((n, context + samples), np.float32), lane.next_seq, lane.expected_seq,
                              lane.chunk_seq, lane.request_id, lane.arrived_ns, lane.unsent, lane.samples_in,
                              lane.last_active, np.empty(n, np.int64), np.empty(n, np.intp))
