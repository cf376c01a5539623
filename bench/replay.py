"""Multi-mic replay bench: how many real-time microphones does a box hold?

This module is the bench's stable Python API (``ringserve bench`` is its command line, in
bench/cli.py; bench/tune/ builds on it). Everything returns plain dataclasses whose
``to_dict()`` is JSON-ready.

    from bench.replay import spawn_engine, raw_fps, measure_point, find_capacity

    with spawn_engine(2, ["--max-batch", "256"]) as endpoint:
        cap = find_capacity(endpoint, shape="device", quick=True)   # ~20 s on 2 cores
        print(cap.capacity_streams, cap.saturation_fps, cap.p99_ms_at_capacity)
        point = measure_point(endpoint, 100, shape="gateway", pace="realtime")
        print(point.p99_ms, point.lost, point.passed)
    ceiling = raw_fps(2, 3.0)       # frames/s; ceiling / 31.25 = microphones it would hold

API (keyword arguments after ``*`` may grow, never change meaning):

``spawn_engine(workers: int, extra_args: Sequence[str] = (), *, transport="tcp")``
    context manager: `ringserve serve --workers W *extra_args` in a child process, stopped on
    exit; yields its endpoint (loopback TCP by default).
``raw_fps(workers: int, seconds: float, batch: int = 256) -> float``
    the raw onnxruntime ceiling: W processes running the model batched, in-process.
``measure_point(endpoint, streams, *, target="ringserve", shape="device", pace="realtime",
               budget_ms=32.0, duration_s=None, settings=None, audio_dir=None, fleet=None, ...)
               -> PointResult``
    replay ``streams`` microphones until the point is stable (``settings``: window length,
    windows that must agree, max duration) or for exactly ``duration_s`` after warm-up.
``find_capacity(endpoint, *, shape="device", budget_ms=32.0, audio_dir=None, quick=False,
                max_streams=None, target="ringserve", settings=None, fleet=None, ...)
                -> CapacityResult``
    the largest N whose point passes (p99 <= budget, nothing lost, achieved frames/s >= 98 %
    of 31.25 * N): N doubles from ``start_streams`` until a point fails, then bisects.
    ``quick=True`` uses short windows and a coarse resolution (~20 s on 2 cores).
``QuietGate(max_others_pct=30, wait_s=300, sample_s=2, retries=2)``
    pass as ``quiet=`` to :func:`find_capacity` on a shared machine: measure only while other
    tenants are quiet, and measure again a point that failed while they were not.
``LoadFleet(audio_dir=None, max_procs=None, nice=0)``
    the load-generator processes; pass one as ``fleet=`` to reuse them across calls
    (otherwise each call starts and stops its own; ``audio_dir`` of a call is then ignored:
    the fleet's audio is used). Use it as a context manager.

``target="per-frame"`` drives the per-frame baseline server (bench/per_frame_server.py,
device shape only) instead of ringserve. The endpoint is a ZeroMQ endpoint of a running
daemon (or of one :func:`spawn_engine` started), or ``tcp://HOST:PORT`` of a per-frame server.

Definitions (see docs/benchmarks.md): a *frame* is 512 samples at 16 kHz = 32 ms; each
stream needs 31.25 frames/s. Latency runs from the moment a chunk's message leaves the load
process (its last sample leaves the client) to the moment its result arrives there,
matched by (stream id, chunk_seq). A point is *stable* when its last ``stable_windows``
windows agree within ``stability`` (10 %) of their mean in achieved frames/s and in p99
latency (latency also within ``latency_abs_tol_ms``, default 5 % of the budget; a closed
loop, ``pace="max"``, only in frames/s). A real-time point that loses a frame, or whose p99
exceeds twice the budget (or that falls under 90 % of the needed frames/s) in two windows
in a row, stops early: it has failed.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.daemon import BenchError, EngineDaemon, spawn_engine
from bench.loadgen import FRAME_MS, LoadPlan, load_main
from bench.procinfo import (
    autogroup_enabled,
    cmdline,
    cpu_seconds_or_none,
    machine_cpu_seconds,
    raise_nofile_limit,
)
from bench.raw import raw_fps
from transport import protocol as P

__all__ = ["BenchError", "CapacityResult", "EngineDaemon", "LoadFleet", "PointResult", "PointSettings", "QuietGate",
           "FULL", "QUICK", "find_capacity", "measure_point", "raw_fps", "spawn_engine", "FRAMES_PER_S"]

FRAMES_PER_S = 1000.0 / FRAME_MS  # 31.25: what one live microphone needs
_CTX = multiprocessing.get_context("spawn")
_GATEWAY_STREAMS_PER_PROC = 1000  # the engine's max_streams_per_connection defaults to 1024
_DEVICE_STREAMS_PER_PROC = 250


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
        return _jsonable(asdict(self))


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
        return _jsonable(out)


def _jsonable(obj: Any) -> Any:
    """NaN/inf -> None, tuples -> lists: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# ---- load processes ------------------------------------------------------------------------

