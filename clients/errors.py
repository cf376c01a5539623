"""Typed exceptions: one class per protocol error code, plus the client's own conditions.

Every exception is a :class:`RingserveError` and carries ``stream_id`` (0 when the error
concerns the connection, not a stream). Errors the engine reports also carry ``code``
(the protocol's :class:`~transport.protocol.ErrorCode`), ``request_id`` and ``chunk_seq``,
and their message is the engine's own text, prefixed with the stream it concerns, e.g.
``stream 3: sample_rate 44100 is not supported: use 16000 or 8000 (resample on the client)``.
"""

from __future__ import annotations

from transport.protocol import ErrorCode, WireError


class RingserveError(Exception):
    """Base class. ``code`` is the protocol's ErrorCode, ``stream_id`` the stream it concerns."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str, stream_id: int = 0, *, request_id: int = 0, chunk_seq: int = 0) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.request_id = request_id
        self.chunk_seq = chunk_seq


# ---- errors the engine reports (ERROR messages) ----------------------------------------

class BadMessageError(RingserveError):
    code = ErrorCode.BAD_MESSAGE


class UnsupportedVersionError(RingserveError):
    code = ErrorCode.UNSUPPORTED_VERSION


class UnknownTypeError(RingserveError):
    code = ErrorCode.UNKNOWN_TYPE


class UnknownStreamError(RingserveError):
    code = ErrorCode.UNKNOWN_STREAM


class StreamExistsError(RingserveError):
    code = ErrorCode.STREAM_EXISTS


class BadParamsError(RingserveError):
    code = ErrorCode.BAD_PARAMS


class BadDTypeError(RingserveError):
    code = ErrorCode.BAD_DTYPE


class BadAudioError(RingserveError):
    code = ErrorCode.BAD_AUDIO


class LimitError(RingserveError):
    code = ErrorCode.LIMIT


class OverloadedError(RingserveError):
    code = ErrorCode.OVERLOADED


class InternalError(RingserveError):
    code = ErrorCode.INTERNAL


class StreamExpiredError(RingserveError):
    code = ErrorCode.EXPIRED


# ---- conditions the client detects ---------------------------------------------------

class EngineTimeout(RingserveError, TimeoutError):
    """No reply within the call's timeout: the daemon may be down or overloaded."""


class StreamClosedError(RingserveError):
    """The stream was closed (by ``close()``, or it failed to reopen); open a new one."""


class StreamResetError(RingserveError):
    """The stream's engine state was lost and the stream reopened from zero.

    Raised for chunks whose results were lost: the daemon was restarted (``reason``
    ``"reconnect"``) or the stream had expired (``"expired"``). The audio of such chunks
    was not analysed; sample offsets of the reopened stream start at 0 again (see
    :class:`clients.results.StreamReset`).
    """

    def __init__(self, message: str, stream_id: int = 0, *, reason: str = "reconnect", epoch: int = 0) -> None:
        super().__init__(message, stream_id)
        self.reason = reason
        self.epoch = epoch


class ConnectionLostError(RingserveError):
    """A control request (ping, stats, open) was cut off because the client reconnected."""


class RepliesLostError(RingserveError):
    """The engine dropped this chunk's reply (it counts them as replies_dropped_slow_client)."""


ENGINE_ERRORS: tuple[type[RingserveError], ...] = (
    BadMessageError, UnsupportedVersionError, UnknownTypeError, UnknownStreamError, StreamExistsError,
    BadParamsError, BadDTypeError, BadAudioError, LimitError, OverloadedError, InternalError,
    StreamExpiredError)
_BY_CODE = {cls.code: cls for cls in ENGINE_ERRORS}


def from_wire(error: WireError) -> RingserveError:
    """The typed exception for an ERROR message, its text prefixed with the stream it names."""
    text = error.text
    if error.stream_id and f"stream {error.stream_id}" not in text:
        text = f"stream {error.stream_id}: {text}"
    return _BY_CODE.get(error.code, InternalError)(text, error.stream_id, request_id=error.request_id,
                                                   chunk_seq=error.chunk_seq)
