"""One real evaluation: a fresh daemon per configuration, measured by the replay bench."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.tune.model import Knobs, Measurement
from bench.tune.sampler import StatsSampler


@dataclass(frozen=True)
class BenchApi:
    """The replay bench's entry points, behind one adapter so the tuner does not care where
    they live: ``spawn_engine(workers, extra_args)`` is a context manager yielding an endpoint,
    ``find_capacity(endpoint, *, shape, budget_ms, audio_dir, quick, ...)`` measures it, and
    ``load_fleet(audio_dir)`` (optional) holds the load-generator processes across calls."""

    source: str
    spawn_engine: Callable[[int, tuple[str, ...]], AbstractContextManager[str]]
    find_capacity: Callable[..., Any]
    load_fleet: Callable[[Path | None], AbstractContextManager[Any]] | None = None
    measure_point: Callable[..., Any] | None = None  # for the saturation point (max pace)
    quick_settings: Any = None  # measure_point's settings in quick mode


def bench_api() -> BenchApi:
    replay = importlib.import_module("bench.replay")
    return BenchApi("bench.replay", replay.spawn_engine, replay.find_capacity, getattr(replay, "LoadFleet", None),
                    getattr(replay, "measure_point", None), getattr(replay, "QUICK", None))


class EngineMeasure:
    """One evaluation per call: a fresh daemon with these knobs (``spawn_engine``), its
    real-time capacity and saturation throughput (``find_capacity``), and the engine's STATS
    and /proc sampled meanwhile. A context manager: the load generators live across calls.

    The capacity search starts at 3/4 of the best capacity explored so far (never below 16),
    which saves the doubling steps from 16 without moving the answer: it still doubles until
    a point fails, then bisects. Saturation throughput is one more point at max pace (every
    stream keeps 2 chunks in flight; 48 streams per worker, at least 64), measured for a fixed
    2 s (quick) or 4 s after the warm-up: find_capacity's own real-time points cannot show
    it, since their offered load stops at 31.25 frames/s per stream.
    """

    def __init__(self, api: BenchApi, *, shape: str, budget_ms: float, quick: bool,
                 audio_dir: str | None = None, on_point: Callable[[str], None] | None = None,
                 max_streams: int | None = None) -> None:
        self.api = api
        self.max_streams = max_streams
        self.shape, self.budget_ms, self.quick = shape, budget_ms, quick
        self.audio_dir = Path(audio_dir) if audio_dir else None
        self.on_point = on_point
        self.accepts = set(inspect.signature(api.find_capacity).parameters)
        self.best_capacity = 0
        self._stack = contextlib.ExitStack()
        self.fleet: Any = None

    def __enter__(self) -> EngineMeasure:
        if self.api.load_fleet is not None and "fleet" in self.accepts:
            self.fleet = self._stack.enter_context(self.api.load_fleet(self.audio_dir))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _saturation(self, endpoint: str, knobs: Knobs, extra: dict[str, Any]) -> Any:
        if self.api.measure_point is None:
            return None
        settings: dict[str, Any] = {key: extra[key] for key in ("fleet", "progress") if key in extra}
        if self.quick and self.api.quick_settings is not None:
            settings["settings"] = self.api.quick_settings
        return self.api.measure_point(endpoint, max(64, 48 * knobs.workers), shape=self.shape, pace="max",
                                      budget_ms=self.budget_ms, duration_s=2.0 if self.quick else 4.0,
                                      audio_dir=self.audio_dir, **settings)

    def _bench_pids(self) -> list[int]:
        return [os.getpid(), *(self.fleet.pids() if self.fleet is not None and hasattr(self.fleet, "pids") else [])]

    def _progress(self, event: dict[str, Any]) -> None:
        if self.on_point is not None and event.get("event") == "point_start":
            pace = " at max pace (saturation)" if event.get("pace") == "max" else ""
            self.on_point(f"{event.get('streams')} streams{pace}")

    def __call__(self, knobs: Knobs, phase: str) -> Measurement:
        extra: dict[str, Any] = {}
        if self.fleet is not None:
            extra["fleet"] = self.fleet
        if "start_streams" in self.accepts and self.best_capacity >= 22:
            extra["start_streams"] = int(0.75 * self.best_capacity)
        if "progress" in self.accepts:
            extra["progress"] = self._progress
        if self.max_streams is not None:
            extra["max_streams"] = self.max_streams
        started = time.monotonic()
        try:
            with self.api.spawn_engine(knobs.workers, knobs.serve_args()) as endpoint, \
                    StatsSampler(endpoint, bench_pids=self._bench_pids) as sampler:
                cap = self.api.find_capacity(endpoint, shape=self.shape, budget_ms=self.budget_ms,
                                             audio_dir=self.audio_dir, quick=self.quick, **extra)
                saturation = self._saturation(endpoint, knobs, extra)
        except (RuntimeError, OSError, TimeoutError, ValueError) as exc:  # BenchError is a RuntimeError
            return Measurement(knobs, phase, 0, 0.0, seconds=time.monotonic() - started,
                               loadavg=os.getloadavg()[0], error=f"{type(exc).__name__}: {exc}"[:500])
        if phase != "final":
            self.best_capacity = max(self.best_capacity, int(cap.capacity_streams))
        p99 = getattr(cap, "p99_ms_at_capacity", None)
        detail = {"capacity": cap.to_dict() if hasattr(cap, "to_dict") else {},
                  "saturation_point": saturation.to_dict() if hasattr(saturation, "to_dict") else None}
        saturation_fps = max(float(cap.saturation_fps), float(getattr(saturation, "achieved_fps", 0.0)))
        return Measurement(knobs, phase, int(cap.capacity_streams), saturation_fps,
                           p99_ms=None if p99 is None or not math.isfinite(p99) else float(p99),
                           seconds=time.monotonic() - started, loadavg=os.getloadavg()[0],
                           diag=sampler.diagnostics(), detail=_jsonable(detail))


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)