@dataclass
class _LoadProc:
    proc: multiprocessing.process.BaseProcess
    conn: Connection
    pid: int


class LoadFleet:
    """Load-generator processes, started on demand (up to ``max_procs``) and reused across
    points; every one is stopped by ``close()`` / the end of the ``with`` block."""

    def __init__(self, audio_dir: Path | None = None, max_procs: int | None = None, nice: int = 0) -> None:
        if audio_dir is None:
            from bench.corpus import ensure_corpus

            audio_dir = ensure_corpus()
        self.audio_dir = Path(audio_dir)
        self.max_procs = max_procs or max(2, os.cpu_count() or 1)
        self.procs: list[_LoadProc] = []
        self.nice = nice  # added to each load process's niceness (negative: higher priority, needs privileges)
        raise_nofile_limit()

    def __enter__(self) -> LoadFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure(self, count: int) -> list[_LoadProc]:
        if count > self.max_procs:
            self.max_procs = count
        while len(self.procs) < count:
            parent, child = _CTX.Pipe(duplex=True)
            proc = _CTX.Process(target=load_main, args=(len(self.procs), str(self.audio_dir), child, self.nice),
                                name=f"bench-load-{len(self.procs)}", daemon=True)
            proc.start()
            child.close()
            if not parent.poll(60):
                proc.kill()
                raise BenchError("a load process did not start within 60 s")
            kind, info = parent.recv()
            if kind != "idle":
                proc.join(5)
                raise BenchError(f"load process failed to start: {info}")
            assert proc.pid is not None
            self.procs.append(_LoadProc(proc, parent, proc.pid))
        return self.procs[:count]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        procs, self.procs = self.procs, []
        for p in procs:
            with contextlib.suppress(OSError, ValueError):
                p.conn.send(("quit",))
        for p in procs:
            p.proc.join(10)
            if p.proc.exitcode is None:
                p.proc.kill()
                p.proc.join()
            p.conn.close()


