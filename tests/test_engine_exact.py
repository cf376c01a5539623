"""Every stream's probabilities equal running it alone, frame by frame, through onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from clients.client import Client, Pending, Result, Stream
from tests.conftest import Clip, DaemonProcess, reference, resample_to_8k, speech_clips

TOLERANCE = 1e-6


def random_chunks(n: int, rng: np.random.Generator, rate: int) -> list[tuple[int, int]]:
    """Chunk boundaries with sizes log-uniform from 1 sample to 5 s."""
    bounds, offset = [], 0
    while offset < n:
        size = int(np.exp(rng.uniform(0, np.log(5 * rate))))
        bounds.append((offset, min(n, offset + size)))
        offset += size
    return bounds


def drive(streams: list[tuple[Stream, Clip, str]], rng: np.random.Generator, window: int = 3) -> dict[int, list[Result]]:
    """Interleave all streams' chunks, up to `window` chunks in flight per stream, then close."""
    plans = {id(s): random_chunks(len(c.pcm), rng, c.rate) for s, c, _ in streams}
    results: dict[int, list[Result]] = {id(s): [] for s, _, _ in streams}
    in_flight: dict[int, list[Pending]] = {id(s): [] for s, _, _ in streams}
    position = {id(s): 0 for s, _, _ in streams}
    while any(position[id(s)] < len(plans[id(s)]) or in_flight[id(s)] for s, _, _ in streams):
        for stream, clip, dtype in streams:
            key = id(stream)
            while len(in_flight[key]) < window and position[key] < len(plans[key]):
                start, end = plans[key][position[key]]
                chunk = clip.pcm[start:end] if dtype == "int16" else clip.f32[start:end]
                in_flight[key].append(stream.submit(chunk))
                position[key] += 1
            if in_flight[key]:
                results[key].extend(in_flight[key].pop(0).result())
    for stream, _, _ in streams:
        results[id(stream)].extend(stream.close())
    return results


def check_exact(streams: list[tuple[Stream, Clip, str]], results: dict[int, list[Result]]) -> float:
    worst = 0.0
    for stream, clip, _ in streams:
        got = results[id(stream)]
        ref = reference(clip)
        assert [r.frame for r in got] == list(range(len(ref))), f"{clip.name}: frames missing or out of order"
        diff = float(np.max(np.abs(np.array([r.probability for r in got], np.float32) - ref)))
        assert diff <= TOLERANCE, f"{clip.name}: max |diff| {diff}"
        worst = max(worst, diff)
    return worst


@pytest.mark.parametrize("connections", [1, 4])
def test_sixteen_streams_random_chunks_bit_exact(engine: DaemonProcess, connections: int) -> None:
    clips = [c for c in speech_clips() if c.rate == 16000]
    assert len(clips) >= 8
    rng = np.random.default_rng(connections)
    clients = [Client(engine.endpoint, timeout=60) for _ in range(connections)]
    try:
        streams = []
        for i in range(16):
            clip = clips[i % len(clips)]
            dtype = "int16" if i % 2 == 0 else "float32"
            streams.append((clients[i % connections].open_stream(16000, dtype), clip, dtype))
        worst = check_exact(streams, drive(streams, rng))
        print(f"16 streams over {connections} connection(s): max |diff| = {worst:.3g}")
    finally:
        for client in clients:
            client.close()


def test_8khz_streams_bit_exact(engine: DaemonProcess) -> None:
    clips = [resample_to_8k(c) for c in speech_clips() if c.rate == 16000][:6]
    rng = np.random.default_rng(8)
    with Client(engine.endpoint, timeout=60) as client:
        streams = [(client.open_stream(8000, dtype), clip, dtype)
                   for clip, dtype in zip(clips, ["int16", "float32"] * 3)]
        assert streams[0][0].frame_samples == 256
        worst = check_exact(streams, drive(streams, rng))
        print(f"8 kHz: max |diff| = {worst:.3g}")


def test_8khz_and_16khz_streams_mixed_bit_exact(engine: DaemonProcess) -> None:
    """Streams of both rates on every worker at once: each batch holds one rate (the inputs
    differ in width), and no stream's frames may pass one another across those batches."""
    clips16 = [c for c in speech_clips() if c.rate == 16000][:3]
    clips8 = [resample_to_8k(c) for c in clips16]
    rng = np.random.default_rng(816)
    with Client(engine.endpoint, timeout=60) as client:
        # Opened 8, 8, 16, 16, 8, 16 kHz: with streams dealt to the least-loaded worker in
        # turn, each of two workers gets both rates.
        order = [(8000, clips8[0]), (8000, clips8[1]), (16000, clips16[0]), (16000, clips16[1]),
                 (8000, clips8[2]), (16000, clips16[2])]
        streams = [(client.open_stream(rate, "int16"), clip, "int16") for rate, clip in order]
        worst = check_exact(streams, drive(streams, rng))
        print(f"8 and 16 kHz mixed: max |diff| = {worst:.3g}")


def test_interleaved_equals_alone(engine: DaemonProcess) -> None:
    clips = [c for c in speech_clips() if c.rate == 16000]
    target = clips[0]
    with Client(engine.endpoint, timeout=60) as client:
        alone = client.open_stream()
        solo = drive([(alone, target, "int16")], np.random.default_rng(1))[id(alone)]
        mixed_streams = [(client.open_stream(), clip, "int16") for clip in [target, *clips[1:6]]]
        mixed = drive(mixed_streams, np.random.default_rng(2))[id(mixed_streams[0][0])]
    assert [r.probability for r in solo] == [r.probability for r in mixed]
    assert alone.events == mixed_streams[0][0].events
    assert solo[-1].frame + 1 == -(-len(target.pcm) // 512)  # last partial frame flushed


def test_reset_starts_over(engine: DaemonProcess) -> None:
    clip = [c for c in speech_clips() if c.rate == 16000][1]
    with Client(engine.endpoint) as client:
        stream = client.open_stream()
        stream.send(clip.pcm[:20000])  # leaves a partial frame buffered, discarded by reset
        stream.reset()
        results = stream.send(clip.pcm[:16384]) + stream.close()
    ref = reference(Clip(clip.name, clip.pcm[:16384], clip.rate))
    assert [r.frame for r in results] == list(range(len(ref)))
    assert np.max(np.abs(np.array([r.probability for r in results], np.float32) - ref)) <= TOLERANCE


def test_chunk_results_cover_exactly_completed_frames(engine: DaemonProcess) -> None:
    clip = speech_clips()[0]
    with Client(engine.endpoint) as client:
        stream = client.open_stream(clip.rate)
        assert stream.send(clip.pcm[:511]) == []
        assert [r.frame for r in stream.send(clip.pcm[511:513])] == [0]
        assert [r.frame for r in stream.send(clip.pcm[513:2048])] == [1, 2, 3]
        assert [r.frame for r in stream.close()] == []
        empty = client.open_stream(clip.rate)
        assert empty.close() == []
