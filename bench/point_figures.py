"""A point's figures from its load processes' window reports: windows merged, latency
percentiles, the stability rule, each window's summary, and the point's totals and verdict
(pass criteria in bench/replay.py's docstring)."""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

import numpy as np

from bench.fleet import PointRun
from bench.probe import cpu_delta, stats_delta
from bench.results import PointResult, PointSettings


def merge_windows(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The load processes' reports of one window (or of several) as one."""
    out: dict[str, Any] = {"sent": 0, "answered": 0, "shed": 0, "timed_out": 0, "late": 0, "unexpected": 0,
                           "in_flight": 0, "refused": Counter(), "other_errors": Counter()}
    lats, lateness = [], []
    for r in reports:
        for key in ("sent", "answered", "shed", "timed_out", "late", "unexpected", "in_flight"):
            out[key] += r[key]
        out["refused"].update(r["refused"])
        out["other_errors"].update(r["other_errors"])
        lats.append(np.frombuffer(r["lat"], np.float32))
        lateness.append(np.frombuffer(r["lateness"], np.float32))
    out["lat"] = np.concatenate(lats) if lats else np.empty(0, np.float32)
    out["lateness"] = np.concatenate(lateness) if lateness else np.empty(0, np.float32)
    return out


def latency_figures(lat: np.ndarray, budget_ms: float, sent_chunks: int) -> dict[str, float]:
    if not len(lat):
        return {"p50_ms": math.nan, "p90_ms": math.nan, "p95_ms": math.nan, "p99_ms": math.nan,
                "max_ms": math.nan, "mean_ms": math.nan, "within_budget": 0.0}
    p50, p90, p95, p99 = (float(v) for v in np.percentile(lat, [50, 90, 95, 99]))
    within = int(np.count_nonzero(lat <= budget_ms))
    return {"p50_ms": p50, "p90_ms": p90, "p95_ms": p95, "p99_ms": p99, "max_ms": float(lat.max()),
            "mean_ms": float(lat.mean()), "within_budget": within / max(sent_chunks, len(lat))}


def agree(values: list[float], rel: float, abs_tol: float) -> bool:
    """Every value within ``rel`` of their mean (or within ``abs_tol``); none NaN or infinite."""
    if not values or any(not math.isfinite(v) for v in values):
        return False
    mean = sum(values) / len(values)
    return all(abs(v - mean) <= max(rel * abs(mean), abs_tol) for v in values)


def window_summary(index: int, merged: dict[str, Any], before: dict[str, Any], after: dict[str, Any],
                   s: PointSettings, result: PointResult, budget_ms: float, warm: bool) -> dict[str, Any]:
    chunks_sent = merged["sent"] // s.chunk_frames
    summary: dict[str, Any] = {
        "index": index, "warmup": warm, "streams": result.streams, "target": result.target, "shape": result.shape,
        "sent": merged["sent"], "answered": merged["answered"], "shed": merged["shed"],
        "refused": dict(merged["refused"]), "timed_out": merged["timed_out"], "late": merged["late"],
        "in_flight": merged["in_flight"],
        "achieved_fps": (merged["answered"] - merged["shed"]) / s.window_s,
        "sent_fps": merged["sent"] / s.window_s, "needed_fps": result.needed_fps,
        **latency_figures(merged["lat"], budget_ms, chunks_sent),
        "lateness_p50_ms": float(np.percentile(merged["lateness"], 50)) if len(merged["lateness"]) else math.nan,
        "lateness_p99_ms": float(np.percentile(merged["lateness"], 99)) if len(merged["lateness"]) else math.nan,
        "engine": stats_delta(before["stats"], after["stats"]), "cpu": cpu_delta(before, after),
        "loadavg1": os.getloadavg()[0],
    }
    return summary


def finish_point(result: PointResult, run: PointRun, measured: list[dict[str, Any]],
                 merged_measured: list[dict[str, Any]], snaps: list[dict[str, Any]], s: PointSettings,
                 budget_ms: float, judge_all: bool = False) -> None:
    """The point's integrity counts (every window, warm-up and drain included), its figures
    over the judged windows, and its verdict. Judged: the last ``stable_windows`` measured
    (the ones that agreed), or every measured window (``judge_all``: a point held for a fixed
    duration, a soak, whose figures are then the whole run's)."""
    every = merge_windows([r for reports in run.windows.values() for r in reports])
    result.sent, result.answered, result.shed = every["sent"], every["answered"], every["shed"]
    result.refused = dict(every["refused"])
    result.timed_out, result.late, result.unexpected = every["timed_out"], every["late"], every["unexpected"]
    result.other_errors = dict(every["other_errors"])
    for done in run.done.values():
        after = done.get("after_close", {})
        result.late += after.get("late", 0)
        result.unexpected += after.get("unexpected", 0)
        for key, value in after.get("other_errors", {}).items():
            result.other_errors[key] = result.other_errors.get(key, 0) + value
    result.streams_closed = sum(d.get("closed", 0) for d in run.done.values())
    result.lost = result.shed + sum(result.refused.values()) + result.timed_out
    result.unexplained = result.sent - (result.answered - result.shed) - result.lost
    result.measured_windows = len(measured)
    result.measured_s = len(measured) * s.window_s
    result.windows = [{k: v for k, v in w.items() if not k.startswith("_")} for w in measured]
    judged = list(range(len(measured)))
    if not judge_all:
        judged = judged[-s.stable_windows:]
    result.judged_windows = len(judged)
    if judged:
        lat = np.concatenate([merged_measured[i]["lat"] for i in judged])
        lateness = np.concatenate([merged_measured[i]["lateness"] for i in judged])
        sent = sum(merged_measured[i]["sent"] for i in judged)
        ok = sum(merged_measured[i]["answered"] - merged_measured[i]["shed"] for i in judged)
        seconds = len(judged) * s.window_s
        result.achieved_fps = ok / seconds
        result.sent_fps = sent / seconds
        figures = latency_figures(lat, budget_ms, sent // s.chunk_frames)
        for key, value in figures.items():
            setattr(result, key, value)
        if len(lateness):
            result.lateness_p50_ms, result.lateness_p99_ms = (float(v) for v in np.percentile(lateness, [50, 99]))
            result.lateness_max_ms = float(lateness.max())
        first, last = measured[judged[0]]["_snap"][0], measured[judged[-1]]["_snap"][1]
        result.engine = stats_delta(snaps[first]["stats"], snaps[last]["stats"])
        result.cpu = cpu_delta(snaps[first], snaps[last])
    result.throughput_ratio = result.achieved_fps / result.needed_fps if result.needed_fps else 0.0
    reasons = []
    if not judged:
        reasons.append("nothing measured")
    if not result.p99_ms <= budget_ms:
        reasons.append(f"p99 {result.p99_ms:.1f} ms > {budget_ms:g} ms")
    if result.lost:
        reasons.append(f"{result.lost} frames lost (shed {result.shed}, refused {sum(result.refused.values())}, "
                       f"timed out {result.timed_out})")
    if result.unexplained:
        reasons.append(f"{result.unexplained} frames unaccounted for")
    if result.throughput_ratio < s.throughput_min:
        reasons.append(f"throughput {100 * result.throughput_ratio:.1f} % of needed < {100 * s.throughput_min:g} %")
    result.fail_reasons = reasons
    result.passed = not reasons and result.stop_reason != "open_failed"
    if result.lateness_p99_ms > budget_ms / 2:
        result.warnings.append(f"the load generator fell behind its schedule (send-time error p99 "
                               f"{result.lateness_p99_ms:.1f} ms): the bench, not only the server, was short of CPU")
    if result.unexpected:
        result.warnings.append(f"{result.unexpected} replies matched nothing sent")
    if result.streams_closed < result.streams_opened:
        result.warnings.append(f"only {result.streams_closed} of {result.streams_opened} streams closed cleanly")

