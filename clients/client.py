"""Blocking client: one DEALER connection carrying any number of streams.

    with Client("tcp://127.0.0.1:5555") as client:
        stream = client.open_stream(sample_rate=16000, threshold=0.5)
        for result in stream.send(pcm_int16):
            print(result.frame, result.probability, result.events)
        stream.close()

The protocol state lives in :class:`clients.session.Session` (sans-IO) and all that does
not wait in :mod:`clients.base`, both shared with the asyncio client; this module only
waits. Nothing runs in the background: replies are read, callbacks run, heartbeats go out
and a lost daemon is reconnected while a call waits (``send``, ``submit`` with a full
window, ``result``, ``close``, ``poll``, ``drain`` ...). A program that streams
fire-and-forget should call ``client.poll()`` regularly (``ringserve mic`` does, once per
captured block).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import zmq

from clients.base import (CLOSE_LINGER_MS, DEFAULT_ENDPOINT, BaseClient, BasePending, BaseStream, connect_dealer,
                          deliver)
from clients.bookkeeping import Request, StreamCore, StreamOptions, StreamState
from clients.errors import EngineTimeout, RingserveError, from_wire
from clients.results import Event, Result, StreamReset, Utterance
from clients.session import PCM, VAD_KEYS, Emit, NewSocket, Output, Send
from transport import protocol as P

__all__ = ["DEFAULT_ENDPOINT", "Client", "Event", "Pending", "Result", "Stream", "StreamReset", "Utterance"]

_VAD_KEYS = VAD_KEYS  # kept for callers of the first client


class Client(BaseClient):
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
        super().__init__(endpoint, timeout, heartbeat=heartbeat, heartbeat_timeout=heartbeat_timeout,
                         reconnect=reconnect, curve=curve)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = connect_dealer(self._context, endpoint, curve)

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
            for payload in self._session.farewells():
                self._socket.send(payload, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._socket.close(CLOSE_LINGER_MS if self.connected else 0)

    def next_request_id(self) -> int:
        return self._session.new_id()

    # ---- plumbing ----------------------------------------------------------------------
    def _send(self, payload: bytes) -> None:
        self._socket.send(payload)

    def _io(self, outputs: list[Output]) -> None:
        failed: BaseException | None = None
        for output in outputs:
            if isinstance(output, Send):
                self._send(output.payload)
            elif isinstance(output, NewSocket):
                self._socket.close(0)
                self._socket = connect_dealer(self._context, self.endpoint, self._curve)
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

    def _wait_request(self, request: Request, deadline: float, what: str) -> Any:
        self._pump(lambda: request.done, deadline, what)
        return request.outcome()

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
                raise core.closed_error()

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
        core, request, what = self._send_open(sample_rate, dtype, stream_id, shed_after_ms, options, vad, deadline)
        try:
            self._wait_request(request, deadline, what)
        except EngineTimeout:
            self._session.abandon(core)
            raise
        return Stream(self, core)

    def submit_many(self, chunks: Iterable[tuple[Stream, PCM]], timeout: float | None = None) -> list[Pending]:
        """Submit one chunk to each of several streams in as few messages as possible."""
        pairs = [(stream._core, pcm) for stream, pcm in chunks]
        self._ready((core for core, _ in pairs), self._deadline(timeout))
        return [Pending(self, ticket) for ticket in self._send_chunks(pairs)]

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time in seconds."""
        request = self._send_request(*self._session.ping(time.monotonic()))
        value: float = self._wait_request(request, self._deadline(timeout), "to a PING")
        return value

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        request = self._send_request(*self._session.stats(time.monotonic()))
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
        self._send(payload)
        return self.wait_for(("req", request_id), timeout=timeout)


class Stream(BaseStream[Client]):
    """One audio stream on a :class:`Client` (see Client.open_stream)."""

    # ---- state (the rest is BaseStream's) -------------------------------------------------
    @property
    def dtype(self) -> P.DType:
        return self._core.dtype

    @property
    def events(self) -> list[Event]:
        """Every event so far (the last ``history`` of them), in order."""
        return list(self._core.history)

    @property
    def last_probability(self) -> float:
        return self._core.last_probability

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
        client = self.client
        deadline = client._deadline(timeout)
        client._ready([self._core], deadline)
        client._wait_request(self._send_reset(), deadline, f"to RESET of stream {self.stream_id}")

    def close(self, timeout: float | None = None) -> list[Result]:
        """Flush (the last partial frame is zero-padded) and close; returns the final results."""
        client, core = self.client, self._core
        if core.finished:
            return []
        deadline = client._deadline(timeout)
        client._pump(lambda: core.state not in (StreamState.OPENING, StreamState.RESETTING), deadline,
                     f"while stream {core.stream_id} resets")
        request = self._send_close()
        if request is None:
            return []
        results: list[Result] = client._wait_request(request, deadline, f"to CLOSE of stream {core.stream_id}")
        return results


class Pending(BasePending[Client]):
    """Results of a submitted chunk, not yet collected."""

    def result(self, timeout: float | None = None) -> list[Result]:
        """The chunk's results (one per frame it completed); raises the engine's error for it."""
        ticket = self.ticket
        self.client._pump(lambda: ticket.done, self.client._deadline(timeout),
                          f"to a chunk of stream {ticket.stream.stream_id}")
        return ticket.outcome()


def as_array(pcm: PCM, dtype: np.dtype[Any]) -> np.ndarray:
    """PCM (array or bytes) as a numpy array of ``dtype``."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(pcm), dtype)
    return np.asarray(pcm)
