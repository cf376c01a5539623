"""Sans-IO core of the ringserve clients: the protocol state of one connection, no sockets.

:class:`Session` is shared by :class:`clients.Client` (blocking) and
:class:`clients.AsyncClient` (asyncio). It never touches a socket, never sleeps and never
reads a clock: the I/O layer passes the time in, sends the bytes it is given and feeds
back every message it receives. What it keeps:

* request ids (one counter for request ids and chunk sequence numbers, 1..2**32-2, so a
  reply names exactly one thing) and the control requests waiting for a reply;
* the stream registry: parameters (to reopen a stream exactly as it was), state, epoch
  and offsets, the chunks in flight in submission order, the window;
* encoding: PCM -> AUDIO messages (several streams may share one message, up to the engine's
  max_message_bytes and max_items_per_message; a chunk over max_message_bytes is split, the
  pieces answered as one :class:`Ticket`);
* decoding: RESULTS items -> per-frame :class:`~clients.results.Result` with events,
  wall-clock arrival times and latency, matched to their chunk by (stream, chunk_seq);
  ERROR -> the typed exception of the chunk or request it names; unsolicited errors
  (an idle stream expired) -> notices;
* utterance bookkeeping (:class:`~clients.utterances.UtteranceKeeper`) per stream;
* liveness: a heartbeat PING when nothing arrived for ``heartbeat_interval`` seconds;
  no reply within ``heartbeat_timeout``, or an UNKNOWN_STREAM error for a stream that is
  open (the engine restarted and forgot it), means the connection is lost;
* reconnection as a state machine: connection lost -> fail what was in flight ->
  ``NewSocket`` (the I/O layer replaces its DEALER) -> PROBING (PING until a PONG) ->
  REOPENING (OPEN every stream with its original parameters) -> CONNECTED, each reopened
  stream starting a new epoch announced by a :class:`~clients.results.StreamReset`.

Input: :meth:`Session.receive` (a message) and :meth:`Session.tick` (time passed; call it
again at :meth:`Session.next_tick`). Both return a list of outputs for the I/O layer, in
order: :class:`Send` (bytes for the socket), :class:`NewSocket` (drop the socket,
connect a fresh one), :class:`Wake` (a Ticket or Request is done: wake its waiter) and
:class:`Emit` (an item for the stream's callbacks). API calls (open, submit, reset,
close, ping, stats) return the bytes to send directly. The records it keeps per stream and
per request live in :mod:`clients.bookkeeping`.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

import numpy as np

from clients.bookkeeping import Request, StreamCore, StreamOptions, StreamState, Ticket, WireChunk
from clients.errors import (ConnectionLostError, RepliesLostError, RingserveError, StreamClosedError,
                            StreamExistsError, StreamResetError, from_wire)
from clients.results import Event, Result, StreamReset, Utterance
from transport import protocol as P
from transport.protocol import ErrorCode, MsgType

__all__ = ["PCM", "VAD_KEYS", "ConnState", "Emit", "Item", "NewSocket", "Output", "Request", "Send", "Session",
           "SessionCounters", "StreamCore", "StreamOptions", "StreamState", "Ticket", "Wake", "pcm_bytes"]

log = logging.getLogger("ringserve.client")

VAD_KEYS = ("threshold", "neg_threshold", "min_silence_duration_ms", "speech_pad_ms",
            "min_speech_duration_ms", "max_speech_duration_s")
_ID_MAX = 0xFFFF_FFFE  # CLOSE_SEQ (0xFFFFFFFF) and 0 (unsolicited) are never issued
_UNCLAIMED_MAX = 1024
_PROBE_INTERVAL = 0.25

PCM = Union[np.ndarray, bytes, bytearray, memoryview]
Item = Union[Result, Event, Utterance, StreamReset, RingserveError]


class ConnState(enum.Enum):
    CONNECTED = "connected"
    PROBING = "probing"  # a fresh socket; PING until the daemon answers
    REOPENING = "reopening"  # the daemon answered; OPEN sent for every stream


# ---- outputs ------------------------------------------------------------------------------

class Send(NamedTuple):
    payload: bytes


class NewSocket(NamedTuple):
    reason: str


class Wake(NamedTuple):
    target: Ticket | Request


class Emit(NamedTuple):
    stream: StreamCore
    item: Item


Output = Union[Send, NewSocket, Wake, Emit]


def pcm_bytes(pcm: PCM, dtype: P.DType) -> bytes:
    """Mono PCM as the stream's wire dtype; bytes pass as they are."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        return bytes(pcm)
    array = np.asarray(pcm)
    expected = P.NUMPY_DTYPES[dtype]
    if array.ndim != 1:
        raise ValueError(f"PCM must be one-dimensional mono audio, got shape {array.shape}")
    if array.dtype.kind != expected.kind or array.dtype.itemsize != expected.itemsize:
        raise TypeError(f"stream expects {expected.name} samples, got {array.dtype}; "
                        f"convert first or open the stream with dtype={array.dtype.name!r}")
    return array.astype(expected, copy=False).tobytes()


