"""Soak: hold a real-time load for a long time and watch every engine process's memory.

RSS (VmRSS of /proc/PID/status) of the daemon and of each worker is sampled once per window
while the load runs; per process the report gives start / end / max and the slope of a
least-squares line through the second half of the samples (the first half includes warm-up
growth: arenas, caches). Growth is *flagged* when that slope is at least
``flag_mib_per_hour`` and the process ended at least ``flag_mib`` above where it started.
Latency and loss are those of an ordinary point held for the whole duration.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from bench.procinfo import rss_bytes
from bench.replay import (
    FULL,
    LoadFleet,
    PointResult,
    PointSettings,
    _jsonable,
    _StatsClient,
    measure_point,
)

MIB = 1 << 20


def parse_duration(text: str) -> float:
    """"30m", "90s", "1h30m", "2h", "45" (seconds) -> seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", text):
        raise ValueError(f"duration {text!r}: use e.g. 30m, 90s, 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


@dataclass
class SoakResult:
    streams: int
    duration_s: float
    flagged: bool
    processes: dict[str, dict[str, Any]]  # role -> pid, start/end/max MiB, slope MiB/h, flagged
    samples: list[dict[str, Any]] = field(default_factory=list)  # t (s), role -> MiB
    point: PointResult | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["point"] = self.point.to_dict() if self.point is not None else None
        return dict(_jsonable(out))


def _engine_roles(stats: dict[str, Any] | None) -> dict[str, int]:
    if not stats:
        return {}
    roles = {"frontend": int(stats["pid"])}
    for w in stats.get("workers", []):
        if w.get("pid"):
            roles[f"worker-{w['index']}"] = int(w["pid"])
    return roles


def summarize_rss(samples: list[dict[str, Any]], pids: dict[str, int], flag_mib_per_hour: float = 2.0,
                  flag_mib: float = 2.0) -> dict[str, dict[str, Any]]:
    out = {}
    for role, pid in pids.items():
        series = [(s["t"], s[role]) for s in samples if s.get(role) is not None]
        if not series:
            continue
        t = np.array([x for x, _ in series])
        mib = np.array([y for _, y in series])
        half = t >= t[-1] / 2
        slope = math.nan
        if half.sum() >= 3 and np.ptp(t[half]) > 0:
            slope = float(np.polyfit(t[half], mib[half], 1)[0]) * 3600.0
        flagged = bool(math.isfinite(slope) and slope >= flag_mib_per_hour and mib[-1] - mib[0] >= flag_mib)
        out[role] = {"pid": pid, "start_mib": float(mib[0]), "end_mib": float(mib[-1]), "max_mib": float(mib.max()),
                     "slope_mib_per_h": slope, "flagged": flagged, "samples": len(series)}
    return out


def soak(endpoint: str, streams: int, duration_s: float, *, shape: str = "device", budget_ms: float = 32.0,
         settings: PointSettings | None = None, fleet: LoadFleet | None = None,
         curve: tuple[str, str] | None = None, progress: Callable[[dict[str, Any]], None] | None = None,
         alive: Callable[[], None] | None = None, window_s: float = 10.0) -> SoakResult:
    """Hold ``streams`` real-time microphones for ``duration_s`` and sample engine RSS per window.
    Needs the engine on this machine (its pids from STATS, its /proc)."""
    s = replace(settings or FULL, window_s=window_s, warmup_s=min(window_s, 10.0))
    stats_client = _StatsClient(endpoint, curve)
    samples: list[dict[str, Any]] = []
    roles: dict[str, int] = {}
    started = time.monotonic()

    def sample(_summary: dict[str, Any] | None = None) -> None:
        current = _engine_roles(stats_client.stats())
        for role, pid in current.items():
            if roles.setdefault(role, pid) != pid:  # a worker was replaced: track the new one apart
                roles[f"{role}@{pid}"] = pid
        row: dict[str, Any] = {"t": round(time.monotonic() - started, 3)}
        for role, pid in roles.items():
            rss = rss_bytes(pid)
            row[role] = rss / MIB if rss is not None else None
        samples.append(row)

    try:
        sample()
        point = measure_point(endpoint, streams, shape=shape, pace="realtime", budget_ms=budget_ms,
                              duration_s=duration_s, settings=s, fleet=fleet, curve=curve, progress=progress,
                              on_window=sample, alive=alive)
        sample()
    finally:
        stats_client.close()
    processes = summarize_rss(samples, roles)
    return SoakResult(streams, duration_s, any(p["flagged"] for p in processes.values()), processes, samples, point)
