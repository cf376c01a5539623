"""Multi-mic replay bench: how many real-time microphones does a box hold?

This module is the bench's stable Python API (``ringserve bench`` is its command line, in
bench/cli.py; bench/tune/ builds on it). Everything returns plain dataclasses whose
``to_dict()`` is JSON-ready.

    from bench.replay import spawn_engine, raw_fps, measure_point, find_capacity

    with spawn_engine(2, ["--max-batch", "256"]) as endpoint:
        cap = find_capacity(endpoint, shape="device", quick=True)   # ~20 s on 2 cores
        print(cap.capacity_streams, cap.saturation_fps, cap.p99_ms_at_capacity)
        point = measure_point(endpoint, 100, shape="gateway", pace="realtime")
        print(point.p99_ms, point.lost, point.passed)
    ceiling = raw_fps(2, 3.0)       # frames/s; ceiling / 31.25 = microphones it would hold

API (keyword arguments after ``*`` may grow, never change meaning):

``spawn_engine(workers: int, extra_args: Sequence[str] = (), *, transport="tcp")``
    context manager: `ringserve serve --workers W *extra_args` in a child process, stopped on
    exit; yields its endpoint (loopback TCP by default).
``raw_fps(workers: int, seconds: float, batch: int = 256) -> float``
    the raw onnxruntime ceiling: W processes running the model batched, in-process.
``measure_point(endpoint, streams, *, target="ringserve", shape="device", pace="realtime",
               budget_ms=32.0, duration_s=None, settings=None, audio_dir=None, fleet=None, ...)
               -> PointResult``
    replay ``streams`` microphones until the point is stable (``settings``: window length,
    windows that must agree, max duration) or for exactly ``duration_s`` after warm-up.
``find_capacity(endpoint, *, shape="device", budget_ms=32.0, audio_dir=None, quick=False,
                max_streams=None, target="ringserve", settings=None, fleet=None, ...)
                -> CapacityResult``
    the largest N whose point passes (p99 <= budget, nothing lost, achieved frames/s >= 98 %
    of 31.25 * N): N doubles from ``start_streams`` until a point fails, then bisects.
    ``quick=True`` uses short windows and a coarse resolution (~20 s on 2 cores).
``QuietGate(max_others_pct=30, wait_s=300, sample_s=2, retries=2)``
    pass as ``quiet=`` to :func:`find_capacity` on a shared machine: measure only while other
    tenants are quiet, and measure again a point that failed while they were not.
``LoadFleet(audio_dir=None, max_procs=None, nice=0)``
    the load-generator processes; pass one as ``fleet=`` to reuse them across calls
    (otherwise each call starts and stops its own; ``audio_dir`` of a call is then ignored:
    the fleet's audio is used). Use it as a context manager.

``target="per-frame"`` drives the per-frame baseline server (bench/per_frame_server.py,
device shape only) instead of ringserve. The endpoint is a ZeroMQ endpoint of a running
daemon (or of one :func:`spawn_engine` started), or ``tcp://HOST:PORT`` of a per-frame server.

Definitions (see docs/benchmarks.md): a *frame* is 512 samples at 16 kHz = 32 ms; each
stream needs 31.25 frames/s. Latency runs from the moment a chunk's message leaves the load
process (its last sample leaves the client) to the moment its result arrives there,
matched by (stream id, chunk_seq). A point is *stable* when its last ``stable_windows``
windows agree within ``stability`` (10 %) of their mean in achieved frames/s and in p99
latency (latency also within ``latency_abs_tol_ms``, default 5 % of the budget; a closed
loop, ``pace="max"``, only in frames/s). A real-time point that loses a frame, or whose p99
exceeds twice the budget (or that falls under 90 % of the needed frames/s) in two windows
in a row, stops early: it has failed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.daemon import BenchError, EngineDaemon, spawn_engine
from bench.fleet import LoadFleet, auto_load_procs
from bench.point import measure_point
from bench.point_figures import agree as _agree
from bench.probe import StatsClient as _StatsClient
from bench.procinfo import autogroup_enabled, machine_cpu_seconds
from bench.raw import raw_fps
from bench.results import FRAMES_PER_S, FULL, QUICK, CapacityResult, PointResult, PointSettings
from bench.results import jsonable as _jsonable

# This module holds the capacity search and the quiet gate; the rest of the API lives in
# small modules (results, fleet, probe, point, point_figures) and is importable from here.
__all__ = ["BenchError", "CapacityResult", "EngineDaemon", "LoadFleet", "PointResult", "PointSettings", "QuietGate",
           "FULL", "QUICK", "find_capacity", "measure_point", "raw_fps", "spawn_engine", "FRAMES_PER_S"]
# Importable from here too, as before the split (bench/soak.py and the tests use them).
__all__ += ["auto_load_procs", "_agree", "_jsonable", "_StatsClient"]


# ---- a noisy, shared machine -------------------------------------------------------------------

@dataclass(frozen=True)
class QuietGate:
    """Measure only while other tenants leave the machine alone: before each point wait (up to
    ``wait_s``) until the whole machine's busy CPU plus hypervisor steal, over ``sample_s``,
    is at most ``max_others_pct`` (% of one core; the bench's own processes are idle between
    points), and measure a failed point again (up to ``retries`` times) when other tenants
    and steal took more than that during it. The pass criteria never change; a point measured
    again keeps its first measurement in the results, marked ``superseded``."""

    max_others_pct: float = 30.0
    wait_s: float = 300.0
    sample_s: float = 2.0
    retries: int = 2


def machine_noise_pct(sample_s: float) -> float | None:
    """Busy CPU of every process on the machine plus steal over ``sample_s``, % of one core;
    processes with a positive niceness are left out (they yield to anything else that runs)
    unless the kernel groups processes by session (autogroup), where they do not yield."""
    before = machine_cpu_seconds()
    time.sleep(sample_s)
    after = machine_cpu_seconds()
    if before is None or after is None:
        return None
    busy, steal, niced = (a - b for a, b in zip(after, before))
    return 100.0 * (busy - (0.0 if autogroup_enabled() else niced) + steal) / sample_s


def wait_for_quiet(gate: QuietGate, say: Callable[[str], None] | None = None) -> float | None:
    """Block until the machine is quiet enough for ``gate`` (or ``gate.wait_s`` passed);
    returns the last reading (% of one core)."""
    deadline = time.monotonic() + gate.wait_s
    noise = machine_noise_pct(gate.sample_s)
    told = False
    while noise is not None and noise > gate.max_others_pct and time.monotonic() < deadline:
        if say is not None and not told:
            say(f"waiting for a quieter machine: other tenants + steal at {noise:.0f} % of a core "
                f"(gate {gate.max_others_pct:g} %, up to {gate.wait_s:.0f} s)")
            told = True
        noise = machine_noise_pct(gate.sample_s)
    return noise


def point_noise_pct(point: PointResult) -> float:
    """Other tenants (niced ones left out) + steal during a point, % of one core."""
    cpu = point.cpu
    others = float(cpu.get("others_pct", 0.0) or 0.0)
    if cpu.get("niced_pct") is not None and not autogroup_enabled():
        others = max(0.0, others - float(cpu["niced_pct"]))  # our own processes may be niced too: approximate
    return others + float(cpu.get("steal_pct", 0.0) or 0.0)


def measure_gated(gate: QuietGate | None, measure: Callable[[], PointResult],
                  say: Callable[[str], None] | None = None) -> list[PointResult]:
    """``measure()`` behind ``gate``: every measurement made, the one that counts last."""
    if gate is None:
        return [measure()]
    results: list[PointResult] = []
    for attempt in range(gate.retries + 1):
        noise_before = wait_for_quiet(gate, say)
        point = measure()
        point.noise_before_pct = noise_before
        results.append(point)
        noise = point_noise_pct(point)
        if point.passed or noise <= gate.max_others_pct or attempt == gate.retries:
            break
        point.superseded = True
        point.warnings.append(f"measured again: other tenants + steal took {noise:.0f} % of a core during it")
        if say is not None:
            say(f"N={point.streams} failed while other tenants + steal took {noise:.0f} % of a core: measuring again")
    return results


# ---- capacity search -------------------------------------------------------------------------

def find_capacity(endpoint: str, *, shape: str = "device", budget_ms: float = 32.0, audio_dir: Path | None = None,
                  quick: bool = False, max_streams: int | None = None, target: str = "ringserve",
                  pace: str = "realtime", start_streams: int | None = None, settings: PointSettings | None = None,
                  resolution: float | None = None, fleet: LoadFleet | None = None,
                  curve: tuple[str, str] | None = None, pids: dict[str, list[int]] | None = None,
                  progress: Callable[[dict[str, Any]], None] | None = None,
                  alive: Callable[[], None] | None = None, quiet: QuietGate | None = None,
                  say: Callable[[str], None] | None = None) -> CapacityResult:
    """The largest number of real-time microphones whose point passes (p99 <= budget, nothing
    lost, >= 98 % of the needed frames/s): start at ``start_streams`` (16; 32 quick), double
    until a point fails (or ``max_streams``, default 4096, passes), then bisect until the
    bracket is within ``resolution`` (5 % of the capacity, at least 2 streams; 12.5 % quick).
    ``quiet``: measure behind a :class:`QuietGate` (a shared, noisy machine)."""
    s = settings or (QUICK if quick else FULL)
    res = resolution if resolution is not None else (0.125 if quick else 0.05)
    top = max_streams or 4096
    n = min(start_streams or (32 if quick else 16), top)
    started = time.monotonic()
    own_fleet = fleet is None
    fleet = fleet or LoadFleet(audio_dir)
    points: list[PointResult] = []
    lo, hi = 0, None

    def measure(count: int) -> bool:
        results = measure_gated(quiet, lambda: measure_point(
            endpoint, count, target=target, shape=shape, pace=pace, budget_ms=budget_ms, settings=s, fleet=fleet,
            curve=curve, pids=pids, progress=progress, alive=alive), say)
        points.extend(results)
        return results[-1].passed

    try:
        while hi is None:
            if measure(n):
                lo = n
                if n >= top:
                    break
                n = min(2 * n, top)
            else:
                hi = n
        while hi is not None and hi - lo > max(2, res * lo, 1):
            mid = (lo + hi) // 2
            if measure(mid):
                lo = mid
            else:
                hi = mid
    finally:
        if own_fleet:
            fleet.close()
    at_capacity = [p for p in points if p.passed and p.streams == lo and not p.superseded]
    return CapacityResult(target=target, shape=shape, budget_ms=budget_ms, capacity_streams=lo,
                          saturation_fps=max((p.achieved_fps for p in points), default=0.0),
                          p99_ms_at_capacity=at_capacity[-1].p99_ms if at_capacity else math.nan,
                          points=points, first_fail=hi, limited_by_max=hi is None,
                          elapsed_s=time.monotonic() - started)


def quick_settings(**changes: Any) -> PointSettings:
    return replace(QUICK, **changes)
