"""Stats: the front-end's counters plus every worker's shared-memory block, aggregated on demand."""

from __future__ import annotations

import importlib.metadata
import os
import time
from typing import TYPE_CHECKING, Any

import onnxruntime

from engine.stats import BUCKETS_US, STARTED_NS

if TYPE_CHECKING:
    from engine.daemon import Daemon

try:
    _VERSION = importlib.metadata.version("ringserve")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    _VERSION = "unknown"

# Admission limits a client or a load generator may need to plan by (engine/config.py).
LIMITS = ("max_streams", "max_streams_per_connection", "max_items_per_message", "max_message_bytes",
          "max_in_flight_frames")


def collect_stats(daemon: Daemon) -> dict[str, Any]:
    frontend = daemon.frontend
    assert frontend is not None
    table = frontend.table
    workers = []
    totals = {"frames": 0, "executions": 0, "compute_s": 0.0, "queue_s": 0.0}
    queue_hist = [0] * (len(BUCKETS_US) + 1)
    compute_hist = [0] * (len(BUCKETS_US) + 1)
    now_ns = time.monotonic_ns()
    for index, link in enumerate(frontend.links):
        snap = link.stats.snapshot()
        for key in totals:
            totals[key] += snap[key]
        queue_hist = [a + b for a, b in zip(queue_hist, snap["queue_hist"])]
        compute_hist = [a + b for a, b in zip(compute_hist, snap["compute_hist"])]
        started_ns = int(link.stats.counters[STARTED_NS])
        alive_s = max((now_ns - started_ns) / 1e9, 1e-9) if started_ns else 0.0
        workers.append({"index": index, "pid": link.proc.info.get("pid"), "provider": link.proc.info.get("provider"),
                        "ready": link.proc.ready,
                        "restarts": link.proc.restarts, "streams": table.worker_load[index],
                        "backlog_bytes": link.backlog_bytes, "frames": snap["frames"],
                        "executions": snap["executions"], "replayed_frames": snap["replayed_frames"],
                        "shed_frames": snap["shed_frames"],
                        "busy_s": snap["busy_s"], "batch_delay_us": snap["batch_delay_us"],
                        "busy_share": round(snap["busy_s"] / alive_s, 4) if alive_s else 0.0})
    frames, executions = totals["frames"], totals["executions"]
    counters = dict(table.counters)
    return {
        "live": True,
        "ready": all(link.proc.ready for link in frontend.links),
        "uptime_s": round(time.time() - daemon.started, 3),
        "instance": table.instance,
        "pid": os.getpid(),
        "model": {"path": daemon.model_path, "sha256": daemon.model_sha256},
        "versions": {"ringserve": _VERSION, "onnxruntime": onnxruntime.__version__, "protocol": 1},
        "endpoints": daemon.endpoints,
        "open_streams": len(table.streams),
        "connections": len(table.connections),
        "frames": frames,
        "executions": executions,
        "avg_batch": round(frames / executions, 3) if executions else 0.0,
        "queue_s_total": totals["queue_s"],
        "compute_s_total": totals["compute_s"],
        "histogram_bounds_us": [float(b) for b in BUCKETS_US],
        "queue_hist": queue_hist,
        "compute_hist": compute_hist,
        "request_hist": table.request_hist.tolist(),
        "request_s_total": table.request_s_total,
        "counters": counters,
        "workers": workers,
        "limits": {key: getattr(daemon.cfg, key) for key in LIMITS},
    }