# ---- the session -------------------------------------------------------------------------

@dataclass
class SessionCounters:
    reconnects: int = 0
    heartbeats: int = 0
    replies_lost: int = 0
    unclaimed: int = 0
    mirror_warnings: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Session:
    def __init__(self, *, now: float, heartbeat_interval: float | None = 2.0, heartbeat_timeout: float = 6.0,
                 reconnect: bool = True) -> None:
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be > 0 or None, got {heartbeat_interval!r}")
        if heartbeat_timeout <= 0:
            raise ValueError(f"heartbeat_timeout must be > 0, got {heartbeat_timeout!r}")
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.reconnect = reconnect
        self.streams: dict[int, StreamCore] = {}
        self.requests: dict[int, Request] = {}
        self.unclaimed: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()
        self.notices: list[RingserveError] = []
        self.max_message_bytes = 1 << 20
        self.max_items_per_message = 1024  # the engine's defaults, until an OPENED says otherwise
        self.state = ConnState.CONNECTED
        self.last_rx = now
        self.last_ping = now
        self.heartbeat: Request | None = None
        self.instance: str | None = None  # the daemon's instance id, from PONG/OPENED
        self.probe_ids: set[int] = set()
        self.last_probe = -math.inf
        self.lost_reason = ""
        self.counters = SessionCounters()
        self._id = 0
        self._auto_sid = 0
        self._reopen_wanted = False  # some stream waits for a reopen the next tick must send

    # ---- ids ----------------------------------------------------------------------------
    def new_id(self) -> int:
        self._id = self._id % _ID_MAX + 1
        return self._id

    def _new_stream_id(self) -> int:
        while True:
            self._auto_sid = self._auto_sid % 0xFFFF_FFFF + 1
            if self._auto_sid not in self.streams:
                return self._auto_sid

    def _request(self, kind: str, stream: StreamCore | None, now: float) -> Request:
        request = Request(self.new_id(), kind, stream, now)
        self.requests[request.id] = request
        return request

    # ---- API: requests ------------------------------------------------------------------
    def open_stream(self, sample_rate: int, dtype: str, stream_id: int | None, vad: dict[str, Any],
                    options: StreamOptions, now: float, shed_after_ms: int | None = None
                    ) -> tuple[StreamCore, Request, bytes]:
        unknown = set(vad) - set(VAD_KEYS)
        if unknown:
            raise TypeError(f"unknown VAD parameter(s) {sorted(unknown)}; known: {list(VAD_KEYS)}")
        sid = self._new_stream_id() if stream_id is None else stream_id
        if not isinstance(sid, int) or not 0 < sid < P.CLOSE_SEQ:
            raise ValueError(f"stream_id must be an integer in 1..{P.CLOSE_SEQ - 1}, got {sid!r}")
        if sid in self.streams:
            raise StreamExistsError(f"stream {sid} is already open on this connection", sid)
        params: dict[str, Any] = {"sample_rate": sample_rate, "dtype": dtype, "vad": dict(vad)}
        if shed_after_ms is not None:
            params["shed_after_ms"] = shed_after_ms
        stream = StreamCore(sid, params, options)
        self.streams[sid] = stream
        request = self._request("open", stream, now)
        return stream, request, P.encode_open(request.id, sid, params)

    def reset(self, stream: StreamCore, now: float) -> tuple[Request, bytes]:
        self._check_ready(stream)
        stream.state = StreamState.RESETTING
        request = self._request("reset", stream, now)
        return request, P.encode_stream_op(MsgType.RESET, request.id, stream.stream_id)

    def close(self, stream: StreamCore, now: float) -> tuple[Request | None, bytes | None]:
        """CLOSE (flushes the last partial frame); (None, None) when nothing is left to close."""
        if stream.state is StreamState.CLOSING and stream.close_request is not None:
            return stream.close_request, None
        if stream.state is not StreamState.OPEN:  # nothing open on the engine (or being reopened)
            stream.reopen_request = None
            self._forget(stream, StreamState.CLOSED if stream.state is not StreamState.FAILED else stream.state)
            self._maybe_connected()
            return None, None
        stream.state = StreamState.CLOSING
        request = self._request("close", stream, now)
        request.value = []
        stream.close_request = request
        return request, P.encode_stream_op(MsgType.CLOSE, request.id, stream.stream_id)

    def ping(self, now: float) -> tuple[Request, bytes]:
        request = self._request("ping", None, now)
        return request, P.header(MsgType.PING, request.id)

    def stats(self, now: float) -> tuple[Request, bytes]:
        request = self._request("stats", None, now)
        return request, P.header(MsgType.STATS, request.id)

    def farewells(self) -> Iterator[bytes]:
        """CLOSE for every stream open on the engine, for a client that goes away without waiting
        for the final results."""
        for stream in list(self.streams.values()):
            if stream.state is StreamState.OPEN:
                yield P.encode_stream_op(MsgType.CLOSE, self.new_id(), stream.stream_id)

    def abandon(self, stream: StreamCore) -> None:
        """The application gave up waiting for the stream to open: forget it (closed if it opens)."""
        if stream.state is StreamState.OPENING:
            self._forget(stream, StreamState.FAILED)

    def want_reopen(self, stream: StreamCore) -> None:
        """Audio came for a stream the engine expired: reopen it at the next tick."""
        if stream.state is StreamState.REOPEN:
            stream.reopen_eager = True
            self._reopen_wanted = True

    def _check_ready(self, stream: StreamCore) -> None:
        if stream.state is StreamState.OPEN:
            return
        if stream.finished or stream.state is StreamState.CLOSING:
            raise stream.closed_error()
        raise RuntimeError(f"stream {stream.stream_id} is {stream.state.value}; wait until it is ready")

    # ---- API: audio ---------------------------------------------------------------------
    def submit(self, items: Iterable[tuple[StreamCore, PCM]], now: float) -> tuple[list[Ticket], list[bytes]]:
        """Encode chunks of one or more streams; returns their tickets and the messages.

        Items of several streams share messages up to the engine's max_message_bytes and
        max_items_per_message; a chunk larger than max_message_bytes is split into pieces
        answered as one ticket.
        """
        budget = max(512, self.max_message_bytes - P.HEADER.size - P.AUDIO_ITEM.size)
        tickets: list[Ticket] = []
        pieces: list[tuple[StreamCore, WireChunk, bytes]] = []
        checked = []
        for stream, pcm in items:  # check everything before any state changes
            self._check_ready(stream)
            checked.append((stream, pcm_bytes(pcm, stream.dtype)))
        for stream, data in checked:
            itemsize = stream.np_dtype.itemsize
            step = budget - budget % itemsize
            ticket = Ticket(stream, len(data) // itemsize, now)
            keep = stream.keeper is not None
            for offset in range(0, max(len(data), 1), step):
                piece = data[offset:offset + step]
                samples = np.frombuffer(piece, stream.np_dtype) if keep else None
                wire = WireChunk(self.new_id(), 0, len(piece) // itemsize, ticket, now, samples)
                ticket.parts += 1
                pieces.append((stream, wire, piece))
            stream.submitted += ticket.nsamples
            stream.tickets_in_flight += 1
            stream.max_tickets_in_flight = max(stream.max_tickets_in_flight, stream.tickets_in_flight)
            tickets.append(ticket)
        messages: list[bytes] = []
        batch: list[tuple[StreamCore, WireChunk, bytes]] = []
        size = P.HEADER.size

        def flush() -> None:
            request_id = batch[0][1].seq  # a one-item message: request id == chunk_seq
            for stream, wire, _ in batch:
                wire.request_id = request_id
                stream.inflight.append(wire)
                stream.by_seq[wire.seq] = wire
            messages.append(P.encode_audio(request_id, [(s.stream_id, w.seq, s.dtype, d) for s, w, d in batch]))

        for entry in pieces:
            need = P.AUDIO_ITEM.size + len(entry[2])
            if batch and (size + need > self.max_message_bytes or len(batch) >= self.max_items_per_message):
                flush()
                batch, size = [], P.HEADER.size
            batch.append(entry)
            size += need
        if batch:
            flush()
        return tickets, messages

    # ---- input: messages ----------------------------------------------------------------
    def receive(self, msg: bytes, wall: float, now: float) -> list[Output]:
        """Decode one message from the engine; returns what the I/O layer must do."""
        out: list[Output] = []
        self.last_rx = now
        try:
            msg_type, request_id = P.parse_header(msg)
        except P.ProtocolError as exc:
            log.warning("ignoring a message that is not ringserve v1: %s", exc)
            return out
        if msg_type == MsgType.RESULTS:
            for item in P.decode_results(msg):
                self._on_item(item, wall, now, out)
        elif msg_type == MsgType.ERROR:
            self._on_error(P.decode_error(msg), wall, now, out)
        else:
            if self._daemon_replaced(msg_type, msg):
                return out + self.connection_lost("the daemon restarted (its instance id changed)", wall, now)
            request = self.requests.pop(request_id, None)
            if request is None:
                if msg_type == MsgType.PONG and request_id in self.probe_ids:
                    self._probe_answered(now, out)
                else:
                    self._unclaimed(("req", request_id), msg)
                return out
            self._on_reply(request, msg_type, msg, wall, now, out)
        return out

    def _daemon_replaced(self, msg_type: int, msg: bytes) -> bool:
        """True when a PONG or OPENED comes from another daemon than the streams were opened on.

        A daemon restarted faster than the heartbeat timeout answers pings like the old one; only
        its instance id (new at every start) tells. While probing after a loss, a new id is expected.
        """
        if msg_type == MsgType.PONG:
            body = msg[P.HEADER.size:]
        elif msg_type == MsgType.OPENED:
            body = msg[P.HEADER.size + P.STREAM_ID.size:]
        else:
            return False
        try:
            instance = P.decode_json(body).get("instance") if body else None
        except P.ProtocolError:
            return False
        if not isinstance(instance, str):
            return False  # an engine that predates instance ids
        previous, self.instance = self.instance, instance
        return previous is not None and previous != instance and self.state is ConnState.CONNECTED

    def _unclaimed(self, key: tuple[str, int], value: Any) -> None:
        self.counters.unclaimed += 1
        self.unclaimed[key] = value
        while len(self.unclaimed) > _UNCLAIMED_MAX:
            self.unclaimed.popitem(last=False)

    def _finish(self, target: Ticket | Request, out: list[Output], error: RingserveError | None = None) -> None:
        if error is not None and target.error is None:
            target.error = error
        target.done = True
        out.append(Wake(target))

    def _on_reply(self, request: Request, msg_type: int, msg: bytes, wall: float, now: float,
                  out: list[Output]) -> None:
        kind, stream = request.kind, request.stream
        if kind in ("open", "reopen") and stream is not None and self.streams.get(stream.stream_id) is not stream:
            if msg_type == MsgType.OPENED:  # closed by the application meanwhile: close it there too
                out.append(Send(P.encode_stream_op(MsgType.CLOSE, self.new_id(), stream.stream_id)))
            self._maybe_connected()
            request.error = StreamClosedError(f"stream {stream.stream_id} was abandoned", stream.stream_id)
        elif kind in ("open", "reopen") and msg_type == MsgType.OPENED and stream is not None:
            info = P.decode_json(msg[P.HEADER.size + P.STREAM_ID.size:])
            self.max_message_bytes = int(info.get("max_message_bytes", self.max_message_bytes))
            self.max_items_per_message = max(1, int(info.get("max_items_per_message", self.max_items_per_message)))
            stream.on_opened(info)
            if kind == "reopen":
                stream.reopen_request = None
                self._new_epoch(stream, stream.reopen_reason, wall, out)
                self._maybe_connected()
            request.value = info
        elif kind == "reset" and msg_type == MsgType.RESET_DONE and stream is not None:
            stream.state = StreamState.OPEN
            if stream.keeper is not None:
                stream.keeper.reset()
            stream.next_frame = 0
            stream.in_speech = False
            self._new_epoch(stream, "reset", wall, out)
        elif kind == "heartbeat" and msg_type == MsgType.PONG:
            self.heartbeat = None
            return
        elif kind == "ping" and msg_type == MsgType.PONG:
            request.value = now - request.sent_at
        elif kind == "stats" and msg_type == MsgType.STATS_REPLY:
            request.value = P.decode_json(msg[P.HEADER.size:])
        else:
            log.warning("unexpected reply type 0x%02x to a %s request", msg_type, kind)
            request.error = RingserveError(f"unexpected reply type 0x{msg_type:02x} to {kind}")
        self._finish(request, out)

    def _new_epoch(self, stream: StreamCore, reason: str, wall: float, out: list[Output]) -> None:
        stream.epoch += 1
        stream.base_sample = stream.submitted
        reset = StreamReset(stream.stream_id, reason, stream.epoch, stream.base_sample,
                            stream.lost_samples, stream.lost_chunks, wall)
        stream.lost_samples = stream.lost_chunks = 0
        stream.push_feed(reset)
        out.append(Emit(stream, reset))

    def _on_error(self, error: P.WireError, wall: float, now: float, out: list[Output]) -> None:
        exc = from_wire(error)
        stream = self.streams.get(error.stream_id)
        request = self.requests.get(error.request_id) if error.request_id else None
        if request is not None and request.kind not in ("heartbeat", "probe"):
            del self.requests[error.request_id]
            self._request_failed(request, exc, wall, now, out)
            return
        wire = stream.by_seq.get(error.chunk_seq) if stream is not None and error.chunk_seq else None
        if stream is not None and wire is not None and wire.request_id == error.request_id:
            if error.code == ErrorCode.UNKNOWN_STREAM and stream.state is StreamState.OPEN and self.reconnect:
                # The engine lost the stream: this chunk and every other in flight fail with
                # StreamResetError, and the stream is reopened.
                if stream.expiring:  # a chunk raced the idle expiry
                    out += self._lose_stream(stream, "expired", eager=True)
                else:
                    out += self.connection_lost(f"the engine no longer knows stream {stream.stream_id} "
                                                "(it was restarted)", wall, now)
                return
            self._chunk_failed(stream, wire, exc, now, out)
            return
        if error.request_id == 0 and error.chunk_seq == 0:
            self.notices.append(exc)
            if stream is not None:
                if error.code == ErrorCode.EXPIRED:
                    stream.expiring = True
                out.append(Emit(stream, exc))
            return
        self._unclaimed(("req", error.request_id), error)

    def _request_failed(self, request: Request, exc: RingserveError, wall: float, now: float,
                        out: list[Output]) -> None:
        stream = request.stream
        if stream is not None:
            if request.kind == "open":
                self.streams.pop(stream.stream_id, None)
                stream.state = StreamState.FAILED
                stream.error = exc
            elif request.kind == "reopen":
                stream.reopen_request = None
                stream.state = StreamState.FAILED
                stream.error = exc
                self._fail_inflight(stream, exc, out)
                out.append(Emit(stream, exc))
                self.streams.pop(stream.stream_id, None)
                self._maybe_connected()
            elif request.kind == "reset":
                stream.state = StreamState.OPEN
                if exc.code == ErrorCode.UNKNOWN_STREAM and not stream.expiring and self.reconnect:
                    out += self.connection_lost(f"the engine no longer knows stream {stream.stream_id}",
                                                wall, now)
            elif request.kind == "close":
                self._forget(stream, StreamState.CLOSED)
        self._finish(request, out, exc)

    # ---- results ------------------------------------------------------------------------
    def _on_item(self, item: P.WireResult, wall: float, now: float, out: list[Output]) -> None:
        stream = self.streams.get(item.stream_id)
        final = item.chunk_seq == P.CLOSE_SEQ
        key = ("close", item.stream_id) if final else ("req", item.chunk_seq)
        if stream is None or stream.state not in (StreamState.OPEN, StreamState.RESETTING, StreamState.CLOSING):
            self._unclaimed(key, item)
            return
        wire: WireChunk | None = None
        if not final:
            wire = stream.by_seq.get(item.chunk_seq)
            if wire is None:
                self._unclaimed(key, item)
                return
            while stream.inflight and stream.inflight[0] is not wire:  # results come in order:
                lost = stream.inflight[0]  # anything before this chunk lost its reply
                self.counters.replies_lost += 1
                self._chunk_failed(stream, lost, RepliesLostError(
                    f"stream {stream.stream_id}: the engine dropped the reply to chunk {lost.seq} "
                    "(the client read too slowly)", stream.stream_id, chunk_seq=lost.seq), now, out)
            stream.inflight.popleft()
            del stream.by_seq[wire.seq]
        probs = item.probabilities
        n = len(probs)
        if n and item.first_frame != stream.next_frame and stream.keeper is not None:
            stream.keeper.mirror_ok = False  # a lost reply left a gap
        stream.next_frame = item.first_frame + n
        stream.frames += n
        sent_at = wire.sent_at if wire is not None else (
            stream.close_request.sent_at if stream.close_request is not None else now)
        latency = now - sent_at
        events = [Event("start" if e.kind == P.EventKind.START else "end", e.sample, e.frame, stream.sample_rate,
                        stream.stream_id, wall, stream.epoch, stream.base_sample) for e in item.events]
        by_frame: dict[int, list[Event]] = {}
        last = item.first_frame + n - 1
        for event in events:
            by_frame.setdefault(min(event.frame, last), []).append(event)
        epoch = stream.epoch
        results = [Result(item.first_frame + i, p, tuple(by_frame.get(item.first_frame + i, ())), wall,
                          latency, epoch) for i, p in enumerate(probs.tolist())]
        if n:
            stream.last_probability = results[-1].probability
        if stream.options.on_result is not None:
            out.extend(Emit(stream, r) for r in results)
        for event in events:
            stream.in_speech = event.kind == "start"
            stream.history.append(event)
            stream.push_feed(event)
            out.append(Emit(stream, event))
        if stream.keeper is not None:
            for utterance in stream.keeper.on_chunk(wire.samples if wire is not None else None, probs, events,
                                                    final):
                stream.utterances += 1
                stream.push_feed(utterance)
                out.append(Emit(stream, utterance))
        if wire is not None:
            ticket = wire.ticket
            ticket.results.extend(results)
            self._part_done(ticket, now, out)
        else:
            stream.in_speech = False
            self._closed_by_engine(stream, results, wall, out)

    def _part_done(self, ticket: Ticket, now: float, out: list[Output]) -> None:
        ticket.parts -= 1
        ticket.received_at = now
        if ticket.parts == 0:
            ticket.stream.tickets_in_flight -= 1
            self._finish(ticket, out)

    def _chunk_failed(self, stream: StreamCore, wire: WireChunk, exc: RingserveError, now: float,
                      out: list[Output]) -> None:
        try:
            stream.inflight.remove(wire)
        except ValueError:
            pass
        stream.by_seq.pop(wire.seq, None)
        stream.chunk_errors += 1
        if wire.ticket.error is None:
            wire.ticket.error = exc
            out.append(Emit(stream, exc))
        self._part_done(wire.ticket, now, out)

    def _closed_by_engine(self, stream: StreamCore, results: list[Result], wall: float, out: list[Output]) -> None:
        request = stream.close_request
        if request is not None:  # our close()
            self.requests.pop(request.id, None)
            request.value = results
            self._forget(stream, StreamState.CLOSED)
            self._finish(request, out)
        else:  # the engine closed it (idle expiry): reopen when audio comes again
            stream.state = StreamState.REOPEN
            stream.reopen_reason = "expired"
            stream.reopen_eager = False
            stream.expiring = False

    def _forget(self, stream: StreamCore, state: StreamState) -> None:
        stream.state = state
        stream.close_request = None
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]

    def _fail_inflight(self, stream: StreamCore, exc: RingserveError, out: list[Output]) -> None:
        while stream.inflight:
            wire = stream.inflight.popleft()
            stream.by_seq.pop(wire.seq, None)
            stream.lost_samples += wire.nsamples
            stream.lost_chunks += 1
            ticket = wire.ticket
            ticket.error = ticket.error or exc
            ticket.parts -= 1
            if ticket.parts == 0:
                stream.tickets_in_flight -= 1
                self._finish(ticket, out)

    def _lose_stream(self, stream: StreamCore, reason: str, eager: bool) -> list[Output]:
        out: list[Output] = []
        exc = StreamResetError(f"stream {stream.stream_id}: results lost, the stream is reopened from zero "
                               f"({reason})", stream.stream_id, reason=reason, epoch=stream.epoch)
        self._fail_inflight(stream, exc, out)
        stream.state = StreamState.REOPEN
        stream.reopen_reason = reason
        stream.reopen_eager = eager
        stream.reopen_request = None
        stream.in_speech = False
        self._reopen_wanted = self._reopen_wanted or eager
        return out

    # ---- connection ---------------------------------------------------------------------
    def connection_lost(self, reason: str, wall: float, now: float) -> list[Output]:
        """The daemon is gone or restarted: fail what was in flight and start reconnecting."""
        out: list[Output] = [NewSocket(reason)]
        self.counters.reconnects += 1
        self.lost_reason = reason
        log.warning("connection lost (%s); reconnecting", reason)
        requests, self.requests = self.requests, {}
        for request in requests.values():
            stream = request.stream
            if request.kind in ("heartbeat", "probe", "reopen"):
                continue
            if request.kind == "open" and stream is not None:
                self.streams.pop(stream.stream_id, None)
                stream.state = StreamState.FAILED
                self._finish(request, out, ConnectionLostError(
                    f"stream {stream.stream_id}: the connection was lost while opening ({reason})", stream.stream_id))
            elif request.kind == "close" and stream is not None:
                self._fail_inflight(stream, StreamResetError(
                    f"stream {stream.stream_id}: the connection was lost while closing; its last results are "
                    f"lost ({reason})", stream.stream_id), out)
                self._forget(stream, StreamState.CLOSED)
                self._finish(request, out, StreamResetError(
                    f"stream {stream.stream_id} closed, but its final results were lost ({reason})",
                    stream.stream_id, reason="reconnect", epoch=stream.epoch))
            elif request.kind == "reset" and stream is not None:
                self._finish(request, out, StreamResetError(
                    f"stream {stream.stream_id}: the connection was lost during reset(); the stream is "
                    f"reopened from zero instead ({reason})", stream.stream_id, reason="reconnect"))
            else:
                self._finish(request, out, ConnectionLostError(f"connection lost ({reason})"))
        for stream in list(self.streams.values()):
            if stream.state in (StreamState.OPEN, StreamState.RESETTING):
                out += self._lose_stream(stream, "reconnect", eager=True)
            elif stream.state is StreamState.REOPEN:
                stream.reopen_request = None  # sent on the old socket: send again
        self.heartbeat = None
        self.probe_ids.clear()
        self.last_probe = -math.inf
        self.state = ConnState.PROBING
        self.last_rx = now
        out += self.tick(wall, now)
        return out

    def _probe_answered(self, now: float, out: list[Output]) -> None:
        self.probe_ids.clear()
        if self.state is ConnState.PROBING:
            self.state = ConnState.REOPENING
            self._send_reopens(now, out)
            self._maybe_connected()

    def _send_reopens(self, now: float, out: list[Output]) -> None:
        self._reopen_wanted = False
        for stream in self.streams.values():
            if stream.state is StreamState.REOPEN and stream.reopen_eager and stream.reopen_request is None:
                request = self._request("reopen", stream, now)
                stream.reopen_request = request
                out.append(Send(P.encode_open(request.id, stream.stream_id, stream.params)))

    def _maybe_connected(self) -> None:
        if self.state is ConnState.REOPENING and not any(
                s.reopen_request is not None for s in self.streams.values()):
            self.state = ConnState.CONNECTED
            log.info("reconnected; %d stream(s) reopened", len(self.streams))

    def next_tick(self, now: float) -> float:
        """Monotonic time by which tick() should run again."""
        if self.state is ConnState.PROBING:
            return min(self.last_probe + _PROBE_INTERVAL, now + _PROBE_INTERVAL)
        if self.state is ConnState.REOPENING:
            return now + min(0.5, self.heartbeat_timeout / 4)
        if self.heartbeat is not None:
            return max(self.heartbeat.sent_at, self.last_rx) + self.heartbeat_timeout
        if self._reopen_wanted:
            return now
        if self.heartbeat_interval is None:
            return now + 3600.0
        return max(self.last_rx, self.last_ping) + self.heartbeat_interval

    def tick(self, wall: float, now: float) -> list[Output]:
        """Time passed: heartbeat, probing and reopening as the connection state needs."""
        out: list[Output] = []
        if self.state is ConnState.PROBING:
            if now - self.last_probe >= _PROBE_INTERVAL:
                request_id = self.new_id()
                self.probe_ids.add(request_id)
                if len(self.probe_ids) > 64:
                    self.probe_ids.discard(min(self.probe_ids))
                self.last_probe = now
                out.append(Send(P.header(MsgType.PING, request_id)))
            return out
        if self.state is ConnState.REOPENING:
            stale = [s.reopen_request for s in self.streams.values()
                     if s.reopen_request is not None and now - s.reopen_request.sent_at > self.heartbeat_timeout]
            if stale and self.reconnect:
                return self.connection_lost("no reply to reopening the streams", wall, now)
            return out
        if self.heartbeat is not None:
            if now - max(self.heartbeat.sent_at, self.last_rx) >= self.heartbeat_timeout:
                self.heartbeat = None
                if self.reconnect:
                    return self.connection_lost(
                        f"no reply to a heartbeat PING within {self.heartbeat_timeout:g} s", wall, now)
                self.notices.append(RingserveError(f"no reply to a heartbeat PING within "
                                                   f"{self.heartbeat_timeout:g} s"))
        elif self.heartbeat_interval is not None and \
                now - max(self.last_rx, self.last_ping) >= self.heartbeat_interval:
            self.heartbeat = self._request("heartbeat", None, now)
            self.last_ping = now
            self.counters.heartbeats += 1
            out.append(Send(P.header(MsgType.PING, self.heartbeat.id)))
        self._send_reopens(now, out)
        return out

    # ---- compatibility: replies nobody registered (raw messages sent by the application) --
    def take_unclaimed(self, keys: Iterable[tuple[str, int]]) -> tuple[bool, Any]:
        for key in keys:
            if key in self.unclaimed:
                return True, self.unclaimed.pop(key)
        return False, None
