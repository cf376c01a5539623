"""`ringserve status`: health and stats of a running engine, asked over ZeroMQ.

    ringserve status [--endpoint E] [--json] [--timeout S]

It sends one STATS message (``Client.stats()``), the same request the daemon's HTTP thread
makes for /stats and /metrics, so all three views agree. Exit status: 0 when the engine is
ready, 1 when it answers but is not ready (a worker is being replaced), 2 when it does not
answer at all. The engine binds its endpoints only once every worker is warm, so during
warm-up the ZeroMQ endpoint does not answer (2); the HTTP /ready probe covers that window.

Latency percentiles are estimated from the engine's histogram buckets the way Prometheus'
``histogram_quantile`` does (linear interpolation inside a bucket), so they are only as
fine as the buckets: 50, 100, 250, 500 us, 1, 2.5, 5, 10, 25, 50, 100, 250 ms, 1 s.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import zmq

from clients.client import DEFAULT_ENDPOINT, Client
from clients.errors import EngineTimeout, RingserveError

EXIT_READY, EXIT_NOT_READY, EXIT_UNREACHABLE = 0, 1, 2

STATUS_HELP = """\
Print the health and statistics of a running engine: readiness, uptime, model and versions,
streams and connections, frames and executions (average batch), queue and compute time,
per-worker busy share, errors by kind, shed frames and worker restarts.

Exit status: 0 ready, 1 answering but not ready, 2 unreachable (nothing answered within
--timeout; the engine binds only after every worker has warmed up).
"""


class Unreachable(Exception):
    pass


def fetch_stats(endpoint: str, timeout: float) -> dict[str, Any]:
    """One STATS round trip; raises Unreachable with a message naming the endpoint."""
    try:
        _check_endpoint(endpoint)
        with Client(endpoint, timeout=timeout) as client:
            return client.stats(timeout)
    except EngineTimeout:
        raise Unreachable(f"no answer from {endpoint} within {timeout:g} s: is `ringserve serve` running "
                          "and bound there? (it binds only once its workers are ready; see its log "
                          "or the HTTP /ready probe)") from None
    except zmq.ZMQError as exc:
        raise Unreachable(f"cannot connect to {endpoint}: {exc} (expected tcp://HOST:PORT or ipc:///path)") from None
    except RingserveError as exc:
        raise Unreachable(f"{endpoint} answered the stats request with an error: {exc}") from None


def _check_endpoint(endpoint: str) -> None:
    """Raise zmq.ZMQError for an endpoint ZeroMQ cannot parse, on a socket closed right away
    (a Client whose connect fails would leave its socket to the garbage collector)."""
    probe: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    try:
        probe.setsockopt(zmq.LINGER, 0)
        probe.connect(endpoint)
    finally:
        probe.close(0)


# ---- numbers -----------------------------------------------------------------------------

def histogram_quantile(q: float, bounds: list[float], counts: list[int]) -> float | None:
    """Estimate the q-quantile from per-bucket counts (``bounds`` are upper bounds; the last
    count is the +Inf bucket). None without observations; ``math.inf`` when the quantile lies
    beyond the last finite bound (only "more than bounds[-1]" is known then)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative, lower = 0, 0.0
    for index, count in enumerate(counts):
        if count and cumulative + count >= rank:
            if index >= len(bounds):
                return math.inf
            upper = bounds[index]
            return lower + (upper - lower) * max(rank - cumulative, 0.0) / count
        cumulative += count
        if index < len(bounds):
            lower = bounds[index]
    return math.inf


def summarize(stats: dict[str, Any]) -> dict[str, Any]:
    """The derived numbers the table shows (seconds), from one stats snapshot."""
    frames = int(stats.get("frames", 0))
    executions = int(stats.get("executions", 0))
    bounds = [b / 1e6 for b in stats.get("histogram_bounds_us", [])]
    counters = stats.get("counters", {})
    derived: dict[str, Any] = {
        "avg_batch": frames / executions if executions else 0.0,
        "queue_mean_s": stats.get("queue_s_total", 0.0) / frames if frames else None,
        "compute_mean_per_frame_s": stats.get("compute_s_total", 0.0) / frames if frames else None,
        "compute_mean_per_batch_s": stats.get("compute_s_total", 0.0) / executions if executions else None,
        "errors": {k[len("errors_"):]: v for k, v in sorted(counters.items()) if k.startswith("errors_") and v},
        "shed_frames": int(counters.get("frames_shed", 0)),
        "worker_restarts": int(counters.get("worker_restarts", 0)),
    }
    for name in ("queue", "compute", "request"):
        counts = stats.get(f"{name}_hist", [])
        derived[f"{name}_p50_s"] = histogram_quantile(0.5, bounds, counts) if bounds else None
        derived[f"{name}_p99_s"] = histogram_quantile(0.99, bounds, counts) if bounds else None
    requests = sum(stats.get("request_hist", []))
    derived["request_mean_s"] = stats.get("request_s_total", 0.0) / requests if requests else None
    return derived


