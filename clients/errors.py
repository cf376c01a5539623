"""Typed exceptions for errors the engine reports, one class per protocol error code."""

from __future__ import annotations

from transport.protocol import ErrorCode, WireError


class RingserveError(Exception):
    """Base class. ``code`` is the protocol's ErrorCode, ``stream_id`` the stream it concerns."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str, stream_id: int = 0) -> None:
        super().__init__(message)
        self.stream_id = stream_id


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


class EngineTimeout(RingserveError, TimeoutError):
    """No reply within the call's timeout: the daemon may be down or overloaded."""


_BY_CODE = {cls.code: cls for cls in RingserveError.__subclasses__() if cls is not EngineTimeout}


def from_wire(error: WireError) -> RingserveError:
    return _BY_CODE.get(error.code, InternalError)(error.text, error.stream_id)
