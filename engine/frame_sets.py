"""One whole frame for each of many streams, taken in bulk.

Taken item by item (StreamTable.audio_item) a frame costs the front-end tens of microseconds
of Python, and the front-end is one process: its cost per frame caps what any number of
workers can serve. Frames that all have one size and dtype form an array, so validation,
int16 scaling, the 64-sample context of every stream and the records to the workers are a
few numpy operations for all of them; only the per-stream bookkeeping (sequence numbers,
pending chunks, the audio clock) stays per item. The frames go to each worker as one
FRAME_SET record (transport/records.py). Two traffic shapes give such frames:

- a gateway multiplexes its microphones and sends, every tick, one message holding the next
  frame of each stream that is due (``take_frame_set``);
- devices each send one frame per message, and a busy front-end reads many of them at once
  (engine/device_frames.py).

Items that do not fit the common case — a stream with a partial frame buffered, a chunk that
is not exactly one frame, an unknown or closing stream, NaN samples, a stream at its in-flight
limit, a stream's second frame in the same set — go through the item-by-item path after the
set, which produces their results or errors exactly as before.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from engine.streams import PendingChunk, Stream
from transport import protocol as P
from transport import records
from transport.protocol import ErrorCode

if TYPE_CHECKING:
    from engine.control import StreamTable

# Below this many frames the numpy set-up costs more than it saves.
MIN_ITEMS = 4
_INT16_SCALE = np.float32(1.0 / 32768.0)
_HEAD_WORDS = P.AUDIO_ITEM.size // 4
_NEVER = 1 << 62


class _FrameSet:
    """The frames bound for one worker (with one shed deadline)."""

    __slots__ = ("taken", "slots", "seqs", "flags", "arrived_ns")

    def __init__(self) -> None:
        self.taken: list[int] = []  # index among the frames taken in bulk
        self.slots: list[int] = []
        self.seqs: list[int] = []
        self.flags: list[int] = []
        self.arrived_ns = _NEVER  # the earliest arrival among them


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
    """Every frame that fits in bulk, one record per worker; then, in order, the rest item by item."""
    pcm, dtype = frames.pcm, frames.dtype
    n, samples = pcm.shape
    rate, _ = table.frame_shapes[(dtype, samples * pcm.itemsize)]
    context = table.context_samples[rate]
    width = context + samples
    identities, request_ids, ids, chunk_seqs = frames.identities, frames.request_ids, frames.ids, frames.chunk_seqs
    finite = np.isfinite(pcm).all(axis=1).tolist() if dtype == P.DType.FLOAT32 else None
    out, streams, limit, counters = table.out(), table.streams, table.max_in_flight, table.counters
    # Judged for the whole set, before any stream changes: at most this set's size more than
    # the item-by-item path would allow.
    room = [out.room_for(w, records.frames_record_bytes(n, width)) for w in range(len(table.worker_load))]
    held = frames.held
    one_by_one = list(held)

    sets: dict[tuple[int, int], _FrameSet] = {}
    rows: list[int] = []  # items taken in bulk, in order
    slots: list[int] = []
    shed: list[tuple[int, Stream, int]] = []
    now_ns = time.monotonic_ns()
    now_s = now_ns / 1e9
    for i, stream_id in enumerate(ids):
        if i in held:
            continue
        stream = streams.get((identities[i], stream_id))
        if (stream is None or stream.closing or stream.dtype != dtype or stream.rate != rate
                or stream.buf_len != context or (finite is not None and not finite[i])
                or len(stream.chunks) >= limit or stream.next_seq - stream.expected_seq >= limit):
            one_by_one.append(i)
            continue
        if stream.buf is not stream.row:  # a large chunk grew a private buffer: back to the matrix
            stream.row[:context] = stream.buf[:context]
            stream.buf = stream.row
        arrived_ns = table.arrival(stream, samples, now_ns)
        shed_after_ms = stream.shed_after_ms
        if shed_after_ms and now_ns - arrived_ns > 1_000_000 * shed_after_ms:
            shed.append((i, stream, arrived_ns))
            continue
        if not room[stream.worker]:
            if shed_after_ms:  # its worker's queue is full: this frame could not run in time either
                counters["frames_shed_queue_full"] += 1
                shed.append((i, stream, arrived_ns))
            else:  # this stream asked never to be shed: refuse, so it can retry
                counters["frames_refused_overloaded"] += 1
                table.error(identities[i], request_ids[i], stream_id, chunk_seqs[i], ErrorCode.OVERLOADED,
                            "the engine is overloaded: this chunk was not used; retry later, or add workers")
            continue
        frame_set = sets.get((stream.worker, shed_after_ms))
        if frame_set is None:
            frame_set = sets[(stream.worker, shed_after_ms)] = _FrameSet()
        frame_set.taken.append(len(rows))
        rows.append(i)
        slots.append(stream.slot)
        frame_set.slots.append(stream.slot)
        frame_set.seqs.append(stream.next_seq)
        frame_set.flags.append(records.FLAG_FRESH if stream.fresh else 0)
        frame_set.arrived_ns = min(frame_set.arrived_ns, arrived_ns)
        stream.fresh = False
        stream.samples_in += samples
        stream.last_active = now_s
        stream.next_seq += 1
        stream.chunks.append(PendingChunk(chunk_seqs[i], request_ids[i], stream.next_seq, arrived=arrived_ns / 1e9))

    scale = _INT16_SCALE if dtype == P.DType.INT16 else None
    if rows:
        # Once for the whole set, then one copy per worker: numpy's cost here is per call.
        inputs = np.empty((len(rows), width), np.float32)
        _model_inputs(table.buffers, np.array(slots, np.intp), pcm if len(rows) == n else pcm[rows], scale, inputs)
        for (worker, shed_after_ms), frame_set in sets.items():
            def fill(meta: np.ndarray, audio: np.ndarray, frame_set: _FrameSet = frame_set) -> None:
                meta["seq"] = frame_set.seqs
                meta["slot"] = frame_set.slots
                meta["flags"] = frame_set.flags
                if len(sets) == 1:
                    audio[:] = inputs
                else:
                    np.take(inputs, frame_set.taken, axis=0, out=audio)

            out.write_frame_set(worker, len(frame_set.taken), width, rate, frame_set.arrived_ns, shed_after_ms, fill)
        counters["frames_in"] += len(rows)
        counters["frames_in_frame_sets"] += len(rows)
    if shed:
        _shed(table, shed, frames, scale, now_s, context)
    for i in sorted(one_by_one):  # in arrival order: a held repeat after its stream's first frame
        msg, offset = frames.locate(i)
        try:
            table.audio_item(identities[i], request_ids[i], ids[i], chunk_seqs[i], dtype, msg, offset,
                             samples * pcm.itemsize)
        except P.ProtocolError as exc:
            table.error(identities[i], request_ids[i], ids[i], chunk_seqs[i], exc.code, str(exc))


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
