"""What the sans-IO session (:mod:`clients.session`) keeps per stream and per request.

Plain records with the little logic that concerns one of them alone (a stream taking its
OPENED reply, a done request's outcome); every protocol decision, and everything that
involves the connection, stays in :class:`clients.session.Session`. The ``waiter`` and
``waker`` slots belong to the I/O layer, which parks its wake-up handles there.
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from clients.errors import RingserveError, StreamClosedError
from clients.results import Event, Result, StreamReset, Utterance
from clients.utterances import UtteranceKeeper
from transport import protocol as P


class StreamState(enum.Enum):
    OPENING = "opening"  # OPEN sent, no reply yet
    OPEN = "open"
    RESETTING = "resetting"  # RESET sent; submits wait for RESET_DONE
    REOPEN = "reopen"  # the engine lost it (restart, expiry): to be opened again
    CLOSING = "closing"  # CLOSE sent; waiting for the FINAL result
    CLOSED = "closed"
    FAILED = "failed"  # could not be reopened; see StreamCore.error


@dataclass
class StreamOptions:
    """Per-stream client settings (not sent to the engine)."""

    window: int = 8  # submitted chunks in flight at most; submit() blocks/awaits beyond
    keep_audio: bool = False  # keep sent audio and deliver Utterances at each end event
    on_result: Callable[[Result], Any] | None = None
    on_event: Callable[[Event], Any] | None = None
    on_utterance: Callable[[Utterance], Any] | None = None
    on_reset: Callable[[StreamReset], Any] | None = None
    on_error: Callable[[RingserveError], Any] | None = None
    history: int = 10_000  # events kept in Stream.events (oldest dropped)
    feed_limit: int = 10_000  # events/utterances buffered for the async iterators

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")


class Ticket:
    """One submitted chunk (maybe split into several wire chunks), answered as a whole."""

    __slots__ = ("stream", "parts", "nsamples", "sent_at", "results", "error", "done", "received_at",
                 "waiter", "epoch")

    def __init__(self, stream: StreamCore, nsamples: int, sent_at: float) -> None:
        self.stream = stream
        self.parts = 0
        self.nsamples = nsamples
        self.sent_at = sent_at  # monotonic
        self.results: list[Result] = []
        self.error: RingserveError | None = None
        self.done = False
        self.received_at = 0.0  # monotonic time of the last part's reply
        self.waiter: Any = None  # the I/O layer's wake-up handle
        self.epoch = stream.epoch

    @property
    def latency(self) -> float:
        """Seconds from sending the chunk to its (last) reply; NaN until done."""
        return self.received_at - self.sent_at if self.done else math.nan

    def outcome(self) -> list[Result]:
        """The results of a done ticket; raises its error instead if it has one."""
        if self.error is not None:
            raise self.error
        return self.results


@dataclass(slots=True)
class WireChunk:
    seq: int
    request_id: int
    nsamples: int
    ticket: Ticket
    sent_at: float
    samples: np.ndarray | None  # kept only for keep_audio streams


class Request:
    """A control request (open, reopen, reset, close, ping, stats, heartbeat, probe)."""

    __slots__ = ("id", "kind", "stream", "sent_at", "done", "value", "error", "waiter")

    def __init__(self, request_id: int, kind: str, stream: StreamCore | None, sent_at: float) -> None:
        self.id = request_id
        self.kind = kind
        self.stream = stream
        self.sent_at = sent_at
        self.done = False
        self.value: Any = None
        self.error: RingserveError | None = None
        self.waiter: Any = None

    def outcome(self) -> Any:
        """The reply's value of a done request; raises its error instead if it has one."""
        if self.error is not None:
            raise self.error
        return self.value


class StreamCore:
    """Everything the client knows about one stream."""

    def __init__(self, stream_id: int, params: dict[str, Any], options: StreamOptions) -> None:
        self.stream_id = stream_id
        self.params = params
        self.options = options
        self.state = StreamState.OPENING
        self.info: dict[str, Any] = {}
        self.sample_rate: int = int(params.get("sample_rate", 16000))
        self.frame_samples = 0
        self.dtype = P.DType.INT16
        self.np_dtype: np.dtype[Any] = P.NUMPY_DTYPES[self.dtype]
        self.epoch = 0
        self.base_sample = 0  # samples submitted before this epoch
        self.submitted = 0  # samples submitted, all epochs
        self.inflight: collections.deque[WireChunk] = collections.deque()
        self.by_seq: dict[int, WireChunk] = {}
        self.tickets_in_flight = 0
        self.max_tickets_in_flight = 0  # high-water mark (the window is never exceeded)
        self.next_frame = 0
        self.frames = 0  # frames received, all epochs
        self.history: collections.deque[Event] = collections.deque(maxlen=options.history)
        self.feed: collections.deque[Event | StreamReset] = collections.deque()
        self.utterance_feed: collections.deque[Utterance] | None = (
            collections.deque() if options.keep_audio and options.on_utterance is None else None)
        self.feed_dropped = 0
        self.keeper: UtteranceKeeper | None = None
        self.reopen_reason = ""
        self.reopen_eager = False
        self.reopen_request: Request | None = None
        self.expiring = False
        self.lost_samples = 0
        self.lost_chunks = 0
        self.close_request: Request | None = None
        self.error: RingserveError | None = None
        self.last_probability = math.nan
        self.in_speech = False
        self.chunk_errors = 0
        self.utterances = 0
        self.waker: Any = None  # the I/O layer's wake-up handle for this stream

    # ---- what the I/O layers ask --------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Audio can be submitted now (open, not resetting or reopening)."""
        return self.state is StreamState.OPEN

    @property
    def finished(self) -> bool:
        return self.state in (StreamState.CLOSED, StreamState.FAILED)

    @property
    def has_room(self) -> bool:
        return self.tickets_in_flight < self.options.window

    @property
    def epoch_samples(self) -> int:
        """Samples submitted in the current epoch."""
        return self.submitted - self.base_sample

    def on_opened(self, info: dict[str, Any]) -> None:
        """Take the engine's OPENED reply (an open or a reopen): its parameters, a clean epoch."""
        self.info = info
        self.sample_rate = int(info.get("sample_rate", self.sample_rate))
        self.frame_samples = int(info.get("frame_samples", 512 if self.sample_rate == 16000 else 256))
        self.dtype = P.DTYPE_NAMES[info.get("dtype", "int16")]
        self.np_dtype = P.NUMPY_DTYPES[self.dtype]
        self.state = StreamState.OPEN
        self.next_frame = 0
        self.in_speech = False
        self.expiring = False
        self.keeper = (UtteranceKeeper(self.stream_id, self.np_dtype, self.sample_rate, self.frame_samples,
                                       info.get("vad", {})) if self.options.keep_audio else None)

    def push_feed(self, item: Event | StreamReset | Utterance) -> None:
        """Buffer an item for the async iterators; past ``feed_limit`` the oldest goes."""
        target: collections.deque[Any] | None = (
            self.utterance_feed if isinstance(item, Utterance) else self.feed)
        if target is None:
            return
        if len(target) >= self.options.feed_limit:
            target.popleft()
            self.feed_dropped += 1
        target.append(item)

    def closed_error(self) -> StreamClosedError:
        """Why audio can no longer go to this stream (it is closing, closed or failed)."""
        return StreamClosedError(f"stream {self.stream_id} is {self.state.value}"
                                 + (f": {self.error}" if self.error else ""), self.stream_id)
