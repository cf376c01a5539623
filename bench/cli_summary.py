"""`ringserve bench`, the report's end: ratios between capacities and against the raw ceiling
(and whether the targets were met), the summary printed, and the --json/--csv/--plot files."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from bench.replay import PointResult
from bench.report import TABLE_LEGEND, points_table, write_csv, write_plot
from bench.results import jsonable

# Issue #4's targets: each shape's share of the raw ceiling, and both shapes' ratio to the
# per-frame server.
SHARE_GOALS = {"ringserve/gateway": 0.75, "ringserve/device": 0.40}
X_GOAL = 5.0


def derive(report: dict[str, Any], baselines: set[str]) -> None:
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
        by_round = _by_round(report, key)
        per_frame_by_round = _by_round(report, "per-frame/device")
        if len(by_round) > 1:  # the searches themselves are in report["capacity"][key]["searches"]
            if raw:
                ratios["share_of_raw_by_round"] = {r: n / raw for r, n in by_round.items()}
            if per_frame_by_round and key != "per-frame/device":
                ratios["x_per_frame_by_round"] = {r: n / per_frame_by_round[r] for r, n in by_round.items()
                                                  if per_frame_by_round.get(r)}
        report["ratios"][key] = ratios
        if key in SHARE_GOALS:
            goal: dict[str, Any] = {}
            if raw:
                want = SHARE_GOALS[key]
                goal["share_of_raw"] = {"want": want, "got": c / raw, "met": c / raw >= want}
                if len(by_round) > 1:
                    goal["share_of_raw"]["met_in_rounds"] = sum(n / raw >= want for n in by_round.values())
            if per_frame:
                goal["x_per_frame"] = {"want": X_GOAL, "got": c / per_frame, "met": c >= X_GOAL * per_frame}
                if "x_per_frame_by_round" in ratios:
                    x_by_round = ratios["x_per_frame_by_round"].values()
                    goal["x_per_frame"]["met_in_rounds"] = sum(x >= X_GOAL for x in x_by_round)
            for g in goal.values():
                if "met_in_rounds" in g:
                    g["rounds"] = len(by_round)
            report["targets"][key] = goal


def _by_round(report: dict[str, Any], key: str) -> dict[int, int]:
    """A target's capacity in each round of --repeat (round number -> streams)."""
    return {e["round"]: e["capacity_streams"] for e in report.get("searches", {}).get(key, [])}


