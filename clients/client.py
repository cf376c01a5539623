"""Blocking client: one DEALER connection carrying any number of streams.

    with Client("tcp://127.0.0.1:5555") as client:
        stream = client.open_stream(sample_rate=16000, threshold=0.5)
        for result in stream.send(pcm_int16):
            print(result.frame, result.probability, result.events)
        stream.close()
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from clients.errors import EngineTimeout, RingserveError, from_wire
from transport import protocol as P

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
_VAD_KEYS = ("threshold", "neg_threshold", "min_silence_duration_ms", "speech_pad_ms",
             "min_speech_duration_ms", "max_speech_duration_s")


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "start" | "end"
    sample: int  # offset from the stream start (or last reset), speech_pad_ms applied
    frame: int  # the frame whose result produced the event
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.sample / self.sample_rate


@dataclass(frozen=True, slots=True)
class Result:
    frame: int
    probability: float  # NaN when the engine shed the frame under overload
    events: tuple[Event, ...] = ()

    @property
    def shed(self) -> bool:
        return self.probability != self.probability


def _pcm_bytes(pcm: np.ndarray | bytes | bytearray | memoryview, dtype: P.DType) -> bytes:
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


class Client:
    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)
        self._ids = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._replies: dict[tuple[str, int], Any] = {}
        self.notices: list[RingserveError] = []  # unsolicited errors, e.g. an idle stream expired

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._socket.close(0)

    def next_request_id(self) -> int:
        return next(self._ids) & 0x7FFF_FFFF or next(self._ids)

    # ---- plumbing ----------------------------------------------------------------------
    def _dispatch(self, msg: bytes) -> None:
        msg_type, request_id = P.parse_header(msg)
        if msg_type == P.MsgType.RESULTS:
            for item in P.decode_results(msg):
                key = ("close", item.stream_id) if item.chunk_seq == P.CLOSE_SEQ else ("req", item.chunk_seq)
                self._replies[key] = item
        elif msg_type == P.MsgType.ERROR:
            error = P.decode_error(msg)
            if error.request_id == 0 and error.chunk_seq == 0:
                self.notices.append(from_wire(error))
            else:
                self._replies[("req", error.request_id)] = error
        else:
            self._replies[("req", request_id)] = msg

    def wait_for(self, *keys: tuple[str, int], timeout: float | None = None) -> Any:
        """The first reply under any of ``keys``; engine errors are raised as typed exceptions."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not (found := [k for k in keys if k in self._replies]):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._socket.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                if any(k in self._replies for k in keys):
                    continue
                raise EngineTimeout(f"no reply from {self.endpoint} within "
                                    f"{self.timeout if timeout is None else timeout:.1f} s")
            while True:
                try:
                    self._dispatch(self._socket.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
        reply = self._replies.pop(found[0])
        if isinstance(reply, P.WireError):
            raise from_wire(reply)
        return reply

    def request(self, payload: bytes, request_id: int, timeout: float | None = None) -> Any:
        self._socket.send(payload)
        return self.wait_for(("req", request_id), timeout=timeout)

    # ---- API ---------------------------------------------------------------------------
    def open_stream(self, sample_rate: int = 16000, dtype: str = "int16", stream_id: int | None = None,
                    shed_after_ms: int | None = None, **vad: float | None) -> Stream:
        """Open a stream. ``shed_after_ms``: how late a frame may fall behind real time before the
        engine sheds it under overload (None: the server's default; 0: never, for offline work)."""
        unknown = set(vad) - set(_VAD_KEYS)
        if unknown:
            raise TypeError(f"unknown VAD parameter(s) {sorted(unknown)}; known: {list(_VAD_KEYS)}")
        sid = next(self._stream_ids) if stream_id is None else stream_id
        request_id = self.next_request_id()
        params: dict[str, Any] = {"sample_rate": sample_rate, "dtype": dtype, "vad": dict(vad)}
        if shed_after_ms is not None:
            params["shed_after_ms"] = shed_after_ms
        reply = self.request(P.encode_open(request_id, sid, params), request_id)
        info = P.decode_json(reply[P.HEADER.size + P.STREAM_ID.size:])
        return Stream(self, sid, info)

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time in seconds."""
        request_id = self.next_request_id()
        started = time.perf_counter()
        self.request(P.header(P.MsgType.PING, request_id), request_id, timeout)
        return time.perf_counter() - started

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        request_id = self.next_request_id()
        reply = self.request(P.header(P.MsgType.STATS, request_id), request_id, timeout)
        return P.decode_json(reply[P.HEADER.size:])


class Stream:
    def __init__(self, client: Client, stream_id: int, info: dict[str, Any]) -> None:
        self.client = client
        self.stream_id = stream_id
        self.info = info
        self.sample_rate: int = info["sample_rate"]
        self.frame_samples: int = info["frame_samples"]
        self.dtype = P.DTYPE_NAMES[info["dtype"]]
        self.events: list[Event] = []  # every event so far, in order
        # Chunks larger than the engine accepts in one message are split transparently.
        self._max_chunk_bytes = max(4096, int(info.get("max_message_bytes", 1 << 20)) - 1024)
        self.closed = False

    def _results(self, item: P.WireResult) -> list[Result]:
        events = [Event("start" if e.kind == P.EventKind.START else "end", e.sample, e.frame, self.sample_rate)
                  for e in item.events]
        self.events.extend(events)
        by_frame: dict[int, list[Event]] = {}
        last = item.first_frame + len(item.probabilities) - 1
        for event in events:
            by_frame.setdefault(min(event.frame, last), []).append(event)
        return [Result(item.first_frame + i, float(p), tuple(by_frame.get(item.first_frame + i, ())))
                for i, p in enumerate(item.probabilities)]

    def send(self, pcm: np.ndarray | bytes, timeout: float | None = None) -> list[Result]:
        """Send a chunk of any length; returns a result for every frame it completed, in order."""
        return self.submit(pcm).result(timeout)

    def submit(self, pcm: np.ndarray | bytes) -> Pending:
        """Send a chunk without waiting; collect its results later, in submission order."""
        if self.closed:
            raise RingserveError(f"stream {self.stream_id} is closed", self.stream_id)
        data = _pcm_bytes(pcm, self.dtype)
        step = self._max_chunk_bytes - self._max_chunk_bytes % P.NUMPY_DTYPES[self.dtype].itemsize
        request_ids = []
        for offset in range(0, max(len(data), 1), step):
            request_id = self.client.next_request_id()
            piece = data[offset:offset + step]
            self.client._socket.send(P.encode_audio(request_id, [(self.stream_id, request_id, self.dtype, piece)]))
            request_ids.append(request_id)
        return Pending(self, request_ids)

    def reset(self, timeout: float | None = None) -> None:
        """Start over: zero state, forget buffered samples; offsets and frames count from 0 again."""
        request_id = self.client.next_request_id()
        self.client.request(P.encode_stream_op(P.MsgType.RESET, request_id, self.stream_id), request_id, timeout)

    def close(self, timeout: float | None = None) -> list[Result]:
        """Flush (the last partial frame is zero-padded) and close; returns the final results."""
        if self.closed:
            return []
        request_id = self.client.next_request_id()
        self.client._socket.send(P.encode_stream_op(P.MsgType.CLOSE, request_id, self.stream_id))
        self.closed = True
        item = self.client.wait_for(("close", self.stream_id), ("req", request_id), timeout=timeout)
        return self._results(item)


class Pending:
    """Results of a submitted chunk, not yet collected."""

    def __init__(self, stream: Stream, request_ids: list[int]) -> None:
        self.stream = stream
        self.request_ids = request_ids

    def result(self, timeout: float | None = None) -> list[Result]:
        results = []
        for request_id in self.request_ids:
            results += self.stream._results(self.stream.client.wait_for(("req", request_id), timeout=timeout))
        return results
