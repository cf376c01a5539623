"""One point: replay N microphones through the load processes until the point is stable (or
for a fixed duration), window by window, and stop early a real-time point that has clearly
failed (definitions in bench/replay.py's docstring)."""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.fleet import LoadFleet, LoadProc, PointRun, auto_load_procs, point_plans
from bench.load_plan import FRAME_MS
from bench.point_figures import agree, finish_point, merge_windows, window_summary
from bench.probe import Probe
from bench.results import FRAMES_PER_S, FULL, PointResult, PointSettings


def measure_point(endpoint: str, streams: int, *, target: str = "ringserve", shape: str = "device",
                  pace: str = "realtime", budget_ms: float = 32.0, duration_s: float | None = None,
                  settings: PointSettings | None = None, audio_dir: Path | None = None,
                  fleet: LoadFleet | None = None, curve: tuple[str, str] | None = None,
                  pids: dict[str, list[int]] | None = None,
                  progress: Callable[[dict[str, Any]], None] | None = None,
                  on_window: Callable[[dict[str, Any]], None] | None = None,
                  unopened_streams: int = 0, open_params: dict[str, Any] | None = None,
                  alive: Callable[[], None] | None = None) -> PointResult:
    """Replay ``streams`` microphones against ``endpoint`` and measure one point.

    ``duration_s``: measure exactly this long after the warm-up (no stability rule; a soak),
    and judge every measured window: the point's figures are then the whole duration's.
    ``pids``: the target's processes by role ({"frontend": [..], "workers": [..]} or
    {"server": [..]}) when they cannot be found from STATS. ``on_window`` gets every window's
    summary; ``progress`` too, plus point start/end events. ``alive`` is called while waiting
    and may raise (e.g. the spawned daemon died)."""
    s = settings or FULL
    if streams < 1:
        raise ValueError("streams must be at least 1")
    if target not in ("ringserve", "per-frame"):
        raise ValueError(f"target must be ringserve or per-frame, not {target!r}")
    own_fleet = fleet is None
    fleet = fleet or LoadFleet(audio_dir)
    try:
        return _measure_point(endpoint, streams, target=target, shape=shape, pace=pace, budget_ms=budget_ms,
                              duration_s=duration_s, s=s, fleet=fleet, curve=curve, pids=pids, progress=progress,
                              on_window=on_window, unopened=unopened_streams, open_params=open_params or {},
                              alive=alive)
    finally:
        if own_fleet:
            fleet.close()


def _measure_point(endpoint: str, streams: int, *, target: str, shape: str, pace: str, budget_ms: float,
                   duration_s: float | None, s: PointSettings, fleet: LoadFleet, curve: tuple[str, str] | None,
                   pids: dict[str, list[int]] | None, progress: Callable[[dict[str, Any]], None] | None,
                   on_window: Callable[[dict[str, Any]], None] | None, unopened: int, open_params: dict[str, Any],
                   alive: Callable[[], None] | None) -> PointResult:
    n_procs = s.load_procs or auto_load_procs(streams, shape, s.streams_per_connection)
    n_procs = max(1, min(n_procs, streams))
    procs = fleet.ensure(n_procs)
    plans = point_plans(endpoint, streams, n_procs, target=target, shape=shape, pace=pace, s=s, curve=curve,
                        unopened=unopened, open_params=open_params)
    result = PointResult(target=target, shape=shape, pace=pace, streams=streams, budget_ms=budget_ms,
                         chunk_ms=s.chunk_frames * FRAME_MS, load_procs=n_procs, window_s=s.window_s,
                         needed_fps=FRAMES_PER_S * streams, started_at=time.time())
    if progress:
        progress({"event": "point_start", "target": target, "shape": shape, "pace": pace, "streams": streams})
    run = PointRun(procs)
    for proc, plan in zip(procs, plans):
        proc.conn.send(("point", plan))
    readies: dict[int, dict[str, Any]] = {}

    def all_ready() -> bool:
        for key in list(run.done):
            if key < 0 and "ready" in run.done[key]:
                readies[-1 - key] = run.done.pop(key)["ready"]
        return len(readies) == n_procs

    run.recv_until(all_ready, 60 + 0.05 * streams, "their streams open", alive)
    result.streams_opened = sum(r["opened"] for r in readies.values())
    failures: Counter[str] = Counter()
    for r in readies.values():
        failures.update(r["failures"])
    result.open_failures = dict(failures)
    probe = Probe(endpoint, target, fleet, curve, pids)
    try:
        if result.streams_opened < streams:
            for proc in procs:
                proc.conn.send(("abort",))
            run.recv_until(lambda: len(run.done) >= n_procs, 30, "the abort", alive)
            result.stop_reason = "open_failed"
            result.fail_reasons = [f"only {result.streams_opened} of {streams} streams opened: {dict(failures)}"]
            return result
        return _hold(result, run, procs, probe, s, budget_ms, duration_s, progress, on_window, alive)
    finally:
        probe.close()