def print_summary(report: dict[str, Any]) -> None:
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
        width = 13 if report.get("repeat", 1) > 1 else 11
        print(f"{'phase':>{width}} " + table[0])
        for e, line in zip(points, table[1:]):
            phase = e["phase"] + (f" r{e['round']}" if report.get("repeat", 1) > 1 and "round" in e else "")
            phase += "*" if e["point"].get("superseded") else ""
            print(f"{phase:>{width}} " + line)
        print(TABLE_LEGEND)
        if any(e["point"].get("superseded") for e in points):
            print("  *: failed while other tenants + steal exceeded the quiet gate; measured again, the later row counts")
    raw = report["baselines"].get("raw")
    if raw:
        runs = ", ".join(f"{r['when']} B={r['batch']} {r['frames_per_s']:.0f} "
                         f"({r['wall_us_per_frame']:.0f} us a frame)" for r in raw["runs"])
        when = "before, between rounds and after" if report.get("repeat", 1) > 1 else "before and after"
        print(f"\nraw onnxruntime ceiling: {raw['frames_per_s']:.0f} frames/s = {raw['streams']:.0f} streams, mean of the "
              f"best batch {when} ({raw['workers']} processes; {runs})")
    if report["capacity"]:
        print(f"\nreal-time capacity (p99 <= {report['budget_ms']:g} ms, nothing lost, >= 98 % of needed frames/s)")
        for key, cap in report["capacity"].items():
            r = report["ratios"].get(key, {})
            extra = []
            if "share_of_raw" in r:
                extra.append(f"{_share(key, r['share_of_raw'])} % of raw")
            if "x_per_frame" in r:
                extra.append(f"{_times(key, r['x_per_frame'])}x per-frame")
            if r.get("frontend_cpu_pct_at_capacity") is not None:
                extra.append(f"front-end CPU {r['frontend_cpu_pct_at_capacity']:.0f} %")
            if r.get("bench_cpu_pct_at_capacity") is not None:
                extra.append(f"bench CPU {r['bench_cpu_pct_at_capacity']:.0f} %")
            if r.get("others_cpu_pct_at_capacity") is not None:
                extra.append(f"other tenants {r['others_cpu_pct_at_capacity']:.0f} %")
            if r.get("steal_pct_at_capacity") is not None:
                extra.append(f"steal {r['steal_pct_at_capacity']:.0f} %")
            limit = " (max_streams reached)" if cap.get("limited_by_max") else ""
            if len(cap.get("searches", [])) > 1:
                limit += (f" (median of {len(cap['searches'])} searches: {', '.join(map(str, cap['searches']))}; "
                          f"its figures from round {cap['median_round']})")
            print(f"  {key:<18} {cap['capacity_streams']:>5} streams{limit}, p99 "
                  f"{_fmt(cap.get('p99_ms_at_capacity'))} ms, saturation {cap['saturation_fps']:.0f} frames/s"
                  + (f"; {', '.join(extra)}" if extra else ""))
            if len(cap.get("searches", [])) > 1:
                print("  " + " " * 18 + " by round: " + "; ".join(_round_text(report, key, r, n)
                                                             for r, n in _by_round(report, key).items()))
    for key, goal in report["targets"].items():
        for name, g in goal.items():
            want = f"{100 * g['want']:.0f} % of raw" if name == "share_of_raw" else f"{g['want']:.0f}x per-frame"
            got = f"{_share(key, g['got'])} %" if name == "share_of_raw" else f"{_times(key, g['got'])}x"
            rounds = f" (met in {g['met_in_rounds']} of {g['rounds']} rounds)" if "met_in_rounds" in g else ""
            print(f"  target {key} >= {want}: got {got} -> {'met' if g['met'] else 'MISSED'}{rounds}")
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


def _round_text(report: dict[str, Any], key: str, search_round: int, streams: int) -> str:
    r = report["ratios"].get(key, {})
    parts = [f"{search_round}: {streams}"]
    if search_round in r.get("share_of_raw_by_round", {}):
        parts.append(f"{_share(key, r['share_of_raw_by_round'][search_round])} %")
    if search_round in r.get("x_per_frame_by_round", {}):
        parts.append(f"{_times(key, r['x_per_frame_by_round'][search_round])}x")
    return " ".join(parts[:1]) + (f" ({', '.join(parts[1:])})" if parts[1:] else "")


def _share(key: str, share: float) -> str:
    """A share of raw in per cent, against ``key``'s target if it has one (see _beside)."""
    goal = SHARE_GOALS.get(key)
    return _beside(100 * share, None if goal is None else 100 * goal, 0)


def _times(key: str, ratio: float) -> str:
    return _beside(ratio, X_GOAL if key in SHARE_GOALS else None, 1)


def _beside(value: float, goal: float | None, decimals: int) -> str:
    """``value`` with ``decimals`` decimals, or more where that rounding would put it on the
    other side of ``goal`` (4.96 is "4.96", not "5.0", against 5)."""
    text = f"{value:.{decimals}f}"
    while goal is not None and (float(text) >= goal) != (value >= goal) and decimals < 4:
        decimals += 1
        text = f"{value:.{decimals}f}"
    return text


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def write_outputs(report: dict[str, Any], args: argparse.Namespace, say: Callable[[str], None]) -> None:
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(jsonable(report), fh, indent=1, allow_nan=False)
        say(f"wrote {args.json}")
    if args.csv:
        write_csv(report, args.csv)
        say(f"wrote {args.csv}")
    if args.plot:
        if report.get("soak"):  # one point held for the whole run: its picture is over time, not over N
            from bench.soak_plot import write_soak_plot

            write_soak_plot(report, args.plot)
        else:
            write_plot(report, args.plot)
        say(f"wrote {args.plot}")
