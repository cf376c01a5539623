"""Client messages -> stream operations, and worker results -> replies, in order.

Streams are keyed by (ZeroMQ identity, client stream id): a client can only name its own
streams, and ids never collide across connections.
"""

from __future__ import annotations

import array
import bisect
import logging
import math
import secrets
import struct
import time
from collections import Counter
from typing import Any, Callable, Protocol

import numpy as np

from engine.frame_sets import take_frame_set
from engine.stats import BUCKETS_US, N_BUCKETS
from engine.lane import Lane
from engine.router_batch import RoutingIds
from engine.slot_index import SlotIndex
from engine.streams import FRESH_NS, PendingChunk, Stream
from engine.vad_events import SpeechSegmenter, VadParams
from transport import protocol as P
from transport import records
from transport.protocol import ErrorCode, MsgType, ProtocolError
from transport.ring import Ring

log = logging.getLogger("ringserve.streams")
_OPEN_KEYS = {"sample_rate", "dtype", "vad", "shed_after_ms"}
# VAD durations are client-chosen; bounding them keeps every event offset a small integer
# (speech_pad_ms=1e300 would make int(end + pad) overflow the wire's u64, or int(inf) raise).
_MAX_VAD_MS = 3_600_000
BUCKETS_S = [b / 1e6 for b in BUCKETS_US]
_NUMPY_DTYPES = {int(k): v for k, v in P.NUMPY_DTYPES.items()}  # plain-int keys: no enum lookup per chunk
_NAN = array.array("f", [math.nan])
_PROB = struct.Struct("<f")
# A stream buffer's room in the table's matrix (one 4 KiB page): context plus a frame, with
# room for a partial one; a stream whose chunks need more grows a private buffer.
BUFFER_SAMPLES = 1024


class Outlet(Protocol):
    def send(self, identity: bytes, payload: bytes) -> None: ...
    def queue_result(self, identity: bytes, item: bytes) -> None: ...
    def send_results(self, items: np.ndarray, item_size: int, bounds: np.ndarray, runs: int, conns: np.ndarray,
                     ids: RoutingIds) -> None: ...
    def write_frames(self, stream: Stream, count: int, arrived_ns: int) -> None: ...
    def write_frame_set(self, worker: int, count: int, width: int, rate: int, shed_after_ms: int,
                        fill: Callable[[np.ndarray, np.ndarray], int]) -> None: ...
    def room_for(self, worker: int, nbytes: int) -> bool: ...