def _hold(result: PointResult, run: PointRun, procs: list[LoadProc], probe: Probe, s: PointSettings,
          budget_ms: float, duration_s: float | None, progress: Callable[[dict[str, Any]], None] | None,
          on_window: Callable[[dict[str, Any]], None] | None, alive: Callable[[], None] | None) -> PointResult:
    warm_windows = math.ceil(s.warmup_s / s.window_s - 1e-9)
    fixed_windows = math.ceil(duration_s / s.window_s - 1e-9) if duration_s is not None else None
    max_windows = fixed_windows or max(s.stable_windows, math.ceil(s.max_point_s / s.window_s - 1e-9))
    abs_tol = s.latency_abs_tol_ms if s.latency_abs_tol_ms is not None else 0.05 * budget_ms
    result.loadavg = list(os.getloadavg())
    t0_ns = time.monotonic_ns() + 200_000_000
    for proc in procs:
        proc.conn.send(("go", t0_ns))
    time.sleep(max(0.0, (t0_ns - time.monotonic_ns()) / 1e9))
    snaps = [probe.snapshot()]
    measured: list[dict[str, Any]] = []  # window summaries after warm-up
    merged_measured: list[dict[str, Any]] = []
    j = 0
    overloaded_run = 0
    while True:
        boundary = t0_ns + (j + 1) * int(s.window_s * 1e9)
        while (left := (boundary - time.monotonic_ns()) / 1e9) > 0:
            time.sleep(min(left, 0.25))
            if alive is not None:
                alive()
        snaps.append(probe.snapshot())
        run.recv_until(lambda: len(run.windows.get(j, [])) == len(procs), s.window_s + 30, f"window {j}", alive)
        merged = merge_windows(run.windows[j])
        summary = window_summary(j, merged, snaps[-2], snaps[-1], s, result, budget_ms, warm=j < warm_windows)
        if on_window is not None:
            on_window(summary)
        if progress is not None:
            progress({"event": "window", **summary})
        j += 1
        if summary["warmup"]:
            continue
        summary["_snap"] = (len(snaps) - 2, len(snaps) - 1)
        measured.append(summary)
        merged_measured.append(merged)
        if fixed_windows is not None:
            if len(measured) >= fixed_windows:
                result.stop_reason = "duration"
                break
            continue
        # A real-time point that has clearly failed stops early; a closed loop (max pace) is
        # meant to be over budget, and is held until its throughput is stable.
        lost = summary["shed"] + sum(summary["refused"].values()) + summary["timed_out"]
        if lost and result.pace == "realtime":
            result.stop_reason = "lost"
            break
        bad = (summary["p99_ms"] > 2 * budget_ms or not math.isfinite(summary["p99_ms"])
               or summary["achieved_fps"] < 0.9 * result.needed_fps)
        overloaded_run = overloaded_run + 1 if bad else 0
        if result.pace == "realtime" and (overloaded_run >= 2 or (bad and len(measured) >= max_windows)):
            result.stop_reason = "overloaded"
            break
        last = measured[-s.stable_windows:]
        if len(last) >= s.stable_windows and agree([w["achieved_fps"] for w in last], s.stability, 0.0) \
                and (result.pace == "max" or agree([w["p99_ms"] for w in last], s.stability, abs_tol)):
            result.stable = True
            result.stop_reason = "stable"
            break
        if len(measured) >= max_windows:
            result.stop_reason = "max_duration"
            break
    if fixed_windows is not None:
        last = measured[-s.stable_windows:]
        result.stable = len(last) >= s.stable_windows and agree([w["achieved_fps"] for w in last], s.stability,
                                                                  0.0) \
            and agree([w["p99_ms"] for w in last], s.stability, abs_tol)
    for proc in procs:
        proc.conn.send(("stop",))
    run.recv_until(lambda: len(run.done) >= len(procs), s.timeout_ms / 1000 + 60, "the end of the point", alive)
    finish_point(result, run, measured, merged_measured, snaps, s, budget_ms, judge_all=fixed_windows is not None)
    if progress:
        progress({"event": "point_end", "result": result})
    return result
