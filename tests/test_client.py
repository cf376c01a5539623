"""The clients against a real daemon: asyncio at 200 streams, windows, callbacks, utterances, errors.

Probabilities are checked against tests/conftest.reference (onnxruntime, frame by frame,
nothing of the engine), utterance audio against the samples the test sent.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from clients import AsyncClient, Client, errors
from clients.results import Event, Result, StreamReset, Utterance
from tests.conftest import Clip, DaemonProcess, reference, resample_to_8k, speech_clips
from tests.test_engine_exact import random_chunks

TOLERANCE = 1e-6


def max_diff(results: list[Result], ref: np.ndarray, name: str) -> float:
    assert [r.frame for r in results] == list(range(len(ref))), f"{name}: frames missing or out of order"
    return float(np.max(np.abs(np.array([r.probability for r in results], np.float32) - ref), initial=0.0))


def clips_16k(seconds: float) -> list[Clip]:
    return [c for c in speech_clips(seconds) if c.rate == 16000]


# ---- asyncio ------------------------------------------------------------------------------

def test_async_client_200_streams_one_loop_bit_exact(engine: DaemonProcess) -> None:
    base = clips_16k(3.0)
    clips = base + [resample_to_8k(c) for c in base[:4]]
    n_streams = 208
    plan = [(clips[i % len(clips)], "int16" if i % 2 else "float32", "send" if i % 3 == 0 else "submit")
            for i in range(n_streams)]

    async def main() -> tuple[list[list[Result]], list[list[Event | StreamReset]], list[list[Event]], float]:
        async with AsyncClient(engine.endpoint, timeout=120) as client:
            streams = await asyncio.gather(*(client.open_stream(clip.rate, dtype, window=4)
                                             for clip, dtype, _ in plan))
            assert len({s.stream_id for s in streams}) == n_streams

            async def drive(i: int) -> list[Result]:
                stream, (clip, dtype, mode) = streams[i], plan[i]
                pcm = clip.pcm if dtype == "int16" else clip.f32
                results: list[Result] = []
                pending = []
                for start, end in random_chunks(len(pcm), np.random.default_rng(i), clip.rate):
                    if mode == "send":
                        results += await stream.send(pcm[start:end])
                    else:
                        pending.append(await stream.submit(pcm[start:end]))
                for p in pending:
                    results += await p
                return results + await stream.close()

            async def watch(i: int) -> list[Event | StreamReset]:
                return [item async for item in streams[i].events()]

            started = time.perf_counter()
            outcome = await asyncio.gather(*(drive(i) for i in range(n_streams)),
                                           *(watch(i) for i in range(n_streams)))
            elapsed = time.perf_counter() - started
            histories = [s.history for s in streams]
        return list(outcome[:n_streams]), list(outcome[n_streams:]), histories, elapsed  # type: ignore[arg-type]

    results, watched, histories, elapsed = asyncio.run(main())
    worst = max(max_diff(r, reference(clip), clip.name) for r, (clip, _, _) in zip(results, plan))
    frames = sum(len(r) for r in results)
    print(f"AsyncClient: {n_streams} streams in one event loop, {frames} frames in {elapsed:.2f} s, "
          f"max |diff| vs frame-by-frame onnxruntime = {worst:.3g}")
    assert worst <= TOLERANCE
    for r, w, h in zip(results, watched, histories):
        assert w == h  # the iterator saw every event, in order, and ended at close
        assert [e for res in r for e in res.events] == h
    assert sum(len(h) for h in histories) > 50  # real speech: plenty of events


def test_async_windowed_fire_and_forget_is_ordered_and_exact(engine: DaemonProcess) -> None:
    clip = clips_16k(12.0)[3]

    async def main() -> tuple[list[Result], list[int], list[Event | StreamReset], list[Event], int,
                              list[Utterance], list[Event]]:
        got: list[Result] = []
        async with AsyncClient(engine.endpoint, timeout=60) as client:
            stream = await client.open_stream(16000, "float32", window=3, on_result=got.append)
            keeper = await client.open_stream(16000, "int16", window=5, keep_audio=True)
            seen_in_flight = []

            async def watch() -> list[Event | StreamReset]:
                return [item async for item in stream.events()]

            async def collect() -> list[Utterance]:
                return [u async for u in keeper.utterances()]

            watcher, collector = asyncio.create_task(watch()), asyncio.create_task(collect())
            for start in range(0, len(clip.f32), 700):  # never awaits a result
                await stream.submit(clip.f32[start:start + 700])
                await keeper.submit(clip.pcm[start:start + 700].tobytes())  # raw bytes work too
                seen_in_flight.append(stream.in_flight)
            await client.drain()
            assert stream.in_flight == 0
            final = await stream.close()
            assert final == got[len(got) - len(final):]
            await keeper.close()
            return (got, seen_in_flight, await watcher, stream.history, stream._core.max_tickets_in_flight,
                    await collector, keeper.history)

    got, seen, watched, history, high, utterances, keeper_events = asyncio.run(main())
    diff = max_diff(got, reference(clip), clip.name)
    print(f"window 3: in flight up to {max(seen)}, {len(got)} frames in order, max |diff| {diff:.3g}")
    assert diff <= TOLERANCE
    assert max(seen) == high == 3  # the window filled (chunks overlapped) and was never exceeded
    assert watched == history and history
    assert [(u.start, u.end) for u in utterances] == list(zip(keeper_events[::2], keeper_events[1::2]))
    for u in utterances:
        np.testing.assert_array_equal(u.audio, clip.pcm[u.start.sample:u.end.sample])


def test_async_typed_errors_and_per_call_timeouts(engine: DaemonProcess) -> None:
    clip = clips_16k(4.0)[0]
    got: list[Result] = []
    failures: list[errors.RingserveError] = []

    async def main() -> None:
        async with AsyncClient(engine.endpoint, timeout=30) as client:
            with pytest.raises(errors.BadParamsError, match="threshold"):
                await client.open_stream(16000, threshold=1.5)
            stream = await client.open_stream(16000, "float32", on_result=got.append, on_error=failures.append)
            bad = clip.f32[:1000].copy()
            bad[5] = np.nan
            with pytest.raises(errors.BadAudioError, match=f"stream {stream.stream_id}: .*NaN"):
                await stream.send(bad)  # refused whole: the stream is unchanged
            with pytest.raises(TypeError, match="float32"):
                await stream.submit(clip.pcm[:10])
            with pytest.raises(errors.EngineTimeout, match="no reply"):
                await stream.send(clip.f32[:8000], timeout=0)  # far too short: raised, chunk still counts
            await stream.send(clip.f32[8000:], timeout=30)
            assert 0 < await client.ping() < 5
            await stream.close()
            with pytest.raises(errors.StreamClosedError):
                await stream.send(clip.f32[:10])

    asyncio.run(main())
    assert [type(f) for f in failures] == [errors.BadAudioError]  # on_error saw it as well
    assert max_diff(got, reference(clip), clip.name) <= TOLERANCE


def test_unreachable_engine_times_out_with_a_clear_message(tmp_path: pytest.TempPathFactory) -> None:
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    started = time.monotonic()
    with Client(endpoint, timeout=0.3) as client:
        with pytest.raises(errors.EngineTimeout, match=r"no reply from .*nobody.sock.*ringserve serve"):
            client.open_stream()
    with pytest.raises(errors.EngineTimeout):
        asyncio.run(_async_ping(endpoint))
    assert time.monotonic() - started < 5


async def _async_ping(endpoint: str) -> float:
    async with AsyncClient(endpoint, timeout=0.3) as client:
        return await client.ping()


# ---- blocking client: callbacks, utterances --------------------------------------------------

def test_sync_callbacks_style(engine: DaemonProcess) -> None:
    clip = clips_16k(15.0)[1]
    calls: list[tuple[str, object]] = []
    with Client(engine.endpoint, timeout=60) as client:
        stream = client.open_stream(16000, "int16", window=4, keep_audio=True,
                                    on_result=lambda r: calls.append(("result", r)),
                                    on_event=lambda e: calls.append(("event", e)),
                                    on_utterance=lambda u: calls.append(("utterance", u)),
                                    on_error=lambda e: calls.append(("error", e)))
        pending = [stream.submit(clip.pcm[s:s + 1234]) for s in range(0, len(clip.pcm), 1234)]
        assert not all(p.done() for p in pending)
        client.drain()
        assert all(p.done() for p in pending) and stream.in_flight == 0
        stream.close()
        events = stream.events
    results = [c for kind, c in calls if kind == "result"]
    diff = max_diff(results, reference(clip), clip.name)  # type: ignore[arg-type]
    assert diff <= TOLERANCE
    assert [c for kind, c in calls if kind == "event"] == events and len(events) >= 2
    assert not [c for kind, c in calls if kind == "error"]
    utterances = [c for kind, c in calls if kind == "utterance"]
    assert len(utterances) == sum(e.kind == "end" for e in events)
    for u, (start, end) in zip(utterances, zip(events[::2], events[1::2])):
        assert isinstance(u, Utterance) and (u.start, u.end) == (start, end)
        np.testing.assert_array_equal(u.audio, clip.pcm[start.sample:end.sample])
    # callback order: an event right after the result that carries it, an utterance after its end
    kinds = [kind for kind, _ in calls]
    first_end = kinds.index("utterance")
    assert kinds[first_end - 1] == "event" and calls[first_end - 1][1] == utterances[0].end  # type: ignore[union-attr]
    print(f"callbacks: {len(results)} results, {len(events)} events, {len(utterances)} utterances, "
          f"max |diff| {diff:.3g}")


def test_utterances_exact_and_memory_bounded_over_a_long_stream(engine: DaemonProcess) -> None:
    parts, total = [], 0
    for clip in clips_16k(20.0):
        parts.append(clip.pcm)
        total += len(clip.pcm)
        if total > 80 * 16000:
            break
    audio = np.concatenate(parts)
    max_speech_s, pad_ms, frame = 3.0, 30, 512
    pad = 16000 * pad_ms / 1000
    bound = max(pad + 250 * 16 + frame, max_speech_s * 16000 + frame - pad + 1)  # clients/utterances.py
    checks: list[tuple[int, int]] = []
    utterances: dict[str, list[Utterance]] = {"bounded": [], "default": []}
    with Client(engine.endpoint, timeout=60) as client:
        streams = {}
        for name, vad in (("bounded", {"max_speech_duration_s": max_speech_s}), ("default", {})):
            def check(result: Result, name: str = name) -> None:
                keeper = streams[name]._core.keeper
                assert keeper is not None
                checks.append((name == "bounded", keeper.kept_samples - (keeper.sent - keeper.processed)))

            streams[name] = client.open_stream(16000, "int16", window=4, keep_audio=True,
                                               on_utterance=utterances[name].append, on_result=check,
                                               speech_pad_ms=pad_ms, **vad)
        rng = np.random.default_rng(7)
        start = 0
        while start < len(audio):
            end = start + int(np.exp(rng.uniform(np.log(160), np.log(16000))))  # 10 ms to 1 s
            client.submit_many([(s, audio[start:end]) for s in streams.values()])
            start = end
        for stream in streams.values():
            stream.close()
        events = {name: s.events for name, s in streams.items()}
        keepers = {name: s._core for name, s in streams.items()}
    for name, found in utterances.items():
        assert len(found) == sum(e.kind == "end" for e in events[name]) > 10
        for u in found:
            assert not u.truncated
            np.testing.assert_array_equal(u.audio, audio[u.start.sample:u.end.sample])
    worst = max(look for bounded, look in checks if bounded)
    print(f"utterances over {len(audio) / 16000:.0f} s: {len(utterances['bounded'])} + "
          f"{len(utterances['default'])}, kept beyond the unanswered audio at most {worst} samples "
          f"({worst / 16000:.2f} s; bound {bound:.0f}), default params at most "
          f"{max(look for b, look in checks if not b)} samples")
    assert worst <= bound
    assert worst < len(audio) / 20  # it really is trimmed
    assert all(k.keeper is None or k.keeper.mirror_ok for k in keepers.values())


def test_sync_client_keeps_the_first_clients_api(engine: DaemonProcess) -> None:
    """send/submit/result/close/reset/events/wait_for as tests/test_engine_*.py use them."""
    clip = clips_16k(4.0)[2]
    with Client(engine.endpoint, timeout=30) as client:
        stream = client.open_stream(16000, "int16", stream_id=4242, min_silence_duration_ms=200)
        assert stream.stream_id == 4242 and stream.frame_samples == 512 and stream.info["vad"][
            "min_silence_duration_ms"] == 200
        a = stream.submit(clip.pcm[:30000])
        b = stream.submit(clip.pcm[30000:])
        results = a.result() + b.result() + stream.close()
        assert stream.close() == []
        assert max_diff(results, reference(clip), clip.name) <= TOLERANCE
        assert client.stats()["open_streams"] >= 0 and client.ping() < 5
        assert client.session.counters.unclaimed == 0
