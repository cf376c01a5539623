"""The engine bench's saturation measurement (a) and (b): a daemon driven to saturation by
bench/engine_load.py, its frames/s and the CPU per served frame of each of its processes
(from /proc) over one window, next to the load generator's own."""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field

from bench.daemon import BenchError, EngineDaemon
from bench.engine_load import ANSWERED, SENT, STOP, Counters, loadgen_main
from bench.procinfo import cpu_seconds, runq_wait_seconds
from clients.client import Client

_CTX = multiprocessing.get_context("spawn")


@dataclass
class EngineResult:
    workers: int
    streams: int
    window: int
    seconds: float
    frames_per_s: float
    avg_batch: float
    frontend_cpu_us_per_frame: float  # daemon main process: front-end loop + ZeroMQ I/O thread
    frontend_loop_us_per_frame: float  # its main thread alone: the poll loop, incl. shm ring writes
    frontend_cores: float  # its CPU seconds per wall second
    worker_cpu_us_per_frame: float  # all workers together
    worker_compute_us_per_frame: float  # the workers' own timing of their batches (stats)
    loadgen_cpu_us_per_frame: float
    loadgen_cores: float
    frontend_runq_wait_share: float  # share of the wall time its main thread waited for a CPU
    worker_runq_wait_share: float  # the same, averaged over the workers
    stalled_intervals: int  # 0.5 s samples in which no result came back
    sent: int = 0
    answered: int = 0  # results received, shed frames included
    shed: int = 0  # answered without inference (the engine's overload policy); not in frames_per_s
    lost: int = 0
    out_of_order: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    streams_closed: int = 0
    engine_counters: dict[str, int] = field(default_factory=dict)


@dataclass
class _Snapshot:
    wall: float
    answered: int
    frontend_cpu: float
    frontend_loop_cpu: float
    worker_cpu: float
    loadgen_cpu: float
    frontend_wait: float
    worker_wait: float
    frames: int
    executions: int
    compute_s: float


def _snapshot(daemon: EngineDaemon, stats_client: Client, worker_pids: list[int], loadgen_pid: int,
              shared: Counters) -> _Snapshot:
    wall, answered = time.perf_counter(), shared[ANSWERED]  # frames that were run, shed ones not counted
    try:
        frontend, workers = cpu_seconds(daemon.pid), sum(cpu_seconds(pid) for pid in worker_pids)
        frontend_loop = cpu_seconds(daemon.pid, daemon.pid)
        loadgen = cpu_seconds(loadgen_pid)
    except FileNotFoundError as exc:
        daemon.check_alive()
        raise BenchError(f"a measured process is gone (a worker restarted?): {exc}\n{daemon.tail()}") from None
    frontend_wait, worker_wait = runq_wait_seconds(daemon.pid), sum(runq_wait_seconds(pid) for pid in worker_pids)
    stats = stats_client.stats()
    return _Snapshot(wall, answered, frontend, frontend_loop, workers, loadgen, frontend_wait, worker_wait,
                     stats["frames"], stats["executions"], stats["compute_s_total"])


def measure_engine(daemon: EngineDaemon, streams: int, window: int, warmup_s: float, seconds: float) -> EngineResult:
    shared = _CTX.Array("q", 3, lock=False)
    parent, child = _CTX.Pipe(duplex=False)
    loadgen = _CTX.Process(target=loadgen_main, args=(daemon.ipc, streams, window, shared, child),
                           name="loadgen", daemon=True)
    stats_client = Client(daemon.ipc, timeout=30)
    try:
        worker_pids = [int(w["pid"]) for w in stats_client.stats()["workers"]]
        loadgen.start()
        child.close()
        assert loadgen.pid is not None
        if not parent.poll(60) or parent.recv()[0] != "ready":
            daemon.check_alive()
            raise BenchError(f"load generator did not open its {streams} streams")
        time.sleep(warmup_s)
        before = _snapshot(daemon, stats_client, worker_pids, loadgen.pid, shared)
        stalled, last, until = 0, before.answered, before.wall + seconds
        while (now := time.perf_counter()) < until:
            time.sleep(min(0.5, until - now))
            daemon.check_alive()
            stalled += shared[ANSWERED] == last
            last = shared[ANSWERED]
        after = _snapshot(daemon, stats_client, worker_pids, loadgen.pid, shared)
        shared[STOP] = 1
        if not parent.poll(60):
            raise BenchError(f"load generator did not finish: sent {shared[SENT]}, "
                             f"answered {shared[ANSWERED]}\n{daemon.tail()}")
        _, report = parent.recv()
        if "failure" in report:
            raise BenchError(f"load generator failed: {report['failure']}\n{daemon.tail()}")
        counters = {k: int(v) for k, v in stats_client.stats()["counters"].items()}
    finally:
        stats_client.close()
        if loadgen.pid is not None:  # started
            loadgen.join(5)
            if loadgen.exitcode is None:
                loadgen.kill()
                loadgen.join()
            loadgen.close()
        parent.close()
        child.close()
    frames = max(after.answered - before.answered, 1)
    wall = after.wall - before.wall
    executions = after.executions - before.executions
    return EngineResult(
        workers=daemon.workers, streams=streams, window=window, seconds=round(wall, 3),
        frames_per_s=frames / wall,
        avg_batch=(after.frames - before.frames) / executions if executions else 0.0,
        frontend_cpu_us_per_frame=1e6 * (after.frontend_cpu - before.frontend_cpu) / frames,
        frontend_loop_us_per_frame=1e6 * (after.frontend_loop_cpu - before.frontend_loop_cpu) / frames,
        frontend_cores=(after.frontend_cpu - before.frontend_cpu) / wall,
        worker_cpu_us_per_frame=1e6 * (after.worker_cpu - before.worker_cpu) / frames,
        worker_compute_us_per_frame=1e6 * (after.compute_s - before.compute_s) / max(after.frames - before.frames, 1),
        loadgen_cpu_us_per_frame=1e6 * (after.loadgen_cpu - before.loadgen_cpu) / frames,
        loadgen_cores=(after.loadgen_cpu - before.loadgen_cpu) / wall,
        frontend_runq_wait_share=(after.frontend_wait - before.frontend_wait) / wall,
        worker_runq_wait_share=(after.worker_wait - before.worker_wait) / wall / daemon.workers,
        stalled_intervals=stalled, sent=report["sent"], answered=report["answered"], shed=report["shed"],
        lost=report["lost"], out_of_order=report["out_of_order"], errors=report["errors"],
        streams_closed=report["streams_closed"], engine_counters=counters)