def _duration(seconds: float | None, last_bound_s: float = 1.0) -> str:
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return f"> {_duration(last_bound_s)}"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def _uptime(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f} s"


def render(endpoint: str, stats: dict[str, Any]) -> str:
    """The human-readable table."""
    d = summarize(stats)
    counters: dict[str, int] = stats.get("counters", {})
    last_bound = (stats.get("histogram_bounds_us") or [1e6])[-1] / 1e6
    ready = bool(stats.get("ready"))
    versions = stats.get("versions", {})
    model = stats.get("model", {})
    lines = [
        f"ringserve at {endpoint}: {'READY' if ready else 'NOT READY'}"
        f" (live, pid {stats.get('pid')}, up {_uptime(float(stats.get('uptime_s', 0.0)))})",
        f"  model        {model.get('path', '?')}",
        f"  sha256       {model.get('sha256', '?')}",
        "  versions     " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"  endpoints    {', '.join(stats.get('endpoints', [])) or '-'}",
        f"  streams      {stats.get('open_streams', 0)} open on {stats.get('connections', 0)} connection(s); "
        f"{counters.get('streams_opened', 0)} opened, {counters.get('streams_closed', 0)} closed, "
        f"{counters.get('streams_expired', 0)} expired since start",
        f"  frames       {stats.get('frames', 0)} run in {stats.get('executions', 0)} executions: "
        f"average batch {d['avg_batch']:.2f}",
        f"               {counters.get('frames_in', 0)} received, {counters.get('frames_out', 0)} answered, "
        f"{d['shed_frames']} shed, {counters.get('frames_refused_overloaded', 0)} refused (overloaded)",
        "",
        "  time                     mean        p50         p99        (p50/p99 estimated from histogram buckets)",
    ]
    rows = [("queue (per frame)", d["queue_mean_s"], "queue"),
            ("compute (per batch)", d["compute_mean_per_batch_s"], "compute"),
            ("request (per chunk)", d["request_mean_s"], "request")]
    for label, mean, key in rows:
        lines.append(f"  {label:<22} {_duration(mean, last_bound):<11} {_duration(d[key + '_p50_s'], last_bound):<11} "
                     f"{_duration(d[key + '_p99_s'], last_bound)}")
    lines.append(f"  {'compute (per frame)':<22} {_duration(d['compute_mean_per_frame_s'], last_bound)}")
    lines += ["", "  worker  pid       provider               ready  restarts  streams  frames      busy"]
    for w in stats.get("workers", []):
        provider = w.get("provider") or "-"
        lines.append(f"  {w['index']:<7} {str(w.get('pid')):<9} {provider:<22} {'yes' if w.get('ready') else 'NO':<6} "
                     f"{w.get('restarts', 0):<9} {w.get('streams', 0):<8} {w.get('frames', 0):<11} "
                     f"{100 * float(w.get('busy_share', 0.0)):.1f}%")
    lines.append("")
    errors = d["errors"]
    lines.append("  errors       " + (", ".join(f"{k}={v}" for k, v in errors.items()) if errors else "none"))
    lines.append(f"  shed         {d['shed_frames']} frame(s)")
    lines.append(f"  restarts     {d['worker_restarts']} worker restart(s)")
    dropped = {k: v for k, v in counters.items() if k.startswith("replies_dropped_") and v}
    if dropped:
        lines.append("  dropped      " + ", ".join(f"{k[len('replies_dropped_'):]}={v}" for k, v in sorted(dropped.items())))
    return "\n".join(lines) + "\n"


# ---- command line --------------------------------------------------------------------

def add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show a running engine's health and stats", description=STATUS_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="engine endpoint (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the raw stats object as JSON")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S",
                   help="seconds to wait for an answer (default %(default)s)")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        print("ringserve status: --timeout must be positive", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        stats = fetch_stats(args.endpoint, args.timeout)
    except Unreachable as exc:
        print(f"ringserve status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print(render(args.endpoint, stats), end="")
    return EXIT_READY if stats.get("ready") else EXIT_NOT_READY
