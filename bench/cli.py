"""`ringserve bench`: how many real-time microphones does a box hold?

The command line of bench/replay.py (whose docstring is the Python API). See
docs/benchmarks.md for what each figure means and how to run it against a remote daemon.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType
from typing import Any, Callable

BENCH_HELP = """\
Replay N live microphones (WAV files, looped, each stream from its own offset and phase) to
a ringserve daemon and measure latency, loss and throughput; sweep N or search for the
largest N that stays real-time (p99 <= budget, nothing lost, >= 98 % of the needed frames/s);
compare with the raw onnxruntime ceiling and a conventional per-frame server in the same run.

examples:
  ringserve bench --spawn-engine --workers 2 --find-capacity --shape device,gateway \\
      --baseline raw,per-frame --json out.json --csv out.csv --plot out.png
  ringserve bench --endpoint tcp://10.0.0.5:5555 --curve server.key bench.key_secret --sweep 50,100,200
  ringserve bench --spawn-engine --workers 2 --streams 300 --soak 30m
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 50,100,200") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: stream counts must be positive")
    return values


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v for v in text.replace(" ", "").split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)} (comma-separated)")
        return values
    return parse


def _load_procs(text: str) -> int | None:
    if text == "auto":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("--load-procs must be auto or a positive integer")
    return value


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="multi-microphone replay bench: real-time capacity, latency, baselines",
                       description=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("target")
    where = t.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="a running daemon's ZeroMQ endpoint (tcp://HOST:PORT or ipc:///path)")
    where.add_argument("--spawn-engine", action="store_true", help="start a daemon for the run and stop it after")
    t.add_argument("--workers", type=int, help="spawned engine: worker processes (default: the CPU count); "
                   "also the raw baseline's process count (default for --endpoint: the daemon's worker count)")
    t.add_argument("--serve-args", default="", metavar="'ARGS'",
                   help="spawned engine: more `ringserve serve` flags, e.g. '--max-batch 256 --shed-after-ms 0'")
    t.add_argument("--transport", choices=("tcp", "ipc"), default="tcp",
                   help="spawned engine: connect over loopback TCP (default, the path devices take) or ipc")
    t.add_argument("--curve", nargs=2, metavar=("SERVER_KEY", "CLIENT_SECRET"),
                   help="ZeroMQ CURVE for a daemon that requires it: the server's public .key and a client "
                   ".key_secret allowed by it (ringserve keys generate)")
    load = p.add_argument_group("load")
    load.add_argument("--audio", type=Path, metavar="DIR", help="directory of WAV files (default: the bench "
                      "corpus, ../shared/audio/corpus or one generated with espeak-ng)")
    load.add_argument("--shape", type=_choices(("device", "gateway")), default=["device"],
                      help="device: one connection per stream, one chunk per message (default); gateway: one "
                      "connection per load process carrying all its streams, one message per tick; "
                      "'device,gateway' measures both")
    load.add_argument("--pace", choices=("realtime", "max"), default="realtime",
                      help="realtime: absolute 32 ms schedule per stream (default); max: closed loop, --window "
                      "chunks in flight per stream")
    load.add_argument("--chunk-ms", type=int, default=32, help="audio per message, a multiple of 32 (default 32)")
    load.add_argument("--tick-ms", type=float, default=4.0, help="gateway shape: one message per tick (default 4)")
    load.add_argument("--window", type=int, default=2, help="max pace: chunks in flight per stream (default 2)")
    load.add_argument("--load-procs", type=_load_procs, default=None, metavar="auto|K",
                      help="load-generator processes (default auto: ~250 device streams or ~1000 gateway "
                      "streams per process, at most one per CPU)")
    load.add_argument("--nice", type=int, default=0, metavar="N",
                      help="run every process the bench starts (spawned engine, baselines, load processes) at "
                      "niceness N, and, where the kernel groups processes by session (autogroup), this session's "
                      "group too (restored afterwards); a negative N (needs privileges) favours them over other "
                      "tenants of a shared machine, all alike (default 0)")
    load.add_argument("--budget-ms", type=float, default=32.0, help="latency budget for p99 (default 32)")
    load.add_argument("--timeout-ms", type=float, default=2000.0,
                      help="a chunk without a reply for this long is lost (timed out; default 2000)")
    hold = p.add_argument_group("holding a point")
    hold.add_argument("--window-s", type=float, help="measurement window (default 2; quick 1)")
    hold.add_argument("--warmup-s", type=float, help="not measured at the start of a point (default 2)")
    hold.add_argument("--stable-windows", type=int, help="windows that must agree within 10 %% (default 3)")
    hold.add_argument("--max-point-s", type=float, help="most measuring per point (default 24)")
    hold.add_argument("--quick", action="store_true", help="short windows, coarse capacity search (smoke runs)")
    what = p.add_argument_group("what to measure")
    mode = what.add_mutually_exclusive_group()
    mode.add_argument("--streams", type=int, metavar="N", help="one point with N streams (with --soak: the "
                      "capacity the soak load is a share of)")
    mode.add_argument("--sweep", type=_int_list, metavar="N1,N2,...", help="one point per N")
    mode.add_argument("--find-capacity", action="store_true",
                      help="search the largest N that stays real-time (doubling, then bisection)")
    what.add_argument("--max-streams", type=int, help="capacity search: stop growing at this N (default 4096)")
    what.add_argument("--start-streams", type=int, help="capacity search: first N (default 16; quick 32)")
    what.add_argument("--saturation", type=int, default=0, metavar="N",
                      help="also measure closed-loop throughput (--pace max, --window chunks in flight) with N "
                      "streams per server and shape: the saturation frames/s, insensitive to latency noise")
    what.add_argument("--no-profile", action="store_true",
                      help="after --find-capacity, skip the latency points at 10 %% and 80 %% of capacity")
    what.add_argument("--baseline", type=_choices(("raw", "per-frame")), action="append", default=[],
                      help="raw: in-process onnxruntime ceiling (measured before and after); per-frame: the "
                      "conventional one-thread-per-connection server, same load and search (comma-separated)")
    what.add_argument("--raw-seconds", type=float, default=5.0, help="raw baseline duration per run (default 5)")
    what.add_argument("--raw-batch", type=_int_list, default=[64, 256], metavar="B1,B2",
                      help="raw baseline batch sizes; the best frames/s of each run is the ceiling (default 64,256)")
    what.add_argument("--per-frame-threads", type=int, default=1,
                      help="per-frame baseline: onnxruntime intra-op threads of its one session (default 1)")
    what.add_argument("--per-frame-endpoint", metavar="tcp://HOST:PORT",
                      help="per-frame baseline: drive this running server (python -m bench.per_frame_server, "
                      "e.g. on a remote engine's machine) instead of starting one here")
    what.add_argument("--soak", metavar="DURATION", help="hold 80 %% of a capacity (--streams, else found first) "
                      "for DURATION (e.g. 30m) and watch engine RSS")
    what.add_argument("--soak-load", type=float, default=0.8, help="soak: share of the capacity held (default 0.8)")
    what.add_argument("--soak-window-s", type=float, default=10.0, help="soak: RSS sample period (default 10)")
    noise = p.add_argument_group("a shared, noisy machine")
    noise.add_argument("--quiet-gate", type=float, default=0.0, metavar="PCT",
                       help="measure only while other tenants' CPU + hypervisor steal is at most PCT %% of one core "
                       "(waiting before each point and raw run), and measure a failed point again (twice at most) "
                       "when they took more during it; 0: off (default)")
    noise.add_argument("--quiet-wait-s", type=float, default=300.0,
                       help="longest wait for a quiet machine before measuring anyway (default 300)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    out.add_argument("--csv", metavar="FILE", help="write one row per point")
    out.add_argument("--plot", metavar="FILE.png", help="latency percentiles and throughput vs N (needs matplotlib: "
                     "the bench extra)")
    out.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_bench)