class StreamTable:
    def __init__(self, *, max_streams: int, max_per_connection: int, max_in_flight: int,
                 max_message_bytes: int, max_items_per_message: int, idle_timeout_s: float,
                 shed_after_ms: int, n_workers: int, frame_samples: dict[int, int], context_samples: dict[int, int],
                 stats_provider: Callable[[], dict[str, Any]]) -> None:
        self.max_streams = max_streams
        self.max_per_connection = max_per_connection
        self.max_in_flight = max_in_flight
        self.max_message_bytes = max_message_bytes
        self.max_items_per_message = max_items_per_message
        self.idle_timeout_s = idle_timeout_s
        self.shed_after_ms = shed_after_ms
        self.frame_samples = frame_samples
        self.context_samples = context_samples
        # (wire dtype, bytes) of one whole frame -> (rate, samples): what a frame set may hold.
        self.frame_shapes: dict[tuple[int, int], tuple[int, int]] = {}
        for rate, frame in frame_samples.items():
            for dtype, np_dtype in P.NUMPY_DTYPES.items():
                self.frame_shapes.setdefault((int(dtype), frame * np_dtype.itemsize), (rate, frame))
        self.stats_provider = stats_provider
        # New at every daemon start: lets a client tell a restarted daemon from a slow one.
        self.instance = secrets.token_hex(8)
        self._instance_json = P.encode_json({"instance": self.instance})
        self.outlet: Outlet | None = None
        self.streams: dict[tuple[bytes, int], Stream] = {}
        self.by_slot: list[Stream | None] = [None] * max_streams
        self.lane = Lane(max_streams)  # streams in their steady state, held as arrays
        # Every slot's stream buffer, one page each: np.zeros maps it lazily, so a slot
        # costs memory only once a stream has used it.
        self.buffers = np.zeros((max_streams, BUFFER_SAMPLES), np.float32)
        self.slot_seq = [0] * max_streams  # next seq per slot; never reused, see worker.py
        self.free_slots = list(range(max_streams - 1, -1, -1))
        self.quarantine: list[tuple[int, int, int]] = []  # (slot, worker, ring position)
        self.connections: dict[bytes, SlotIndex] = {}  # each client's open streams
        self.slot_stamps = np.zeros(max_streams, np.int64)  # slot_index.lookup's marks
        self.lookups = 0
        self.worker_load = [0] * n_workers
        self.counters: Counter[str] = Counter()
        self.request_hist = np.zeros(N_BUCKETS, np.int64)  # arrival -> reply of audio chunks
        self.request_s_total = 0.0
        self.drained_ns = time.monotonic_ns()  # the front-end last found its socket empty

    # ---- dispatch ----------------------------------------------------------------------
    def on_message(self, identity: bytes, msg: bytes) -> None:
        request_id = stream_id = 0
        try:
            if len(msg) > self.max_message_bytes:
                raise ProtocolError(ErrorCode.LIMIT, f"message of {len(msg)} bytes exceeds the "
                                    f"{self.max_message_bytes}-byte limit (max_message_bytes)")
            msg_type, request_id = P.parse_header(msg)
            if msg_type == MsgType.AUDIO:
                self.on_audio(identity, request_id, msg)
            elif msg_type == MsgType.PING:
                self.out().send(identity, P.header(MsgType.PONG, request_id) + self._instance_json)
            elif msg_type == MsgType.STATS:
                self.out().send(identity, P.header(MsgType.STATS_REPLY, request_id)
                                 + P.encode_json(self.stats_provider()))
            elif msg_type in (MsgType.OPEN, MsgType.RESET, MsgType.CLOSE):
                stream_id = P.parse_stream_id(msg)
                if msg_type == MsgType.OPEN:
                    self.on_open(identity, request_id, stream_id, msg[P.HEADER.size + P.STREAM_ID.size:])
                else:
                    self.on_stream_op(identity, request_id, stream_id, msg_type)
            else:
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type 0x{msg_type:02x}")
        except ProtocolError as exc:
            self.error(identity, request_id, stream_id, 0, exc.code, str(exc))

    def out(self) -> Outlet:
        assert self.outlet is not None
        return self.outlet

    def error(self, identity: bytes, request_id: int, stream_id: int, chunk_seq: int,
              code: ErrorCode, text: str) -> None:
        self.counters[f"errors_{code.name.lower()}"] += 1
        self.out().send(identity, P.encode_error(request_id, stream_id, chunk_seq, code, text))

    # ---- open / reset / close ------------------------------------------------------------
    def on_open(self, identity: bytes, request_id: int, stream_id: int, body: bytes) -> None:
        params = P.decode_json(body)
        unknown = set(params) - _OPEN_KEYS
        if unknown:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"unknown open parameter(s) {sorted(unknown)}; "
                                f"known: {sorted(_OPEN_KEYS)}")
        rate = params.get("sample_rate", 16000)
        # JSON 16000.0 == 16000 would pass a dict lookup and later break struct packing;
        # a list or object would raise TypeError (unhashable): only a plain int may pass.
        if not isinstance(rate, int) or isinstance(rate, bool) or rate not in self.frame_samples:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"sample_rate {rate!r} is not supported: use "
                                f"{' or '.join(map(str, self.frame_samples))} (resample on the client)")
        dtype_name = params.get("dtype", "int16")
        if not isinstance(dtype_name, str) or dtype_name not in P.DTYPE_NAMES:
            raise ProtocolError(ErrorCode.BAD_DTYPE, f"dtype {dtype_name!r} is not supported: use int16 or float32")
        vad = params.get("vad", {})
        try:
            vad_params = VadParams.from_mapping(vad if isinstance(vad, dict) else {"vad": vad})
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_PARAMS, str(exc)) from None
        except (TypeError, OverflowError) as exc:  # OverflowError: e.g. a 4000-digit integer
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"vad parameters out of range: {exc}") from None
        for name in ("min_silence_duration_ms", "speech_pad_ms", "min_speech_duration_ms"):
            if getattr(vad_params, name) > _MAX_VAD_MS:
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"{name} must be at most {_MAX_VAD_MS} ms "
                                    f"(one hour), got {getattr(vad_params, name)!r}")
        shed_after_ms = params.get("shed_after_ms", self.shed_after_ms)
        if shed_after_ms is None:
            shed_after_ms = self.shed_after_ms
        if not isinstance(shed_after_ms, int) or isinstance(shed_after_ms, bool) or not 0 <= shed_after_ms < 2**31:
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"shed_after_ms {shed_after_ms!r} must be an integer >= 0 "
                                "(0: never shed this stream's frames)")
        key = (identity, stream_id)
        if key in self.streams:
            raise ProtocolError(ErrorCode.STREAM_EXISTS, f"stream {stream_id} is already open on this connection")
        streams = self.connections.get(identity)
        if streams is not None and len(streams) >= self.max_per_connection:
            raise ProtocolError(ErrorCode.LIMIT, f"this connection already has {self.max_per_connection} "
                                "open streams (max_streams_per_connection)")
        if not self.free_slots:
            raise ProtocolError(ErrorCode.LIMIT, f"the engine already serves {len(self.streams)} streams "
                                "(max_streams)")
        slot = self.free_slots.pop()
        worker = min(range(len(self.worker_load)), key=self.worker_load.__getitem__)
        self.worker_load[worker] += 1
        stream = Stream(identity, stream_id, slot, worker, rate, self.frame_samples[rate],
                        self.context_samples[rate], P.DTYPE_NAMES[dtype_name],
                        SpeechSegmenter(vad_params, rate, self.lane.vad_state[slot], self.lane.vad_limits[slot]),
                        self.slot_seq[slot], time.monotonic(),
                        self.buffers[slot])
        stream.shed_after_ms = shed_after_ms
        self.streams[key] = self.by_slot[slot] = stream
        self.connections.setdefault(identity, SlotIndex()).add(stream_id, slot)
        self.counters["streams_opened"] += 1
        reply = {"stream": stream_id, "sample_rate": rate, "frame_samples": stream.frame,
                 "dtype": dtype_name, "vad": vad_params.to_dict(), "max_message_bytes": self.max_message_bytes,
                 "max_items_per_message": self.max_items_per_message, "shed_after_ms": shed_after_ms,
                 "instance": self.instance}
        self.out().send(identity, P.header(MsgType.OPENED, request_id) + P.STREAM_ID.pack(stream_id)
                         + P.encode_json(reply))

    def on_stream_op(self, identity: bytes, request_id: int, stream_id: int, op: int) -> None:
        stream = self._stream(identity, stream_id)
        stream.last_active = time.monotonic()
        if op == MsgType.RESET:
            stream.discard_pending()
            stream.chunks.append(PendingChunk(0, request_id, stream.next_seq, kind="reset"))
        else:
            stream.closing = True
            if stream.pad_final():
                self.out().write_frames(stream, 1, time.monotonic_ns())
                self.counters["frames_in"] += 1
            stream.chunks.append(PendingChunk(P.CLOSE_SEQ, request_id, stream.next_seq, kind="close"))
        self.complete_chunks(stream)

    def _stream(self, identity: bytes, stream_id: int) -> Stream:
        stream = self.streams.get((identity, stream_id))
        if stream is None:
            raise ProtocolError(ErrorCode.UNKNOWN_STREAM, f"stream {stream_id} is not open on this connection")
        if stream.closing:
            raise ProtocolError(ErrorCode.UNKNOWN_STREAM, f"stream {stream_id} is closing")
        self.lane.demote(stream)
        return stream

    # ---- audio -------------------------------------------------------------------------
    def on_audio(self, identity: bytes, request_id: int, msg: bytes) -> None:
        if take_frame_set(self, identity, request_id, msg):
            return
        # Each item costs the front-end tens of microseconds however small it is: a message with
        # too many is refused whole, as is a malformed one, before any item of it is used.
        limit = self.max_items_per_message
        items = P.audio_items(msg, limit)
        if len(items) > limit:
            raise ProtocolError(ErrorCode.LIMIT, f"message holds more than max_items_per_message={limit} "
                                "audio items; send fewer streams' chunks per message")
        for stream_id, chunk_seq, dtype, offset, nbytes in items:
            try:
                self.audio_item(identity, request_id, stream_id, chunk_seq, dtype, msg, offset, nbytes)
            except ProtocolError as exc:
                self.error(identity, request_id, stream_id, chunk_seq, exc.code, str(exc))

    def audio_item(self, identity: bytes, request_id: int, stream_id: int, chunk_seq: int, dtype: int,
                    msg: bytes, offset: int, nbytes: int) -> None:
        stream = self._stream(identity, stream_id)
        if dtype != stream.dtype:
            raise ProtocolError(ErrorCode.BAD_DTYPE, f"stream {stream_id} was opened for "
                                f"{P.DType(stream.dtype).name.lower()} samples but this chunk says dtype {dtype}")
        np_dtype = _NUMPY_DTYPES[dtype]
        if nbytes % np_dtype.itemsize:
            raise ProtocolError(ErrorCode.BAD_AUDIO, f"chunk of {nbytes} bytes is not a whole number of "
                                f"{np_dtype.itemsize}-byte samples")
        samples = np.frombuffer(msg, np_dtype, nbytes // np_dtype.itemsize, offset)
        if dtype == P.DType.FLOAT32 and not np.isfinite(samples).all():
            raise ProtocolError(ErrorCode.BAD_AUDIO, "chunk contains NaN or Inf samples; nothing of it was used")
        # Every chunk waits in stream.chunks until its reply, shed or not, whether or not it adds a
        # frame: bound them (tiny chunks would otherwise pile up behind the frames in flight).
        # Checked before arrival(), so a refused chunk leaves even the stream's audio clock alone.
        if len(stream.chunks) >= self.max_in_flight:
            raise ProtocolError(ErrorCode.LIMIT, f"stream {stream_id} already has {len(stream.chunks)} chunks "
                                f"awaiting results (max_in_flight_frames={self.max_in_flight}); wait for "
                                "results or send larger chunks")
        new_frames = (stream.buf_len - stream.context + len(samples)) // stream.frame
        now_ns = time.monotonic_ns()
        arrived_ns = self.arrival(stream, len(samples), now_ns)
        # Intake shedding: a chunk whose last frame is already past its deadline goes no further
        # than here; this is what lets a saturated front-end catch up (worker.py sheds the rest).
        shed = bool(new_frames and stream.shed_after_ms and now_ns - arrived_ns > 1_000_000 * stream.shed_after_ms
                    + (new_frames - 1) * stream.frame * stream.ns_per_sample)
        if not shed and stream.in_flight + new_frames > self.max_in_flight:
            raise ProtocolError(ErrorCode.LIMIT, f"stream {stream_id} would have {stream.in_flight + new_frames} "
                                f"frames in flight, over max_in_flight_frames={self.max_in_flight}; "
                                "wait for results or send smaller chunks")
        if not shed and new_frames and not self.out().room_for(
                stream.worker, records.frames_record_bytes(new_frames, stream.frame + stream.context)):
            if not stream.shed_after_ms:  # this stream asked never to be shed: refuse, so it can retry
                self.counters["frames_refused_overloaded"] += new_frames
                raise ProtocolError(ErrorCode.OVERLOADED, "the engine is overloaded: this chunk was not "
                                    "used; retry later, or add workers")
            shed = True  # its worker's queue is full: these frames could not run in time either
            self.counters["frames_shed_queue_full"] += new_frames
        stream.last_active = now_ns / 1e9  # time.monotonic(), without reading the clock again
        count = stream.append(samples)
        self.counters["frames_in"] += count
        chunk = PendingChunk(chunk_seq, request_id, stream.next_seq, arrived=arrived_ns / 1e9)
        if shed:
            stream.drop_frames(count)
            self.shed_at_intake(chunk, count)
        elif count:
            self.out().write_frames(stream, count, arrived_ns)
            chunk.end_seq = stream.next_seq
        stream.chunks.append(chunk)
        if chunk.end_seq <= stream.expected_seq:
            self.complete_chunks(stream)

    def shed_at_intake(self, chunk: PendingChunk, count: int) -> None:
        chunk.shed = chunk.shed_at_intake = count
        chunk.probs.extend(_NAN * count)
        self.counters["frames_shed_at_intake"] += count

    def arrival(self, stream: Stream, samples: int, now_ns: int) -> int:
        """When this chunk reached the daemon, estimated: it may have waited in ZeroMQ's queue.

        While the front-end keeps up, it finds its socket empty every loop turn and a message's
        read time is its arrival time; each such message anchors the stream's audio clock. When
        it falls behind, a live stream's chunk arrived when its audio did by that clock, but not
        before the socket was last empty, nor after now (a sender faster than real time, or one
        that paused, is judged by those bounds). A chunk refused after this still moved the
        clock: the clock models the sender, whose audio moved on either way.
        """
        stream.audio_ns += samples * stream.ns_per_sample
        drained = self.drained_ns
        if now_ns - drained <= FRESH_NS:
            stream.clock_ns = now_ns - stream.audio_ns
            return now_ns
        return min(now_ns, max(drained, stream.clock_ns + stream.audio_ns))

    # ---- results -----------------------------------------------------------------------
    def on_results(self, seqs: np.ndarray, slots: np.ndarray, probs: np.ndarray) -> None:
        """One RESULTS record's frames (seq int64, slot intp, prob float32). Those of lane
        streams in order are answered in bulk (engine/lane.py); the rest here, frame by frame."""
        rest = self.answer_lane(seqs, slots, probs)
        if rest is None:
            return
        slots = slots[rest]
        for slot in np.unique(slots[self.lane.on[slots]]).tolist():
            stream = self.by_slot[slot]
            assert stream is not None
            self.lane.demote(stream)
        self._on_results(seqs[rest].tolist(), slots.tolist(), probs[rest].tolist())

    def answer_lane(self, seqs: np.ndarray, slots: np.ndarray, probs: np.ndarray) -> np.ndarray | None:
        """Results of lane streams that come in order answered in bulk (Lane.answer); returns the
        rest as a mask, or None if there is none."""
        rest, waited = self.lane.answer(seqs, slots, probs, self.out(), self.request_hist, self.counters)
        self.request_s_total += waited
        return rest

    def _on_results(self, seqs: list[int], slots: list[int], probs: list[float]) -> None:
        """Results of streams outside the lane. The common one, which answers a one-frame audio
        chunk in order and was not shed, is answered here in one loop: the general path's calls
        per frame cost the front-end a few microseconds. Any other frame goes through
        on_result, with the same reply either way."""
        by_slot, hist, buckets = self.by_slot, self.request_hist, BUCKETS_S
        queue, pack_item, pack_prob = self.out().queue_result, P.RESULT_ITEM.pack, _PROB.pack
        now = time.monotonic()
        answered, waited = 0, 0.0
        for seq, slot, prob in zip(seqs, slots, probs):
            stream = by_slot[slot]
            if stream is None or seq != stream.expected_seq or prob != prob or not stream.chunks:
                self.on_result(slot, seq, prob)
                continue
            chunks = stream.chunks
            chunk = chunks[0]
            if chunk.end_seq != seq + 1 or chunk.first_frame >= 0 or chunk.shed or chunk.kind != "audio":
                self.on_result(slot, seq, prob)
                continue
            chunks.popleft()
            first = seq - stream.frame_base
            stream.expected_seq = seq + 1
            stream.samples_out += stream.frame
            events = stream.segmenter.push(prob)
            elapsed = now - chunk.arrived
            hist[bisect.bisect_left(buckets, elapsed)] += 1
            waited += elapsed
            if events:
                item = P.encode_result_item(stream.stream_id, chunk.chunk_seq, first, pack_prob(prob),
                                            [(e.kind, e.frame, e.sample) for e in events], 0)
            else:
                item = pack_item(stream.stream_id, chunk.chunk_seq, first, 1, 0, 0) + pack_prob(prob)
            queue(stream.identity, item)
            answered += 1
            if chunks and (chunks[0].end_seq <= stream.expected_seq or chunks[0].unsent):
                self.complete_chunks(stream)  # a RESET, CLOSE, frameless or unsent chunk behind it
        self.counters["frames_out"] += answered
        self.request_s_total += waited

    def on_result(self, slot: int, seq: int, prob: float) -> None:
        stream = self.by_slot[slot]
        if stream is None or seq < stream.expected_seq:
            self.counters["duplicate_results_dropped"] += 1  # a frame re-run after a worker crash
            return
        if seq != stream.expected_seq:
            log.error("slot %d: result seq %d, expected %d", slot, seq, stream.expected_seq)
            self.counters["errors_internal"] += 1
            return
        if prob != prob:  # NaN: the worker shed this frame (overload policy, see worker.py)
            stream.chunks[0].shed += 1
            self.counters["frames_shed"] += 1
            self.counters["frames_shed_in_worker"] += 1
        events = stream.on_result(prob)
        if events:
            stream.chunks[0].events.extend((e.kind, e.frame, e.sample) for e in events)
        self.counters["frames_out"] += 1
        if stream.chunks[0].end_seq == stream.expected_seq:
            self.complete_chunks(stream)

    def complete_chunks(self, stream: Stream) -> None:
        while stream.chunks:
            chunk = stream.chunks[0]
            if chunk.unsent and chunk.end_seq == stream.expected_seq + 1:  # its turn: answered, shed
                chunk.events.extend((e.kind, e.frame, e.sample) for e in stream.on_result(math.nan))
                self.counters["frames_shed"] += 1
                self.counters["frames_out"] += 1
            if chunk.end_seq > stream.expected_seq:
                break
            stream.chunks.popleft()
            first = chunk.first_frame if chunk.first_frame >= 0 else stream.expected_seq - stream.frame_base
            flags = P.ResultFlag.SHED if chunk.shed else 0
            if chunk.kind == "reset":
                stream.segmenter.reset()
                stream.frame_base = stream.expected_seq
                self.out().send(stream.identity, P.header(MsgType.RESET_DONE, chunk.request_id)
                                 + P.STREAM_ID.pack(stream.stream_id))
                continue
            if chunk.shed_at_intake:  # its frames take their place in the stream only now, in order
                stream.frame_base -= chunk.shed_at_intake  # frame numbers count them; seqs do not
                for _ in range(chunk.shed_at_intake):
                    chunk.events.extend((e.kind, e.frame, e.sample) for e in stream.segmenter.push(math.nan))
                stream.samples_out += chunk.shed_at_intake * stream.frame
                self.counters["frames_shed"] += chunk.shed_at_intake
                self.counters["frames_out"] += chunk.shed_at_intake
            if chunk.kind == "audio":
                elapsed = time.monotonic() - chunk.arrived
                self.request_hist[bisect.bisect_left(BUCKETS_S, elapsed)] += 1
                self.request_s_total += elapsed
            if chunk.kind == "close":
                chunk.events.extend((e.kind, e.frame, e.sample) for e in stream.segmenter.finish(stream.samples_in))
                flags |= P.ResultFlag.FINAL
            self.out().queue_result(stream.identity, P.encode_result_item(
                stream.stream_id, chunk.chunk_seq, first, chunk.probs.tobytes(), chunk.events, flags))
            if chunk.kind == "close":
                self.release(stream)

    def release(self, stream: Stream) -> None:
        """Forget a stream; its slot is reused only once its worker released every frame of it."""
        del self.streams[(stream.identity, stream.stream_id)]
        self.by_slot[stream.slot] = None
        self.slot_seq[stream.slot] = stream.next_seq
        streams = self.connections[stream.identity]
        streams.remove(stream.stream_id)
        if not streams:
            del self.connections[stream.identity]
        self.worker_load[stream.worker] -= 1
        self.quarantine.append((stream.slot, stream.worker, -1))
        self.counters["streams_closed"] += 1

    def drop_connection(self, identity: bytes) -> None:
        """The client is gone: close its streams without replies once their frames are done."""
        for stream in [s for s in self.streams.values() if s.identity == identity and not s.closing]:
            self.lane.demote(stream)
            stream.closing = True
            stream.chunks.append(PendingChunk(P.CLOSE_SEQ, 0, stream.next_seq, kind="close"))
            self.complete_chunks(stream)

    def housekeeping(self, now: float, in_rings: list[Ring]) -> None:
        if self.quarantine:
            still = []
            for slot, worker, position in self.quarantine:
                ring = in_rings[worker]
                if position < 0:
                    position = ring.head_position()
                if ring.tail_position() >= position:
                    self.free_slots.append(slot)
                else:
                    still.append((slot, worker, position))
            self.quarantine = still
        lane = self.lane
        for slot in np.flatnonzero(lane.on & (lane.next_seq == lane.expected_seq)
                                   & (now - lane.last_active > self.idle_timeout_s)).tolist():
            stream = self.by_slot[slot]
            assert stream is not None
            lane.demote(stream)
        for stream in list(self.streams.values()):
            if lane.on[stream.slot]:
                continue
            if not stream.closing and not stream.in_flight and now - stream.last_active > self.idle_timeout_s:
                self.counters["streams_expired"] += 1
                self.error(stream.identity, 0, stream.stream_id, 0, ErrorCode.EXPIRED,
                           f"stream {stream.stream_id} closed after {self.idle_timeout_s:.0f} s without audio "
                           "(idle_timeout_s)")
                # The notice may have found the client gone (EHOSTUNREACH): drop_connection() then
                # already closed this stream, and closing it again would raise UNKNOWN_STREAM here.
                if not stream.closing:
                    self.on_stream_op(stream.identity, 0, stream.stream_id, MsgType.CLOSE)
