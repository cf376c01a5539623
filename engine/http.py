"""Optional HTTP listener: /live, /ready, /stats (JSON) and /metrics (Prometheus).

It runs in a thread of the daemon, started before the workers so an orchestrator sees
live-but-not-ready during warm-up. It never touches front-end state directly: once the
engine runs, it asks the front-end for stats over an inproc ZeroMQ socket, exactly as
`ringserve status` does over the network, so both views agree by construction and the
front-end's single-threaded loop stays the only reader and writer of its own state.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import zmq
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from transport import protocol as P

log = logging.getLogger("ringserve.http")
StatusSource = Callable[[], dict[str, Any]]


def fetch_stats(context: zmq.Context, endpoint: str, timeout_ms: int = 2000) -> dict[str, Any]:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(P.header(P.MsgType.STATS, 1))
        if not sock.poll(timeout_ms):
            raise TimeoutError("front-end did not answer a stats request")
        reply = sock.recv()
        return P.decode_json(reply[P.HEADER.size:])
    finally:
        sock.close()


def _histogram(name: str, doc: str, bounds_us: list[float], counts: list[int], total_s: float,
               labels: dict[str, str] | None = None) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels or {}))
    cumulative, buckets = 0, []
    for bound, count in zip([*bounds_us, float("inf")], counts):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound / 1e6), cumulative))
    family.add_metric(list((labels or {}).values()), buckets, total_s)
    return family


class EngineCollector(Collector):
    """Builds every metric from one stats snapshot per scrape: nothing on the hot path."""

    def __init__(self, source: StatusSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        stats = self.source()
        yield GaugeMetricFamily("ringserve_ready", "1 once every worker has loaded and warmed its model",
                                value=1.0 if stats.get("ready") else 0.0)
        if "frames" not in stats:
            return
        counters = stats["counters"]
        yield CounterMetricFamily("ringserve_frames", "Frames run through the model", value=stats["frames"])
        yield CounterMetricFamily("ringserve_executions", "Model executions (batches)", value=stats["executions"])
        yield CounterMetricFamily("ringserve_messages_received", "Messages received from clients",
                                  value=counters.get("messages_in", 0))
        yield CounterMetricFamily("ringserve_frames_received", "Complete frames received from clients",
                                  value=counters.get("frames_in", 0))
        yield CounterMetricFamily("ringserve_frames_in_frame_sets", "Frames the front-end took in bulk: a gateway's "
                                  "one frame for each of many streams, or devices' one-frame messages read together",
                                  value=counters.get("frames_in_frame_sets", 0))
        yield CounterMetricFamily("ringserve_frames_answered", "Frame results delivered to clients",
                                  value=counters.get("frames_out", 0))
        shed = CounterMetricFamily("ringserve_frames_shed", "Frames shed under overload (NaN result sent), by "
                                   "where (worker: late in its queue; intake: late on arrival at the front-end; "
                                   "queue_full: its worker's queue was full)", labels=["where"])
        shed.add_metric(["worker"], counters.get("frames_shed_in_worker", 0))
        shed.add_metric(["intake"], counters.get("frames_shed_at_intake", 0) - counters.get("frames_shed_queue_full", 0))
        shed.add_metric(["queue_full"], counters.get("frames_shed_queue_full", 0))
        yield shed
        yield CounterMetricFamily("ringserve_worker_restarts", "Workers replaced after dying",
                                  value=counters.get("worker_restarts", 0))
        yield CounterMetricFamily("ringserve_streams_opened", "Streams opened", value=counters.get("streams_opened", 0))
        yield CounterMetricFamily("ringserve_streams_expired", "Streams closed by the engine after idle_timeout_s",
                                  value=counters.get("streams_expired", 0))
        yield CounterMetricFamily("ringserve_frames_refused", "Frames refused with OVERLOADED (worker backlog full)",
                                  value=counters.get("frames_refused_overloaded", 0))
        dropped = CounterMetricFamily("ringserve_replies_dropped", "Replies not delivered, by reason "
                                      "(slow_client: its queue was full; client_gone: it disconnected)",
                                      labels=["reason"])
        for reason in ("slow_client", "client_gone"):
            dropped.add_metric([reason], counters.get(f"replies_dropped_{reason}", 0))
        yield dropped
        errors = CounterMetricFamily("ringserve_errors", "Errors sent to clients, by kind", labels=["kind"])
        for key, value in sorted(counters.items()):
            if key.startswith("errors_"):
                errors.add_metric([key[len("errors_"):]], value)
        yield errors
        yield GaugeMetricFamily("ringserve_open_streams", "Streams open now", value=stats["open_streams"])
        yield GaugeMetricFamily("ringserve_connections", "Client connections with open streams",
                                value=stats["connections"])
        yield GaugeMetricFamily("ringserve_uptime_seconds", "Seconds since the daemon started", value=stats["uptime_s"])
        busy = GaugeMetricFamily("ringserve_worker_busy_ratio", "Share of time each worker spent running batches",
                                 labels=["worker"])
        busy_seconds = CounterMetricFamily("ringserve_worker_busy_seconds",
                                           "Seconds each worker spent running batches (rate() = busy ratio now)",
                                           labels=["worker"])
        delay = GaugeMetricFamily("ringserve_worker_batch_delay_seconds",
                                  "How long each worker now lets a frame wait for a fuller batch "
                                  "(grows with its busy share, see busy_batch_delay_us)", labels=["worker"])
        for worker in stats["workers"]:
            busy.add_metric([str(worker["index"])], worker["busy_share"])
            busy_seconds.add_metric([str(worker["index"])], worker.get("busy_s", 0.0))
            delay.add_metric([str(worker["index"])], worker.get("batch_delay_us", 0) / 1e6)
        yield busy
        yield busy_seconds
        yield delay
        bounds = stats["histogram_bounds_us"]
        yield _histogram("ringserve_queue_seconds", "Time a frame waited in its worker's ring before its batch ran",
                         bounds, stats["queue_hist"], stats["queue_s_total"])
        yield _histogram("ringserve_compute_seconds", "Time one batch took in onnxruntime",
                         bounds, stats["compute_hist"], stats["compute_s_total"])
        yield _histogram("ringserve_request_seconds", "Time from a chunk's arrival to its reply, inside the engine",
                         bounds, stats["request_hist"], stats["request_s_total"])


def start_http(address: str, status: StatusSource) -> ThreadingHTTPServer:
    registry = CollectorRegistry()
    registry.register(EngineCollector(status))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                    return
                stats = status()
            except Exception as exc:  # a probe must get an answer, not a dropped connection
                self._reply(503, json.dumps({"error": str(exc)}).encode(), "application/json")
                return
            if path == "/live":
                self._reply(200, b'{"live": true}', "application/json")
            elif path == "/ready":
                ready = bool(stats.get("ready"))
                self._reply(200 if ready else 503, json.dumps({"ready": ready}).encode(), "application/json")
            elif path == "/stats":
                self._reply(200, json.dumps(stats).encode(), "application/json")
            else:
                self._reply(404, b'{"error": "try /live, /ready, /stats or /metrics"}', "application/json")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would drown the log

    host, _, port = address.rpartition(":")
    server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("HTTP listener on http://%s/ (live, ready, stats, metrics)", address)
    return server