def _settings(args: argparse.Namespace) -> Any:
    from bench.replay import FULL, QUICK

    base = QUICK if args.quick else FULL
    changes: dict[str, Any] = {"chunk_frames": args.chunk_ms // 32, "tick_ms": args.tick_ms,
                               "timeout_ms": args.timeout_ms, "window": args.window, "load_procs": args.load_procs}
    for name in ("window_s", "warmup_s", "stable_windows", "max_point_s"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return replace(base, **changes)


def _check_args(args: argparse.Namespace) -> str | None:
    if args.chunk_ms < 32 or args.chunk_ms % 32:
        return "--chunk-ms must be a positive multiple of 32 (whole 512-sample frames)"
    if not (args.streams or args.sweep or args.find_capacity or args.soak or args.saturation):
        return ("say what to measure: --streams N, --sweep N1,N2,..., --find-capacity, --saturation N "
                "or --soak DURATION")
    if args.soak and args.sweep:
        return "--soak holds one load: give the capacity with --streams N or let --find-capacity find it"
    if args.workers is not None and args.workers < 1:
        return "--workers must be at least 1"
    if args.pace == "max" and args.find_capacity:
        return "--find-capacity searches real-time capacity: use --pace realtime (and --saturation N for throughput)"
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    problem = _check_args(args)
    if problem:
        print(f"ringserve bench: {problem}", file=sys.stderr)
        return 2
    if args.plot:
        from bench.report import require_matplotlib

        require_matplotlib()

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwind through every finally: daemons and load processes stop

    signal.signal(signal.SIGTERM, on_sigterm)
    from bench.daemon import BenchError

    try:
        report = run(args)
    except BenchError as exc:
        print(f"ringserve bench failed: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"ringserve bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ringserve bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    return 0 if report.get("ok", True) else 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.procinfo import machine_info
    from bench.replay import FRAMES_PER_S, LoadFleet
    from bench.report import Progress

    settings = _settings(args)
    budget = args.budget_ms
    shapes: list[str] = args.shape
    baselines = {b for group in args.baseline for b in group}
    progress = Progress() if not args.quiet else None
    say = progress.say if progress is not None else (lambda text: None)
    curve = tuple(args.curve) if args.curve else None
    report: dict[str, Any] = {
        "version": 1, "argv": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine_info(), "budget_ms": budget, "settings": asdict(settings), "nice": args.nice,
        "target": {}, "baselines": {}, "capacity": {}, "points": [], "profile": {}, "saturation": {}, "ratios": {},
        "targets": {}}
    started = time.monotonic()
    from bench.procinfo import machine_cpu_seconds

    machine_before = machine_cpu_seconds()
    with ExitStack() as stack:
        if args.nice:
            from bench.procinfo import autogroup_enabled, set_autogroup_nice

            if autogroup_enabled():  # per-process niceness would only rank us among ourselves
                previous = set_autogroup_nice(args.nice)
                report["autogroup_nice"] = {"set": args.nice if previous is not None else None,
                                            "previous": previous}
                if previous is None:
                    say(f"--nice {args.nice}: could not set this session's autogroup niceness (privileges?): "
                        "other sessions' processes compete as equals anyway")
                else:
                    stack.callback(set_autogroup_nice, previous)
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
        else:
            endpoint = args.endpoint
            report["target"] = {"endpoint": endpoint, "spawned": False}
            stats = _remote_stats(endpoint, curve)
            if stats is None:
                raise _bench_error(f"no STATS reply from {endpoint}: is the daemon running (and --curve given "
                                   "if it requires CURVE)?")
            report["target"].update({"workers": len(stats.get("workers", [])), "versions": stats.get("versions"),
                                     "daemon_pid": stats.get("pid")})
            workers = workers or len(stats.get("workers", [])) or 1
        say(f"engine at {endpoint}; {report['machine']['cpus']} CPUs, onnxruntime {report['machine']['onnxruntime']}, "
            f"load average {report['machine']['loadavg'][0]:.2f}")
        fleet = stack.enter_context(LoadFleet(args.audio, nice=args.nice))
        report["audio_dir"] = str(fleet.audio_dir)
        raw_runs: list[dict[str, Any]] = []
        from bench.replay import QuietGate, wait_for_quiet

        gate = QuietGate(args.quiet_gate, wait_s=args.quiet_wait_s) if args.quiet_gate > 0 else None
        report["quiet_gate"] = asdict(gate) if gate is not None else None
        local = args.spawn_engine or _is_local(endpoint)

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
        for shape in shapes:
            _measure_target(report, args, endpoint, "ringserve", shape, common, curve, alive, say)
        if "per-frame" in baselines and not args.soak:
            _per_frame_baseline(report, args, common, say)
        raw_baseline("after")
        if raw_runs:  # per run (before, after) the best batch; the ceiling is their mean
            best = {when: max((r for r in raw_runs if r["when"] == when), key=lambda r: r["frames_per_s"])
                    for when in dict.fromkeys(r["when"] for r in raw_runs)}
            fps = sum(r["frames_per_s"] for r in best.values()) / len(best)
            report["baselines"]["raw"] = {"frames_per_s": fps, "streams": fps / FRAMES_PER_S, "workers": workers,
                                          "batch": sorted({r["batch"] for r in best.values()}),
                                          "best": {k: v["frames_per_s"] for k, v in best.items()}, "runs": raw_runs}
        if args.soak:
            _run_soak(report, args, endpoint, shapes[0], common, curve, alive, say, local)
    report["loadavg_end"] = list(os.getloadavg())
    report["elapsed_s"] = time.monotonic() - started
    machine_after = machine_cpu_seconds()
    if machine_before and machine_after:  # the whole run, every process on the machine
        report["machine_during_run"] = {
            "busy_pct": 100 * (machine_after[0] - machine_before[0]) / report["elapsed_s"],
            "steal_pct": 100 * (machine_after[1] - machine_before[1]) / report["elapsed_s"]}
    _derive(report, baselines)
    _print_summary(report)
    _write_outputs(report, args, say)
    return report


def _per_frame_baseline(report: dict[str, Any], args: argparse.Namespace, common: dict[str, Any],
                        say: Callable[[str], None]) -> None:
    """The conventional server, same load and search, device shape (one connection per stream)."""
    if args.per_frame_endpoint:
        say(f"per-frame baseline server at {args.per_frame_endpoint} (its CPU is not read from here)")
        report["baselines"]["per-frame"] = {"endpoint": args.per_frame_endpoint, "spawned": False}
        _measure_target(report, args, args.per_frame_endpoint, "per-frame", "device", common, None, None, say)
        return
    from bench.per_frame_server import spawn_per_frame_server

    say("per-frame baseline server: one thread per connection, one session.run per frame under a lock")
    with spawn_per_frame_server(args.per_frame_threads, nice=args.nice) as server:
        report["baselines"]["per-frame"] = {"endpoint": server.endpoint, "pid": server.pid, "spawned": True,
                                            "intra_op_threads": args.per_frame_threads}

        def server_alive() -> None:
            if server.proc.poll() is not None:
                raise _bench_error("the per-frame server died:\n" + "\n".join(server.log))

        _measure_target(report, args, server.endpoint, "per-frame", "device",
                        {**common, "pids": {"server": [server.pid]}}, None, server_alive, say)


def _bench_error(text: str) -> Exception:
    from bench.daemon import BenchError

    return BenchError(text)


def _remote_stats(endpoint: str, curve: tuple[str, ...] | None) -> dict[str, Any] | None:
    from bench.replay import _StatsClient

    client = _StatsClient(endpoint, (curve[0], curve[1]) if curve else None)
    try:
        return client.stats(timeout=10.0)
    finally:
        client.close()


def _is_local(endpoint: str) -> bool:
    from bench.replay import _local_endpoint

    return _local_endpoint(endpoint)


def _measure_target(report: dict[str, Any], args: argparse.Namespace, endpoint: str, target: str, shape: str,
                    common: dict[str, Any], curve: tuple[str, ...] | None, alive: Callable[[], None] | None,
                    say: Callable[[str], None]) -> None:
    from bench.replay import PointResult, find_capacity, measure_gated, measure_point

    curve2 = (curve[0], curve[1]) if curve else None
    key = f"{target}/{shape}"
    gate = common.get("quiet")
    common = {k: v for k, v in common.items() if k != "quiet"}

    def gated(phase: str, measure: Callable[[], PointResult]) -> PointResult:
        results = measure_gated(gate, measure, say)
        report["points"] += [{"phase": phase, "point": r.to_dict()} for r in results]
        return results[-1]

    if args.saturation and not args.soak:
        say(f"{key}: saturation, closed loop, {args.saturation} streams x {args.window} chunks in flight")
        closed = {**common, "settings": replace(common["settings"], timeout_ms=max(common["settings"].timeout_ms,
                                                                                    10_000.0))}
        p = gated("saturation", lambda: measure_point(endpoint, args.saturation, target=target, shape=shape,
                                                      pace="max", curve=curve2, alive=alive, **closed))
        report["saturation"][key] = {"streams": args.saturation, "window": args.window, "frames_per_s": p.achieved_fps,
                                     "streams_equivalent": p.achieved_fps / 31.25, "p50_ms": p.p50_ms,
                                     "p99_ms": p.p99_ms, "lost": p.lost, "stable": p.stable, "cpu": p.cpu,
                                     "avg_batch": p.engine.get("avg_batch")}
    if args.find_capacity or (args.soak and not args.streams and target == "ringserve"):
        say(f"{key}: searching real-time capacity (p99 <= {args.budget_ms:g} ms, nothing lost, >= 98 % of needed)")
        cap = find_capacity(endpoint, shape=shape, budget_ms=args.budget_ms, quick=args.quick,
                            max_streams=args.max_streams, target=target, start_streams=args.start_streams,
                            settings=common["settings"], fleet=common["fleet"], curve=curve2,
                            pids=common.get("pids"), progress=common["progress"], alive=alive, quiet=gate, say=say)
        report["points"] += [{"phase": "capacity", "point": p.to_dict()} for p in cap.points]
        entry = {k: v for k, v in cap.to_dict().items() if k != "points"}
        point = cap.capacity_point
        entry["capacity_point"] = point.to_dict() if point is not None else None
        report["capacity"][key] = entry
        say(f"{key}: capacity {cap.capacity_streams} streams (first fail {cap.first_fail}), "
            f"p99 {cap.p99_ms_at_capacity:.1f} ms, saturation {cap.saturation_fps:.0f} frames/s, "
            f"{cap.elapsed_s:.0f} s")
        if target == "ringserve" and cap.capacity_streams and not args.no_profile and not args.soak:
            report["profile"][key] = {}
            for share in (0.1, 0.8):
                n = max(1, round(share * cap.capacity_streams))
                p = gated(f"profile-{int(share * 100)}", lambda: measure_point(
                    endpoint, n, target=target, shape=shape, pace="realtime", curve=curve2, alive=alive, **common))
                report["profile"][key][f"{int(share * 100)}%"] = {
                    "streams": n, "p50_ms": p.p50_ms, "p90_ms": p.p90_ms, "p99_ms": p.p99_ms, "max_ms": p.max_ms,
                    "lost": p.lost, "passed": p.passed, "stable": p.stable}
        return
    if args.soak or not (args.sweep or args.streams):
        return  # the soak itself measures with --streams
    for n in (args.sweep or [args.streams]):
        gated("sweep" if args.sweep else "streams", lambda: measure_point(
            endpoint, n, target=target, shape=shape, pace=args.pace, curve=curve2, alive=alive, **common))


def _run_soak(report: dict[str, Any], args: argparse.Namespace, endpoint: str, shape: str, common: dict[str, Any],
              curve: tuple[str, ...] | None, alive: Callable[[], None] | None, say: Callable[[str], None],
              local: bool) -> None:
    from bench.soak import parse_duration, soak

    if not local:
        say("soak: the engine is not on this machine; RSS cannot be read from here (run the bench there)")
    duration = parse_duration(args.soak)
    capacity = args.streams or report["capacity"].get(f"ringserve/{shape}", {}).get("capacity_streams", 0)
    if not capacity:
        raise _bench_error("soak: no capacity to take a share of (the search found none)")
    streams = max(1, round(args.soak_load * capacity))
    say(f"soak: {streams} streams ({100 * args.soak_load:.0f} % of {capacity}), {shape} shape, {duration:.0f} s")
    result = soak(endpoint, streams, duration, shape=shape, budget_ms=args.budget_ms, settings=common["settings"],
                  fleet=common["fleet"], curve=(curve[0], curve[1]) if curve else None, progress=common["progress"],
                  alive=alive, window_s=args.soak_window_s)
    report["soak"] = {**result.to_dict(), "capacity": capacity, "load_share": args.soak_load}
    if result.point is not None:
        report["points"].append({"phase": "soak", "point": result.point.to_dict()})


def _derive(report: dict[str, Any], baselines: set[str]) -> None:
    """Ratios between capacities and against the raw ceiling, and the issue's targets."""
    raw = report["baselines"].get("raw", {}).get("streams")
    per_frame = report["capacity"].get("per-frame/device", {}).get("capacity_streams")
    if per_frame is not None:
        report["baselines"].setdefault("per-frame", {})["capacity_streams"] = per_frame
    raw_fps = report["baselines"].get("raw", {}).get("frames_per_s")
    per_frame_sat = report["saturation"].get("per-frame/device", {}).get("frames_per_s")
    for key, sat in report["saturation"].items():
        if raw_fps:
            sat["share_of_raw"] = sat["frames_per_s"] / raw_fps
        if per_frame_sat and key != "per-frame/device":
            sat["x_per_frame"] = sat["frames_per_s"] / per_frame_sat
    goals = {"ringserve/gateway": 0.75, "ringserve/device": 0.40}
    for key, cap in report["capacity"].items():
        c = cap.get("capacity_streams", 0)
        ratios: dict[str, Any] = {"capacity_streams": c}
        if raw:
            ratios["share_of_raw"] = c / raw
        if per_frame and key != "per-frame/device":
            ratios["x_per_frame"] = c / per_frame
        point = cap.get("capacity_point") or {}
        ratios["frontend_cpu_pct_at_capacity"] = (point.get("cpu") or {}).get("frontend_pct")
        ratios["workers_cpu_pct_at_capacity"] = (point.get("cpu") or {}).get("workers_pct")
        ratios["bench_cpu_pct_at_capacity"] = (point.get("cpu") or {}).get("bench_pct")
        ratios["others_cpu_pct_at_capacity"] = (point.get("cpu") or {}).get("others_pct")
        ratios["steal_pct_at_capacity"] = (point.get("cpu") or {}).get("steal_pct")
        fps = point.get("achieved_fps") or 0.0
        if fps:
            ratios["cpu_us_per_frame_at_capacity"] = {
                role: 1e4 * value / fps for role in ("frontend", "workers", "bench", "server")
                if (value := (point.get("cpu") or {}).get(f"{role}_pct")) is not None}
        report["ratios"][key] = ratios
        if key in goals:
            goal: dict[str, Any] = {}
            if raw:
                goal["share_of_raw"] = {"want": goals[key], "got": c / raw, "met": c / raw >= goals[key]}
            if per_frame:
                goal["x_per_frame"] = {"want": 5.0, "got": c / per_frame, "met": c >= 5 * per_frame}
            report["targets"][key] = goal


def _print_summary(report: dict[str, Any]) -> None:
    from bench.replay import PointResult
    from bench.report import TABLE_LEGEND, points_table

    def point(d: dict[str, Any]) -> PointResult:
        names = PointResult.__dataclass_fields__
        p = PointResult(**{k: v for k, v in d.items() if k in names})
        for key in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms"):
            if getattr(p, key) is None:
                setattr(p, key, math.nan)
        return p

    m = report["machine"]
    during = report.get("machine_during_run", {})
    print(f"\nringserve bench at {m['source']}: {m['cpus']} CPUs ({m['cpu_model']}), onnxruntime {m['onnxruntime']}, "
          f"load average {m['loadavg'][0]:.2f} -> {report['loadavg_end'][0]:.2f}, {report['elapsed_s']:.0f} s; "
          f"machine busy {_fmt(during.get('busy_pct'), '.0f')} %, steal {_fmt(during.get('steal_pct'), '.0f')} % "
          "of one core over the run")
    points = [e for e in report["points"]]
    if points:
        print("\npoints (phase: capacity search, profile at 10 %/80 % of capacity, sweep, soak)")
        table = points_table(point(e["point"]) for e in points).splitlines()
        print(f"{'phase':>11} " + table[0])
        for e, line in zip(points, table[1:]):
            phase = e["phase"] + ("*" if e["point"].get("superseded") else "")
            print(f"{phase:>11} " + line)
        print(TABLE_LEGEND)
        if any(e["point"].get("superseded") for e in points):
            print("  *: failed while other tenants + steal exceeded the quiet gate; measured again, the later row counts")
    raw = report["baselines"].get("raw")
    if raw:
        runs = ", ".join(f"{r['when']} B={r['batch']} {r['frames_per_s']:.0f}" for r in raw["runs"])
        print(f"\nraw onnxruntime ceiling: {raw['frames_per_s']:.0f} frames/s = {raw['streams']:.0f} streams, mean of the "
              f"best batch before and after ({raw['workers']} processes; {runs})")
    if report["capacity"]:
        print(f"\nreal-time capacity (p99 <= {report['budget_ms']:g} ms, nothing lost, >= 98 % of needed frames/s)")
        for key, cap in report["capacity"].items():
            r = report["ratios"].get(key, {})
            extra = []
            if "share_of_raw" in r:
                extra.append(f"{100 * r['share_of_raw']:.0f} % of raw")
            if "x_per_frame" in r:
                extra.append(f"{r['x_per_frame']:.1f}x per-frame")
            if r.get("frontend_cpu_pct_at_capacity") is not None:
                extra.append(f"front-end CPU {r['frontend_cpu_pct_at_capacity']:.0f} %")
            if r.get("bench_cpu_pct_at_capacity") is not None:
                extra.append(f"bench CPU {r['bench_cpu_pct_at_capacity']:.0f} %")
            if r.get("others_cpu_pct_at_capacity") is not None:
                extra.append(f"other tenants {r['others_cpu_pct_at_capacity']:.0f} %")
            if r.get("steal_pct_at_capacity") is not None:
                extra.append(f"steal {r['steal_pct_at_capacity']:.0f} %")
            limit = " (max_streams reached)" if cap.get("limited_by_max") else ""
            print(f"  {key:<18} {cap['capacity_streams']:>5} streams{limit}, p99 "
                  f"{_fmt(cap.get('p99_ms_at_capacity'))} ms, saturation {cap['saturation_fps']:.0f} frames/s"
                  + (f"; {', '.join(extra)}" if extra else ""))
    for key, goal in report["targets"].items():
        for name, g in goal.items():
            want = f"{100 * g['want']:.0f} % of raw" if name == "share_of_raw" else f"{g['want']:.0f}x per-frame"
            got = f"{100 * g['got']:.0f} %" if name == "share_of_raw" else f"{g['got']:.1f}x"
            print(f"  target {key} >= {want}: got {got} -> {'met' if g['met'] else 'MISSED'}")
    if report["saturation"]:
        print("\nsaturation throughput (closed loop: not real-time, what each server can push at most)")
        for key, sat in report["saturation"].items():
            extra = []
            if "share_of_raw" in sat:
                extra.append(f"{100 * sat['share_of_raw']:.0f} % of raw")
            if "x_per_frame" in sat:
                extra.append(f"{sat['x_per_frame']:.1f}x per-frame")
            print(f"  {key:<18} {sat['frames_per_s']:>7.0f} frames/s = {sat['streams_equivalent']:.0f} streams' worth "
                  f"({sat['streams']} streams x {sat['window']} in flight, batch {_fmt(sat.get('avg_batch'))}, "
                  f"p99 {_fmt(sat['p99_ms'])} ms, lost {sat['lost']})" + (f"; {', '.join(extra)}" if extra else ""))
    for key, levels in report["profile"].items():
        for level, f in levels.items():
            print(f"  latency a pipeline feels, {key} at {level} of capacity (N={f['streams']}): "
                  f"p50 {_fmt(f['p50_ms'])} ms, p99 {_fmt(f['p99_ms'])} ms, lost {f['lost']}")
    soak = report.get("soak")
    if soak:
        print(f"\nsoak: {soak['streams']} streams for {soak['duration_s']:.0f} s; memory growth "
              f"{'FLAGGED' if soak['flagged'] else 'not flagged'}")
        for role, proc in soak["processes"].items():
            print(f"  {role:<12} pid {proc['pid']:>7}: RSS start {proc['start_mib']:.1f} end {proc['end_mib']:.1f} "
                  f"max {proc['max_mib']:.1f} MiB, slope {_fmt(proc['slope_mib_per_h'], '.2f')} MiB/h"
                  + (" FLAGGED" if proc["flagged"] else ""))


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _write_outputs(report: dict[str, Any], args: argparse.Namespace, say: Callable[[str], None]) -> None:
    from bench.replay import _jsonable
    from bench.report import write_csv, write_plot

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_jsonable(report), fh, indent=1, allow_nan=False)
        say(f"wrote {args.json}")
    if args.csv:
        write_csv(report, args.csv)
        say(f"wrote {args.csv}")
    if args.plot:
        write_plot(report, args.plot)
        say(f"wrote {args.plot}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
