"""asyncio client: one DEALER connection (zmq.asyncio) carrying any number of streams.

    async with AsyncClient("tcp://127.0.0.1:5555") as client:
        stream = await client.open_stream(16000, "int16", keep_audio=True)
        results = await stream.send(pcm)            # pull style
        pending = await stream.submit(pcm)          # fire-and-forget, bounded by the window
        async for item in stream.events():          # Event or StreamReset, until closed
            ...

The protocol state lives in :class:`clients.session.Session` (sans-IO) and all that does
not wait in :mod:`clients.base`, both shared with the blocking client; this module awaits.
Two background tasks run while the client is open: a reader, which feeds every message to
the session, wakes waiters and runs callbacks, and a ticker, for heartbeats and
reconnection. Callbacks are plain functions called in the event loop in the order items
arrive; they must not block.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Generator

import zmq
import zmq.asyncio

from clients.base import (CLOSE_LINGER_MS, DEFAULT_ENDPOINT, BaseClient, BasePending, BaseStream, connect_dealer,
                          deliver)
from clients.bookkeeping import Request, StreamCore, StreamOptions, StreamState, Ticket
from clients.errors import EngineTimeout, RingserveError
from clients.results import Event, Result, StreamReset, Utterance
from clients.session import PCM, Emit, NewSocket, Output, Send, Wake

log = logging.getLogger("ringserve.client")

__all__ = ["AsyncClient", "AsyncPending", "AsyncStream"]


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class AsyncClient(BaseClient):
    """An asyncio connection to the engine; use ``async with`` (or ``await start()`` / ``aclose()``).

    Same parameters as :class:`clients.Client`: ``timeout`` (default per-call timeout),
    ``heartbeat`` / ``heartbeat_timeout`` / ``reconnect`` (see the README's reconnect section).
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 10.0, *,
                 heartbeat: float | None = 2.0, heartbeat_timeout: float = 6.0, reconnect: bool = True,
                 curve: tuple[str, str] | None = None) -> None:
        super().__init__(endpoint, timeout, heartbeat=heartbeat, heartbeat_timeout=heartbeat_timeout,
                         reconnect=reconnect, curve=curve)
        self._context = zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._poke: asyncio.Event | None = None
        self.callback_errors = 0

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect and start the background tasks (idempotent)."""
        if self._closed:
            raise RingserveError("the client is closed")
        if self._socket is None:
            self._poke = asyncio.Event()
            self._socket = connect_dealer(self._context, self.endpoint, self._curve)
            self._reader = asyncio.create_task(self._read_loop(self._socket), name="ringserve-reader")
            self._ticker = asyncio.create_task(self._tick_loop(), name="ringserve-ticker")

    async def aclose(self) -> None:
        """Close the connection; streams still open are closed on the engine (best effort)."""
        if self._closed:
            return
        self._closed = True
        sock = self._socket
        if sock is not None:
            for payload in self._session.farewells():
                self._send(payload)
        for task in (self._reader, self._ticker):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if sock is not None:
            sock.close(CLOSE_LINGER_MS if self.connected else 0)
        self._socket = None
        for core in self._session.streams.values():  # wake iterators so they can end
            _wake_stream(core)

    # ---- plumbing ----------------------------------------------------------------------
    def _send(self, payload: bytes) -> None:
        if self._socket is None:
            raise RingserveError("the client is not started: use `async with AsyncClient(...)`")
        future = self._socket.send(payload)
        if isinstance(future, asyncio.Future):
            future.add_done_callback(_consume)

    def _io(self, outputs: list[Output]) -> None:
        for output in outputs:
            if isinstance(output, Send):
                self._send(output.payload)
            elif isinstance(output, NewSocket):
                self._replace_socket()
            elif isinstance(output, Wake):
                target = output.target
                waiter = target.waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
                if target.stream is not None:
                    _wake_stream(target.stream)
            elif isinstance(output, Emit):
                _wake_stream(output.stream)
                try:
                    deliver(output)
                except Exception:  # noqa: BLE001 - a callback must not stop the reader
                    self.callback_errors += 1
                    log.exception("stream %d: callback failed", output.stream.stream_id)

    def _replace_socket(self) -> None:
        old, reader = self._socket, self._reader
        self._socket = connect_dealer(self._context, self.endpoint, self._curve)
        self._reader = asyncio.create_task(self._read_loop(self._socket), name="ringserve-reader")
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if old is not None:
            old.close(0)

    async def _read_loop(self, sock: zmq.asyncio.Socket) -> None:
        session = self._session
        try:
            while sock is self._socket:
                msg = await sock.recv()
                if sock is not self._socket:
                    return
                self._io(session.receive(msg, time.time(), time.monotonic()))
        except zmq.ZMQError:
            if sock is self._socket and not self._closed:
                raise

    async def _tick_loop(self) -> None:
        session = self._session
        assert self._poke is not None
        while not self._closed:
            now = time.monotonic()
            delay = session.next_tick(now) - now
            if delay > 0:
                try:
                    await asyncio.wait_for(self._poke.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                self._poke.clear()
            self._io(session.tick(time.time(), time.monotonic()))

    async def _wait_target(self, target: Ticket | Request, deadline: float, what: str) -> None:
        while not target.done:
            if target.waiter is None or target.waiter.done():
                target.waiter = asyncio.get_running_loop().create_future()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineTimeout(self._timeout_text(what))
            try:
                await asyncio.wait_for(asyncio.shield(target.waiter), remaining)
            except asyncio.TimeoutError:
                if not target.done:
                    raise EngineTimeout(self._timeout_text(what)) from None

    async def _wait_request(self, request: Request, deadline: float, what: str) -> Any:
        await self._wait_target(request, deadline, what)
        return request.outcome()

    async def _wait_stream(self, core: StreamCore, cond: Callable[[], bool], deadline: float | None,
                           what: str) -> None:
        while not cond():
            event = _stream_event(core)
            if deadline is None:
                await event.wait()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineTimeout(self._timeout_text(what))
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                if not cond():
                    raise EngineTimeout(self._timeout_text(what)) from None

    async def _ready(self, cores: Iterable[StreamCore], deadline: float) -> None:
        for core in cores:
            if core.state is StreamState.REOPEN:
                self._session.want_reopen(core)
                if self._poke is not None:
                    self._poke.set()
            await self._wait_stream(core, lambda c=core: c.finished or (c.ready and c.has_room),  # type: ignore[misc]
                                    deadline, f"for room in the window of stream {core.stream_id}")
            if core.finished:
                raise core.closed_error()

    # ---- API ---------------------------------------------------------------------------
    async def open_stream(self, sample_rate: int = 16000, dtype: str = "int16", stream_id: int | None = None,
                          shed_after_ms: int | None = None, *, window: int = 8, keep_audio: bool = False,
                          on_result: Callable[[Result], Any] | None = None,
                          on_event: Callable[[Event], Any] | None = None,
                          on_utterance: Callable[[Utterance], Any] | None = None,
                          on_reset: Callable[[StreamReset], Any] | None = None,
                          on_error: Callable[[RingserveError], Any] | None = None,
                          timeout: float | None = None, **vad: float | None) -> AsyncStream:
        """Open a stream; the parameters are those of :meth:`clients.Client.open_stream`."""
        await self.start()
        options = StreamOptions(window=window, keep_audio=keep_audio, on_result=on_result, on_event=on_event,
                                on_utterance=on_utterance, on_reset=on_reset, on_error=on_error)
        deadline = self._deadline(timeout)
        core, request, what = self._send_open(sample_rate, dtype, stream_id, shed_after_ms, options, vad, deadline)
        try:
            await self._wait_request(request, deadline, what)
        except (EngineTimeout, asyncio.CancelledError):
            self._session.abandon(core)
            raise
        return AsyncStream(self, core)

    async def submit_many(self, chunks: Iterable[tuple[AsyncStream, PCM]],
                          timeout: float | None = None) -> list[AsyncPending]:
        """Submit one chunk to each of several streams in as few messages as possible; awaits
        only while a stream's window is full."""
        pairs = [(stream._core, pcm) for stream, pcm in chunks]
        await self._ready([core for core, _ in pairs], self._deadline(timeout))
        return [AsyncPending(self, ticket) for ticket in self._send_chunks(pairs)]

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip time in seconds."""
        await self.start()
        request = self._send_request(*self._session.ping(time.monotonic()))
        value: float = await self._wait_request(request, self._deadline(timeout), "to a PING")
        return value

    async def stats(self, timeout: float | None = None) -> dict[str, Any]:
        await self.start()
        request = self._send_request(*self._session.stats(time.monotonic()))
        value: dict[str, Any] = await self._wait_request(request, self._deadline(timeout), "to a STATS request")
        return value

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every chunk submitted on this connection has its results."""
        deadline = self._deadline(timeout)
        for core in list(self._session.streams.values()):
            await self._wait_stream(core, lambda c=core: c.tickets_in_flight == 0,  # type: ignore[misc]
                                    deadline, "while waiting for the results of the chunks in flight")


