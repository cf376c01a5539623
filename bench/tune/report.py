"""What `ringserve tune` shows: live progress, the table of every configuration, the verdict."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from bench.tune.model import Knobs, Measurement, diagnose
from bench.tune.search import TuneResult, _pct


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
    return (f"{k.workers:>2} {k.intra_op_threads:>3} {k.max_batch:>5} {k.batch_delay_us:>6} {k.busy_batch_delay_us:>6} "
            f"{k.spin_us:>5} "
            f"{cap:>8} {m.saturation_fps:>8.0f} {p99:>6} {diag} {m.phase:>7}")


_HEAD = (f"{'W':>2} {'thr':>3} {'batch':>5} {'delay':>6} {'bdelay':>6} {'spin':>5} {'capacity':>8} {'sat fps':>8} {'p99ms':>6} "
         f"{'busy':>5} {'avgB':>6} {'q ms':>6} {'c us':>6} {'fe':>5} {'other':>5} {'phase':>7}")


def format_report(result: TuneResult, *, budget_ms: float, shape: str, loadavg: Sequence[float],
                  loadavg_before: Sequence[float] | None = None) -> str:
    title = f"every configuration tried, best first (capacity: streams in real time at p99 <= {budget_ms:g} ms, "
    lines = [title + f"shape {shape})", "  " + _HEAD]
    lines += ["  " + _row(m) for m in result.ranked()]
    lines += ["  W workers, thr intra-op threads, batch max_batch, delay batch_delay_us, bdelay busy_batch_delay_us,",
              "  spin spin_us;",
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