def auto_load_procs(streams: int, shape: str, cpus: int | None = None) -> int:
    """One load process per ~250 device connections (per ~1000 gateway streams), at most
    one per CPU, but always enough that no gateway connection exceeds the engine's
    per-connection stream limit."""
    cpus = cpus or os.cpu_count() or 1
    per = _DEVICE_STREAMS_PER_PROC if shape == "device" else _GATEWAY_STREAMS_PER_PROC
    procs = min(max(1, -(-streams // per)), cpus)
    if shape == "gateway":
        procs = max(procs, -(-streams // _GATEWAY_STREAMS_PER_PROC))
    return max(1, min(procs, streams))


# ---- what the target does: STATS deltas and CPU from /proc --------------------------------

class _StatsClient:
    """STATS requests on a private DEALER (no dependency on the client library's state)."""

    def __init__(self, endpoint: str, curve: tuple[str, str] | None) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            from transport.security import enable_client_curve

            enable_client_curve(self.sock, *curve)
        self.sock.connect(endpoint)
        self.request = 0

    def stats(self, timeout: float = 2.0) -> dict[str, Any] | None:
        self.request += 1
        self.sock.send(P.header(P.MsgType.STATS, self.request))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            msg = self.sock.recv()
            if len(msg) >= P.HEADER.size and msg[3] == P.MsgType.STATS_REPLY:
                if P.HEADER.unpack_from(msg)[3] == self.request:
                    return P.decode_json(msg[P.HEADER.size:]) if len(msg) - P.HEADER.size <= 1 << 20 else None
        return None

    def close(self) -> None:
        self.sock.close(0)


def _local_endpoint(endpoint: str) -> bool:
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "*") or host.startswith("127.")


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class _Probe:
    """Snapshots of the target (CPU of its processes, engine STATS) and of the bench itself."""

    def __init__(self, endpoint: str, target: str, fleet: LoadFleet, curve: tuple[str, str] | None,
                 pids: dict[str, list[int]] | None) -> None:
        self.target = target
        self.fleet = fleet
        self.stats_client = _StatsClient(endpoint, curve) if target == "ringserve" else None
        self.fixed_pids = pids
        self.local = _local_endpoint(endpoint)

    def close(self) -> None:
        if self.stats_client is not None:
            self.stats_client.close()

    def _engine_pids(self, stats: dict[str, Any] | None) -> dict[str, list[int]]:
        if self.fixed_pids is not None:
            return self.fixed_pids
        if stats is None or not self.local:
            return {}
        daemon = int(stats.get("pid") or 0)
        if not daemon or "serve" not in cmdline(daemon):
            return {}  # another pid namespace (a container) or not ours to read
        workers = [int(w["pid"]) for w in stats.get("workers", []) if w.get("pid")]
        return {"frontend": [daemon], "workers": [w for w in workers if _parent_pid(w) == daemon]}

    def snapshot(self) -> dict[str, Any]:
        stats = self.stats_client.stats() if self.stats_client is not None else None
        snap: dict[str, Any] = {"wall": time.monotonic(), "stats": stats, "cpu": {},
                                "machine": machine_cpu_seconds()}
        roles = dict(self._engine_pids(stats))
        roles["bench"] = [os.getpid(), *self.fleet.pids()]
        roles["loadgen"] = self.fleet.pids()
        for role, pids in roles.items():
            values = [cpu_seconds_or_none(pid) for pid in pids]
            snap["cpu"][role] = None if not values or None in values else (sum(v for v in values if v), tuple(pids))
        return snap


def _stats_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    if not before or not after:
        return {}
    frames = after["frames"] - before["frames"]
    executions = after["executions"] - before["executions"]
    queue_s = after["queue_s_total"] - before["queue_s_total"]
    compute_s = after["compute_s_total"] - before["compute_s_total"]
    requests = sum(after.get("request_hist", [])) - sum(before.get("request_hist", []))
    request_s = after.get("request_s_total", 0.0) - before.get("request_s_total", 0.0)
    counters = {k: int(v) - int(before["counters"].get(k, 0)) for k, v in after["counters"].items()}
    busy = {}
    b_workers = {w["index"]: w for w in before.get("workers", [])}
    wall = max(after.get("uptime_s", 0) - before.get("uptime_s", 0), 1e-9)
    for w in after.get("workers", []):
        prev = b_workers.get(w["index"])
        if prev is not None and "busy_s" in w and "busy_s" in prev and prev.get("pid") == w.get("pid"):
            busy[str(w["index"])] = round((w["busy_s"] - prev["busy_s"]) / wall, 3)
    return {
        "frames": frames, "executions": executions,
        "avg_batch": frames / executions if executions else 0.0,
        "queue_ms_per_frame": 1e3 * queue_s / frames if frames else math.nan,
        "compute_ms_per_batch": 1e3 * compute_s / executions if executions else math.nan,
        "compute_ms_per_frame": 1e3 * compute_s / frames if frames else math.nan,
        "queue_share": queue_s / (queue_s + compute_s) if queue_s + compute_s > 0 else math.nan,
        "request_ms": 1e3 * request_s / requests if requests else math.nan,
        "worker_busy_share": busy,
        "counters": {k: v for k, v in counters.items() if v},
    }


def _cpu_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    wall = after["wall"] - before["wall"]
    out: dict[str, Any] = {}
    for role, value in after["cpu"].items():
        prev = before["cpu"].get(role)
        if value is None or prev is None or value[1] != prev[1] or wall <= 0:
            continue  # a process came or went: no figure rather than a wrong one
        out[f"{role}_pct"] = 100.0 * (value[0] - prev[0]) / wall
    if "frontend_pct" in out and "workers_pct" in out:
        out["engine_pct"] = out["frontend_pct"] + out["workers_pct"]
    if "server_pct" in out:
        out["engine_pct"] = out["server_pct"]
    if after.get("machine") is not None and before.get("machine") is not None and wall > 0:
        out["machine_pct"] = 100.0 * (after["machine"][0] - before["machine"][0]) / wall
        out["steal_pct"] = 100.0 * (after["machine"][1] - before["machine"][1]) / wall
        out["niced_pct"] = 100.0 * (after["machine"][2] - before["machine"][2]) / wall
        if "engine_pct" in out and "bench_pct" in out:  # other tenants, and kernel work no process is charged for
            out["others_pct"] = max(0.0, out["machine_pct"] - out["engine_pct"] - out["bench_pct"])
    return out


# ---- one point -------------------------------------------------------------------------------

def _merge_windows(reports: list[dict[str, Any]]) -> dict[str, Any]:
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


def _latency_figures(lat: np.ndarray, budget_ms: float, sent_chunks: int) -> dict[str, float]:
    if not len(lat):
        return {"p50_ms": math.nan, "p90_ms": math.nan, "p95_ms": math.nan, "p99_ms": math.nan,
                "max_ms": math.nan, "mean_ms": math.nan, "within_budget": 0.0}
    p50, p90, p95, p99 = (float(v) for v in np.percentile(lat, [50, 90, 95, 99]))
    within = int(np.count_nonzero(lat <= budget_ms))
    return {"p50_ms": p50, "p90_ms": p90, "p95_ms": p95, "p99_ms": p99, "max_ms": float(lat.max()),
            "mean_ms": float(lat.mean()), "within_budget": within / max(sent_chunks, len(lat))}


def _agree(values: list[float], rel: float, abs_tol: float) -> bool:
    if not values or any(not math.isfinite(v) for v in values):
        return False
    mean = sum(values) / len(values)
    return all(abs(v - mean) <= max(rel * abs(mean), abs_tol) for v in values)


def _plans(endpoint: str, streams: int, procs: int, *, target: str, shape: str, pace: str, s: PointSettings,
           curve: tuple[str, str] | None, unopened: int, open_params: dict[str, Any]) -> list[LoadPlan]:
    plans, first = [], 0
    for i in range(procs):
        count = streams // procs + (1 if i < streams % procs else 0)
        plans.append(LoadPlan(target=target, endpoint=endpoint, shape=shape, pace=pace, first_stream=first,
                              streams=count, chunk_frames=s.chunk_frames, window=s.window, tick_ms=s.tick_ms,
                              timeout_ms=s.timeout_ms, window_s=s.window_s, seed=s.seed, curve=curve,
                              unopened_streams=unopened if i == 0 else 0, open_params=open_params))
        first += count + (unopened if i == 0 else 0)
    return plans


class _PointRun:
    def __init__(self, procs: list[_LoadProc]) -> None:
        self.procs = procs
        self.windows: dict[int, list[dict[str, Any]]] = {}
        self.done: dict[int, dict[str, Any]] = {}

    def recv_until(self, predicate: Callable[[], bool], timeout: float, what: str,
                   check: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"load processes did not report {what} within {timeout:.0f} s")
            ready = wait([p.conn for p in self.procs], min(left, 0.5))
            if check is not None:
                check()
            for conn in ready:
                index = next(i for i, p in enumerate(self.procs) if p.conn is conn)
                try:
                    msg: tuple[Any, ...] = self.procs[index].conn.recv()
                except EOFError:
                    raise BenchError(f"load process {index} died") from None
                if msg[0] == "window":
                    self.windows.setdefault(msg[1], []).append(msg[2])
                elif msg[0] == "done":
                    self.done[index] = msg[1]
                elif msg[0] == "failed":
                    raise BenchError(f"load process {index} failed: {msg[1]}")
                else:
                    self.done.setdefault(-1 - index, {})[msg[0]] = msg[1]


def measure_point(endpoint: str, streams: int, *, target: str = "ringserve", shape: str = "device",
                  pace: str = "realtime", budget_ms: float = 32.0, duration_s: float | None = None,
                  settings: PointSettings | None = None, audio_dir: Path | None = None,
                  fleet: LoadFleet | None = None, curve: tuple[str, str] | None = None,
                  pids: dict[str, list[int]] | None = None,
                  progress: Callable[[dict[str, Any]], None] | None = None,
                  on_window: Callable[[dict[str, Any]], None] | None = None,
                  unopened_streams: int = 0, open_params: dict[str, Any] | None = None,
                  alive: Callable[[], None] | None = None) -> PointResult:
    """Replay ``streams`` microphones against ``endpoint`` and measure one point.

    ``duration_s``: measure exactly this long after the warm-up (no stability rule; a soak).
    ``pids``: the target's processes by role ({"frontend": [..], "workers": [..]} or
    {"server": [..]}) when they cannot be found from STATS. ``on_window`` gets every window's
    summary; ``progress`` too, plus point start/end events. ``alive`` is called while waiting
    and may raise (e.g. the spawned daemon died)."""
    s = settings or FULL
    if streams < 1:
        raise ValueError("streams must be at least 1")
    if target not in ("ringserve", "per-frame"):
        raise ValueError(f"target must be ringserve or per-frame, not {target!r}")
    own_fleet = fleet is None
    fleet = fleet or LoadFleet(audio_dir)
    try:
        return _measure_point(endpoint, streams, target=target, shape=shape, pace=pace, budget_ms=budget_ms,
                              duration_s=duration_s, s=s, fleet=fleet, curve=curve, pids=pids, progress=progress,
                              on_window=on_window, unopened=unopened_streams, open_params=open_params or {},
                              alive=alive)
    finally:
        if own_fleet:
            fleet.close()


def _measure_point(endpoint: str, streams: int, *, target: str, shape: str, pace: str, budget_ms: float,
                   duration_s: float | None, s: PointSettings, fleet: LoadFleet, curve: tuple[str, str] | None,
                   pids: dict[str, list[int]] | None, progress: Callable[[dict[str, Any]], None] | None,
                   on_window: Callable[[dict[str, Any]], None] | None, unopened: int, open_params: dict[str, Any],
                   alive: Callable[[], None] | None) -> PointResult:
    n_procs = s.load_procs or auto_load_procs(streams, shape)
    n_procs = max(1, min(n_procs, streams))
    procs = fleet.ensure(n_procs)
    plans = _plans(endpoint, streams, n_procs, target=target, shape=shape, pace=pace, s=s, curve=curve,
                   unopened=unopened, open_params=open_params)
    result = PointResult(target=target, shape=shape, pace=pace, streams=streams, budget_ms=budget_ms,
                         chunk_ms=s.chunk_frames * FRAME_MS, load_procs=n_procs, window_s=s.window_s,
                         needed_fps=FRAMES_PER_S * streams, started_at=time.time())
    if progress:
        progress({"event": "point_start", "target": target, "shape": shape, "pace": pace, "streams": streams})
    run = _PointRun(procs)
    for proc, plan in zip(procs, plans):
        proc.conn.send(("point", plan))
    readies: dict[int, dict[str, Any]] = {}

    def all_ready() -> bool:
        for key in list(run.done):
            if key < 0 and "ready" in run.done[key]:
                readies[-1 - key] = run.done.pop(key)["ready"]
        return len(readies) == n_procs

    run.recv_until(all_ready, 60 + 0.05 * streams, "their streams open", alive)
    result.streams_opened = sum(r["opened"] for r in readies.values())
    failures: Counter[str] = Counter()
    for r in readies.values():
        failures.update(r["failures"])
    result.open_failures = dict(failures)
    probe = _Probe(endpoint, target, fleet, curve, pids)
    try:
        if result.streams_opened < streams:
            for proc in procs:
                proc.conn.send(("abort",))
            run.recv_until(lambda: len(run.done) >= n_procs, 30, "the abort", alive)
            result.stop_reason = "open_failed"
            result.fail_reasons = [f"only {result.streams_opened} of {streams} streams opened: {dict(failures)}"]
            return result
        return _hold(result, run, procs, probe, s, budget_ms, duration_s, progress, on_window, alive)
    finally:
        probe.close()


def _hold(result: PointResult, run: _PointRun, procs: list[_LoadProc], probe: _Probe, s: PointSettings,
          budget_ms: float, duration_s: float | None, progress: Callable[[dict[str, Any]], None] | None,
          on_window: Callable[[dict[str, Any]], None] | None, alive: Callable[[], None] | None) -> PointResult:
    warm_windows = math.ceil(s.warmup_s / s.window_s - 1e-9)
    fixed_windows = math.ceil(duration_s / s.window_s - 1e-9) if duration_s is not None else None
    max_windows = fixed_windows or max(s.stable_windows, math.ceil(s.max_point_s / s.window_s - 1e-9))
    abs_tol = s.latency_abs_tol_ms if s.latency_abs_tol_ms is not None else 0.05 * budget_ms
    result.loadavg = list(os.getloadavg())
    t0_ns = time.monotonic_ns() + 200_000_000
    for proc in procs:
        proc.conn.send(("go", t0_ns))
    time.sleep(max(0.0, (t0_ns - time.monotonic_ns()) / 1e9))
    snaps = [probe.snapshot()]
    measured: list[dict[str, Any]] = []  # window summaries after warm-up
    merged_measured: list[dict[str, Any]] = []
    j = 0
    overloaded_run = 0
    while True:
        boundary = t0_ns + (j + 1) * int(s.window_s * 1e9)
        while (left := (boundary - time.monotonic_ns()) / 1e9) > 0:
            time.sleep(min(left, 0.25))
            if alive is not None:
                alive()
        snaps.append(probe.snapshot())
        run.recv_until(lambda: len(run.windows.get(j, [])) == len(procs), s.window_s + 30, f"window {j}", alive)
        merged = _merge_windows(run.windows[j])
        summary = _window_summary(j, merged, snaps[-2], snaps[-1], s, result, budget_ms, warm=j < warm_windows)
        if on_window is not None:
            on_window(summary)
        if progress is not None:
            progress({"event": "window", **summary})
        j += 1
        if summary["warmup"]:
            continue
        summary["_snap"] = (len(snaps) - 2, len(snaps) - 1)
        measured.append(summary)
        merged_measured.append(merged)
        if fixed_windows is not None:
            if len(measured) >= fixed_windows:
                result.stop_reason = "duration"
                break
            continue
        # A real-time point that has clearly failed stops early; a closed loop (max pace) is
        # meant to be over budget, and is held until its throughput is stable.
        lost = summary["shed"] + sum(summary["refused"].values()) + summary["timed_out"]
        if lost and result.pace == "realtime":
            result.stop_reason = "lost"
            break
        bad = (summary["p99_ms"] > 2 * budget_ms or not math.isfinite(summary["p99_ms"])
               or summary["achieved_fps"] < 0.9 * result.needed_fps)
        overloaded_run = overloaded_run + 1 if bad else 0
        if result.pace == "realtime" and (overloaded_run >= 2 or (bad and len(measured) >= max_windows)):
            result.stop_reason = "overloaded"
            break
        last = measured[-s.stable_windows:]
        if len(last) >= s.stable_windows and _agree([w["achieved_fps"] for w in last], s.stability, 0.0) \
                and (result.pace == "max" or _agree([w["p99_ms"] for w in last], s.stability, abs_tol)):
            result.stable = True
            result.stop_reason = "stable"
            break
        if len(measured) >= max_windows:
            result.stop_reason = "max_duration"
            break
    if fixed_windows is not None:
        last = measured[-s.stable_windows:]
        result.stable = len(last) >= s.stable_windows and _agree([w["achieved_fps"] for w in last], s.stability,
                                                                  0.0) \
            and _agree([w["p99_ms"] for w in last], s.stability, abs_tol)
    for proc in procs:
        proc.conn.send(("stop",))
    run.recv_until(lambda: len(run.done) >= len(procs), s.timeout_ms / 1000 + 60, "the end of the point", alive)
    _finish(result, run, measured, merged_measured, snaps, s, budget_ms)
    if progress:
        progress({"event": "point_end", "result": result})
    return result


def _window_summary(index: int, merged: dict[str, Any], before: dict[str, Any], after: dict[str, Any],
                    s: PointSettings, result: PointResult, budget_ms: float, warm: bool) -> dict[str, Any]:
    chunks_sent = merged["sent"] // s.chunk_frames
    summary: dict[str, Any] = {
        "index": index, "warmup": warm, "streams": result.streams, "target": result.target, "shape": result.shape,
        "sent": merged["sent"], "answered": merged["answered"], "shed": merged["shed"],
        "refused": dict(merged["refused"]), "timed_out": merged["timed_out"], "late": merged["late"],
        "in_flight": merged["in_flight"],
        "achieved_fps": (merged["answered"] - merged["shed"]) / s.window_s,
        "sent_fps": merged["sent"] / s.window_s, "needed_fps": result.needed_fps,
        **_latency_figures(merged["lat"], budget_ms, chunks_sent),
        "lateness_p50_ms": float(np.percentile(merged["lateness"], 50)) if len(merged["lateness"]) else math.nan,
        "lateness_p99_ms": float(np.percentile(merged["lateness"], 99)) if len(merged["lateness"]) else math.nan,
        "engine": _stats_delta(before["stats"], after["stats"]), "cpu": _cpu_delta(before, after),
        "loadavg1": os.getloadavg()[0],
    }
    return summary


def _finish(result: PointResult, run: _PointRun, measured: list[dict[str, Any]],
            merged_measured: list[dict[str, Any]], snaps: list[dict[str, Any]], s: PointSettings,
            budget_ms: float) -> None:
    every = _merge_windows([r for reports in run.windows.values() for r in reports])
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
    judged = list(range(len(measured)))[-s.stable_windows:] if measured else []
    result.judged_windows = len(judged)
    if judged:
        lat = np.concatenate([merged_measured[i]["lat"] for i in judged])
        lateness = np.concatenate([merged_measured[i]["lateness"] for i in judged])
        sent = sum(merged_measured[i]["sent"] for i in judged)
        ok = sum(merged_measured[i]["answered"] - merged_measured[i]["shed"] for i in judged)
        seconds = len(judged) * s.window_s
        result.achieved_fps = ok / seconds
        result.sent_fps = sent / seconds
        figures = _latency_figures(lat, budget_ms, sent // s.chunk_frames)
        for key, value in figures.items():
            setattr(result, key, value)
        if len(lateness):
            result.lateness_p50_ms, result.lateness_p99_ms = (float(v) for v in np.percentile(lateness, [50, 99]))
            result.lateness_max_ms = float(lateness.max())
        first, last = measured[judged[0]]["_snap"][0], measured[judged[-1]]["_snap"][1]
        result.engine = _stats_delta(snaps[first]["stats"], snaps[last]["stats"])
        result.cpu = _cpu_delta(snaps[first], snaps[last])
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


# ---- a noisy, shared machine -------------------------------------------------------------------

@dataclass(frozen=True)
class QuietGate:
    """Measure only while other tenants leave the machine alone: before each point wait (up to
    ``wait_s``) until the whole machine's busy CPU plus hypervisor steal, over ``sample_s``,
    is at most ``max_others_pct`` (% of one core; the bench's own processes are idle between
    points), and measure a failed point again (up to ``retries`` times) when other tenants
    and steal took more than that during it. The pass criteria never change; a point measured
    again keeps its first measurement in the results, marked ``superseded``."""

    max_others_pct: float = 30.0
    wait_s: float = 300.0
    sample_s: float = 2.0
    retries: int = 2


def machine_noise_pct(sample_s: float) -> float | None:
    """Busy CPU of every process on the machine plus steal over ``sample_s``, % of one core;
    processes with a positive niceness are left out (they yield to anything else that runs)
    unless the kernel groups processes by session (autogroup), where they do not yield."""
    before = machine_cpu_seconds()
    time.sleep(sample_s)
    after = machine_cpu_seconds()
    if before is None or after is None:
        return None
    busy, steal, niced = (a - b for a, b in zip(after, before))
    return 100.0 * (busy - (0.0 if autogroup_enabled() else niced) + steal) / sample_s


def wait_for_quiet(gate: QuietGate, say: Callable[[str], None] | None = None) -> float | None:
    """Block until the machine is quiet enough for ``gate`` (or ``gate.wait_s`` passed);
    returns the last reading (% of one core)."""
    deadline = time.monotonic() + gate.wait_s
    noise = machine_noise_pct(gate.sample_s)
    told = False
    while noise is not None and noise > gate.max_others_pct and time.monotonic() < deadline:
        if say is not None and not told:
            say(f"waiting for a quieter machine: other tenants + steal at {noise:.0f} % of a core "
                f"(gate {gate.max_others_pct:g} %, up to {gate.wait_s:.0f} s)")
            told = True
        noise = machine_noise_pct(gate.sample_s)
    return noise


def point_noise_pct(point: PointResult) -> float:
    """Other tenants (niced ones left out) + steal during a point, % of one core."""
    cpu = point.cpu
    others = float(cpu.get("others_pct", 0.0) or 0.0)
    if cpu.get("niced_pct") is not None and not autogroup_enabled():
        others = max(0.0, others - float(cpu["niced_pct"]))  # our own processes may be niced too: approximate
    return others + float(cpu.get("steal_pct", 0.0) or 0.0)


def measure_gated(gate: QuietGate | None, measure: Callable[[], PointResult],
                  say: Callable[[str], None] | None = None) -> list[PointResult]:
    """``measure()`` behind ``gate``: every measurement made, the one that counts last."""
    if gate is None:
        return [measure()]
    results: list[PointResult] = []
    for attempt in range(gate.retries + 1):
        noise_before = wait_for_quiet(gate, say)
        point = measure()
        point.noise_before_pct = noise_before
        results.append(point)
        noise = point_noise_pct(point)
        if point.passed or noise <= gate.max_others_pct or attempt == gate.retries:
            break
        point.superseded = True
        point.warnings.append(f"measured again: other tenants + steal took {noise:.0f} % of a core during it")
        if say is not None:
            say(f"N={point.streams} failed while other tenants + steal took {noise:.0f} % of a core: measuring again")
    return results


# ---- capacity search -------------------------------------------------------------------------

def find_capacity(endpoint: str, *, shape: str = "device", budget_ms: float = 32.0, audio_dir: Path | None = None,
                  quick: bool = False, max_streams: int | None = None, target: str = "ringserve",
                  pace: str = "realtime", start_streams: int | None = None, settings: PointSettings | None = None,
                  resolution: float | None = None, fleet: LoadFleet | None = None,
                  curve: tuple[str, str] | None = None, pids: dict[str, list[int]] | None = None,
                  progress: Callable[[dict[str, Any]], None] | None = None,
                  alive: Callable[[], None] | None = None, quiet: QuietGate | None = None,
                  say: Callable[[str], None] | None = None) -> CapacityResult:
    """The largest number of real-time microphones whose point passes (p99 <= budget, nothing
    lost, >= 98 % of the needed frames/s): start at ``start_streams`` (16; 32 quick), double
    until a point fails (or ``max_streams``, default 4096, passes), then bisect until the
    bracket is within ``resolution`` (5 % of the capacity, at least 2 streams; 12.5 % quick).
    ``quiet``: measure behind a :class:`QuietGate` (a shared, noisy machine)."""
    s = settings or (QUICK if quick else FULL)
    res = resolution if resolution is not None else (0.125 if quick else 0.05)
    top = max_streams or 4096
    n = min(start_streams or (32 if quick else 16), top)
    started = time.monotonic()
    own_fleet = fleet is None
    fleet = fleet or LoadFleet(audio_dir)
    points: list[PointResult] = []
    lo, hi = 0, None

    def measure(count: int) -> bool:
        results = measure_gated(quiet, lambda: measure_point(
            endpoint, count, target=target, shape=shape, pace=pace, budget_ms=budget_ms, settings=s, fleet=fleet,
            curve=curve, pids=pids, progress=progress, alive=alive), say)
        points.extend(results)
        return results[-1].passed

    try:
        while hi is None:
            if measure(n):
                lo = n
                if n >= top:
                    break
                n = min(2 * n, top)
            else:
                hi = n
        while hi is not None and hi - lo > max(2, res * lo, 1):
            mid = (lo + hi) // 2
            if measure(mid):
                lo = mid
            else:
                hi = mid
    finally:
        if own_fleet:
            fleet.close()
    at_capacity = [p for p in points if p.passed and p.streams == lo and not p.superseded]
    return CapacityResult(target=target, shape=shape, budget_ms=budget_ms, capacity_streams=lo,
                          saturation_fps=max((p.achieved_fps for p in points), default=0.0),
                          p99_ms_at_capacity=at_capacity[-1].p99_ms if at_capacity else math.nan,
                          points=points, first_fail=hi, limited_by_max=hi is None,
                          elapsed_s=time.monotonic() - started)


def quick_settings(**changes: Any) -> PointSettings:
    return replace(QUICK, **changes)
