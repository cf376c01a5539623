"""`ringserve tune`: find the engine configuration that serves the most real-time streams here.

    ringserve tune [--budget-ms 32] [--quick] [--out ringserve.toml] [--shape device|gateway]
                   [--json FILE] [--plot FILE.png] [--max-evals N]

Every configuration tried is a real daemon (``spawn_engine``) measured by the replay bench
(``find_capacity``): its real-time capacity (the most live streams whose p99 result latency
stays within the budget) and its saturation throughput. While the bench drives it, a sampler
reads the engine's STATS and /proc every 0.5 s; the busiest 2 s window says what limits the
configuration (cores, the front-end, the model, or the latency budget).

The search, driven by one measurement function (so the tests can drive it over a known
landscape):

1. workers, the dominant knob, coarse to fine over 1 .. cores+1: a coarse grid (1, cores,
   cores+1 and a few between), then the midpoints around the best until its neighbours are
   measured. On a 2-core machine that is simply 1, 2 and 3.
2. hill climbing from the best worker count over the other ServeConfig knobs that move
   throughput or latency (max_batch, batch_delay_us, spin_us, intra_op_threads, then workers
   again): one grid step at a time, keep going while it improves by more than the noise
   margin, until a pass moves nothing or the evaluation budget is spent.
3. a same-run final: the best two, the default and the worst configuration are measured
   again, interleaved (A B D W, then W D B A, ...), so that drift on a shared machine hits
   them all alike; the recommendation is the best of that final comparison.

The chosen configuration is written as TOML: a ``[serve]`` table (workers plus every key that
differs from the defaults) that ``ringserve serve --config FILE`` reads, and a ``[tune]``
table with what was measured, which ``serve`` ignores. ``ringserve serve --workers auto`` takes
``workers`` from ``./ringserve.toml`` (or ``$RINGSERVE_TUNED``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import inspect
import itertools
import json
import math
import os
import signal
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from engine.config import ServeConfig

FRAMES_PER_STREAM_S = 16000 / 512  # 31.25 frames/s: one 512-sample frame per 32 ms at 16 kHz
TUNED_KEYS = ("workers", "intra_op_threads", "max_batch", "batch_delay_us", "spin_us")


# ---- configurations --------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Knobs:
    """One engine configuration: the ServeConfig settings the tuner varies."""

    workers: int
    intra_op_threads: int
    max_batch: int
    batch_delay_us: int
    spin_us: int

    @classmethod
    def default(cls) -> Knobs:
        """What `ringserve serve` runs with no settings on this machine."""
        cfg = ServeConfig()
        return cls(**{key: getattr(cfg, key) for key in TUNED_KEYS})

    def changes(self) -> dict[str, int]:
        """The settings that differ from ServeConfig's defaults."""
        default = self.default()
        return {key: getattr(self, key) for key in TUNED_KEYS if getattr(self, key) != getattr(default, key)}

    def serve_args(self) -> tuple[str, ...]:
        """`serve` flags for every setting but workers that differs from the defaults."""
        args: list[str] = []
        for key, value in self.changes().items():
            if key != "workers":
                args += ["--" + key.replace("_", "-"), str(value)]
        return tuple(args)

    def label(self) -> str:
        rest = " ".join(f"{key}={value}" for key, value in self.changes().items() if key != "workers")
        return f"workers={self.workers}" + (f" {rest}" if rest else "") + (" (default)" if self == self.default()
                                                                             else "")


def knob_grid(cores: int, default: Knobs) -> dict[str, tuple[int, ...]]:
    """The values the climb steps through, per knob, in order; the defaults are always in."""
    grid = {
        "workers": tuple(range(1, cores + 2)),
        "intra_op_threads": tuple(sorted({1, 2, *(t for t in (4, 8) if t <= cores)})),
        "max_batch": (16, 32, 64, 128, 256, 512, 1024, 2048),
        "batch_delay_us": (0, 200, 500, 1000, 2000, 4000),
        "spin_us": (0, 20, 50, 200, 1000),
    }
    return {key: tuple(sorted({*values, getattr(default, key)})) for key, values in grid.items()}


# ---- measurements ----------------------------------------------------------------------

@dataclass
class Diagnostics:
    """The engine in its busiest sampled window (>= 2 s) of one evaluation."""

    window_s: float
    frames_per_s: float
    busy_share: list[float]  # per worker: busy time / wall time (STATS busy_s, else /proc CPU)
    avg_batch: float
    queue_ms_per_frame: float  # mean time a frame waited in its worker's ring
    compute_us_per_frame: float  # batched model time per frame (the workers' own timing)
    frontend_cores: float  # the daemon's main process (poll loop + ZeroMQ I/O): CPU s per wall s
    worker_cores: float  # all workers together
    machine_busy: float  # /proc/stat: share of all cores busy (load generator and neighbours included)
    bench_cores: float = 0.0  # the tuner and its load generators
    machine_cores: float = 0.0  # machine_busy in cores

    @property
    def other_cores(self) -> float:
        """CPU used by neither the engine nor the bench: other people's work on a shared machine."""
        return max(self.machine_cores - self.frontend_cores - self.worker_cores - self.bench_cores, 0.0)

    @property
    def mean_busy(self) -> float:
        return sum(self.busy_share) / len(self.busy_share) if self.busy_share else 0.0


@dataclass
class Measurement:
    knobs: Knobs
    phase: str  # "workers", "climb" or "final"
    capacity_streams: int
    saturation_fps: float
    p99_ms: float | None = None
    seconds: float = 0.0  # wall time of the whole evaluation, daemon start included
    loadavg: float = 0.0  # 1-minute load average when it finished
    diag: Diagnostics | None = None
    error: str | None = None
    round: int = 0  # final re-measure round
    detail: dict[str, Any] = field(default_factory=dict)  # the bench's own result (points, ...)

    def score(self) -> tuple[int, float]:
        return (self.capacity_streams, self.saturation_fps) if self.error is None else (-1, 0.0)


