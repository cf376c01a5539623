"""`ringserve bench`, what is measured against one target (ringserve in one shape, or the
per-frame baseline): its saturation, its real-time capacity and latency profile, a sweep or
one point, and the soak. Every point goes into the report."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bench.daemon import BenchError
from bench.replay import PointResult, QuietGate, find_capacity, measure_gated, measure_point
from bench.soak import parse_duration, soak


def measure_target(report: dict[str, Any], args: argparse.Namespace, endpoint: str, target: str, shape: str,
                   common: dict[str, Any], curve: tuple[str, ...] | None, alive: Callable[[], None] | None,
                   say: Callable[[str], None], search_round: int = 1) -> None:
    """One round's measurements of one target: the saturation (first round only), a capacity
    search (kept in ``report["searches"]`` until :func:`settle_capacities` picks the median),
    or the sweep/point. The latency profile waits for :func:`profile_target`."""
    curve2 = (curve[0], curve[1]) if curve else None
    key = f"{target}/{shape}"
    gate = common.get("quiet")
    common = {k: v for k, v in common.items() if k != "quiet"}

    def gated(phase: str, measure: Callable[[], PointResult]) -> PointResult:
        return _gated(report, gate, phase, measure, say)

    if args.saturation and not args.soak and search_round == 1:
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
        rounds = f" (round {search_round} of {args.repeat})" if args.repeat > 1 else ""
        say(f"{key}: searching real-time capacity{rounds} (p99 <= {args.budget_ms:g} ms, nothing lost, "
            ">= 98 % of needed)")
        cap = find_capacity(endpoint, shape=shape, budget_ms=args.budget_ms, quick=args.quick,
                            max_streams=args.max_streams, target=target, start_streams=args.start_streams,
                            settings=common["settings"], fleet=common["fleet"], curve=curve2,
                            pids=common.get("pids"), progress=common["progress"], alive=alive, quiet=gate, say=say)
        report["points"] += [{"phase": "capacity", "round": search_round, "point": p.to_dict()} for p in cap.points]
        entry = {k: v for k, v in cap.to_dict().items() if k != "points"}
        point = cap.capacity_point
        entry["capacity_point"] = point.to_dict() if point is not None else None
        entry["round"] = search_round
        report.setdefault("searches", {}).setdefault(key, []).append(entry)
        say(f"{key}: capacity {cap.capacity_streams} streams{rounds} (first fail {cap.first_fail}), "
            f"p99 {cap.p99_ms_at_capacity:.1f} ms, saturation {cap.saturation_fps:.0f} frames/s, "
            f"{cap.elapsed_s:.0f} s")
        return
    if args.soak or not (args.sweep or args.streams):
        return  # the soak itself measures with --streams
    for n in (args.sweep or [args.streams]):
        gated("sweep" if args.sweep else "streams", lambda: measure_point(
            endpoint, n, target=target, shape=shape, pace=args.pace, curve=curve2, alive=alive, **common))


def _gated(report: dict[str, Any], gate: QuietGate | None, phase: str, measure: Callable[[], PointResult],
           say: Callable[[str], None]) -> PointResult:
    """Measure behind the quiet gate; every measurement (a superseded one too) goes into the
    report's points, the last one counts."""
    results = measure_gated(gate, measure, say)
    report["points"] += [{"phase": phase, "point": r.to_dict()} for r in results]
    return results[-1]


def settle_capacities(report: dict[str, Any]) -> None:
    """Each target's capacity is the median of its searches (the lower middle one when their
    count is even: a claim should not rest on the luckier half); every search stays in the
    report, and ``searches`` lists their capacities in round order."""
    for key, entries in report.get("searches", {}).items():
        ranked = sorted(entries, key=lambda e: e["capacity_streams"])
        median = ranked[(len(ranked) - 1) // 2]
        report["capacity"][key] = {**median, "searches": [e["capacity_streams"] for e in entries],
                                   "median_round": median["round"]}


def profile_target(report: dict[str, Any], args: argparse.Namespace, endpoint: str, shape: str,
                   common: dict[str, Any], curve: tuple[str, ...] | None, alive: Callable[[], None] | None,
                   say: Callable[[str], None]) -> None:
    """The latency a pipeline feels at 10 % and 80 % of ringserve's (median) capacity."""
    key = f"ringserve/{shape}"
    capacity = report["capacity"].get(key, {}).get("capacity_streams")
    if not capacity or args.no_profile or args.soak:
        return
    curve2 = (curve[0], curve[1]) if curve else None
    gate = common.get("quiet")
    common = {k: v for k, v in common.items() if k != "quiet"}
    report["profile"][key] = {}
    for share in (0.1, 0.8):
        n = max(1, round(share * capacity))
        p = _gated(report, gate, f"profile-{int(share * 100)}", lambda: measure_point(
            endpoint, n, target="ringserve", shape=shape, pace="realtime", curve=curve2, alive=alive, **common), say)
        report["profile"][key][f"{int(share * 100)}%"] = {
            "streams": n, "p50_ms": p.p50_ms, "p90_ms": p.p90_ms, "p99_ms": p.p99_ms, "max_ms": p.max_ms,
            "lost": p.lost, "passed": p.passed, "stable": p.stable}


def run_soak(report: dict[str, Any], args: argparse.Namespace, endpoint: str, shape: str, common: dict[str, Any],
             curve: tuple[str, ...] | None, alive: Callable[[], None] | None, say: Callable[[str], None],
             local: bool) -> None:
    if not local:
        say("soak: the engine is not on this machine; RSS cannot be read from here (run the bench there)")
    duration = parse_duration(args.soak)
    capacity = args.streams or report["capacity"].get(f"ringserve/{shape}", {}).get("capacity_streams", 0)
    if not capacity:
        raise BenchError("soak: no capacity to take a share of (the search found none)")
    streams = max(1, round(args.soak_load * capacity))
    say(f"soak: {streams} streams ({100 * args.soak_load:.0f} % of {capacity}), {shape} shape, {duration:.0f} s")
    result = soak(endpoint, streams, duration, shape=shape, budget_ms=args.budget_ms, settings=common["settings"],
                  fleet=common["fleet"], curve=(curve[0], curve[1]) if curve else None, progress=common["progress"],
                  alive=alive, window_s=args.soak_window_s)
    report["soak"] = {**result.to_dict(), "capacity": capacity, "load_share": args.soak_load}
    if result.point is not None:
        report["points"].append({"phase": "soak", "point": result.point.to_dict()})

