"""What `ringserve bench` shows and writes: live progress, the summary table, CSV, the plot."""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Iterable
from typing import IO, Any

from bench.replay import PointResult

BUDGET_COLOR = "#c0392b"
SERIES_STYLE = {  # (target, shape) -> matplotlib colour, label
    ("ringserve", "device"): ("#1f77b4", "ringserve, device shape"),
    ("ringserve", "gateway"): ("#2ca02c", "ringserve, gateway shape"),
    ("per-frame", "device"): ("#ff7f0e", "per-frame server (baseline)"),
}


def _f(value: Any, spec: str = ".1f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def _us(ms: float | None) -> float | None:
    return None if ms is None else 1000 * ms


class Progress:
    """One updating line on a TTY (per window), plain lines otherwise (per point)."""

    def __init__(self, stream: IO[str] | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = 0

    def say(self, text: str) -> None:
        self._clear()
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "point_start":
            if self.tty:
                self._line(f"{event['target']} {event['shape']} N={event['streams']}: opening streams ...")
        elif kind == "window":
            if not self.tty:
                return
            tag = "warm-up" if event["warmup"] else f"window {event['index']}"
            lost = event["shed"] + sum(event["refused"].values()) + event["timed_out"]
            cpu = event.get("cpu", {})
            self._line(f"{event['target']} {event['shape']} N={event['streams']} {tag}: "
                       f"p50 {_f(event['p50_ms'])} p99 {_f(event['p99_ms'])} ms, "
                       f"{event['achieved_fps']:.0f}/{event['needed_fps']:.0f} fr/s, lost {lost}, "
                       f"engine CPU {_f(cpu.get('engine_pct'), '.0f')} %, bench {_f(cpu.get('bench_pct'), '.0f')} %, "
                       f"load {event['loadavg1']:.1f}")
        elif kind == "point_end":
            self.say(point_line(event["result"]))

    def _line(self, text: str) -> None:
        self._clear()
        self.stream.write(text)
        self.stream.flush()
        self.width = len(text)


def point_line(p: PointResult) -> str:
    verdict = "PASS" if p.passed else "fail: " + "; ".join(p.fail_reasons)
    stable = "stable" if p.stable else f"unstable ({p.stop_reason})"
    if p.warnings:
        stable += "; " + "; ".join(p.warnings)
    return (f"{p.target} {p.shape} {p.pace} N={p.streams}: p50 {_f(p.p50_ms)} p99 {_f(p.p99_ms)} max "
            f"{_f(p.max_ms)} ms, {p.achieved_fps:.0f}/{p.needed_fps:.0f} frames/s, lost {p.lost}, "
            f"{stable}, {p.measured_s:.0f} s -> {verdict}")


COLUMNS = [  # header, width, getter
    ("target", 9, lambda p: p.target),
    ("shape", 7, lambda p: p.shape),
    ("N", 5, lambda p: str(p.streams)),
    ("sent", 8, lambda p: str(p.sent)),
    ("answered", 8, lambda p: str(p.answered)),
    ("lost", 5, lambda p: str(p.lost)),
    ("p50", 6, lambda p: _f(p.p50_ms)),
    ("p90", 6, lambda p: _f(p.p90_ms)),
    ("p95", 6, lambda p: _f(p.p95_ms)),
    ("p99", 6, lambda p: _f(p.p99_ms)),
    ("max", 7, lambda p: _f(p.max_ms)),
    ("<=bud%", 6, lambda p: _f(100 * p.within_budget)),
    ("fr/s", 7, lambda p: f"{p.achieved_fps:.0f}"),
    ("need%", 6, lambda p: _f(100 * p.throughput_ratio)),
    ("batch", 6, lambda p: _f(p.engine.get("avg_batch"))),
    ("queue", 6, lambda p: _f(p.engine.get("queue_ms_per_frame"), ".2f")),
    ("comp", 6, lambda p: _f(p.engine.get("compute_ms_per_batch"), ".2f")),
    ("us/fr", 5, lambda p: _f(_us(p.engine.get("compute_ms_per_frame")), ".0f")),
    ("fe%", 5, lambda p: _f(p.cpu.get("frontend_pct", p.cpu.get("server_pct")), ".0f")),
    ("wrk%", 5, lambda p: _f(p.cpu.get("workers_pct"), ".0f")),
    ("bench%", 6, lambda p: _f(p.cpu.get("bench_pct"), ".0f")),
    ("other%", 6, lambda p: _f(p.cpu.get("others_pct"), ".0f")),
    ("steal%", 6, lambda p: _f(p.cpu.get("steal_pct"), ".0f")),
    ("sched", 5, lambda p: _f(p.lateness_p99_ms)),
    ("stable", 6, lambda p: "yes" if p.stable else "no"),
    ("pass", 4, lambda p: "yes" if p.passed else "no"),
]


def points_table(points: Iterable[PointResult]) -> str:
    lines = [" ".join(f"{h:>{w}}" for h, w, _ in COLUMNS)]
    for p in points:
        lines.append(" ".join(f"{get(p):>{w}}" for _, w, get in COLUMNS))
    return "\n".join(lines)


TABLE_LEGEND = """\
  latency columns in ms, from a chunk leaving the load process to its result arriving there;
  <=bud%: share answered within the budget; fr/s: frames answered per second (not shed), need%:
  of the 31.25 per stream a live microphone needs; lost = shed + refused + timed out (whole
  point); batch: engine frames per model execution; queue: ms a frame waited in a worker's
  queue (avg); comp: ms per batch execution (avg); us/fr: the same per frame (wall time: the
  gather, the model, the results, and any time the worker lost its core meanwhile; far above
  the raw runs' us a frame at a similar CPU share, the host was slow during the point, which
  steal% does not always show); fe%/wrk%/bench%: CPU of the front-end
  (daemon process; per-frame server for the baseline) / the workers / the bench's own
  processes, in % of one core (200 % = 2 cores); other%: the rest of the machine's busy CPU
  (/proc/stat): other tenants, softirq; steal%: CPU the hypervisor gave to other guests; sched: p99 of the send-time error against the
  absolute schedule, ms (the load generator keeping time; large = the bench itself was short of CPU)."""


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for entry in report.get("points", []):
        p = entry["point"]
        row = {"phase": entry["phase"], "round": entry.get("round"), "target": p["target"], "shape": p["shape"],
               "pace": p["pace"], "streams": p["streams"]}
        for key in ("needed_fps", "achieved_fps", "sent_fps", "throughput_ratio", "p50_ms", "p90_ms", "p95_ms",
                    "p99_ms", "max_ms", "mean_ms", "within_budget", "lateness_p50_ms", "lateness_p99_ms",
                    "lateness_max_ms", "sent", "answered", "shed", "timed_out", "late", "lost", "unexplained",
                    "streams_opened", "streams_closed", "measured_windows", "measured_s", "stable", "stop_reason",
                    "passed", "chunk_ms", "load_procs", "budget_ms"):
            row[key] = p.get(key)
        row["refused"] = sum((p.get("refused") or {}).values())
        for key in ("avg_batch", "queue_ms_per_frame", "compute_ms_per_batch", "compute_ms_per_frame",
                    "queue_share", "request_ms"):
            row[f"engine_{key}"] = (p.get("engine") or {}).get(key)
        for key in ("frontend_pct", "workers_pct", "engine_pct", "server_pct", "bench_pct", "loadgen_pct",
                    "machine_pct", "others_pct", "steal_pct"):
            row[f"cpu_{key}"] = (p.get("cpu") or {}).get(key)
        row["loadavg1"] = (p.get("loadavg") or [None])[0]
        row["fail_reasons"] = "; ".join(p.get("fail_reasons") or [])
        row["warnings"] = "; ".join(p.get("warnings") or [])
        row["superseded"] = p.get("superseded")
        row["noise_before_pct"] = p.get("noise_before_pct")
        rows.append(row)
    return rows


def write_csv(report: dict[str, Any], path: str) -> None:
    rows = csv_rows(report)
    with open(path, "w", newline="") as fh:
        if not rows:
            return
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def require_matplotlib(command: str = "bench") -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(f"ringserve {command}: --plot needs matplotlib: pip install -e '.[bench]' "
                         "(or: make install, which installs the bench extra)") from None


def write_plot(report: dict[str, Any], path: str) -> None:
    """Latency percentiles (top) and achieved frames/s (bottom) against N, one colour per
    server and shape; the budget line, the needed frames/s and the raw ceiling drawn."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = float(report.get("budget_ms", 32.0))
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in report.get("points", []):
        if entry["phase"] == "soak":
            continue
        p = entry["point"]
        if p.get("pace") != "realtime" or p.get("p99_ms") is None or p.get("superseded"):
            continue
        capacity = report.get("capacity", {}).get(f"{p['target']}/{p['shape']}", {})
        if "round" in entry and entry["round"] != capacity.get("median_round", entry["round"]):
            continue  # --repeat: the curve is the median search's; the others show as the capacity's range
        series.setdefault((p["target"], p["shape"]), []).append(p)
    fig, (ax_lat, ax_fps) = plt.subplots(2, 1, figsize=(10, 9), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 2]})
    n_max, n_min = 1, None
    for key, points in series.items():
        color, label = SERIES_STYLE.get(key, ("#7f7f7f", f"{key[0]}, {key[1]}"))
        by_n: dict[int, dict[str, Any]] = {}
        for p in points:
            by_n[p["streams"]] = p  # the last measurement of an N wins
        ns = sorted(by_n)
        n_max = max(n_max, ns[-1])
        n_min = ns[0] if n_min is None else min(n_min, ns[0])
        p50 = [by_n[n]["p50_ms"] for n in ns]
        p99 = [by_n[n]["p99_ms"] for n in ns]
        ax_lat.plot(ns, p99, "-", color=color, lw=2, label=f"{label}: p99")
        ax_lat.plot(ns, p50, "--", color=color, lw=1.2, label=f"{label}: p50")
        for n in ns:
            p = by_n[n]
            face = color if p["passed"] else "white"
            ax_lat.plot([n], [p["p99_ms"]], "o", color=color, mfc=face, ms=6)
            ax_fps.plot([n], [p["achieved_fps"]], "o", color=color, mfc=face, ms=6)
        ax_fps.plot(ns, [by_n[n]["achieved_fps"] for n in ns], "-", color=color, lw=2, label=label)
        capacity = report.get("capacity", {}).get(f"{key[0]}/{key[1]}")
        if capacity and capacity.get("capacity_streams"):
            c = capacity["capacity_streams"]
            ax_lat.axvline(c, color=color, ls=":", lw=1.2)
            searches = capacity.get("searches") or []
            if len(searches) > 1:
                ax_lat.axvspan(min(searches), max(searches), color=color, alpha=0.12, lw=0,
                               label=f"{label}: {len(searches)} searches, {min(searches)}-{max(searches)}")
            ax_lat.annotate(f"capacity {c}", xy=(c, budget), xytext=(4, 6), textcoords="offset points",
                            color=color, fontsize=9, rotation=90, va="bottom")
    ax_lat.axhline(budget, color=BUDGET_COLOR, lw=1.5, ls="-")
    ax_lat.text(1.01, budget, f"{budget:g} ms budget", color=BUDGET_COLOR, va="center", fontsize=9,
                transform=ax_lat.get_yaxis_transform())
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency, ms (log)")
    ax_lat.set_title("Real-time microphones: latency and throughput vs number of streams\n"
                     "(filled marker: point passed - p99 within budget, nothing lost, >= 98 % of needed frames/s)",
                     fontsize=11)
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend(fontsize=8, loc="upper left", ncol=1)
    n_min = n_min or 1
    xs = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192) if n_min / 2 <= n <= 2 * n_max]
    import numpy as np

    grid = np.geomspace(max(1, n_min / 2), 2 * n_max, 200)
    ax_fps.plot(grid, 31.25 * grid, color="#555555", ls="--", lw=1, label="needed: 31.25 frames/s per stream")
    for key_text, sat in report.get("saturation", {}).items():
        target, _, shape = key_text.partition("/")
        color, label = SERIES_STYLE.get((target, shape), ("#7f7f7f", key_text))
        ax_fps.axhline(sat["frames_per_s"], color=color, ls=":", lw=1.5,
                       label=f"{label}: saturation, closed loop ({sat['frames_per_s']:.0f}/s)")
    raw = report.get("baselines", {}).get("raw", {}).get("frames_per_s")
    if raw:
        ax_fps.axhline(raw, color="#9467bd", ls="-.", lw=1.5, label=f"raw onnxruntime ceiling: {raw:.0f} frames/s")
    ax_fps.set_xscale("log", base=2)
    top = max([raw or 0.0] + [p["achieved_fps"] for pts in series.values() for p in pts]
              + [sat["frames_per_s"] for sat in report.get("saturation", {}).values()] + [1.0])
    ax_fps.set_ylim(0, 1.1 * top)
    ax_fps.set_xticks(xs)
    ax_fps.set_xticklabels([str(x) for x in xs])
    ax_fps.set_xlim(left=max(1.0, n_min / 1.3), right=n_max * 1.3)
    ax_fps.set_xlabel("concurrent real-time streams N (32 ms frames)")
    ax_fps.set_ylabel("frames/s answered")
    ax_fps.grid(True, which="both", alpha=0.3)
    ax_fps.legend(fontsize=8, loc="upper left")
    machine = report.get("machine", {})
    fig.text(0.01, 0.005, f"{machine.get('cpus')} CPUs ({machine.get('cpu_model', '')}), onnxruntime "
             f"{machine.get('onnxruntime')}, source {machine.get('source')}, load avg "
             f"{_f((machine.get('loadavg') or [None])[0], '.1f')} at start; bench on the same machine",
             fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
