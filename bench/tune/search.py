"""The search: workers coarse to fine, hill climbing over the other knobs, a same-run final."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from bench.tune.model import Knobs, MeasureFn, Measurement, knob_grid


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
                climb_knobs=("max_batch", "batch_delay_us", "busy_batch_delay_us", "spin_us", "intra_op_threads",
                             "workers"),
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


def _pct(a: float, b: float) -> str:  # here, not in report.py: the search's note uses it too
    return f"{100 * (a / b - 1):+.0f}%" if b > 0 else "n/a"
