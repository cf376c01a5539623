"""The tuner's data: a configuration (Knobs), one evaluation of it (Measurement, Diagnostics),
and what limits it (diagnose)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.config import ServeConfig

TUNED_KEYS = ("workers", "intra_op_threads", "max_batch", "batch_delay_us", "spin_us", "busy_batch_delay_us")


# ---- configurations --------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Knobs:
    """One engine configuration: the ServeConfig settings the tuner varies."""

    workers: int
    intra_op_threads: int
    max_batch: int
    batch_delay_us: int
    spin_us: int
    busy_batch_delay_us: int = ServeConfig.busy_batch_delay_us

    @classmethod
    def default(cls) -> Knobs:
        """What `ringserve serve` runs with no settings on this machine."""
        cfg = ServeConfig()
        return cls(**{key: getattr(cfg, key) for key in TUNED_KEYS})

    def changes(self) -> dict[str, int]:
        """The settings that differ from ServeConfig's defaults."""
        default = self.default()
        return {key: getattr(self, key) for key in TUNED_KEYS if getattr(self, key) != getattr(default, key)}

    def serve_args(self) -> tuple[str, ...]:
        """`serve` flags for every setting but workers that differs from the defaults."""
        args: list[str] = []
        for key, value in self.changes().items():
            if key != "workers":
                args += ["--" + key.replace("_", "-"), str(value)]
        return tuple(args)

    def label(self) -> str:
        rest = " ".join(f"{key}={value}" for key, value in self.changes().items() if key != "workers")
        return f"workers={self.workers}" + (f" {rest}" if rest else "") + (" (default)" if self == self.default()
                                                                             else "")


def knob_grid(cores: int, default: Knobs) -> dict[str, tuple[int, ...]]:
    """The values the climb steps through, per knob, in order; the defaults are always in."""
    grid = {
        "workers": tuple(range(1, cores + 2)),
        "intra_op_threads": tuple(sorted({1, 2, *(t for t in (4, 8) if t <= cores)})),
        "max_batch": (16, 32, 64, 128, 256, 512, 1024, 2048),
        "batch_delay_us": (0, 200, 500, 1000, 2000, 4000),
        "spin_us": (0, 20, 50, 200, 1000),
        "busy_batch_delay_us": (2000, 4000, 8000, 16000),
    }
    return {key: tuple(sorted({*values, getattr(default, key)})) for key, values in grid.items()}


# ---- measurements ----------------------------------------------------------------------

@dataclass
class Diagnostics:
    """The engine in its busiest sampled window (>= 2 s) of one evaluation."""

    window_s: float
    frames_per_s: float
    busy_share: list[float]  # per worker: busy time / wall time (STATS busy_s, else /proc CPU)
    avg_batch: float
    queue_ms_per_frame: float  # mean time a frame waited in its worker's ring
    compute_us_per_frame: float  # batched model time per frame (the workers' own timing)
    frontend_cores: float  # the daemon's main process (poll loop + ZeroMQ I/O): CPU s per wall s
    worker_cores: float  # all workers together
    machine_busy: float  # /proc/stat: share of all cores busy (load generator and neighbours included)
    bench_cores: float = 0.0  # the tuner and its load generators
    machine_cores: float = 0.0  # machine_busy in cores

    @property
    def other_cores(self) -> float:
        """CPU used by neither the engine nor the bench: other people's work on a shared machine."""
        return max(self.machine_cores - self.frontend_cores - self.worker_cores - self.bench_cores, 0.0)

    @property
    def mean_busy(self) -> float:
        return sum(self.busy_share) / len(self.busy_share) if self.busy_share else 0.0


@dataclass
class Measurement:
    knobs: Knobs
    phase: str  # "workers", "climb" or "final"
    capacity_streams: int
    saturation_fps: float
    p99_ms: float | None = None
    seconds: float = 0.0  # wall time of the whole evaluation, daemon start included
    loadavg: float = 0.0  # 1-minute load average when it finished
    diag: Diagnostics | None = None
    error: str | None = None
    round: int = 0  # final re-measure round
    detail: dict[str, Any] = field(default_factory=dict)  # the bench's own result (points, ...)

    def score(self) -> tuple[int, float]:
        return (self.capacity_streams, self.saturation_fps) if self.error is None else (-1, 0.0)


MeasureFn = Callable[[Knobs, str], Measurement]


# ---- what limits a configuration -------------------------------------------------------

def diagnose(m: Measurement, cores: int) -> tuple[str, str]:
    """(limit, why): cores, front-end, model or latency budget, from STATS and /proc."""
    d = m.diag
    if d is None:
        return "unknown", "no engine STATS were sampled during the measurement"
    busy = d.mean_busy
    engine_cores = d.frontend_cores + d.worker_cores
    numbers = (f"At its busiest ({d.frames_per_s:.0f} frames/s): workers busy {busy:.0%} "
               f"(avg batch {d.avg_batch:.1f}, {d.compute_us_per_frame:.0f} us compute and "
               f"{d.queue_ms_per_frame:.2f} ms queueing per frame); CPU in cores: front-end {d.frontend_cores:.2f}, "
               f"workers {d.worker_cores:.2f}, load generator {d.bench_cores:.2f}, other work "
               f"{d.other_cores:.2f}; machine {d.machine_busy:.0%} busy")
    if d.frontend_cores >= 0.85:
        return "front-end", (f"the front-end: the daemon's single poll loop used ~1 core "
                             f"({d.frontend_cores:.2f}); more workers cannot help. {numbers}")
    if d.machine_busy >= 0.85 or engine_cores >= 0.85 * cores:
        shared = (f" -- {d.other_cores:.2f} of them taken by other work on this machine"
                  if d.other_cores >= 0.25 * cores else "")
        return "cores", (f"the cores: all {cores} were busy{shared}; more workers would only share the same "
                         f"cores. {numbers}")
    if busy >= 0.85:
        return "model", (f"the model: every worker was busy ~all the time ({busy:.0%}) running "
                         f"{d.compute_us_per_frame:.0f} us of compute per frame. {numbers}")
    return "latency budget", (f"the latency budget: the p99 crossed the budget before any CPU resource "
                              f"saturated (queueing {d.queue_ms_per_frame:.2f} ms per frame). {numbers}")
