"""What the target does while a point runs: snapshots of its engine STATS and of the CPU of its
processes, the bench's own and the whole machine's (from /proc), and the deltas between two."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import zmq

from bench.fleet import LoadFleet
from bench.procinfo import cmdline, cpu_seconds_or_none, machine_cpu_seconds
from transport import protocol as P


class StatsClient:
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


def local_endpoint(endpoint: str) -> bool:
    """Whether ``endpoint`` is on this machine (so /proc shows its processes)."""
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


class Probe:
    """Snapshots of the target (CPU of its processes, engine STATS) and of the bench itself."""

    def __init__(self, endpoint: str, target: str, fleet: LoadFleet, curve: tuple[str, str] | None,
                 pids: dict[str, list[int]] | None) -> None:
        self.target = target
        self.fleet = fleet
        self.stats_client = StatsClient(endpoint, curve) if target == "ringserve" else None
        self.fixed_pids = pids
        self.local = local_endpoint(endpoint)

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


def stats_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
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


def cpu_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
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

