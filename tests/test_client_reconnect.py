"""A daemon SIGKILLed and restarted on the same endpoint: both clients notice, reconnect, reopen.

The asyncio client streams fire-and-forget through the outage and notices by its heartbeat;
the blocking client (heartbeat off) is idle during it and notices by the UNKNOWN_STREAM
error the new daemon answers its next chunk with. Both must report the reset explicitly,
and everything sent after it must again match the frame-by-frame onnxruntime reference.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import threading
import time

import numpy as np

from clients import AsyncClient, Client, StreamReset, StreamResetError
from clients.results import Event, Result
from tests.conftest import Clip, DaemonProcess, reference, speech_clips, spawn_daemon

TOLERANCE = 1e-6
CHUNK = 1600  # 100 ms


def check_epoch(results: list[Result], audio: np.ndarray, reset: StreamReset, end: int, name: str) -> float:
    """Results of the epoch after ``reset`` against the reference of the audio sent in it."""
    after = [r for r in results if r.epoch == reset.epoch]
    ref = reference(Clip(f"{name}-after-reset", audio[reset.base_sample:end], 16000))
    assert [r.frame for r in after] == list(range(len(ref))), f"{name}: frames after the reset"
    return float(np.max(np.abs(np.array([r.probability for r in after], np.float32) - ref)))


def test_clients_reconnect_after_sigkill_and_restart() -> None:
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='rs-')}/engine.sock"
    clips = [c for c in speech_clips() if c.rate == 16000]
    audio_async = np.concatenate([clips[0].pcm, clips[1].pcm])[: 24 * 16000]
    audio_sync = clips[2].pcm[: 12 * 16000]
    daemons: list[DaemonProcess] = [spawn_daemon("--workers", "1", endpoint=endpoint)]
    restarted = threading.Event()
    sync_idle = threading.Event()
    timeline: dict[str, float] = {}

    def kill_and_restart() -> None:
        daemons[0].stop(signal.SIGKILL)
        timeline["killed"] = time.monotonic()
        daemons.append(spawn_daemon("--workers", "1", endpoint=endpoint))
        timeline["restarted"] = time.monotonic()
        restarted.set()

    # ---- blocking client: idle through the outage, heartbeat off --------------------------
    sync_out: dict[str, object] = {}

    def sync_side() -> None:
        results: list[Result] = []
        resets: list[StreamReset] = []
        lost = 0
        with Client(endpoint, timeout=60, heartbeat=None) as client:
            stream = client.open_stream(16000, "int16", on_reset=resets.append)
            sent = 0
            for start in range(0, len(audio_sync), CHUNK):
                if start == 40 * CHUNK:
                    sync_idle.set()  # nothing in flight while the daemon is replaced
                    restarted.wait(120)
                try:
                    results += stream.send(audio_sync[start:start + CHUNK])
                except StreamResetError:
                    lost += 1  # the chunk the new daemon did not know the stream for
                sent = start + CHUNK
            results += stream.close()
            sync_out.update(results=results, resets=resets, lost=lost, sent=min(sent, len(audio_sync)),
                            reconnects=client.reconnects, events=stream.events)

    sync_thread = threading.Thread(target=sync_side)

    # ---- asyncio client: streaming fire-and-forget through the outage ---------------------
    async def async_side() -> tuple[list[Result], list[StreamReset], list[Event | StreamReset], int, int]:
        results: list[Result] = []
        resets: list[StreamReset] = []
        async with AsyncClient(endpoint, timeout=60, heartbeat=0.3, heartbeat_timeout=1.0) as client:
            stream = await client.open_stream(16000, "int16", window=4, on_result=results.append,
                                              on_reset=resets.append)

            async def watch() -> list[Event | StreamReset]:
                return [item async for item in stream.events()]

            watcher = asyncio.create_task(watch())
            restart = None
            for i, start in enumerate(range(0, len(audio_async), CHUNK)):
                if i == 50:
                    await asyncio.to_thread(sync_idle.wait, 60)
                    restart = asyncio.create_task(asyncio.to_thread(kill_and_restart))
                await stream.submit(audio_async[start:start + CHUNK])
                await asyncio.sleep(0.02)  # 5x real time
            assert restart is not None
            await restart
            await client.drain()
            await stream.close()
            return results, resets, await watcher, client.reconnects, stream.epoch

    sync_thread.start()
    try:
        results, resets, items, reconnects, epoch = asyncio.run(async_side())
    finally:
        sync_thread.join(180)
        for daemon in daemons:
            daemon.stop()
    assert not sync_thread.is_alive()

    # asyncio client: one explicit reset, seen by the callback and by the iterator, in order
    assert reconnects == 1 and epoch == 1
    [reset] = resets
    assert reset.reason == "reconnect" and reset.epoch == 1
    assert [i for i in items if isinstance(i, StreamReset)] == [reset]
    assert all(e.epoch == 0 for e in items[:items.index(reset)])
    assert all(e.epoch == 1 and e.base_sample == reset.base_sample for e in items[items.index(reset) + 1:])
    # offsets: epoch 0 covered what was answered, the lost chunks are counted, the rest is epoch 1
    answered = sum(1 for r in results if r.epoch == 0) * 512
    assert answered <= reset.base_sample - reset.lost_samples < answered + 512
    diff_async = check_epoch(results, audio_async, reset, len(audio_async), "async")
    assert diff_async <= TOLERANCE

    # blocking client: noticed through UNKNOWN_STREAM, reset reported, exact afterwards
    [sync_reset] = sync_out["resets"]  # type: ignore[misc]
    assert sync_out["reconnects"] == 1 and sync_out["lost"] == 1
    assert sync_reset.reason == "reconnect" and sync_reset.lost_chunks == 1 and sync_reset.lost_samples == CHUNK
    assert sync_reset.base_sample == 41 * CHUNK  # sample 0 of the new epoch = first chunk sent after it
    diff_sync = check_epoch(sync_out["results"], audio_sync, sync_reset, int(sync_out["sent"]),  # type: ignore[arg-type]
                            "sync")
    assert diff_sync <= TOLERANCE
    print(f"daemon SIGKILLed, restarted in {timeline['restarted'] - timeline['killed']:.1f} s; async client: "
          f"reset at stream sample {reset.base_sample} ({reset.lost_chunks} chunks / {reset.lost_samples} samples "
          f"lost), max |diff| after it {diff_async:.3g}; sync client: reset at {sync_reset.base_sample}, "
          f"max |diff| after it {diff_sync:.3g}")


def test_idle_stream_notices_a_quick_restart_by_the_instance_id() -> None:
    """Restarted faster than the heartbeat timeout: only the new instance id in PONG tells."""
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='rs-')}/engine.sock"
    clip = [c for c in speech_clips() if c.rate == 16000][0]
    first = spawn_daemon("--workers", "1", endpoint=endpoint)
    second: DaemonProcess | None = None
    try:
        resets: list[StreamReset] = []
        with Client(endpoint, timeout=60, heartbeat=0.2, heartbeat_timeout=60) as client:
            stream = client.open_stream(16000, "int16", on_reset=resets.append)
            stream.send(clip.pcm[:16000])
            first.stop(signal.SIGKILL)
            second = spawn_daemon("--workers", "1", endpoint=endpoint)
            deadline = time.monotonic() + 20
            while not resets and time.monotonic() < deadline:
                client.poll(0.1)  # idle: no audio is sent, only heartbeats
            assert [r.reason for r in resets] == ["reconnect"], "the restart went unnoticed"
            results = stream.send(clip.pcm[16000:48000]) + stream.close()
        ref = reference(Clip(clip.name + "-after-quick-restart", clip.pcm[16000:48000], 16000))
        got = np.array([r.probability for r in results if r.epoch == resets[0].epoch], np.float32)
        assert len(got) == len(ref) and float(np.max(np.abs(got - ref))) <= TOLERANCE
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            assert second.stop() == 0
