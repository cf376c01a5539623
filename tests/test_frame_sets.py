"""Gateway messages taken in bulk (engine/frame_sets.py) give exactly what frame-by-frame
onnxruntime gives, and items that do not fit the bulk path are still answered item by item."""

from __future__ import annotations

import numpy as np
import zmq

from clients.client import Client, Pending, Result, Stream
from tests.conftest import Clip, DaemonProcess, reference, speech_clips
from transport import protocol as P
from transport.protocol import DType, ErrorCode, MsgType

FRAME = 512
TICKS = 48
TOLERANCE = 1e-6


def frames_in_sets(client: Client) -> int:
    return int(client.stats()["counters"].get("frames_in_frame_sets", 0))


def test_gateway_messages_are_bit_exact_with_odd_streams_mixed_in(engine: DaemonProcess) -> None:
    """One message per tick carries the next frame of every stream of a dtype. Mixed in: a
    stream with a partial frame buffered (never fits the bulk path), one that first sent a
    94-frame chunk (its buffer outgrew the shared matrix and moves back), one that joins late
    (fresh state mid-run)."""
    clips = [c for c in speech_clips() if c.rate == 16000][:8]
    # (clip, dtype, tick it opens at, samples it sends alone before the ticks)
    specs = [(0, "int16", 0, 0), (1, "int16", 0, 100), (2, "int16", 0, 94 * FRAME), (3, "int16", 20, 0),
             (4, "int16", 0, 0), (5, "float32", 0, 0), (6, "float32", 0, 3 * FRAME), (7, "float32", 0, 0),
             (0, "float32", 5, 0), (1, "float32", 0, 0)]
    with Client(engine.endpoint, timeout=60) as client:
        before = frames_in_sets(client)
        streams: list[tuple[Stream, Clip, str, int] | None] = [None] * len(specs)
        sent = [0] * len(specs)
        results: list[list[Result]] = [[] for _ in specs]
        for tick in range(TICKS):
            for k, (clip_index, dtype, opens_at, lead) in enumerate(specs):
                if tick == opens_at:
                    clip = clips[clip_index % len(clips)]
                    stream = client.open_stream(16000, dtype)
                    streams[k] = (stream, clip, dtype, lead)
                    if lead:
                        results[k] += stream.send(clip.pcm[:lead] if dtype == "int16" else clip.f32[:lead])
                        sent[k] = lead
            for dtype in ("int16", "float32"):
                batch: list[tuple[int, Stream, np.ndarray]] = []
                for k, entry in enumerate(streams):
                    if entry is not None and entry[2] == dtype:
                        pcm = entry[1].pcm if dtype == "int16" else entry[1].f32
                        batch.append((k, entry[0], pcm[sent[k]:sent[k] + FRAME]))
                        sent[k] += FRAME
                pending: list[Pending] = client.submit_many([(s, chunk) for _, s, chunk in batch])
                for (k, _, _), p in zip(batch, pending):
                    results[k] += p.result()
        for k, entry in enumerate(streams):
            assert entry is not None
            results[k] += entry[0].close()
        taken = frames_in_sets(client) - before

    for k, entry in enumerate(streams):
        assert entry is not None
        _, clip, _, _ = entry
        ref = reference(Clip(clip.name, clip.pcm[:sent[k]], clip.rate))
        assert [r.frame for r in results[k]] == list(range(len(ref))), f"stream {k}: frames missing or out of order"
        diff = np.max(np.abs(np.array([r.probability for r in results[k]], np.float32) - ref))
        assert diff <= TOLERANCE, f"stream {k} ({specs[k]}): max |diff| {diff}"
    # Every tick's message carried >= 4 streams; each frame of all but the partial-frame stream
    # (its 100 samples keep every later frame split across two messages) fits the bulk path.
    assert taken == sum(TICKS - opens_at for _, _, opens_at, lead in specs if lead % FRAME == 0)


def test_a_set_with_bad_items_answers_every_item(engine: DaemonProcess) -> None:
    """One gateway message: good frames, a NaN frame, an unknown stream and a stream of the
    other dtype. The good ones are answered exactly; each bad one gets its own error and
    leaves its stream untouched."""
    clip = [c for c in speech_clips() if c.rate == 16000][0]
    first = reference(Clip(clip.name, clip.pcm[:FRAME], clip.rate))[0]
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(engine.endpoint)
    try:
        def open_stream(sid: int, dtype: str) -> None:
            sock.send(P.encode_open(sid, sid, {"sample_rate": 16000, "dtype": dtype}))
            assert P.parse_header(sock.recv())[0] == MsgType.OPENED

        for sid in (1, 2, 3, 4, 5):
            open_stream(sid, "float32")
        open_stream(6, "int16")
        good = clip.f32[:FRAME].astype("<f4")
        nan = good.copy()
        nan[100] = np.nan

        def item(sid: int, samples: np.ndarray) -> tuple[int, int, DType, bytes]:
            return (sid, 10 + sid, DType.FLOAT32, samples.tobytes())

        first_message = [item(1, good), item(2, good), item(3, nan), item(99, good), item(4, good), item(5, good),
                         item(6, good)]
        second_message = [item(sid, good) for sid in (1, 2, 3, 4, 5)]
        probs: dict[int, list[float]] = {}
        errors: dict[int, ErrorCode] = {}
        for items in (first_message, second_message):
            sock.send(P.encode_audio(7, items))
            expected = len(items)
            while expected:
                assert sock.poll(30_000), "a reply is missing"
                msg = sock.recv()
                if P.parse_header(msg)[0] == MsgType.ERROR:
                    error = P.decode_error(msg)
                    assert error.request_id == 7 and error.chunk_seq == 10 + error.stream_id
                    errors[error.stream_id] = error.code
                    expected -= 1
                else:
                    for result in P.decode_results(msg):
                        probs.setdefault(result.stream_id, []).extend(result.probabilities.tolist())
                        assert result.first_frame == len(probs[result.stream_id]) - 1
                        expected -= 1
    finally:
        sock.close(0)
    assert errors == {3: ErrorCode.BAD_AUDIO, 99: ErrorCode.UNKNOWN_STREAM, 6: ErrorCode.BAD_DTYPE}
    # Stream 3's NaN frame was not used: its first answered frame is frame 0 of its audio.
    assert sorted(probs) == [1, 2, 3, 4, 5]
    assert all(len(p) == (1 if sid == 3 else 2) for sid, p in probs.items())
    for sid, p in probs.items():
        assert abs(p[0] - first) <= TOLERANCE, (sid, p[0], first)