def _stream_event(core: StreamCore) -> asyncio.Event:
    """The event the next change of this stream sets (one per change, so waiters never miss one)."""
    event: asyncio.Event | None = core.waker
    if event is None:
        event = core.waker = asyncio.Event()
    return event


def _wake_stream(core: StreamCore) -> None:
    event: asyncio.Event | None = core.waker
    if event is not None:
        core.waker = None
        event.set()


class AsyncStream(BaseStream[AsyncClient]):
    """One audio stream on an :class:`AsyncClient`."""

    # ---- state (the rest is BaseStream's) -------------------------------------------------
    @property
    def history(self) -> list[Event]:
        """Every event so far (the last ``history`` of them), in order."""
        return list(self._core.history)

    # ---- audio --------------------------------------------------------------------------
    async def send(self, pcm: PCM, timeout: float | None = None) -> list[Result]:
        """Send a chunk of any length; returns a result for every frame it completed, in order."""
        deadline = self.client._deadline(timeout)
        pending = await self.submit(pcm, timeout)
        return await pending.result(max(0.0, deadline - time.monotonic()))

    async def submit(self, pcm: PCM, timeout: float | None = None) -> AsyncPending:
        """Send a chunk without waiting for its results (they reach the callbacks and the
        iterators, in order); awaits only while ``window`` chunks are in flight."""
        return (await self.client.submit_many([(self, pcm)], timeout))[0]

    async def reset(self, timeout: float | None = None) -> None:
        """Start over: offsets and frames count from 0 again (a StreamReset marks the point)."""
        client = self.client
        deadline = client._deadline(timeout)
        await client._ready([self._core], deadline)
        await client._wait_request(self._send_reset(), deadline, f"to RESET of stream {self.stream_id}")

    async def close(self, timeout: float | None = None) -> list[Result]:
        """Flush (the last partial frame is zero-padded) and close; returns the final results."""
        client, core = self.client, self._core
        if core.finished:
            return []
        deadline = client._deadline(timeout)
        await client._wait_stream(core, lambda: core.state not in (StreamState.OPENING, StreamState.RESETTING),
                                  deadline, f"while stream {core.stream_id} resets")
        request = self._send_close()
        _wake_stream(core)
        if request is None:
            return []
        results: list[Result] = await client._wait_request(request, deadline, f"to CLOSE of stream {core.stream_id}")
        return results

    # ---- pull: iterators ------------------------------------------------------------------
    async def events(self) -> AsyncIterator[Event | StreamReset]:
        """Every ``start``/``end`` Event and StreamReset, in order, from the stream's open (up to
        ``feed_limit`` buffered); ends once the stream is closed."""
        core = self._core
        while True:
            while core.feed:
                yield core.feed.popleft()
            if core.finished or self.client._closed:
                return
            await _stream_event(core).wait()

    async def utterances(self) -> AsyncIterator[Utterance]:
        """Every Utterance of a ``keep_audio`` stream (without on_utterance), in order; ends once
        the stream is closed."""
        core = self._core
        if core.utterance_feed is None:
            raise RingserveError("utterances() needs open_stream(keep_audio=True) without on_utterance")
        feed = core.utterance_feed
        while True:
            while feed:
                yield feed.popleft()
            if core.finished or self.client._closed:
                return
            await _stream_event(core).wait()


class AsyncPending(BasePending[AsyncClient]):
    """Results of a submitted chunk; ``await pending`` (or ``await pending.result(timeout)``)."""

    async def result(self, timeout: float | None = None) -> list[Result]:
        ticket = self.ticket
        await self.client._wait_target(ticket, self.client._deadline(timeout),
                                       f"to a chunk of stream {ticket.stream.stream_id}")
        return ticket.outcome()

    def __await__(self) -> Generator[Any, None, list[Result]]:
        return self.result().__await__()
