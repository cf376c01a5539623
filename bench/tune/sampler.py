"""Samples a running engine: its STATS, the daemon's and workers' /proc CPU, /proc/stat."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.tune.model import Diagnostics

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class _Sample:
    t: float
    frames: int
    executions: int
    compute_s: float
    queue_s: float
    busy_s: list[float] | None
    frontend_cpu: float
    worker_cpu: list[float]
    machine_busy: float  # cumulative busy jiffies, all cores
    machine_total: float
    bench_cpu: dict[int, float] = field(default_factory=dict)  # per pid


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _machine_jiffies() -> tuple[float, float]:
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    total = float(sum(values[:8]))  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - values[3] - values[4], total


def request_stats(endpoint: str, timeout: float = 5.0) -> dict[str, Any]:
    """One STATS round trip over a private DEALER socket (thread-safe: nothing shared)."""
    import zmq

    from transport import protocol as P

    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(P.header(P.MsgType.STATS, 7))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                break
            msg = sock.recv()
            if P.parse_header(msg) == (P.MsgType.STATS_REPLY, 7):
                value: dict[str, Any] = json.loads(msg[P.HEADER.size:])
                return value
        raise TimeoutError(f"no STATS reply from {endpoint} within {timeout} s")
    finally:
        sock.close(0)


class StatsSampler:
    """Samples the engine's STATS, the daemon's and workers' /proc CPU and /proc/stat."""

    def __init__(self, endpoint: str, interval: float = 0.5,
                 bench_pids: Callable[[], Sequence[int]] | None = None) -> None:
        self.endpoint = endpoint
        self.bench_pids = bench_pids or (lambda: [os.getpid()])
        self.interval = interval
        self.samples: list[_Sample] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tune-sampler", daemon=True)

    def __enter__(self) -> StatsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._sample())
            except (OSError, TimeoutError, ValueError, KeyError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"  # a worker restarting, a slow reply: skip
            self._stop.wait(self.interval)

    def _sample(self) -> _Sample:
        stats = request_stats(self.endpoint)
        t = time.monotonic()
        workers = stats["workers"]
        busy = [float(w["busy_s"]) for w in workers] if all("busy_s" in w for w in workers) else None
        machine_busy, machine_total = _machine_jiffies()
        bench = {}
        for pid in self.bench_pids():
            with contextlib.suppress(OSError, ValueError, IndexError):
                bench[pid] = _proc_cpu(pid)
        return _Sample(t, int(stats["frames"]), int(stats["executions"]), float(stats["compute_s_total"]),
                       float(stats["queue_s_total"]), busy, _proc_cpu(int(stats["pid"])),
                       [_proc_cpu(int(w["pid"])) for w in workers], machine_busy, machine_total, bench)

    def diagnostics(self, window_s: float = 2.0) -> Diagnostics | None:
        return busiest_window(self.samples, window_s)


def busiest_window(samples: Sequence[_Sample], window_s: float = 2.0) -> Diagnostics | None:
    best: tuple[float, _Sample, _Sample] | None = None
    for i, a in enumerate(samples):
        for b in samples[i + 1:]:
            if b.t - a.t >= window_s:
                if len(b.worker_cpu) == len(a.worker_cpu):
                    rate = (b.frames - a.frames) / (b.t - a.t)
                    if best is None or rate > best[0]:
                        best = (rate, a, b)
                break
    if best is None:
        return None
    rate, a, b = best
    wall = b.t - a.t
    frames = max(b.frames - a.frames, 1)
    executions = b.executions - a.executions
    if a.busy_s is not None and b.busy_s is not None:
        busy = [(y - x) / wall for x, y in zip(a.busy_s, b.busy_s)]
    else:
        busy = [(y - x) / wall for x, y in zip(a.worker_cpu, b.worker_cpu)]
    total = b.machine_total - a.machine_total
    cores = os.cpu_count() or 1
    machine_busy = (b.machine_busy - a.machine_busy) / total if total > 0 else 0.0
    bench = sum(b.bench_cpu[pid] - a.bench_cpu[pid] for pid in a.bench_cpu if pid in b.bench_cpu) / wall
    return Diagnostics(
        window_s=round(wall, 3), frames_per_s=rate, busy_share=[round(min(x, 1.0), 3) for x in busy],
        avg_batch=(b.frames - a.frames) / executions if executions else 0.0,
        queue_ms_per_frame=1e3 * (b.queue_s - a.queue_s) / frames,
        compute_us_per_frame=1e6 * (b.compute_s - a.compute_s) / frames,
        frontend_cores=(b.frontend_cpu - a.frontend_cpu) / wall,
        worker_cores=(sum(b.worker_cpu) - sum(a.worker_cpu)) / wall,
        machine_busy=machine_busy, bench_cores=bench, machine_cores=machine_busy * cores)
