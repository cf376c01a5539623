"""Workers SIGKILLed again and again under load: every frame answered, every stream still exact."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np

from clients.client import Client
from tests.conftest import Clip, reference, speech_clips, spawn_daemon
from tests.test_engine_exact import check_exact, drive


def test_workers_killed_under_load_lose_nothing() -> None:
    daemon = spawn_daemon("--workers", "2")
    kills: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        with Client(daemon.endpoint, timeout=30) as admin:
            while not stop.is_set():
                time.sleep(0.6)
                workers = [w for w in admin.stats()["workers"] if w["ready"] and w["pid"]]
                if workers:
                    victim = workers[len(kills) % len(workers)]["pid"]
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)

    try:
        clips = [Clip(c.name, c.pcm[:10 * 16000], c.rate) for c in speech_clips() if c.rate == 16000]
        worst, frames, rounds = 0.0, 0, 0
        with Client(daemon.endpoint, timeout=60) as client:
            thread = threading.Thread(target=killer)
            thread.start()
            try:
                # Rounds of 16 streams until three workers died under them: a fast machine
                # finishes one round before the killer has struck three times.
                while len(kills) < 3 and rounds < 50:
                    streams = [(client.open_stream(16000, "int16" if i % 2 else "float32"), clips[i % len(clips)],
                                "int16" if i % 2 else "float32") for i in range(16)]
                    results = drive(streams, np.random.default_rng(11 + rounds), window=4)
                    worst = max(worst, check_exact(streams, results))
                    frames += sum(len(reference(c)) for _, c, _ in streams)
                    rounds += 1
            finally:
                stop.set()
                thread.join()
            deadline = time.monotonic() + 30  # the last victim may have died just now
            while (stats := client.stats())["counters"].get("worker_restarts", 0) < len(kills):
                assert time.monotonic() < deadline, "a killed worker was not replaced"
                time.sleep(0.1)
        print(f"{rounds} rounds, {len(kills)} workers killed, {stats['counters'].get('worker_restarts')} restarts, "
              f"{frames} frames all answered, max |diff| {worst:.3g}, "
              f"duplicates dropped {stats['counters'].get('duplicate_results_dropped', 0)}, "
              f"replayed {sum(w['replayed_frames'] for w in stats['workers'])}")
        assert len(kills) >= 3, "the load finished before enough workers were killed"
        assert stats["counters"]["worker_restarts"] >= len(kills)
        assert stats["counters"]["frames_out"] == frames
    finally:
        assert daemon.stop() == 0, daemon.log()
