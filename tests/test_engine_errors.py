"""Bad input gets a clear, typed error for that client; the engine and other streams carry on."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zmq

from clients import errors
from clients.client import Client
from tests.conftest import DaemonProcess, reference, speech_clips
from transport import protocol as P


def raw_exchange(endpoint: str, payload: bytes, timeout_ms: int = 5000) -> bytes:
    """Send one raw message on a fresh DEALER and return the reply."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(payload)
        assert sock.poll(timeout_ms), "no reply to a malformed message"
        return sock.recv()
    finally:
        sock.close()


def test_open_rejects_bad_parameters(engine: DaemonProcess) -> None:
    with Client(engine.endpoint) as client:
        with pytest.raises(errors.BadParamsError, match="sample_rate 44100"):
            client.open_stream(44100)
        with pytest.raises(errors.BadDTypeError, match="int8"):
            client.open_stream(16000, "int8")
        with pytest.raises(errors.BadParamsError, match="threshold"):
            client.open_stream(16000, threshold=1.5)
        client.open_stream(16000, stream_id=7)
        with pytest.raises(errors.StreamExistsError, match="stream 7"):
            client.open_stream(16000, stream_id=7)


def test_bad_audio_is_refused_and_the_stream_survives(engine: DaemonProcess) -> None:
    clip = speech_clips()[0]
    with Client(engine.endpoint) as client:
        stream = client.open_stream(clip.rate, "float32")
        nan_chunk = clip.f32[:1000].copy()
        nan_chunk[10] = np.nan
        with pytest.raises(errors.BadAudioError, match="NaN or Inf"):
            stream.send(nan_chunk)
        inf_chunk = clip.f32[:1000].copy()
        inf_chunk[3] = np.inf
        with pytest.raises(errors.BadAudioError):
            stream.send(inf_chunk)
        with pytest.raises(errors.BadAudioError, match="whole number"):
            stream.send(b"\x00" * 7)
        with pytest.raises(TypeError, match="float32"):
            stream.send(clip.pcm[:100])  # int16 array into a float32 stream: refused client-side
        # The refused chunks changed nothing: the stream still matches the reference exactly.
        results = stream.send(clip.f32) + stream.close()
    ref = reference(clip)
    assert np.max(np.abs(np.array([r.probability for r in results], np.float32) - ref)) <= 1e-6


def test_dtype_mismatch_on_the_wire(engine: DaemonProcess) -> None:
    with Client(engine.endpoint) as client:
        stream = client.open_stream(16000, "int16")
        payload = P.encode_audio(99, [(stream.stream_id, 99, P.DType.FLOAT32, b"\x00" * 8)])
        client._socket.send(payload)
        with pytest.raises(errors.BadDTypeError, match="int16"):
            client.wait_for(("req", 99))


def test_unknown_stream_and_stream_ops(engine: DaemonProcess) -> None:
    with Client(engine.endpoint) as client, Client(engine.endpoint) as other:
        mine = client.open_stream()
        stranger = other.open_stream(stream_id=mine.stream_id + 1000)
        forged = P.encode_audio(5, [(stranger.stream_id, 5, P.DType.INT16, b"\x00" * 1024)])
        client._socket.send(forged)  # another connection's stream id: not visible from here
        with pytest.raises(errors.UnknownStreamError):
            client.wait_for(("req", 5))
        assert stranger.send(np.zeros(512, np.int16))[0].frame == 0  # untouched


@pytest.mark.parametrize("payload,code", [
    (b"", P.ErrorCode.BAD_MESSAGE),
    (b"hello world", P.ErrorCode.BAD_MESSAGE),
    (struct.pack("<2sBBI", b"RS", 9, 1, 3), P.ErrorCode.UNSUPPORTED_VERSION),
    (struct.pack("<2sBBI", b"RS", 1, 0x7F, 3), P.ErrorCode.UNKNOWN_TYPE),
    (P.header(P.MsgType.OPEN, 3) + b"\x01", P.ErrorCode.BAD_MESSAGE),
    (P.header(P.MsgType.OPEN, 3) + struct.pack("<I", 1) + b"{not json", P.ErrorCode.BAD_MESSAGE),
    (P.header(P.MsgType.OPEN, 3) + struct.pack("<I", 1) + b'{"colour": 1}', P.ErrorCode.BAD_PARAMS),
    (P.header(P.MsgType.AUDIO, 3), P.ErrorCode.BAD_MESSAGE),
    (P.header(P.MsgType.AUDIO, 3) + struct.pack("<IIII", 1, 1, 1, 1 << 30), P.ErrorCode.BAD_MESSAGE),
    (P.header(P.MsgType.CLOSE, 3) + struct.pack("<I", 424242), P.ErrorCode.UNKNOWN_STREAM),
])
def test_malformed_messages_get_error_replies(engine: DaemonProcess, payload: bytes, code: P.ErrorCode) -> None:
    reply = raw_exchange(engine.endpoint, payload)
    assert P.parse_header(reply)[0] == P.MsgType.ERROR
    error = P.decode_error(reply)
    assert error.code == code, error.text
    assert error.text


def test_engine_survives_garbage_while_a_clean_stream_runs(engine: DaemonProcess) -> None:
    clip = speech_clips()[2]
    rng = np.random.default_rng(3)
    with Client(engine.endpoint) as client:
        stream = client.open_stream()
        results = []
        for i, start in enumerate(range(0, len(clip.pcm), 4000)):
            results += stream.send(clip.pcm[start:start + 4000])
            garbage = rng.bytes(int(rng.integers(0, 300)))
            if i % 2:
                garbage = P.header(P.MsgType(rng.choice([1, 2, 3, 4]))) + garbage
            raw_exchange(engine.endpoint, garbage)
        results += stream.close()
    ref = reference(clip)
    assert np.max(np.abs(np.array([r.probability for r in results], np.float32) - ref)) <= 1e-6
