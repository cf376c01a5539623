"""A worker's batching wait follows its load: ``batch_delay_us`` while its model is mostly
idle, up to ``busy_batch_delay_us`` while it is busy (engine/worker.py ``gather``).

Real daemon, one worker, real model: 64 streams each submit 20 s of speech at once, which
one second per chunk, keeps the worker busy for seconds on any machine; the wait it reports in STATS must rise
above the floor meanwhile, every frame must be answered, and once the engine is idle again
one more frame must bring the wait back to the floor.
"""

from __future__ import annotations

import signal
import time

import numpy as np

from clients.client import Client
from tests.conftest import speech_clips, spawn_daemon

FLOOR_US, BUSY_US = 500, 20_000
STREAMS = 64
SECONDS_PER_STREAM = 20
CHUNK_SAMPLES = 16000  # one second per message item: few items, many frames, a cheap front-end


def _speech(samples: int) -> np.ndarray:
    clip = max(speech_clips(), key=lambda c: len(c.pcm))
    return np.resize(clip.pcm, samples).astype(np.int16)


def _worker_delay_us(client: Client) -> int:
    return int(client.stats()["workers"][0]["batch_delay_us"])


def test_busy_worker_waits_longer_for_fuller_batches() -> None:
    daemon = spawn_daemon("--workers", "1", "--batch-delay-us", str(FLOOR_US),
                          "--busy-batch-delay-us", str(BUSY_US))
    try:
        audio = _speech(SECONDS_PER_STREAM * 16000)
        with Client(daemon.endpoint, timeout=60) as client:
            assert _worker_delay_us(client) == FLOOR_US  # no load measured yet
            # One chunk in flight per stream: ~2,000 frames queued, well within the worker's ring.
            streams = [client.open_stream(window=1) for _ in range(STREAMS)]
            pending, seen = [], []
            for start in range(0, len(audio), CHUNK_SAMPLES):
                chunk = audio[start:start + CHUNK_SAMPLES]
                pending += client.submit_many([(stream, chunk) for stream in streams])
                seen.append(_worker_delay_us(client))
            frames = sum(len(p.result()) for p in pending)
            assert frames == STREAMS * (len(audio) // 512)  # every frame answered, none shed
            assert max(seen) > 2 * FLOOR_US, f"the wait never grew under load: {seen}"
            assert max(seen) <= BUSY_US
            time.sleep(0.5)  # idle: the next measurement window finds the model unused
            streams[0].send(audio[:512])
            assert _worker_delay_us(client) == FLOOR_US
    finally:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log()


def test_no_wait_when_every_active_stream_is_already_queued() -> None:
    """One frame per stream per batch: once each active stream has a frame queued, waiting
    cannot make the batch any fuller, so the worker must run it at once rather than hold every
    frame for the whole (here 200 ms) wait."""
    delay_us = 200_000
    daemon = spawn_daemon("--workers", "1", "--batch-delay-us", str(delay_us))
    try:
        frame = _speech(512)
        with Client(daemon.endpoint, timeout=60) as client:
            streams = [client.open_stream(window=1) for _ in range(4)]
            before = client.stats()
            rounds, until = 0, time.monotonic() + 1.5  # six measurement windows of the worker's load
            while time.monotonic() < until:  # every stream's frame in one message, then all their results
                for pending in client.submit_many([(stream, frame) for stream in streams]):
                    assert len(pending.result()) == 1
                rounds += 1
            after = client.stats()
        frames = after["frames"] - before["frames"]
        queued_ms = 1000 * (after["queue_s_total"] - before["queue_s_total"]) / frames
        assert frames == rounds * len(streams)
        assert queued_ms < delay_us / 1000 / 20, f"frames waited {queued_ms:.1f} ms on average for a batch " \
                                                "that could not grow"
    finally:
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
