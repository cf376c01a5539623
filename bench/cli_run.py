"""`ringserve bench`, the run: start (or reach) the engine and the load processes, measure each
target and baseline, and hand the report to bench/cli_summary.py. Every process it starts is
stopped on every exit path (an ExitStack)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, replace
from typing import Any

from bench.cli_measure import measure_target, profile_target, run_soak, settle_capacities
from bench.cli_summary import derive, print_summary, write_outputs
from bench.daemon import BenchError
from bench.probe import StatsClient, local_endpoint
from bench.procinfo import autogroup_enabled, machine_cpu_seconds, machine_info, set_autogroup_nice
from bench.replay import FRAMES_PER_S, FULL, QUICK, LoadFleet, PointSettings, QuietGate, wait_for_quiet
from bench.report import Progress


def settings_from_args(args: argparse.Namespace) -> PointSettings:
    base = QUICK if args.quick else FULL
    changes: dict[str, Any] = {"chunk_frames": args.chunk_ms // 32, "tick_ms": args.tick_ms,
                               "timeout_ms": args.timeout_ms, "window": args.window, "load_procs": args.load_procs,
                               "link": args.link}
    for name in ("window_s", "warmup_s", "stable_windows", "max_point_s"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return replace(base, **changes)


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_from_args(args)
    budget = args.budget_ms
    shapes: list[str] = args.shape
    baselines = {b for group in args.baseline for b in group}
    progress = Progress() if not args.quiet else None
    say = progress.say if progress is not None else (lambda text: None)
    curve = tuple(args.curve) if args.curve else None
    report: dict[str, Any] = {
        "version": 1, "argv": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine_info(), "budget_ms": budget, "settings": asdict(settings), "nice": args.nice,
        "repeat": args.repeat, "target": {}, "baselines": {}, "capacity": {}, "points": [], "profile": {},
        "saturation": {}, "ratios": {}, "targets": {}}
    started = time.monotonic()
    machine_before = machine_cpu_seconds()
    with ExitStack() as stack:
        if args.nice:
            _nice_session(args.nice, stack, report, say)
        endpoint, workers, alive, stats = _start_target(args, stack, report, curve, say)
        settings = _engine_limits(settings, stats, report, say)
        say(f"engine at {endpoint}; {report['machine']['cpus']} CPUs, onnxruntime {report['machine']['onnxruntime']}, "
            f"load average {report['machine']['loadavg'][0]:.2f}")
        fleet = stack.enter_context(LoadFleet(args.audio, nice=args.nice))
        report["audio_dir"] = str(fleet.audio_dir)
        raw_runs: list[dict[str, Any]] = []
        gate = QuietGate(args.quiet_gate, wait_s=args.quiet_wait_s) if args.quiet_gate > 0 else None
        report["quiet_gate"] = asdict(gate) if gate is not None else None
        local = args.spawn_engine or local_endpoint(endpoint)

        def raw_baseline(when: str) -> None:
            if "raw" not in baselines:
                return
            if not local:
                say("raw baseline skipped: it must run on the engine's machine (run `ringserve bench` there)")
                return
            from bench.raw import measure_raw

            for batch in args.raw_batch:
                noise = wait_for_quiet(gate, say) if gate is not None else None
                say(f"raw onnxruntime baseline ({when}): {workers} processes, batch {batch}, {args.raw_seconds:g} s")
                raw = measure_raw(workers, batch, args.raw_seconds, warm_s=min(1.0, args.raw_seconds / 2),
                                  nice=args.nice)
                raw_runs.append({"when": when, **asdict(raw), "loadavg1": os.getloadavg()[0],
                                 "noise_before_pct": noise})
                say(f"raw: {raw.frames_per_s:.0f} frames/s = {raw.frames_per_s / FRAMES_PER_S:.0f} streams")

        raw_baseline("before")
        common = {"settings": settings, "fleet": fleet, "progress": progress, "budget_ms": budget, "quiet": gate}
        # Rounds interleave the targets, so that a slow stretch of a shared host lands on each
        # of them rather than on all of one target's searches.
        for search_round in range(1, args.repeat + 1):
            for shape in shapes:
                measure_target(report, args, endpoint, "ringserve", shape, common, curve, alive, say, search_round)
            if "per-frame" in baselines and not args.soak:
                _per_frame_baseline(report, args, common, say, search_round)
            if search_round < args.repeat:
                raw_baseline(f"after round {search_round}")
        settle_capacities(report)
        for shape in shapes:
            profile_target(report, args, endpoint, shape, common, curve, alive, say)
        raw_baseline("after")
        if raw_runs:
            report["baselines"]["raw"] = _raw_ceiling(raw_runs, workers)
        if args.soak:
            run_soak(report, args, endpoint, shapes[0], common, curve, alive, say, local)
    report["loadavg_end"] = list(os.getloadavg())
    report["elapsed_s"] = time.monotonic() - started
    machine_after = machine_cpu_seconds()
    if machine_before and machine_after:  # the whole run, every process on the machine
        report["machine_during_run"] = {
            "busy_pct": 100 * (machine_after[0] - machine_before[0]) / report["elapsed_s"],
            "steal_pct": 100 * (machine_after[1] - machine_before[1]) / report["elapsed_s"]}
    derive(report, baselines)
    print_summary(report)
    write_outputs(report, args, say)
    return report


def _nice_session(nice: int, stack: ExitStack, report: dict[str, Any], say: Callable[[str], None]) -> None:
    """Where the kernel groups processes by session (autogroup), per-process niceness would
    only rank us among ourselves: set this session's group's niceness, restored on exit."""
    if autogroup_enabled():
        previous = set_autogroup_nice(nice)
        report["autogroup_nice"] = {"set": nice if previous is not None else None, "previous": previous}
        if previous is None:
            say(f"--nice {nice}: could not set this session's autogroup niceness (privileges?): "
                "other sessions' processes compete as equals anyway")
        else:
            stack.callback(set_autogroup_nice, previous)


def _start_target(args: argparse.Namespace, stack: ExitStack, report: dict[str, Any], curve: tuple[str, ...] | None,
                  say: Callable[[str], None]) -> tuple[str, int, Callable[[], None] | None, dict[str, Any] | None]:
    """Spawn the engine (stopped when ``stack`` closes) or check that the remote one answers:
    (its endpoint, its worker count, a check that raises once a spawned engine died, its STATS)."""
    alive: Callable[[], None] | None = None
    workers = args.workers
    if args.spawn_engine:
        from bench.daemon import EngineDaemon

        workers = workers or os.cpu_count() or 1
        serve_args = shlex.split(args.serve_args)
        say(f"starting ringserve serve --workers {workers} {' '.join(serve_args)}")
        daemon = stack.enter_context(EngineDaemon(workers, serve_args, nice=args.nice))
        endpoint = daemon.endpoint(args.transport)
        alive = daemon.check_alive
        report["target"] = {"endpoint": endpoint, "spawned": True, "workers": workers, "serve_args": serve_args}
        stats = _remote_stats(endpoint, curve)
    else:
        endpoint = args.endpoint
        report["target"] = {"endpoint": endpoint, "spawned": False}
        stats = _remote_stats(endpoint, curve)
        if stats is None:
            raise BenchError(f"no STATS reply from {endpoint}: is the daemon running (and --curve given "
                             "if it requires CURVE)?")
        report["target"].update({"workers": len(stats.get("workers", [])), "versions": stats.get("versions"),
                                 "daemon_pid": stats.get("pid")})
        workers = workers or len(stats.get("workers", [])) or 1
    return endpoint, workers, alive, stats


def _raw_ceiling(raw_runs: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """Per run (before, after) the best batch; the ceiling is their mean."""
    best = {when: max((r for r in raw_runs if r["when"] == when), key=lambda r: r["frames_per_s"])
            for when in dict.fromkeys(r["when"] for r in raw_runs)}
    fps = sum(r["frames_per_s"] for r in best.values()) / len(best)
    return {"frames_per_s": fps, "streams": fps / FRAMES_PER_S, "workers": workers,
            "batch": sorted({r["batch"] for r in best.values()}),
            "best": {k: v["frames_per_s"] for k, v in best.items()}, "runs": raw_runs}


def _per_frame_baseline(report: dict[str, Any], args: argparse.Namespace, common: dict[str, Any],
                        say: Callable[[str], None], search_round: int) -> None:
    """The conventional server, same load and search, device shape (one connection per stream)."""
    if args.per_frame_endpoint:
        say(f"per-frame baseline server at {args.per_frame_endpoint} (its CPU is not read from here)")
        report["baselines"]["per-frame"] = {"endpoint": args.per_frame_endpoint, "spawned": False}
        measure_target(report, args, args.per_frame_endpoint, "per-frame", "device", common, None, None, say,
                       search_round)
        return
    from bench.per_frame_server import spawn_per_frame_server

    say("per-frame baseline server: one thread per connection, one session.run per frame under a lock")
    with spawn_per_frame_server(args.per_frame_threads, nice=args.nice) as server:
        report["baselines"]["per-frame"] = {"endpoint": server.endpoint, "pid": server.pid, "spawned": True,
                                            "intra_op_threads": args.per_frame_threads}

        def server_alive() -> None:
            if server.proc.poll() is not None:
                raise BenchError("the per-frame server died:\n" + "\n".join(server.log))

        measure_target(report, args, server.endpoint, "per-frame", "device",
                       {**common, "pids": {"server": [server.pid]}}, None, server_alive, say, search_round)


def _engine_limits(settings: PointSettings, stats: dict[str, Any] | None, report: dict[str, Any],
                   say: Callable[[str], None]) -> PointSettings:
    """The engine's admission limits (STATS ``limits``), which the gateway load plans by;
    a daemon too old to report them keeps the settings' default."""
    limits = stats.get("limits") if stats else None
    if not isinstance(limits, dict) or not isinstance(limits.get("max_streams_per_connection"), int):
        say(f"the engine did not report its limits: gateway connections hold at most "
            f"{settings.streams_per_connection} streams each")
        return settings
    report["target"]["limits"] = limits
    settings = replace(settings, streams_per_connection=limits["max_streams_per_connection"])
    report["settings"] = asdict(settings)
    return settings


def _remote_stats(endpoint: str, curve: tuple[str, ...] | None) -> dict[str, Any] | None:
    client = StatsClient(endpoint, (curve[0], curve[1]) if curve else None)
    try:
        return client.stats(timeout=10.0)
    finally:
        client.close()
