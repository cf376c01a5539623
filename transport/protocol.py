"""ringserve wire protocol, version 1 (documented in docs/protocol.md).

Every message is one ZeroMQ frame (a DEALER client sends single-frame messages; the
ROUTER adds the identity) that starts with an 8-byte header::

    2s magic b"RS" | u8 version | u8 type | u32 request_id (echoed in the reply)

Audio and results use fixed little-endian binary layouts; rare control messages (open,
stats) carry a small UTF-8 JSON object. Nothing is ever unpickled.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"RS"
VERSION = 1
HEADER = struct.Struct("<2sBBI")
STREAM_ID = struct.Struct("<I")
AUDIO_ITEM = struct.Struct("<IIII")  # stream_id, chunk_seq, dtype, nbytes; then nbytes of PCM
RESULT_ITEM = struct.Struct("<IIQIHH")  # stream_id, chunk_seq, first_frame, n_frames, n_events, flags
EVENT_ITEM = struct.Struct("<IIQ")  # kind, frame, sample
ERROR_BODY = struct.Struct("<IIH")  # stream_id, chunk_seq, code; then UTF-8 text
MAX_JSON_BYTES = 4096
CLOSE_SEQ = 0xFFFF_FFFF  # chunk_seq of the result that flushes a closing stream


class MsgType(enum.IntEnum):
    OPEN = 0x01
    AUDIO = 0x02
    RESET = 0x03
    CLOSE = 0x04
    PING = 0x05
    STATS = 0x06
    OPENED = 0x81
    RESULTS = 0x82
    RESET_DONE = 0x83
    PONG = 0x85
    STATS_REPLY = 0x86
    ERROR = 0xE0


class DType(enum.IntEnum):
    INT16 = 1
    FLOAT32 = 2


DTYPE_NAMES = {"int16": DType.INT16, "float32": DType.FLOAT32}
NUMPY_DTYPES: dict[DType, np.dtype[Any]] = {DType.INT16: np.dtype("<i2"), DType.FLOAT32: np.dtype("<f4")}


class ErrorCode(enum.IntEnum):
    BAD_MESSAGE = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_TYPE = 3
    UNKNOWN_STREAM = 4
    STREAM_EXISTS = 5
    BAD_PARAMS = 6
    BAD_DTYPE = 7
    BAD_AUDIO = 8
    LIMIT = 9
    OVERLOADED = 10
    INTERNAL = 11
    EXPIRED = 12


class ResultFlag(enum.IntFlag):
    FINAL = 1  # the stream is closed; this is its last result
    SHED = 2  # some frames were shed under overload: their probability is NaN


class EventKind(enum.IntEnum):
    START = 1
    END = 2


class ProtocolError(ValueError):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def header(msg_type: MsgType, request_id: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, msg_type, request_id)


def parse_header(msg: bytes | memoryview) -> tuple[int, int]:
    """(type, request_id); raises ProtocolError for anything that is not a v1 message."""
    if len(msg) < HEADER.size:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"message of {len(msg)} bytes is shorter than the 8-byte header")
    magic, version, msg_type, request_id = HEADER.unpack_from(msg)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "bad magic: not a ringserve message")
    if version != VERSION:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                            f"protocol version {version} is not supported; this engine speaks version {VERSION}")
    return msg_type, request_id


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(body: bytes | memoryview) -> dict[str, Any]:
    if len(body) > MAX_JSON_BYTES:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"JSON body of {len(body)} bytes exceeds {MAX_JSON_BYTES}")
    try:
        obj = json.loads(bytes(body).decode("utf-8"))
    except RecursionError:  # e.g. "[[[[..." nested deeper than the interpreter's recursion limit
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "JSON body is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, int digit limit
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"body is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "JSON body must be an object")
    return obj


# ---- client -> engine ------------------------------------------------------------------

def encode_open(request_id: int, stream_id: int, params: dict[str, Any]) -> bytes:
    return header(MsgType.OPEN, request_id) + STREAM_ID.pack(stream_id) + encode_json(params)


def encode_audio(request_id: int, items: list[tuple[int, int, DType, bytes]]) -> bytes:
    parts = [header(MsgType.AUDIO, request_id)]
    for stream_id, chunk_seq, dtype, pcm in items:
        parts.append(AUDIO_ITEM.pack(stream_id, chunk_seq, dtype, len(pcm)))
        parts.append(pcm)
    return b"".join(parts)


def encode_stream_op(msg_type: MsgType, request_id: int, stream_id: int) -> bytes:
    return header(msg_type, request_id) + STREAM_ID.pack(stream_id)


def audio_items(msg: bytes | memoryview, limit: int | None = None) -> list[tuple[int, int, int, int, int]]:
    """(stream_id, chunk_seq, dtype, offset, nbytes) per item, every length validated.

    With ``limit``, it stops after ``limit + 1`` items: enough for the caller to refuse the
    message, at a cost bounded by the limit rather than by the message's size. A malformed
    item within the part walked raises ProtocolError, so a message is refused before any item
    of it is used.
    """
    offset = HEADER.size
    end = len(msg)
    if offset == end:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "AUDIO message carries no items")
    stop = end if limit is None else limit + 1
    items: list[tuple[int, int, int, int, int]] = []
    while offset < end and len(items) < stop:
        if end - offset < AUDIO_ITEM.size:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"truncated audio item header at byte {offset}")
        stream_id, chunk_seq, dtype, nbytes = AUDIO_ITEM.unpack_from(msg, offset)
        offset += AUDIO_ITEM.size
        if nbytes > end - offset:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"audio item claims {nbytes} bytes but only {end - offset} follow")
        items.append((stream_id, chunk_seq, dtype, offset, nbytes))
        offset += nbytes
    return items


def parse_stream_id(msg: bytes | memoryview) -> int:
    if len(msg) < HEADER.size + STREAM_ID.size:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message is missing its stream id")
    return int(STREAM_ID.unpack_from(msg, HEADER.size)[0])


# ---- engine -> client ------------------------------------------------------------------

def encode_error(request_id: int, stream_id: int, chunk_seq: int, code: ErrorCode, text: str) -> bytes:
    return header(MsgType.ERROR, request_id) + ERROR_BODY.pack(stream_id, chunk_seq, code) + text.encode()


@dataclass(frozen=True, slots=True)
class WireEvent:
    kind: EventKind
    frame: int
    sample: int


@dataclass(frozen=True, slots=True)
class WireResult:
    stream_id: int
    chunk_seq: int
    first_frame: int
    probabilities: np.ndarray
    events: tuple[WireEvent, ...]
    final: bool


def encode_result_item(stream_id: int, chunk_seq: int, first_frame: int, probs: bytes,
                       events: list[tuple[int, int, int]], flags: int) -> bytes:
    parts = [RESULT_ITEM.pack(stream_id, chunk_seq, first_frame, len(probs) // 4, len(events), flags), probs]
    parts.extend(EVENT_ITEM.pack(*event) for event in events)
    return b"".join(parts)


def decode_results(msg: bytes | memoryview) -> list[WireResult]:
    out = []
    offset, end = HEADER.size, len(msg)
    while offset < end:
        stream_id, chunk_seq, first, n_frames, n_events, flags = RESULT_ITEM.unpack_from(msg, offset)
        offset += RESULT_ITEM.size
        probs = np.frombuffer(msg, "<f4", n_frames, offset).copy()
        offset += 4 * n_frames
        events = []
        for _ in range(n_events):
            kind, frame, sample = EVENT_ITEM.unpack_from(msg, offset)
            events.append(WireEvent(EventKind(kind), frame, sample))
            offset += EVENT_ITEM.size
        out.append(WireResult(stream_id, chunk_seq, first, probs, tuple(events), bool(flags & ResultFlag.FINAL)))
    return out


@dataclass(frozen=True, slots=True)
class WireError:
    request_id: int
    stream_id: int
    chunk_seq: int
    code: ErrorCode
    text: str


def decode_error(msg: bytes | memoryview) -> WireError:
    _, request_id = parse_header(msg)
    stream_id, chunk_seq, code = ERROR_BODY.unpack_from(msg, HEADER.size)
    text = bytes(msg[HEADER.size + ERROR_BODY.size:]).decode("utf-8", "replace")
    try:
        kind = ErrorCode(code)
    except ValueError:
        kind = ErrorCode.INTERNAL
    return WireError(request_id, stream_id, chunk_seq, kind, text)
