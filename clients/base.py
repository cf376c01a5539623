"""What the blocking and the asyncio client share: everything but the waiting.

:class:`clients.Client` waits by polling its socket, :class:`clients.AsyncClient` by
awaiting futures and events. The rest is the same for both and written once here: the
socket setup, running callbacks, the connection's settings and state, sending requests,
and the read-only views of a stream and of a submitted chunk.
"""

from __future__ import annotations

import time
from typing import Any, Generic, TypeVar

import zmq

from clients.bookkeeping import Request, StreamCore, StreamOptions, StreamState, Ticket
from clients.errors import RingserveError
from clients.results import Event, Result, StreamReset, Utterance
from clients.session import PCM, ConnState, Emit, Session

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
CLOSE_LINGER_MS = 200  # lets the farewell CLOSEs out on a live connection; a lost one gets 0

SocketT = TypeVar("SocketT", bound="zmq.Socket[Any]")
ClientT = TypeVar("ClientT", bound="BaseClient")


def connect_dealer(context: zmq.Context[SocketT], endpoint: str, curve: tuple[str, str] | None) -> SocketT:
    """A DEALER connected to ``endpoint``, with CURVE when ``curve`` names the key files."""
    sock = context.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)  # the engine drops replies to a full pipe: never let it fill
        sock.setsockopt(zmq.SNDHWM, 0)
        if curve is not None:
            from transport.security import enable_client_curve

            enable_client_curve(sock, *curve)
        sock.connect(endpoint)
    except BaseException:
        sock.close(0)
        raise
    return sock


def deliver(emit: Emit) -> None:
    """Run the stream callback registered for an emitted item."""
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


class BaseClient:
    """One connection's settings and session; subclasses own the socket and the waiting."""

    def __init__(self, endpoint: str, timeout: float, *, heartbeat: float | None, heartbeat_timeout: float,
                 reconnect: bool, curve: tuple[str, str] | None) -> None:
        self.endpoint = endpoint
        self._curve = curve
        self.timeout = timeout
        self._session = Session(now=time.monotonic(), heartbeat_interval=heartbeat,
                                heartbeat_timeout=heartbeat_timeout, reconnect=reconnect)
        self._closed = False

    def _send(self, payload: bytes) -> None:
        """Queue one message on the socket without waiting for it to go out."""
        raise NotImplementedError

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

    # ---- sending (each subclass waits for the reply its own way) ------------------------
    def _send_open(self, sample_rate: int, dtype: str, stream_id: int | None, shed_after_ms: int | None,
                   options: StreamOptions, vad: dict[str, float | None], deadline: float
                   ) -> tuple[StreamCore, Request, str]:
        """OPEN a stream; returns its record, the request and what a timeout waited for."""
        core, request, payload = self._session.open_stream(sample_rate, dtype, stream_id, dict(vad), options,
                                                           time.monotonic(), shed_after_ms)
        self._send(payload)
        return core, request, f"within {deadline - request.sent_at:.1f} s (opening stream {core.stream_id})"

    def _send_chunks(self, pairs: list[tuple[StreamCore, PCM]]) -> list[Ticket]:
        """Submit chunks to streams that have room for them; returns their tickets."""
        tickets, messages = self._session.submit(pairs, time.monotonic())
        for payload in messages:
            self._send(payload)
        return tickets

    def _send_request(self, request: Request, payload: bytes) -> Request:
        self._send(payload)
        return request

    # ---- timeouts -----------------------------------------------------------------------
    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _timeout_text(self, what: str) -> str:
        state = self._session.state
        hint = "" if state is ConnState.CONNECTED else (
            f"; the connection was lost ({self._session.lost_reason}) and the client is {state.value}")
        return f"no reply from {self.endpoint} {what}{hint}; is `ringserve serve` running there?"


class BaseStream(Generic[ClientT]):
    """The state of one stream, read from the session's record of it."""

    def __init__(self, client: ClientT, core: StreamCore) -> None:
        self.client = client
        self._core = core

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
    def state(self) -> StreamState:
        return self._core.state

    @property
    def closed(self) -> bool:
        return self._core.finished or self._core.state is StreamState.CLOSING

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
    def kept_samples(self) -> int:
        """Samples held for utterances (keep_audio streams)."""
        return self._core.keeper.kept_samples if self._core.keeper is not None else 0

    def _send_reset(self) -> Request:
        return self.client._send_request(*self.client._session.reset(self._core, time.monotonic()))

    def _send_close(self) -> Request | None:
        """CLOSE the stream; None when nothing is left open on the engine."""
        request, payload = self.client._session.close(self._core, time.monotonic())
        if payload is not None:
            self.client._send(payload)
        return request


class BasePending(Generic[ClientT]):
    """A submitted chunk whose results may not have arrived yet."""

    def __init__(self, client: ClientT, ticket: Ticket) -> None:
        self.client = client
        self.ticket = ticket

    def done(self) -> bool:
        return self.ticket.done

    @property
    def latency(self) -> float:
        """Seconds from sending to the reply (NaN until done)."""
        return self.ticket.latency
