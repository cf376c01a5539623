"""One whole frame for each of many streams, taken in bulk.

Taken item by item (StreamTable.audio_item) a frame costs the front-end tens of microseconds
of Python, and the front-end is one process: its cost per frame caps what any number of
workers can serve. Frames that all have one size and dtype form an array, so validation,
int16 scaling, the 64-sample context of every stream and the records to the workers are a
few numpy operations for all of them, and so is the per-stream bookkeeping of streams in the
lane (engine/lane.py: sequence numbers, frames in flight, the audio clock). The frames go to
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

import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from engine.lane import IN_FLIGHT, shape_key
from engine.streams import FRESH_NS, PendingChunk, Stream
from transport import protocol as P
from transport import records
from transport.protocol import ErrorCode

if TYPE_CHECKING:
    from engine.control import StreamTable

# Below this many frames the numpy set-up costs more than it saves.
MIN_ITEMS = 4
_INT16_SCALE = np.float32(1.0 / 32768.0)
_HEAD_WORDS = P.AUDIO_ITEM.size // 4


class Frames:
    """n one-frame chunks of one dtype and size, and where each came from."""

    __slots__ = ("identities", "request_ids", "ids", "chunk_seqs", "pcm", "dtype", "locate", "held")

    def __init__(self, identities: list[bytes], request_ids: list[int], ids: list[int], chunk_seqs: list[int],
                 pcm: np.ndarray, dtype: int, locate: Callable[[int], tuple[bytes, int]],
                 held: frozenset[int] = frozenset()) -> None:
        self.identities = identities
        self.request_ids = request_ids
        self.ids = ids
        self.chunk_seqs = chunk_seqs
        self.pcm = pcm  # [n, samples], the wire's dtype
        self.dtype = dtype
        self.locate = locate  # item i -> (message, offset of its PCM), for the item-by-item path
        self.held = held  # items that must take the item-by-item path whatever their stream's state


def take_frame_set(table: StreamTable, identity: bytes, request_id: int, msg: bytes) -> bool:
    """Take ``msg`` (an AUDIO message) in bulk; False if it has not the frame-set shape and
    nothing of it was used. A message that names a stream twice, or whose items differ in
    size, is not taken here."""
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
    if not ((heads[:, 3] == nbytes).all() and (heads[:, 2] == dtype).all()):
        return False
    ids = heads[:, 0].tolist()
    if len(set(ids)) != n:
        return False
    np_dtype, samples = P.NUMPY_DTYPES[dtype], shape[1]
    pcm = np.ndarray((n, samples), np_dtype, msg, base + P.AUDIO_ITEM.size, (stride, np_dtype.itemsize))
    frames = Frames([identity] * n, [request_id] * n, ids, heads[:, 1].tolist(), pcm, dtype,
                     lambda i: (msg, base + i * stride + P.AUDIO_ITEM.size))
    take_frames(table, frames)
    return True


def take_frames(table: StreamTable, frames: Frames) -> None:
    """Every frame of a lane stream (engine/lane.py) in bulk, one record per worker; then, in
    order, the rest item by item."""
    pcm, dtype = frames.pcm, frames.dtype
    n, samples = pcm.shape
    rate, _ = table.frame_shapes[(dtype, samples * pcm.itemsize)]
    context = table.context_samples[rate]
    width = context + samples
    lane, get = table.lane, table.streams.get
    slots = np.array([-1 if (stream := get(key)) is None else stream.slot
                      for key in zip(frames.identities, frames.ids)], np.intp)
    fits = slots >= 0
    if frames.held:
        fits[list(frames.held)] = False
    if dtype == P.DType.FLOAT32:
        fits &= np.isfinite(pcm).all(axis=1)
    slots[~fits] = 0  # a valid index; these items are not taken
    shape, limit = shape_key(dtype, rate), min(table.max_in_flight, IN_FLIGHT)
    in_lane = fits & lane.on[slots]
    in_lane &= lane.shape[slots] == shape
    in_lane &= lane.next_seq[slots] - lane.expected_seq[slots] < limit
    if not in_lane.all():
        for i in np.flatnonzero(fits & ~lane.on[slots]).tolist():
            stream = table.by_slot[int(slots[i])]
            assert stream is not None
            if lane.eligible(stream) and stream.dtype == dtype and stream.rate == rate:
                lane.promote(stream)
                in_lane[i] = stream.next_seq - stream.expected_seq < limit
    taken = np.flatnonzero(in_lane)
    one_by_one = np.flatnonzero(~in_lane).tolist()

    now_ns = time.monotonic_ns()
    if len(taken):
        ts = slots[taken]
        arrived = _arrivals(table, ts, samples, now_ns)
        shed_after = lane.shed_after_ms[ts]
        workers = lane.worker[ts]
        late = shed_after > 0
        late &= now_ns - arrived > 1_000_000 * shed_after
        out = table.out()
        room = np.array([out.room_for(w, records.frames_record_bytes(n, width))
                         for w in range(len(table.worker_load))], np.bool_)
        full = ~room[workers] & ~late
        go = ~(late | full)
        if not go.all():
            _turned_away(table, frames, slots, taken[late], taken[full & (shed_after > 0)],
                         taken[full & (shed_after == 0)], dict(zip(taken.tolist(), arrived.tolist())), context, now_ns)
            taken, ts, arrived, shed_after, workers = taken[go], ts[go], arrived[go], shed_after[go], workers[go]
        if len(taken):
            _send(table, frames, taken, ts, arrived, shed_after, workers, width, rate, now_ns)
    for i in one_by_one:  # in arrival order: a held repeat after its stream's first frame
        msg, offset = frames.locate(i)
        try:
            table.audio_item(frames.identities[i], frames.request_ids[i], frames.ids[i], frames.chunk_seqs[i], dtype,
                             msg, offset, samples * pcm.itemsize)
        except P.ProtocolError as exc:
            table.error(frames.identities[i], frames.request_ids[i], frames.ids[i], frames.chunk_seqs[i], exc.code,
                        str(exc))


def _arrivals(table: StreamTable, slots: np.ndarray, samples: int, now_ns: int) -> np.ndarray:
    """StreamTable.arrival for lane streams, all at once."""
    lane = table.lane
    audio = lane.audio_ns[slots] + samples * lane.ns_per_sample[slots]
    lane.audio_ns[slots] = audio
    if now_ns - table.drained_ns <= FRESH_NS:
        lane.clock_ns[slots] = now_ns - audio
        return np.full(len(slots), now_ns, np.int64)
    return np.minimum(now_ns, np.maximum(table.drained_ns, lane.clock_ns[slots] + audio))


def _send(table: StreamTable, frames: Frames, taken: np.ndarray, slots: np.ndarray, arrived: np.ndarray,
          shed_after: np.ndarray, workers: np.ndarray, width: int, rate: int, now_ns: int) -> None:
    """The frames that go to the workers: one FRAME_SET record per (worker, shed deadline)."""
    lane, pcm = table.lane, frames.pcm
    seqs = lane.next_seq[slots]
    lane.next_seq[slots] = seqs + 1
    k = seqs % IN_FLIGHT
    lane.chunk_seq[slots, k] = np.array(frames.chunk_seqs, np.uint32)[taken]
    lane.request_id[slots, k] = np.array(frames.request_ids, np.uint32)[taken]
    lane.arrived_ns[slots, k] = arrived
    flags = np.where(lane.fresh[slots], records.FLAG_FRESH, 0).astype(np.uint32)
    lane.fresh[slots] = False
    lane.samples_in[slots] += pcm.shape[1]
    lane.last_active[slots] = now_ns / 1e9
    count = len(taken)
    scale = _INT16_SCALE if frames.dtype == P.DType.INT16 else None
    if count < len(pcm):
        pcm = pcm[taken]
    keys = workers << 32 | shed_after
    groups = [None] if (keys == keys[0]).all() else [np.flatnonzero(keys == key) for key in np.unique(keys).tolist()]
    out = table.out()
    for group in groups:
        # Each worker's model inputs are made in its record, not copied there.
        part = (seqs, slots, flags, pcm, arrived) if group is None else (
            seqs[group], slots[group], flags[group], pcm[group], arrived[group])

        def fill(meta: np.ndarray, audio: np.ndarray, part: tuple[np.ndarray, ...] = part) -> None:
            meta["seq"], meta["slot"], meta["flags"] = part[0], part[1], part[2]
            _model_inputs(table.buffers, part[1], part[3], scale, audio)

        first = 0 if group is None else int(group[0])
        out.write_frame_set(int(workers[first]), len(part[0]), width, rate, int(part[4].min()), int(shed_after[first]),
                            fill)
    table.counters["frames_in"] += count
    table.counters["frames_in_frame_sets"] += count


def _turned_away(table: StreamTable, frames: Frames, slots: np.ndarray, late: np.ndarray, queue_full: np.ndarray,
                 refused: np.ndarray, arrived_of: dict[int, int], context: int, now_ns: int) -> None:
    """Lane frames that do not go to a worker: shed at intake (late, or their worker's queue
    is full), or refused (a stream that asked never to be shed, whose worker's queue is full).
    Items are indices into ``frames`` (and ``slots``); ``arrived_of``: item -> its arrival."""
    table.counters["frames_shed_queue_full"] += len(queue_full)
    shed = []
    for i in sorted(late.tolist() + queue_full.tolist()):
        stream = table.by_slot[int(slots[i])]
        assert stream is not None
        table.lane.demote(stream)
        shed.append((i, stream, arrived_of[i]))
    for i in refused.tolist():
        table.counters["frames_refused_overloaded"] += 1
        table.error(frames.identities[i], frames.request_ids[i], frames.ids[i], frames.chunk_seqs[i],
                    ErrorCode.OVERLOADED, "the engine is overloaded: this chunk was not used; retry later, or add workers")
    if shed:
        _shed(table, shed, frames, _INT16_SCALE if frames.dtype == P.DType.INT16 else None, now_ns / 1e9, context)


def _model_inputs(buffers: np.ndarray, slots: np.ndarray, frames: np.ndarray, scale: np.float32 | None,
                  out: np.ndarray) -> None:
    """[context | frame] per stream into ``out``, and each stream's context moved on to its frame's end."""
    context = out.shape[1] - frames.shape[1]
    out[:, :context] = buffers[slots, :context]
    if scale is None:
        out[:, context:] = frames
    else:
        np.multiply(frames, scale, out=out[:, context:])
    buffers[slots, :context] = out[:, -context:]


def _shed(table: StreamTable, shed: list[tuple[int, Stream, int]], frames: Frames, scale: np.float32 | None,
          now_s: float, context: int) -> None:
    """Intake shedding, as StreamTable.audio_item does it: not run, but the audio still
    becomes the context of the stream's next frame."""
    pcm = frames.pcm
    slots = np.array([stream.slot for _, stream, _ in shed], np.intp)
    _model_inputs(table.buffers, slots, pcm[[i for i, _, _ in shed]], scale,
                  np.empty((len(shed), context + pcm.shape[1]), np.float32))
    for i, stream, arrived_ns in shed:
        stream.samples_in += pcm.shape[1]
        stream.last_active = now_s
        chunk = PendingChunk(frames.chunk_seqs[i], frames.request_ids[i], stream.next_seq, arrived=arrived_ns / 1e9)
        table.shed_at_intake(chunk, 1)
        stream.chunks.append(chunk)
        if chunk.end_seq <= stream.expected_seq:
            table.complete_chunks(stream)
    table.counters["frames_in"] += len(shed)