MeasureFn = Callable[[Knobs, str], Measurement]


# ---- the search ------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    quick: bool
    max_evals: int  # measurements while exploring (workers sweep + climb); the final comes on top
    climb_knobs: tuple[str, ...]
    final_rounds: int  # how often each finalist is measured again, interleaved
    time_budget_s: float | None = None  # stop exploring early to leave room for the final
    final_worst: bool = True  # the worst explored configuration is a finalist too
    margin: float = 0.02  # a move must beat the current best by more than this share


def make_plan(cores: int, quick: bool, max_evals: int | None = None, minutes: float | None = None) -> Plan:
    workers_points = min(cores + 1, 6)
    budget_s = None if minutes is None else 60.0 * minutes
    if quick:
        return Plan(quick=True, max_evals=max_evals or workers_points + 2, climb_knobs=("max_batch", "spin_us"),
                    final_rounds=1, time_budget_s=budget_s or 160.0, final_worst=False)
    return Plan(quick=False, max_evals=max_evals or workers_points + 10,
                climb_knobs=("max_batch", "batch_delay_us", "spin_us", "intra_op_threads", "workers"),
                final_rounds=2, time_budget_s=budget_s)


@dataclass
class TuneResult:
    cores: int
    plan: Plan
    measurements: list[Measurement]  # every evaluation, in the order it ran
    explored: dict[Knobs, Measurement]  # first measurement of each configuration
    final: dict[Knobs, list[Measurement]]  # the same-run re-measures
    final_order: list[Knobs]
    recommended: Knobs
    default: Knobs
    worst: Knobs
    note: str = ""  # why the recommendation is not simply the final's best
    stopped_by: str = ""  # what ended the exploration, when a budget did

    def final_score(self, knobs: Knobs) -> tuple[float, float]:
        runs = [m for m in self.final.get(knobs, []) if m.error is None]
        if not runs:
            return (-1.0, 0.0)
        return (sum(m.capacity_streams for m in runs) / len(runs), sum(m.saturation_fps for m in runs) / len(runs))

    def ranked(self) -> list[Measurement]:
        """Every configuration explored, best first by its exploration measurement."""
        return sorted(self.explored.values(), key=lambda m: m.score(), reverse=True)

    def finalists(self) -> list[Knobs]:
        return sorted(self.final, key=self.final_score, reverse=True)

    def spread(self) -> float | None:
        """Run-to-run noise of this run: for every configuration measured more than once, the
        spread of its capacities as a share of the largest; the median over them."""
        spreads = []
        for knobs, runs in self.final.items():
            values = [m.capacity_streams for m in runs if m.error is None]
            first = self.explored.get(knobs)
            if first is not None and first.error is None:
                values.append(first.capacity_streams)
            if len(values) >= 2 and max(values) > 0:
                spreads.append((max(values) - min(values)) / max(values))
        return sorted(spreads)[len(spreads) // 2] if spreads else None


class Tuner:
    """Coarse-to-fine over workers, hill climbing over the rest, a same-run final.

    ``measure(knobs, phase)`` does one evaluation; everything else here is bookkeeping, so the
    search can be tested over a known landscape.
    """

    def __init__(self, measure: MeasureFn, cores: int, plan: Plan,
                 on_result: Callable[[Measurement, int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, default: Knobs | None = None) -> None:
        self.measure = measure
        self.cores = cores
        self.plan = plan
        self.default = Knobs.default() if default is None else default
        self.grid = knob_grid(cores, self.default)
        self.on_result = on_result
        self.clock = clock
        self.measurements: list[Measurement] = []
        self.explored: dict[Knobs, Measurement] = {}
        self.evals = 0
        self.stopped_by = ""  # what ended the exploration early, if anything did
        self.started = clock()

    # -- budget
    def _final_size(self) -> int:
        return min(4 if self.plan.final_worst else 3, max(len(self.explored), 1)) * self.plan.final_rounds

    def _can_explore(self) -> bool:
        if self.evals >= self.plan.max_evals:
            self.stopped_by = self.stopped_by or f"the evaluation budget ({self.plan.max_evals})"
            return False
        if self.plan.time_budget_s is not None and self.measurements:
            per_eval = (self.clock() - self.started) / len(self.measurements)
            if self.clock() - self.started + per_eval * (1 + self._final_size()) > self.plan.time_budget_s:
                self.stopped_by = self.stopped_by or (
                    f"the time budget ({self.plan.time_budget_s:.0f} s at {per_eval:.0f} s per evaluation, "
                    f"the final included)")
                return False
        return True

    def _run(self, knobs: Knobs, phase: str, round_: int = 0) -> Measurement:
        m = self.measure(knobs, phase)
        m.phase, m.round = phase, round_
        self.measurements.append(m)
        if self.on_result is not None:
            self.on_result(m, len(self.measurements))
        return m

    def _explore(self, knobs: Knobs, phase: str) -> Measurement | None:
        """The configuration's measurement: cached, new, or None once the budget is spent."""
        if knobs in self.explored:
            return self.explored[knobs]
        if not self._can_explore():
            return None
        self.evals += 1
        m = self._run(knobs, phase)
        self.explored[knobs] = m
        return m

    def _better(self, a: Measurement, b: Measurement) -> bool:
        if a.error is not None:
            return False
        if b.error is not None:
            return True
        margin = 1 + self.plan.margin
        return (a.capacity_streams > b.capacity_streams * margin
                or (a.capacity_streams >= b.capacity_streams and a.saturation_fps > b.saturation_fps * margin))

    def _best(self) -> Measurement:
        return max(self.explored.values(), key=lambda m: m.score())

    # -- phase 1: workers, coarse to fine
    def coarse_workers(self) -> list[int]:
        top = self.cores + 1
        if top <= 4:
            points = set(range(1, top + 1))
        else:
            points = {1, self.cores, top, *(round(1 + (top - 1) * k / 4) for k in (1, 2, 3))}
        first = [self.default.workers] if self.default.workers in points else []
        return first + sorted(points - set(first))

    def sweep_workers(self) -> None:
        base = self.default
        for w in self.coarse_workers():
            if self._explore(replace(base, workers=w), "workers") is None:
                return
        while True:
            tried = sorted(k.workers for k in self.explored if replace(k, workers=base.workers) == base)
            best = max((self.explored[replace(base, workers=w)] for w in tried), key=lambda m: m.score())
            w, i = best.knobs.workers, tried.index(best.knobs.workers)
            mids = []
            if i > 0 and w - tried[i - 1] > 1:
                mids.append((w + tried[i - 1]) // 2)
            if i + 1 < len(tried) and tried[i + 1] - w > 1:
                mids.append((w + tried[i + 1] + 1) // 2)
            if not mids:
                return
            for mid in mids:
                if self._explore(replace(base, workers=mid), "workers") is None:
                    return

    # -- phase 2: hill climbing
    def climb(self) -> None:
        current = self._best()
        while True:
            moved_any = False
            for knob in self.plan.climb_knobs:
                moved, current, spent = self._climb_knob(knob, current)
                moved_any |= moved
                if spent:
                    return
            if not moved_any:
                return

    def _climb_knob(self, knob: str, current: Measurement) -> tuple[bool, Measurement, bool]:
        """(moved, new current, budget spent)."""
        values = self.grid[knob]
        for step in (1, -1):
            moved = False
            index = values.index(getattr(current.knobs, knob)) + step
            while 0 <= index < len(values):
                candidate = replace(current.knobs, **{knob: values[index]})
                m = self._explore(candidate, "climb")
                if m is None:
                    return moved, current, True
                if not self._better(m, current):
                    break
                current, moved = m, True
                index += step
            if moved:
                return True, current, False
        return False, current, False

    # -- phase 3: same-run final
    def finalists(self) -> list[Knobs]:
        ranked = sorted(self.explored.values(), key=lambda m: m.score(), reverse=True)
        picks = [m.knobs for m in ranked[:2]] + [self.default]
        if self.plan.final_worst:
            picks += [m.knobs for m in ranked[-1:]]
        return list(dict.fromkeys(picks))

    def final(self, finalists: list[Knobs]) -> tuple[dict[Knobs, list[Measurement]], list[Knobs]]:
        results: dict[Knobs, list[Measurement]] = {k: [] for k in finalists}
        order: list[Knobs] = []
        for round_ in range(self.plan.final_rounds):
            for knobs in (finalists if round_ % 2 == 0 else finalists[::-1]):
                order.append(knobs)
                results[knobs].append(self._run(knobs, "final", round_ + 1))
        return results, order

    def run(self) -> TuneResult:
        self.sweep_workers()
        if self.explored:
            self.climb()
        finalists = self.finalists()
        final, order = self.final(finalists)
        worst = min(self.explored.values(), key=lambda m: m.score()).knobs if self.explored else self.default
        result = TuneResult(self.cores, self.plan, self.measurements, self.explored, final, order,
                            recommended=self.default, default=self.default, worst=worst)
        ranked = result.finalists()
        if ranked and result.final_score(ranked[0])[0] >= 0:
            result.recommended = ranked[0]
        best, default, spread = result.final_score(ranked[0])[0], result.final_score(self.default)[0], result.spread()
        # Both as a share of the larger number: (best - default) / best against the spread.
        if (result.recommended != self.default and best > 0 and spread is not None
                and (best - default) / best <= spread):
            result.note = (f"the final's best, {ranked[0].label()}, beat the default by {_pct(best, default)} "
                           f"({(best - default) / best:.0%} of its capacity), within this run's run-to-run spread "
                           f"({spread:.0%}): keeping the default")
            result.recommended = self.default
        result.stopped_by = self.stopped_by
        return result


# ---- what limits a configuration -------------------------------------------------------

def diagnose(m: Measurement, cores: int) -> tuple[str, str]:
    """(limit, why): cores, front-end, model or latency budget, from STATS and /proc."""
    d = m.diag
    if d is None:
        return "unknown", "no engine STATS were sampled during the measurement"
    busy = d.mean_busy
    engine_cores = d.frontend_cores + d.worker_cores
    numbers = (f"At its busiest ({d.frames_per_s:.0f} frames/s): workers busy {busy:.0%} "
               f"(avg batch {d.avg_batch:.1f}, {d.compute_us_per_frame:.0f} us compute and "
               f"{d.queue_ms_per_frame:.2f} ms queueing per frame); CPU in cores: front-end {d.frontend_cores:.2f}, "
               f"workers {d.worker_cores:.2f}, load generator {d.bench_cores:.2f}, other work "
               f"{d.other_cores:.2f}; machine {d.machine_busy:.0%} busy")
    if d.frontend_cores >= 0.85:
        return "front-end", (f"the front-end: the daemon's single poll loop used ~1 core "
                             f"({d.frontend_cores:.2f}); more workers cannot help. {numbers}")
    if d.machine_busy >= 0.85 or engine_cores >= 0.85 * cores:
        shared = (f" -- {d.other_cores:.2f} of them taken by other work on this machine"
                  if d.other_cores >= 0.25 * cores else "")
        return "cores", (f"the cores: all {cores} were busy{shared}; more workers would only share the same "
                         f"cores. {numbers}")
    if busy >= 0.85:
        return "model", (f"the model: every worker was busy ~all the time ({busy:.0%}) running "
                         f"{d.compute_us_per_frame:.0f} us of compute per frame. {numbers}")
    return "latency budget", (f"the latency budget: the p99 crossed the budget before any CPU resource "
                              f"saturated (queueing {d.queue_ms_per_frame:.2f} ms per frame). {numbers}")


# ---- live engine sampler ---------------------------------------------------------------

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


# ---- the bench API (bench.replay) ------------------------------------------------------

@dataclass(frozen=True)
class BenchApi:
    """The replay bench's entry points, behind one adapter so the tuner does not care where
    they live: ``spawn_engine(workers, extra_args)`` is a context manager yielding an endpoint,
    ``find_capacity(endpoint, *, shape, budget_ms, audio_dir, quick, ...)`` measures it, and
    ``load_fleet(audio_dir)`` (optional) holds the load-generator processes across calls."""

    source: str
    spawn_engine: Callable[[int, tuple[str, ...]], AbstractContextManager[str]]
    find_capacity: Callable[..., Any]
    load_fleet: Callable[[Path | None], AbstractContextManager[Any]] | None = None
    measure_point: Callable[..., Any] | None = None  # for the saturation point (max pace)
    quick_settings: Any = None  # measure_point's settings in quick mode


def bench_api() -> BenchApi:
    replay = importlib.import_module("bench.replay")
    return BenchApi("bench.replay", replay.spawn_engine, replay.find_capacity, getattr(replay, "LoadFleet", None),
                    getattr(replay, "measure_point", None), getattr(replay, "QUICK", None))


class EngineMeasure:
    """One evaluation per call: a fresh daemon with these knobs (``spawn_engine``), its
    real-time capacity and saturation throughput (``find_capacity``), and the engine's STATS
    and /proc sampled meanwhile. A context manager: the load generators live across calls.

    The capacity search starts at 3/4 of the best capacity explored so far (never below 16),
    which saves the doubling steps from 16 without moving the answer: it still doubles until
    a point fails, then bisects. Saturation throughput is one more point at max pace (every
    stream keeps 2 chunks in flight; 48 streams per worker, at least 64), measured for a fixed
    2 s (quick) or 4 s after the warm-up: find_capacity's own real-time points cannot show
    it, since their offered load stops at 31.25 frames/s per stream.
    """

    def __init__(self, api: BenchApi, *, shape: str, budget_ms: float, quick: bool,
                 audio_dir: str | None = None, on_point: Callable[[str], None] | None = None,
                 max_streams: int | None = None) -> None:
        self.api = api
        self.max_streams = max_streams
        self.shape, self.budget_ms, self.quick = shape, budget_ms, quick
        self.audio_dir = Path(audio_dir) if audio_dir else None
        self.on_point = on_point
        self.accepts = set(inspect.signature(api.find_capacity).parameters)
        self.best_capacity = 0
        self._stack = contextlib.ExitStack()
        self.fleet: Any = None

    def __enter__(self) -> EngineMeasure:
        if self.api.load_fleet is not None and "fleet" in self.accepts:
            self.fleet = self._stack.enter_context(self.api.load_fleet(self.audio_dir))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _saturation(self, endpoint: str, knobs: Knobs, extra: dict[str, Any]) -> Any:
        if self.api.measure_point is None:
            return None
        settings: dict[str, Any] = {key: extra[key] for key in ("fleet", "progress") if key in extra}
        if self.quick and self.api.quick_settings is not None:
            settings["settings"] = self.api.quick_settings
        return self.api.measure_point(endpoint, max(64, 48 * knobs.workers), shape=self.shape, pace="max",
                                      budget_ms=self.budget_ms, duration_s=2.0 if self.quick else 4.0,
                                      audio_dir=self.audio_dir, **settings)

    def _bench_pids(self) -> list[int]:
        return [os.getpid(), *(self.fleet.pids() if self.fleet is not None and hasattr(self.fleet, "pids") else [])]

    def _progress(self, event: dict[str, Any]) -> None:
        if self.on_point is not None and event.get("event") == "point_start":
            pace = " at max pace (saturation)" if event.get("pace") == "max" else ""
            self.on_point(f"{event.get('streams')} streams{pace}")

    def __call__(self, knobs: Knobs, phase: str) -> Measurement:
        extra: dict[str, Any] = {}
        if self.fleet is not None:
            extra["fleet"] = self.fleet
        if "start_streams" in self.accepts and self.best_capacity >= 22:
            extra["start_streams"] = int(0.75 * self.best_capacity)
        if "progress" in self.accepts:
            extra["progress"] = self._progress
        if self.max_streams is not None:
            extra["max_streams"] = self.max_streams
        started = time.monotonic()
        try:
            with self.api.spawn_engine(knobs.workers, knobs.serve_args()) as endpoint, \
                    StatsSampler(endpoint, bench_pids=self._bench_pids) as sampler:
                cap = self.api.find_capacity(endpoint, shape=self.shape, budget_ms=self.budget_ms,
                                             audio_dir=self.audio_dir, quick=self.quick, **extra)
                saturation = self._saturation(endpoint, knobs, extra)
        except (RuntimeError, OSError, TimeoutError, ValueError) as exc:  # BenchError is a RuntimeError
            return Measurement(knobs, phase, 0, 0.0, seconds=time.monotonic() - started,
                               loadavg=os.getloadavg()[0], error=f"{type(exc).__name__}: {exc}"[:500])
        if phase != "final":
            self.best_capacity = max(self.best_capacity, int(cap.capacity_streams))
        p99 = getattr(cap, "p99_ms_at_capacity", None)
        detail = {"capacity": cap.to_dict() if hasattr(cap, "to_dict") else {},
                  "saturation_point": saturation.to_dict() if hasattr(saturation, "to_dict") else None}
        saturation_fps = max(float(cap.saturation_fps), float(getattr(saturation, "achieved_fps", 0.0)))
        return Measurement(knobs, phase, int(cap.capacity_streams), saturation_fps,
                           p99_ms=None if p99 is None or not math.isfinite(p99) else float(p99),
                           seconds=time.monotonic() - started, loadavg=os.getloadavg()[0],
                           diag=sampler.diagnostics(), detail=_jsonable(detail))


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


# ---- progress, table, explanation ------------------------------------------------------

class Progress:
    """One line per finished evaluation; on a TTY also a live line for the one running."""

    def __init__(self, stream: TextIO = sys.stderr, live: bool | None = None) -> None:
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.started = time.monotonic()
        self._current: str | None = None
        self._detail = ""
        self._since = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self.live:
            self._ticker = threading.Thread(target=self._tick, name="tune-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(2)
        self._clear()

    def _clear(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self._current is not None:
                    detail = f", {self._detail}" if self._detail else ""
                    self.stream.write(f"\r\033[K  ... {self._current}: {time.monotonic() - self._since:.0f} s{detail}")
                    self.stream.flush()

    def stamp(self) -> str:
        elapsed = int(time.monotonic() - self.started)
        return f"{elapsed // 60:02d}:{elapsed % 60:02d}"

    def begin(self, knobs: Knobs, phase: str) -> None:
        with self._lock:
            self._current, self._since, self._detail = f"{phase} {knobs.label()}", time.monotonic(), ""

    def detail(self, text: str) -> None:
        """What the running evaluation is doing now (the live line shows it)."""
        with self._lock:
            self._detail = text

    def done(self, m: Measurement, index: int) -> None:
        with self._lock:
            self._current = None
            self._clear()
            self.stream.write(f"[{self.stamp()}] {index:>2} {m.phase:<7} {describe(m)}\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        with self._lock:
            self._clear()
            self.stream.write(f"[{self.stamp()}] {text}\n")
            self.stream.flush()


def describe(m: Measurement) -> str:
    if m.error is not None:
        return f"{m.knobs.label():<40} FAILED: {m.error}"
    p99 = "-" if m.p99_ms is None else f"{m.p99_ms:.1f}"
    round_ = f" round {m.round}" if m.phase == "final" else ""
    return (f"{m.knobs.label():<40} capacity {m.capacity_streams:>5} streams, saturation {m.saturation_fps:>7.0f} "
            f"frames/s, p99 {p99} ms ({m.seconds:.0f} s, load {m.loadavg:.1f}){round_}")


def _row(m: Measurement) -> str:
    k, d = m.knobs, m.diag
    p99 = "-" if m.p99_ms is None else f"{m.p99_ms:.1f}"
    diag = (f"{d.mean_busy:>5.0%} {d.avg_batch:>6.1f} {d.queue_ms_per_frame:>6.2f} {d.compute_us_per_frame:>6.0f} "
            f"{d.frontend_cores:>5.2f} {d.other_cores:>5.2f}" if d else f"{'':>5} {'':>6} {'':>6} {'':>6} {'':>5} {'':>5}")
    cap = "FAILED" if m.error else f"{m.capacity_streams}"
    return (f"{k.workers:>2} {k.intra_op_threads:>3} {k.max_batch:>5} {k.batch_delay_us:>6} {k.spin_us:>5} "
            f"{cap:>8} {m.saturation_fps:>8.0f} {p99:>6} {diag} {m.phase:>7}")


_HEAD = (f"{'W':>2} {'thr':>3} {'batch':>5} {'delay':>6} {'spin':>5} {'capacity':>8} {'sat fps':>8} {'p99ms':>6} "
         f"{'busy':>5} {'avgB':>6} {'q ms':>6} {'c us':>6} {'fe':>5} {'other':>5} {'phase':>7}")


def format_report(result: TuneResult, *, budget_ms: float, shape: str, loadavg: Sequence[float],
                  loadavg_before: Sequence[float] | None = None) -> str:
    title = f"every configuration tried, best first (capacity: streams in real time at p99 <= {budget_ms:g} ms, "
    lines = [title + f"shape {shape})", "  " + _HEAD]
    lines += ["  " + _row(m) for m in result.ranked()]
    lines += ["  W workers, thr intra-op threads, batch max_batch, delay batch_delay_us, spin spin_us;",
              "  at the busiest 2 s: busy = worker busy share, avgB = frames per batch, q ms = queueing and",
              "  c us = compute per frame, fe = front-end cores, other = cores used by neither the engine nor",
              "  the bench (other people's work on a shared machine)", ""]
    rounds = result.plan.final_rounds
    lines.append(f"same-run final ({rounds} interleaved round{'s' if rounds > 1 else ''}: "
                 + " ".join(_tag(result, k) for k in result.final_order) + ")")
    lines.append(f"  {'':<3} {'configuration':<44} {'capacity':>8} {'sat fps':>8}   per round (explored)")
    for knobs in result.finalists():
        cap, fps = result.final_score(knobs)
        runs = " ".join("FAILED" if m.error else str(m.capacity_streams) for m in result.final[knobs])
        first = result.explored.get(knobs)
        explored = f" ({first.capacity_streams})" if first is not None and first.error is None else ""
        lines.append(f"  {_tag(result, knobs):<3} {knobs.label():<44} {cap:>8.1f} {fps:>8.0f}   {runs}{explored}")
    best, default, worst = (result.final_score(k)[0] for k in (result.recommended, result.default, result.worst))
    spread = result.spread()
    lines.append("")
    lines.append(f"recommended: {result.recommended.label()}")
    if result.note:
        lines.append(f"  {result.note}")
    if best > 0:
        parts = [] if result.recommended == result.default else [f"the default's {default:.1f} ({_pct(best, default)})"]
        if result.worst != result.recommended and result.worst in result.final:
            parts.append(f"the worst explored's ({result.worst.label()}) {worst:.1f} ({_pct(best, worst)})")
        elif result.worst != result.recommended:
            parts.append(f"the worst explored's ({result.worst.label()}) "
                         f"{result.explored[result.worst].capacity_streams} (exploration only, not re-measured)")
        lines.append(f"  capacity {best:.1f} streams" + (" vs " + " and ".join(parts) if parts else "")
                     + ", measured in the same run")
    if spread is not None:
        verdict = ""
        if result.recommended != result.default and best > 0:
            verdict = f"; the margin over the default is {(best - default) / best:.0%} of the capacity: " + (
                "larger than that" if (best - default) / best > spread else "within it")
        lines.append(f"  run-to-run spread: a configuration measured twice in this run differed by {spread:.0%} "
                     f"of its capacity (median){verdict}")
    rec = result.final.get(result.recommended, []) + [result.explored[k] for k in (result.recommended,)
                                                      if k in result.explored]
    with_diag = [m for m in rec if m.diag is not None]
    if with_diag:
        why = diagnose(with_diag[0], result.cores)[1]
        lines.append(f"  limited by {why}")
    others = [m.diag.other_cores for m in result.measurements if m.diag is not None]
    if others and sum(others) / len(others) >= 0.25 * result.cores:
        lines.append(f"  WARNING: other work on this machine used {sum(others) / len(others):.2f} of {result.cores} "
                     f"cores on average during the tune: capacities are far below an idle machine's and the "
                     f"ranking is unreliable; tune again when the machine is quiet")
    if result.stopped_by:
        lines.append(f"  exploration stopped by {result.stopped_by}")
    before = f"{loadavg_before[0]:.2f} before, " if loadavg_before else ""
    lines.append(f"  {len(result.measurements)} measurements ({len(result.explored)} configurations, "
                 f"{sum(len(v) for v in result.final.values())} final), {result.cores} cores, "
                 f"load average {before}{loadavg[0]:.2f} {loadavg[1]:.2f} {loadavg[2]:.2f} after")
    return "\n".join(lines)


def _tag(result: TuneResult, knobs: Knobs) -> str:
    finalists = list(result.final)
    return "ABCDEFGH"[finalists.index(knobs)] if knobs in finalists else "?"


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.0f}%" if b > 0 else "n/a"


# ---- the tuned file --------------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is JSON-compatible for what we write
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "nan"
    return str(value)


def tuned_toml(knobs: Knobs, meta: dict[str, Any], keep: dict[str, Any] | None = None) -> str:
    """A `[serve]` table (workers, every tuned key that differs from the defaults, and the
    settings ``keep`` carries over from an existing file) and a `[tune]` table of metadata."""
    serve = {**(keep or {}), "workers": knobs.workers, **knobs.changes()}
    lines = ["# Written by `ringserve tune`. `ringserve serve --config THIS_FILE` reads [serve] (flags and",
             "# RINGSERVE_* variables override it); `ringserve serve --workers auto` takes its workers from",
             "# ./ringserve.toml or $RINGSERVE_TUNED. [tune] records what was measured; serve ignores it.",
             "", "[serve]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in serve.items()]
    lines += ["", "[tune]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in meta.items() if value is not None]
    return "\n".join(lines) + "\n"


def carried_settings(path: str) -> dict[str, Any]:
    """Settings of an existing file at ``path`` that the tuner does not own (bind, http, ...)."""
    from engine.settings import read_file

    if not os.path.isfile(path):
        return {}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in read_file(path).items()
            if key not in TUNED_KEYS}


def tune_meta(result: TuneResult, *, budget_ms: float, shape: str, quick: bool, source: str,
              loadavg: Sequence[float]) -> dict[str, Any]:
    import onnxruntime

    try:
        from bench.procinfo import source_version
    except ImportError:  # before the bench helpers were split out of engine_bench
        from bench.engine_bench import source_version

    best, default = result.final_score(result.recommended), result.final_score(result.default)
    rec = [m for m in result.final.get(result.recommended, []) if m.diag is not None]
    limit = diagnose(rec[0], result.cores)[0] if rec else "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine_cores": result.cores,
        "onnxruntime": onnxruntime.__version__,
        "ringserve_source": source_version(),
        "bench": source,
        "shape": shape,
        "budget_ms": float(budget_ms),
        "quick": quick,
        "capacity_streams": round(best[0], 1),
        "saturation_fps": round(best[1], 1),
        "default_capacity_streams": round(default[0], 1),
        "limited_by": limit,
        "run_to_run_spread": None if result.spread() is None else round(result.spread() or 0.0, 3),
        "configurations_tried": len(result.explored),
        "measurements": len(result.measurements),
        "load_average": [round(x, 2) for x in loadavg],
    }


# ---- JSON and plot ---------------------------------------------------------------------

def result_json(result: TuneResult, meta: dict[str, Any]) -> dict[str, Any]:
    def one(m: Measurement) -> dict[str, Any]:
        data = dataclasses.asdict(m)
        data["knobs"] = dataclasses.asdict(m.knobs)
        data["label"] = m.knobs.label()
        if m.diag is not None:
            data["limit"] = diagnose(m, result.cores)[0]
        return data

    return {
        "meta": meta,
        "plan": dataclasses.asdict(result.plan),
        "recommended": dataclasses.asdict(result.recommended),
        "note": result.note,
        "stopped_by": result.stopped_by,
        "default": dataclasses.asdict(result.default),
        "worst": dataclasses.asdict(result.worst),
        "measurements": [one(m) for m in result.measurements],
        "final": [{"knobs": dataclasses.asdict(k), "label": k.label(), "capacity_mean": result.final_score(k)[0],
                   "saturation_fps_mean": result.final_score(k)[1],
                   "capacity_per_round": [m.capacity_streams for m in result.final[k]]}
                  for k in result.finalists()],
        "final_order": [k.label() for k in result.final_order],
    }


# A 5x7 bitmap font for the plot's labels: each glyph is 7 rows of 5 bits.
_FONT = {
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12), "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14), "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31),
    "F": (31, 16, 16, 30, 16, 16, 16), "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14), "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17),
    "L": (16, 16, 16, 16, 16, 16, 31), "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14), "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13),
    "R": (30, 17, 17, 30, 20, 18, 17), "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14), "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10),
    "X": (17, 17, 10, 4, 10, 17, 17), "Y": (17, 17, 10, 4, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    " ": (0, 0, 0, 0, 0, 0, 0), ".": (0, 0, 0, 0, 0, 12, 12), "-": (0, 0, 0, 31, 0, 0, 0),
    "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8), "/": (1, 1, 2, 4, 8, 16, 16),
    "=": (0, 0, 31, 0, 31, 0, 0), ":": (0, 12, 12, 0, 12, 12, 0), ",": (0, 0, 0, 0, 12, 4, 8),
    "<": (2, 4, 8, 16, 8, 4, 2), ">": (8, 4, 2, 1, 2, 4, 8), "+": (0, 4, 4, 31, 4, 4, 0),
    "%": (24, 25, 2, 4, 8, 19, 3),
}


class Canvas:
    """Just enough raster drawing for one chart, written as an 8-bit RGB PNG with zlib."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (3 * width * height))

    def dot(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int]) -> None:
        for y in range(min(y0, y1), max(y0, y1) + 1):
            for x in range(min(x0, x1), max(x0, x1) + 1):
                self.dot(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], width: int = 1) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for s in range(steps + 1):
            x, y = round(x0 + (x1 - x0) * s / steps), round(y0 + (y1 - y0) * s / steps)
            self.rect(x - width // 2, y - width // 2, x + (width - 1) // 2, y + (width - 1) // 2, color)

    def text(self, x: int, y: int, text: str, color: tuple[int, int, int] = (0, 0, 0), scale: int = 2,
             vertical: bool = False) -> None:
        for n, char in enumerate(text.upper()):
            glyph = _FONT.get(char, _FONT[" "])
            for row, bits in enumerate(glyph):
                for col in range(5):
                    if bits >> (4 - col) & 1:
                        gx, gy = 6 * scale * n + col * scale, row * scale
                        if vertical:  # reads bottom to top
                            gx, gy = gy, -gx - scale + 1
                        self.rect(x + gx, y + gy, x + gx + scale - 1, y + gy + scale - 1, color)

    def text_width(self, text: str, scale: int = 2) -> int:
        return 6 * scale * len(text) - scale

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        stride = 3 * self.width
        raw = b"".join(b"\x00" + bytes(self.pixels[y * stride:(y + 1) * stride]) for y in range(self.height))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot_capacity(result: TuneResult, path: str, *, budget_ms: float) -> None:
    """Capacity against worker count: every exploration measurement (the workers sweep joined
    by a line), the same-run final re-measures as rings, the recommendation in red."""
    width, height, left, right, top, bottom = 760, 500, 90, 30, 70, 70
    canvas = Canvas(width, height)
    points = [m for m in result.measurements if m.error is None]
    max_w = max([result.cores + 1, *(m.knobs.workers for m in points)])
    max_cap = max([1, *(m.capacity_streams for m in points)])
    step = _nice_step(max_cap / 5)
    top_cap = step * math.ceil(max_cap / step)

    def xy(workers: float, capacity: float) -> tuple[int, int]:
        x = left + (workers - 0.5) / max_w * (width - left - right)
        y = height - bottom - capacity / top_cap * (height - top - bottom)
        return round(x), round(y)

    grey, black, blue, red, green = (200, 200, 200), (0, 0, 0), (40, 90, 200), (210, 40, 40), (40, 150, 60)
    for k in range(int(top_cap / step) + 1):
        y = xy(0.5, k * step)[1]
        canvas.line(left, y, width - right, y, grey)
        label = f"{k * step:g}"
        canvas.text(left - 8 - canvas.text_width(label), y - 7, label)
    for w in range(1, max_w + 1):
        x, y = xy(w, 0)
        canvas.line(x, y, x, y + 6, black)
        canvas.text(x - canvas.text_width(str(w)) // 2, y + 12, str(w))
    canvas.line(left, height - bottom, width - right, height - bottom, black, 2)
    canvas.line(left, top, left, height - bottom, black, 2)
    canvas.text(left + (width - left - right - canvas.text_width("WORKERS")) // 2, height - 28, "WORKERS")
    canvas.text(14, (height + canvas.text_width("CAPACITY (STREAMS)")) // 2, "CAPACITY (STREAMS)", vertical=True)
    canvas.text(left, 14, f"RINGSERVE TUNE: CAPACITY AT P99 <= {budget_ms:g} MS, {result.cores} CORES")
    default_rest = replace(result.default, workers=0)
    sweep = sorted((m for m in points if m.phase == "workers" and replace(m.knobs, workers=0) == default_rest),
                   key=lambda m: m.knobs.workers)
    for a, b in itertools.pairwise(sweep):
        canvas.line(*xy(a.knobs.workers, a.capacity_streams), *xy(b.knobs.workers, b.capacity_streams), blue, 2)
    for m in points:
        x, y = xy(m.knobs.workers + (0.12 if m.phase == "final" else 0), m.capacity_streams)
        color = red if m.knobs == result.recommended else (green if m.phase == "final" else blue)
        if m.phase == "final":
            for degrees in range(0, 360, 10):
                angle = math.radians(degrees)
                canvas.dot(round(x + 5 * math.cos(angle)), round(y + 5 * math.sin(angle)), color)
        else:
            canvas.rect(x - 3, y - 3, x + 3, y + 3, color)
    legend = [(blue, "EXPLORED"), (green, "FINAL RE-MEASURE"), (red, "RECOMMENDED")]
    x = left + 10
    for color, name in legend:
        canvas.rect(x, 40, x + 10, 50, color)
        canvas.text(x + 16, 38, name, color)
        x += 40 + canvas.text_width(name)
    with open(path, "wb") as fh:
        fh.write(canvas.png())


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return float(factor * magnitude)
    return float(10 * magnitude)


# ---- command line ----------------------------------------------------------------------

TUNE_HELP = __doc__


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="find the best engine configuration for this machine",
                       description=TUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-ms", type=float, default=32.0,
                   help="p99 result latency a stream may see and still count as real time (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="fewer knobs and evaluations, the bench's quick capacity search: < 3 min on 2 cores")
    p.add_argument("--out", default="ringserve.toml", metavar="FILE.toml",
                   help="where to write the chosen configuration (default %(default)s); '-' writes nothing")
    p.add_argument("--shape", choices=("device", "gateway"), default="device",
                   help="traffic shape the capacity is measured with (default %(default)s)")
    p.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also plot capacity against worker count")
    p.add_argument("--max-evals", type=int, metavar="N",
                   help="exploration evaluations before the final re-measure (default: quick 5, full 13 on 2 cores)")
    p.add_argument("--minutes", type=float, metavar="M",
                   help="time budget: stop exploring early enough that the final re-measure fits "
                        "(default: quick 2.67, full none)")
    p.add_argument("--audio-dir", metavar="DIR", help="audio the replay bench streams (default: its own)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    if args.budget_ms <= 0:
        print("ringserve tune: --budget-ms must be positive", file=sys.stderr)
        return 2
    if args.max_evals is not None and args.max_evals < 1:
        print("ringserve tune: --max-evals must be at least 1", file=sys.stderr)
        return 2
    if args.minutes is not None and args.minutes <= 0:
        print("ringserve tune: --minutes must be positive", file=sys.stderr)
        return 2
    try:
        api = bench_api()
    except ImportError as exc:
        print(f"ringserve tune: the replay bench is not available ({exc})", file=sys.stderr)
        return 1
    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwind through every finally: daemons and load generators stop

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    progress = Progress()
    try:
        with EngineMeasure(api, shape=args.shape, budget_ms=args.budget_ms, quick=args.quick,
                           audio_dir=args.audio_dir, on_point=progress.detail) as measure:
            return run_tune(args, measure, api.source, progress=progress)
    except KeyboardInterrupt:
        print("ringserve tune: interrupted; every daemon started was stopped; nothing written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_tune(args: argparse.Namespace, measure: MeasureFn, source: str, *, cores: int | None = None,
             default: Knobs | None = None, progress: Progress | None = None) -> int:
    """Search, report, write: everything `ringserve tune` does after choosing how to measure."""
    from engine.config import ConfigError

    keep: dict[str, Any] = {}
    if args.out != "-":
        try:
            keep = carried_settings(args.out)
        except ConfigError as exc:
            print(f"ringserve tune: will not overwrite {args.out}: {exc}", file=sys.stderr)
            return 2
    cores = cores or os.cpu_count() or 1
    plan = make_plan(cores, args.quick, args.max_evals, getattr(args, "minutes", None))
    loadavg_before = os.getloadavg()
    with progress or Progress() as shown:
        def measure_with_progress(knobs: Knobs, phase: str) -> Measurement:
            shown.begin(knobs, phase)
            return measure(knobs, phase)

        shown.note(f"tuning on {cores} cores, load average {loadavg_before[0]:.2f}; "
                   f"{'quick' if plan.quick else 'full'}: up to {plan.max_evals} configurations, then "
                   f"{plan.final_rounds} interleaved final round(s); shape {args.shape}, "
                   f"p99 budget {args.budget_ms:g} ms; measuring with {source}")
        result = Tuner(measure_with_progress, cores, plan, on_result=shown.done, default=default).run()
    loadavg = os.getloadavg()
    print(format_report(result, budget_ms=args.budget_ms, shape=args.shape, loadavg=loadavg,
                        loadavg_before=loadavg_before))
    if result.final_score(result.recommended)[0] <= 0:
        print("ringserve tune: no configuration was measured successfully; nothing written", file=sys.stderr)
        return 1
    meta = tune_meta(result, budget_ms=args.budget_ms, shape=args.shape, quick=args.quick, source=source,
                     loadavg=loadavg)
    if args.out != "-":
        with open(args.out, "w") as fh:
            fh.write(tuned_toml(result.recommended, meta, keep))
        print(f"wrote {args.out}: `ringserve serve --config {args.out}` (or `--workers auto` from this directory)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result_json(result, meta), fh, indent=2)
    if args.plot:
        plot_capacity(result, args.plot, budget_ms=args.budget_ms)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune")
    sub = parser.add_subparsers(dest="command", required=True)
    add_tune_parser(sub)
    args = parser.parse_args(["tune", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
