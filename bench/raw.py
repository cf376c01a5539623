"""The raw ceiling: W processes each run the Silero model in-process, batched, in a closed loop.

No transport, no framing, no scheduling: onnxruntime alone, one intra-op thread per process
(the engine's workers use one each), a large batch, the LSTM state fed back. Its frames/s is
the most this machine's cores can do with the model; ``fps / 31.25`` is the number of live
microphones that ceiling would hold (a 512-sample frame is 32 ms of 16 kHz audio).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from bench.daemon import BenchError
from bench.procinfo import runq_wait_seconds

RATE = 16000
_CTX = multiprocessing.get_context("spawn")


@dataclass
class RawResult:
    workers: int
    batch: int
    frames_per_s: float  # all processes together
    wall_us_per_frame: float  # per process: one batched session.run / batch
    cpu_us_per_frame: float
    runq_wait_share: float  # per process: share of the wall time spent waiting for a CPU


def _raw_main(model_path: str, batch: int, warm_s: float, seconds: float, start: Any, conn: Connection,
              nice: int = 0) -> None:
    import onnxruntime

    from engine.models.silero import CONTEXT_SAMPLES, FRAME_SAMPLES

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    if nice:
        os.nice(nice)
    width = FRAME_SAMPLES[RATE] + CONTEXT_SAMPLES[RATE]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(os.getpid())
    feed = {"input": (0.05 * rng.standard_normal((batch, width))).astype(np.float32),
            "state": np.zeros((2, batch, 128), np.float32), "sr": np.array(RATE, np.int64)}
    feed["state"] = session.run(None, feed)[1]
    conn.send("ready")
    if not start.wait(120):
        return
    frames, until = 0, time.perf_counter() + warm_s
    while time.perf_counter() < until:
        feed["state"] = session.run(None, feed)[1]
    wall0, cpu0, wait0 = time.perf_counter(), time.process_time(), runq_wait_seconds(os.getpid())
    until = wall0 + seconds
    while time.perf_counter() < until:
        feed["state"] = session.run(None, feed)[1]
        frames += batch
    conn.send({"frames": frames, "wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
               "wait_s": runq_wait_seconds(os.getpid()) - wait0})


def measure_raw(workers: int, batch: int, seconds: float, warm_s: float = 1.0, nice: int = 0) -> RawResult:
    """W processes started together, measured over the same ``seconds`` after ``warm_s``."""
    from engine.models.silero import default_model_path

    model_path = default_model_path()
    start = _CTX.Event()
    procs, conns = [], []
    try:
        for _ in range(workers):
            parent, child = _CTX.Pipe(duplex=False)
            proc = _CTX.Process(target=_raw_main, args=(model_path, batch, warm_s, seconds, start, child, nice),
                                daemon=True)
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        for conn in conns:
            if not conn.poll(120) or conn.recv() != "ready":
                raise BenchError("a raw onnxruntime process did not load the model")
        start.set()
        results = []
        for conn in conns:
            if not conn.poll(warm_s + seconds + 60):
                raise BenchError("a raw onnxruntime process did not report")
            results.append(conn.recv())
    finally:
        for proc in procs:
            proc.join(5)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            proc.close()
        for conn in conns:
            conn.close()
    frames, wall = sum(r["frames"] for r in results), sum(r["wall_s"] for r in results)
    return RawResult(workers, batch, sum(r["frames"] / r["wall_s"] for r in results), 1e6 * wall / frames,
                     1e6 * sum(r["cpu_s"] for r in results) / frames, sum(r["wait_s"] for r in results) / wall)


def raw_fps(workers: int, seconds: float, batch: int = 256) -> float:
    """The raw onnxruntime ceiling in frames/s for ``workers`` processes (batch 256)."""
    return measure_raw(workers, batch, seconds, warm_s=min(1.0, max(0.2, seconds / 4))).frames_per_s
