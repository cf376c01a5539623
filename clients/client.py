"""Blocking client: one DEALER connection carrying any number of streams.

    with Client("tcp://127.0.0.1:5555") as client:
        stream = client.open_stream(sample_rate=16000, threshold=0.5)
        for result in stream.send(pcm_int16):
            print(result.frame, result.probability, result.events)
        stream.close()

The protocol state lives in :class:`clients.session.Session` (sans-IO); this module only
moves bytes and waits. Nothing runs in the background: replies are read, callbacks run,
heartbeats go out and a lost daemon is reconnected while a call waits (``send``,
``submit`` with a full window, ``result``, ``close``, ``poll``, ``drain`` ...). A program
that streams fire-and-forget should call ``client.poll()`` regularly (``ringserve mic``
does, once per captured block).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import zmq

from clients.errors import EngineTimeout, RingserveError, StreamClosedError, from_wire
from clients.results import Event, Result, StreamReset, Utterance
from clients.session import (PCM, VAD_KEYS, ConnState, Emit, NewSocket, Output, Request, Send, Session,
                             StreamCore, StreamOptions, StreamState, Ticket)
from transport import protocol as P

__all__ = ["DEFAULT_ENDPOINT", "Client", "Event", "Pending", "Result", "Stream", "StreamReset", "Utterance"]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
_VAD_KEYS = VAD_KEYS  # kept for callers of the first client
_CLOSE_LINGER_MS = 200


def deliver(emit: Emit) -> None:
    """Run the stream callback registered for an emitted item (shared with the async client)."""
    options, item = emit.stream.options, emit.item
    if isinstance(item, Result):
        if options.on_result is not None:
            options.on_result(item)
    elif isinstance(item, Event):
        if options.on_event is not None:
            options.on_event(item)
    elif isinstance(item, Utterance):
        if options.on_utterance is not None:
            options.on_utterance(item)
    elif isinstance(item, StreamReset):
        if options.on_reset is not None:
            options.on_reset(item)
    elif options.on_error is not None:
        options.on_error(item)


class Client:
    """A blocking connection to the engine.

    ``timeout``: default per-call timeout in seconds (every call takes its own ``timeout=``).
    ``heartbeat``: send a PING after this many seconds without a message (None: never);
    ``heartbeat_timeout``: no reply for this long means the daemon is gone. With
    ``reconnect=True`` the client then replaces its socket, waits for the daemon and reopens
    every stream with its parameters (see :class:`~clients.results.StreamReset`).
    ``curve``: (server public ``.key`` file, client ``.key_secret`` file) for an engine that
    requires ZeroMQ CURVE (``ringserve keys generate``).
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 10.0, *,
                 heartbeat: float | None = 2.0, heartbeat_timeout: float = 6.0, reconnect: bool = True,
                 curve: tuple[str, str] | None = None) -> None:
        self.endpoint = endpoint
        self._curve = curve
        self.timeout = timeout
        self._session = Session(now=time.monotonic(), heartbeat_interval=heartbeat,
                                heartbeat_timeout=heartbeat_timeout, reconnect=reconnect)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._new_socket()
        self._closed = False

    def _new_socket(self) -> zmq.Socket[bytes]:
        sock = self._context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 0)  # the engine drops replies to a full pipe: never let it fill
            sock.setsockopt(zmq.SNDHWM, 0)
            if self._curve is not None:
                from transport.security import enable_client_curve

                enable_client_curve(sock, *self._curve)
            sock.connect(self.endpoint)
        except BaseException:
            sock.close(0)
            raise
        return sock

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; streams still open are closed on the engine (best effort)."""
        if self._closed:
            return
        self._closed = True
        try:
            for core in list(self._session.streams.values()):
                if core.state is StreamState.OPEN:
                    self._socket.send(P.encode_stream_op(P.MsgType.CLOSE, self._session.new_id(), core.stream_id),
                                      zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._socket.close(_CLOSE_LINGER_MS if self._session.state is ConnState.CONNECTED else 0)

    # ---- state --------------------------------------------------------------------------
    @property
    def session(self) -> Session:
        return self._session

    @property
    def notices(self) -> list[RingserveError]:
        """Unsolicited errors, e.g. an idle stream expired."""
        return self._session.notices

    @property
    def connected(self) -> bool:
        """False while the client is reconnecting to a lost daemon."""
        return self._session.state is ConnState.CONNECTED

    @property
    def reconnects(self) -> int:
        return self._session.counters.reconnects

    def next_request_id(self) -> int:
        return self._session.new_id()

    # ---- plumbing ----------------------------------------------------------------------
    def _io(self, outputs: list[Output]) -> None:
        failed: BaseException | None = None
        for output in outputs:
            if isinstance(output, Send):
                self._socket.send(output.payload)
            elif isinstance(output, NewSocket):
                self._socket.close(0)
                self._socket = self._new_socket()
            elif isinstance(output, Emit):
                try:
                    deliver(output)
                except Exception as exc:  # noqa: BLE001 - raised once every output is handled
                    failed = failed or exc
        if failed is not None:
            raise failed

    def _drain(self) -> int:
        count = 0
        while True:
            sock = self._socket
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return count
            count += 1
            self._io(self._session.receive(msg, time.time(), time.monotonic()))

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _pump(self, done: Callable[[], bool], deadline: float, what: str) -> None:
        """Read, tick and wait until done() or the deadline (EngineTimeout)."""
        session = self._session
        while True:
            self._drain()
            if done():
                return
            now = time.monotonic()
            next_tick = session.next_tick(now)
            if now >= next_tick:
                self._io(session.tick(time.time(), now))
                continue
            if now >= deadline:
                raise EngineTimeout(self._timeout_text(what))
            self._socket.poll(max(1, int((min(deadline, next_tick) - now) * 1000) + 1), zmq.POLLIN)

    def _timeout_text(self, what: str) -> str:
        state = self._session.state
        hint = "" if state is ConnState.CONNECTED else (
            f"; the connection was lost ({self._session.lost_reason}) and the client is {state.value}")
        return (f"no reply from {self.endpoint} {what}{hint}; is `ringserve serve` running there?")

    def _wait_request(self, request: Request, deadline: float, what: str) -> Any:
        self._pump(lambda: request.done, deadline, what)
        if request.error is not None:
            raise request.error
        return request.value

    def _ready(self, cores: Iterable[StreamCore], deadline: float) -> None:
        """Wait until every stream can take a chunk (open, reopened, room in its window)."""
        cores = list(cores)
        for core in cores:
            if core.state is StreamState.REOPEN:
                self._session.want_reopen(core)
        self._pump(lambda: all(c.finished or (c.ready and c.has_room) for c in cores), deadline,
                   "for room in the stream window")
        for core in cores:
            if core.finished:
                raise StreamClosedError(f"stream {core.stream_id} is {core.state.value}"
                                        + (f": {core.error}" if core.error else ""), core.stream_id)

    # ---- API ---------------------------------------------------------------------------
    def open_stream(self, sample_rate: int = 16000, dtype: str = "int16", stream_id: int | None = None,
                    shed_after_ms: int | None = None, *, window: int = 8, keep_audio: bool = False,
                    on_result: Callable[[Result], Any] | None = None,
                    on_event: Callable[[Event], Any] | None = None,
                    on_utterance: Callable[[Utterance], Any] | None = None,
                    on_reset: Callable[[StreamReset], Any] | None = None,
                    on_error: Callable[[RingserveError], Any] | None = None,
                    timeout: float | None = None, **vad: float | None) -> Stream:
        """Open a stream.

        ``dtype``: "int16" or "float32" samples; ``**vad``: threshold, neg_threshold,
        min_silence_duration_ms, speech_pad_ms, min_speech_duration_ms, max_speech_duration_s.
        ``shed_after_ms``: how late a frame may fall behind real time before the engine sheds
        it under overload (None: the server's default; 0: never, for offline work).
        ``window``: chunks one stream may have in flight (``submit`` blocks beyond).
        ``keep_audio``: keep the audio and deliver :class:`Utterance` objects at each end event.
        Callbacks run while the client waits or polls, in the order items arrive.
        """
        options = StreamOptions(window=window, keep_audio=keep_audio, on_result=on_result, on_event=on_event,
                                on_utterance=on_utterance, on_reset=on_reset, on_error=on_error)
        deadline = self._deadline(timeout)
        core, request, payload = self._session.open_stream(sample_rate, dtype, stream_id, dict(vad), options,
                                                           time.monotonic(), shed_after_ms)
        self._socket.send(payload)
        try:
            self._wait_request(request, deadline, f"within {deadline - request.sent_at:.1f} s "
                               f"(opening stream {core.stream_id})")
        except EngineTimeout:
            self._session.abandon(core)
            raise
        return Stream(self, core)

    def submit_many(self, chunks: Iterable[tuple[Stream, PCM]], timeout: float | None = None) -> list[Pending]:
        """Submit one chunk to each of several streams in as few messages as possible."""
        pairs = [(stream._core, pcm) for stream, pcm in chunks]
        self._ready((core for core, _ in pairs), self._deadline(timeout))
        tickets, messages = self._session.submit(pairs, time.monotonic())
        for payload in messages:
            self._socket.send(payload)
        return [Pending(self, ticket) for ticket in tickets]

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time in seconds."""
        request, payload = self._session.ping(time.monotonic())
        self._socket.send(payload)
        value: float = self._wait_request(request, self._deadline(timeout), "to a PING")
        return value

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        request, payload = self._session.stats(time.monotonic())
        self._socket.send(payload)
        value: dict[str, Any] = self._wait_request(request, self._deadline(timeout), "to a STATS request")
        return value

    def poll(self, timeout: float = 0.0) -> int:
        """Handle what arrived (callbacks run here) and send heartbeats; wait up to ``timeout`` s
        for a first message. Returns the number of messages handled."""
        session = self._session
        deadline = time.monotonic() + timeout
        count = 0
        while True:
            count += self._drain()
            now = time.monotonic()
            next_tick = session.next_tick(now)
            if now >= next_tick:
                self._io(session.tick(time.time(), now))
                continue
            if count or now >= deadline:
                return count
            self._socket.poll(max(1, int((min(deadline, next_tick) - now) * 1000) + 1), zmq.POLLIN)

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every chunk submitted on this connection has its results."""
        streams = self._session.streams
        self._pump(lambda: all(c.tickets_in_flight == 0 for c in streams.values()), self._deadline(timeout),
                   "while waiting for the results of the chunks in flight")

    # ---- compatibility: raw requests ------------------------------------------------------
    def wait_for(self, *keys: tuple[str, int], timeout: float | None = None) -> Any:
        """The first reply under any of ``keys`` (``("req", request_id or chunk_seq)`` or
        ``("close", stream_id)``) to a message sent raw on ``_socket``; engine errors are raised
        as typed exceptions."""
        found: list[Any] = []

        def done() -> bool:
            ok, value = self._session.take_unclaimed(keys)
            if ok:
                found.append(value)
            return ok

        self._pump(done, self._deadline(timeout), f"to request {keys}")
        reply = found[0]
        if isinstance(reply, P.WireError):
            raise from_wire(reply)
        return reply

    def request(self, payload: bytes, request_id: int, timeout: float | None = None) -> Any:
        self._socket.send(payload)
        return self.wait_for(("req", request_id), timeout=timeout)


class Stream:
    """One audio stream on a :class:`Client` (see Client.open_stream)."""

    def __init__(self, client: Client, core: StreamCore) -> None:
        self.client = client
        self._core = core

    # ---- state --------------------------------------------------------------------------
    @property
    def stream_id(self) -> int:
        return self._core.stream_id

    @property
    def info(self) -> dict[str, Any]:
        """The engine's OPENED reply: sample_rate, frame_samples, dtype, vad, limits."""
        return self._core.info

    @property
    def sample_rate(self) -> int:
        return self._core.sample_rate

    @property
    def frame_samples(self) -> int:
        return self._core.frame_samples

    @property
    def dtype(self) -> P.DType:
        return self._core.dtype

    @property
    def state(self) -> StreamState:
        return self._core.state

    @property
    def closed(self) -> bool:
        return self._core.finished or self._core.state is StreamState.CLOSING

    @property
    def events(self) -> list[Event]:
        """Every event so far (the last ``history`` of them), in order."""
        return list(self._core.history)

    @property
    def epoch(self) -> int:
        """0 after open; +1 at every reset (see StreamReset)."""
        return self._core.epoch

    @property
    def in_flight(self) -> int:
        """Submitted chunks whose results have not arrived yet."""
        return self._core.tickets_in_flight

    @property
    def in_speech(self) -> bool:
        return self._core.in_speech

    @property
    def last_probability(self) -> float:
        return self._core.last_probability

    @property
    def kept_samples(self) -> int:
        """Samples held for utterances (keep_audio streams)."""
        return self._core.keeper.kept_samples if self._core.keeper is not None else 0

    def pop_utterances(self) -> list[Utterance]:
        """Utterances completed so far and not yet taken (keep_audio streams without on_utterance)."""
        feed = self._core.utterance_feed
        if not feed:
            return []
        out = list(feed)
        feed.clear()
        return out

    # ---- audio --------------------------------------------------------------------------
    def send(self, pcm: PCM, timeout: float | None = None) -> list[Result]:
        """Send a chunk of any length; returns a result for every frame it completed, in order."""
        deadline = self.client._deadline(timeout)
        return self.submit(pcm, timeout).result(max(0.0, deadline - time.monotonic()))

    def submit(self, pcm: PCM, timeout: float | None = None) -> Pending:
        """Send a chunk without waiting for its results (they also reach the callbacks, in
        order); blocks only while ``window`` chunks are in flight, up to ``timeout``."""
        return self.client.submit_many([(self, pcm)], timeout)[0]

    def reset(self, timeout: float | None = None) -> None:
        """Start over: zero state, forget buffered samples; offsets and frames count from 0 again.
        Chunks already submitted get their results first (of the old epoch)."""
        client, core = self.client, self._core
        deadline = client._deadline(timeout)
        client._ready([core], deadline)
        request, payload = client._session.reset(core, time.monotonic())
        client._socket.send(payload)
        client._wait_request(request, deadline, f"to RESET of stream {core.stream_id}")

    def close(self, timeout: float | None = None) -> list[Result]:
        """Flush (the last partial frame is zero-padded) and close; returns the final results."""
        client, core = self.client, self._core
        if core.finished:
            return []
        deadline = client._deadline(timeout)
        client._pump(lambda: core.state not in (StreamState.OPENING, StreamState.RESETTING), deadline,
                     f"while stream {core.stream_id} resets")
        request, payload = client._session.close(core, time.monotonic())
        if payload is not None:
            client._socket.send(payload)
        if request is None:
            return []
        results: list[Result] = client._wait_request(request, deadline, f"to CLOSE of stream {core.stream_id}")
        return results


class Pending:
    """Results of a submitted chunk, not yet collected."""

    def __init__(self, client: Client, ticket: Ticket) -> None:
        self.client = client
        self.ticket = ticket

    def done(self) -> bool:
        return self.ticket.done

    @property
    def latency(self) -> float:
        """Seconds from sending to the reply (NaN until done)."""
        return self.ticket.latency

    def result(self, timeout: float | None = None) -> list[Result]:
        """The chunk's results (one per frame it completed); raises the engine's error for it."""
        ticket = self.ticket
        self.client._pump(lambda: ticket.done, self.client._deadline(timeout),
                          f"to a chunk of stream {ticket.stream.stream_id}")
        if ticket.error is not None:
            raise ticket.error
        return ticket.results


def as_array(pcm: PCM, dtype: np.dtype[Any]) -> np.ndarray:
    """PCM (array or bytes) as a numpy array of ``dtype``."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(pcm), dtype)
    return np.asarray(pcm)
