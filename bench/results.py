"""What a point is held with and what a point or a capacity search returns: plain
dataclasses whose ``to_dict()`` is strict JSON (definitions in bench/replay.py's docstring)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from bench.load_plan import FRAME_MS

FRAMES_PER_S = 1000.0 / FRAME_MS  # 31.25: what one live microphone needs


@dataclass(frozen=True)
class PointSettings:
    """How a point is held: windows of ``window_s``; the first ``warmup_s`` are not measured;
    then windows until the last ``stable_windows`` agree (or ``max_point_s`` of measuring)."""

    window_s: float = 2.0
    warmup_s: float = 2.0
    stable_windows: int = 3
    stability: float = 0.10
    latency_abs_tol_ms: float | None = None  # None: 5 % of the budget
    max_point_s: float = 24.0  # of measuring, warm-up excluded
    chunk_frames: int = 1  # frames per message (--chunk-ms / 32)
    tick_ms: float = 4.0  # gateway shape: one AUDIO message per tick
    timeout_ms: float = 2000.0  # a chunk without a reply for this long is lost (timed out)
    window: int = 2  # max pace: chunks in flight per stream
    load_procs: int | None = None  # None: auto
    # gateway shape: the most streams one connection may hold (the engine's
    # max_streams_per_connection, read from its STATS); a load process is one gateway connection
    streams_per_connection: int = 1024
    link: str = "zmtp"  # plain sockets speaking ZMTP (bench/load_zmtp.py) or "libzmq" (DEALERs)
    seed: int = 1
    throughput_min: float = 0.98  # a passing point achieves this share of the needed frames/s


FULL = PointSettings()
QUICK = PointSettings(window_s=1.0, warmup_s=0.5, stable_windows=2, max_point_s=2.0, stability=0.15)


@dataclass
class PointResult:
    target: str
    shape: str
    pace: str
    streams: int
    budget_ms: float
    chunk_ms: float
    load_procs: int
    window_s: float
    needed_fps: float = 0.0  # 31.25 per stream
    achieved_fps: float = 0.0  # frames answered (not shed) per second, judged windows
    sent_fps: float = 0.0
    throughput_ratio: float = 0.0  # achieved / needed
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    mean_ms: float = math.nan
    within_budget: float = 0.0  # share of chunks answered within budget_ms (of those sent in the windows)
    lateness_p50_ms: float = math.nan  # send time - absolute schedule (realtime pace)
    lateness_p99_ms: float = math.nan
    lateness_max_ms: float = math.nan
    # integrity, whole point (warm-up and drain included), in frames
    sent: int = 0
    answered: int = 0  # shed included
    shed: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # ERROR replies, by code
    timed_out: int = 0
    late: int = 0  # replies that came after the time-out (their frames are in timed_out)
    lost: int = 0  # shed + refused + timed_out
    unexplained: int = 0  # sent - (answered - shed) - lost: must be 0
    unexpected: int = 0  # replies matching nothing sent
    other_errors: dict[str, int] = field(default_factory=dict)
    streams_opened: int = 0
    streams_closed: int = 0
    open_failures: dict[str, int] = field(default_factory=dict)
    # how the point was held
    measured_windows: int = 0
    judged_windows: int = 0
    measured_s: float = 0.0
    stable: bool = False
    stop_reason: str = ""  # stable | max_duration | duration | overloaded | lost | open_failed
    passed: bool = False
    fail_reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. the load generator fell behind its schedule
    superseded: bool = False  # a QuietGate measured this point again (the later result counts)
    noise_before_pct: float | None = None  # QuietGate: other tenants + steal just before, % of a core
    engine: dict[str, Any] = field(default_factory=dict)  # STATS deltas over the judged windows
    cpu: dict[str, Any] = field(default_factory=dict)  # % of one core, judged windows
    loadavg: list[float] = field(default_factory=list)
    windows: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = 0.0  # time.time()

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


@dataclass
class CapacityResult:
    target: str
    shape: str
    budget_ms: float
    capacity_streams: int  # largest N that passed (0: none did)
    saturation_fps: float  # most frames/s any point achieved (overloaded points show the ceiling)
    p99_ms_at_capacity: float
    points: list[PointResult]
    first_fail: int | None = None  # smallest N that failed (None: max_streams passed)
    limited_by_max: bool = False  # max_streams passed: the capacity may be higher
    elapsed_s: float = 0.0

    @property
    def capacity_point(self) -> PointResult | None:
        passed = [p for p in self.points if p.passed and p.streams == self.capacity_streams and not p.superseded]
        return passed[-1] if passed else None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "points"}
        out["points"] = [p.to_dict() for p in self.points]
        return jsonable(out)


def jsonable(obj: Any) -> Any:
    """NaN/inf -> None, tuples -> lists: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj

