"""Operations: HTTP probes, Prometheus metrics, stats over ZeroMQ and HTTP, execution
providers, logs, and `ringserve status`, all against real daemon subprocesses."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.client import Client
from clients.status import histogram_quantile
from engine.cli import main as cli_main
from engine.models.silero import SILERO_SHA256
from tests.conftest import REPO, DaemonProcess, spawn_daemon

FRAME = 512  # samples per frame at 16 kHz
HAVE_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \[(front-end|worker-\d+)\] ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int | None, bytes]:
    """(status, body); status None when nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, b""


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """Every sample of /metrics keyed by (name, labels), and each family's type."""
    code, body = http_get(port, "/metrics")
    assert code == 200, body
    samples: Samples = {}
    types = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass
class HttpEngine:
    daemon: DaemonProcess
    port: int
    probes: list[tuple[float, int | None, int | None]] = field(default_factory=list)  # (t, /live, /ready)
    warm_stats: bytes = b""
    warm_metrics: bytes = b""

    @property
    def endpoint(self) -> str:
        return self.daemon.endpoint


@pytest.fixture(scope="module")
def ops() -> Iterator[HttpEngine]:
    """A 2-worker daemon with HTTP, probed from the moment it starts until /ready says 200."""
    port = free_port()
    daemon = spawn_daemon("--http", f"127.0.0.1:{port}", wait_ready=False)
    engine = HttpEngine(daemon, port)
    started = time.monotonic()
    try:
        while time.monotonic() - started < 90:
            live, _ = http_get(port, "/live", 1.0)
            ready = http_get(port, "/ready", 1.0)[0] if live is not None else None
            engine.probes.append((time.monotonic() - started, live, ready))
            if ready == 503 and not engine.warm_stats:
                engine.warm_stats = http_get(port, "/stats")[1]
                engine.warm_metrics = http_get(port, "/metrics")[1]
            if ready == 200:
                break
            assert daemon.proc.poll() is None, daemon.log()
            time.sleep(0.01)
        daemon.wait_for_line("ready:", 10)
    except BaseException:
        daemon.stop(signal.SIGKILL)
        raise
    yield engine
    assert daemon.stop() == 0, daemon.log()
    log = daemon.log()
    assert "[shutdown] frames served=" in log and "[shutdown] stopped" in log, log


STATS_REQUESTS: Counter[str] = Counter()  # sent by settle(), so tests can account for every message


def settle(endpoint: str, timeout: float = 5.0) -> dict[str, Any]:
    """Stats once every answered frame is also in the workers' counters (a worker bumps its
    counters just after publishing a batch's results) and every worker is ready."""
    deadline = time.monotonic() + timeout
    with Client(endpoint) as client:
        while True:
            STATS_REQUESTS["settle"] += 1
            stats = client.stats()
            counters = stats["counters"]
            caught_up = stats["frames"] >= counters.get("frames_out", 0) - counters.get("frames_shed", 0)
            if (stats["ready"] and caught_up) or time.monotonic() > deadline:
                return stats
            time.sleep(0.02)


def send_streams(endpoint: str, streams: int, frames: int, extra_samples: int, chunk_frames: int) -> tuple[int, int]:
    """Open `streams` streams, send frames*512+extra samples each in chunks, close them all.
    Returns (results received, audio chunks sent)."""
    results = chunks = 0
    rng = np.random.default_rng(7)
    with Client(endpoint) as client:
        opened = [client.open_stream(16000) for _ in range(streams)]
        for stream in opened:
            pcm = (rng.standard_normal(frames * FRAME + extra_samples) * 3000).astype(np.int16)
            step = chunk_frames * FRAME
            for offset in range(0, len(pcm), step):
                results += len(stream.send(pcm[offset:offset + step]))
                chunks += 1
        for stream in opened:
            results += len(stream.close())
    return results, chunks


# ---- readiness ---------------------------------------------------------------------------

def test_ready_flips_only_after_warm_up(ops: HttpEngine) -> None:
    answered = [(live, ready) for _, live, ready in ops.probes if live is not None]
    assert answered, f"/live never answered: {ops.probes}"
    assert all(live == 200 for live, _ in answered)
    readiness = [ready for _, ready in answered]
    assert readiness[-1] == 200
    # Live-but-not-ready during warm-up, then ready for good: 503...503 200.
    assert readiness.count(503) >= 1, f"warm-up was never observed: {ops.probes}"
    assert readiness == [503] * (len(readiness) - 1) + [200], readiness
    # While warming up, /stats says so and /metrics exposes only ringserve_ready 0.
    assert json.loads(ops.warm_stats) == {"live": True, "ready": False, "state": "starting"}
    warm = {f.name: f for f in text_string_to_metric_families(ops.warm_metrics.decode())}
    assert set(warm) == {"ringserve_ready"} and warm["ringserve_ready"].samples[0].value == 0.0
    # The log agrees: HTTP listener first (before any worker), the ready line after.
    lines = ops.daemon.lines
    listener = next(i for i, line in enumerate(lines) if "HTTP listener on" in line)
    ready_line = next(i for i, line in enumerate(lines) if "ready:" in line)
    assert listener < ready_line
    assert http_get(ops.port, "/ready") == (200, b'{"ready": true}')
    assert http_get(ops.port, "/live")[0] == 200
    assert http_get(ops.port, "/nope")[0] == 404
    samples, _ = scrape(ops.port)
    assert value(samples, "ringserve_ready") == 1.0


# ---- metrics -----------------------------------------------------------------------------

HISTOGRAMS = ("ringserve_queue_seconds", "ringserve_compute_seconds", "ringserve_request_seconds")


def test_metrics_count_every_frame_exactly(ops: HttpEngine) -> None:
    settle(ops.endpoint)
    before, _ = scrape(ops.port)
    settle_requests = STATS_REQUESTS["settle"]
    # 3 streams x (37 frames + 100 samples): 37 complete frames each, and a zero-padded
    # 38th run when the stream closes.
    results, chunks = send_streams(ops.endpoint, streams=3, frames=37, extra_samples=100, chunk_frames=5)
    assert results == 3 * 38
    settle(ops.endpoint)
    after, types = scrape(ops.port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ringserve_frames_answered_total") == 114
    assert delta("ringserve_frames_total") == 114  # run through the model
    assert delta("ringserve_frames_received_total") == 114  # 111 complete frames sent + 3 zero-padded at close
    # OPEN, the audio chunks and CLOSE of each stream, settle()'s STATS requests, and the second
    # scrape's own (the HTTP thread asks the front-end over the ROUTER; a request counts itself)
    settled = STATS_REQUESTS["settle"] - settle_requests
    assert delta("ringserve_messages_received_total") == 3 + chunks + 3 + settled + 1
    assert delta("ringserve_streams_opened_total") == 3
    for where in ("worker", "intake", "queue_full"):
        assert delta("ringserve_frames_shed_total", where=where) == 0
    assert delta("ringserve_worker_restarts_total") == 0
    executions = delta("ringserve_executions_total")
    assert 1 <= executions <= 114
    assert value(after, "ringserve_open_streams") == 0 and value(after, "ringserve_connections") == 0
    assert not [k for k in after if k[0] == "ringserve_errors_total" and after[k] != before.get(k, 0.0)]
    # Histograms: one observation per frame (queue), per batch (compute), per audio chunk (request).
    assert delta("ringserve_queue_seconds_count") == 114
    assert delta("ringserve_compute_seconds_count") == executions
    assert delta("ringserve_request_seconds_count") == chunks
    for name in HISTOGRAMS:
        assert types[name] == "histogram"
        buckets = sorted(((float(dict(labels)["le"]), v) for (sample, labels), v in after.items()
                          if sample == name + "_bucket"))
        assert buckets[-1][0] == math.inf and len(buckets) == 14
        assert buckets[-1][1] == value(after, name + "_count")
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), buckets  # cumulative
        assert value(after, name + "_sum") > 0
    for quiet in ("ringserve_frames_refused_total", "ringserve_streams_expired_total"):
        assert quiet in {name for name, _ in after} and delta(quiet) == 0
    assert delta("ringserve_replies_dropped_total", reason="slow_client") == 0
    for counter in ("ringserve_frames", "ringserve_executions", "ringserve_frames_received", "ringserve_errors",
                    "ringserve_worker_busy_seconds", "ringserve_frames_refused", "ringserve_replies_dropped"):
        assert types[counter] == "counter"
    for gauge in ("ringserve_ready", "ringserve_open_streams", "ringserve_uptime_seconds", "ringserve_worker_busy_ratio"):
        assert types[gauge] == "gauge"
    assert {dict(labels)["worker"] for (name, labels) in after if name == "ringserve_worker_busy_ratio"} == {"0", "1"}
    assert sum(v for (name, _), v in after.items() if name == "ringserve_worker_busy_seconds_total") > 0


def test_stats_over_zeromq_and_http_agree(ops: HttpEngine) -> None:
    send_streams(ops.endpoint, streams=2, frames=20, extra_samples=0, chunk_frames=3)
    with Client(ops.endpoint) as client:
        held = client.open_stream(16000)  # one open stream on one connection, in both views
        held.send(np.zeros(3 * FRAME, np.int16))
        settle(ops.endpoint)
        over_zmq = client.stats()
        code, body = http_get(ops.port, "/stats")
        assert code == 200
        over_http = json.loads(body)
        held.close()

    def comparable(stats: dict[str, Any]) -> dict[str, Any]:
        stats = dict(stats)
        del stats["uptime_s"]  # time-based: differ between two calls
        # each view's own request counts itself
        stats["counters"] = {k: v for k, v in stats["counters"].items() if k != "messages_in"}
        stats["workers"] = [{k: v for k, v in w.items() if k != "busy_share"} for w in stats["workers"]]
        return stats

    assert comparable(over_zmq) == comparable(over_http)
    assert over_http["counters"]["messages_in"] == over_zmq["counters"]["messages_in"] + 1
    assert over_zmq["open_streams"] == 1 and over_zmq["connections"] == 1
    assert over_zmq["counters"]["frames_out"] >= 40 + 3
    assert abs(over_zmq["uptime_s"] - over_http["uptime_s"]) < 5
    assert over_zmq["model"]["sha256"] == SILERO_SHA256
    assert over_zmq["versions"]["onnxruntime"] == onnxruntime.__version__


# ---- logs ----------------------------------------------------------------------------------

def test_text_logs_name_the_process_and_nothing_is_logged_per_frame(ops: HttpEngine) -> None:
    settle(ops.endpoint)
    before = len(ops.daemon.lines)
    results, _ = send_streams(ops.endpoint, streams=3, frames=100, extra_samples=0, chunk_frames=2)
    assert results == 300
    with Client(ops.endpoint) as client:
        client.stats()
    http_get(ops.port, "/metrics")
    http_get(ops.port, "/ready")
    time.sleep(0.3)
    assert ops.daemon.lines[before:] == [], "lines logged for traffic, stats or probes"
    lines = list(ops.daemon.lines)
    assert lines and all(TEXT_LINE.match(line) for line in lines), lines
    startup = "".join(lines)
    assert "[front-end] HTTP listener on" in startup
    ready = next(line for line in lines if "ready:" in line)
    for part in (ops.endpoint, "workers=2", SILERO_SHA256, f"onnxruntime={onnxruntime.__version__}",
                 "provider=", f"pid={ops.daemon.pid}"):
        assert part in ready, ready


def _log_from_worker_process() -> None:
    import logging

    from engine.logs import setup_logging

    for fmt in ("text", "json"):
        setup_logging("info", fmt)
        logging.getLogger("ringserve.worker").info("hello in %s", fmt)


def test_worker_processes_log_under_their_own_name(capfd: pytest.CaptureFixture[str]) -> None:
    """Workers are spawned as `worker-N` (engine/supervisor.py) and set up logging like the
    front-end, so their lines carry their own name, in text and in JSON."""
    child = multiprocessing.get_context("spawn").Process(target=_log_from_worker_process, name="worker-3")
    child.start()
    child.join(60)
    assert child.exitcode == 0
    text, as_json = capfd.readouterr().err.strip().splitlines()
    assert TEXT_LINE.match(text) and text.endswith("[worker-3] hello in text"), text
    record = json.loads(as_json)
    assert record["process"] == "worker-3" and record["level"] == "info"
    assert record["msg"] == "hello in json" and record["logger"] == "ringserve.worker"


def test_json_logs_provider_auto_and_summaries() -> None:
    daemon = spawn_daemon("--provider", "auto", "--log-format", "json", "--workers", "1")
    try:
        with Client(daemon.endpoint) as client:
            stream = client.open_stream(16000)
            assert len(stream.send(np.zeros(50 * FRAME, np.int16))) == 50
            stream.close()
            workers = client.stats()["workers"]
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
    records = [json.loads(line) for line in daemon.lines]  # every line is one JSON object
    assert records and all({"ts", "level", "process", "logger", "msg"} <= set(r) for r in records)
    # (a warning is possible: segments of a SIGKILLed daemon removed at start-up)
    assert all(r["process"] in ("front-end", "worker-0") and r["level"] in ("info", "warning")
               for r in records), records
    assert any(r["process"] == "worker-0" and "warmed up" in r["msg"] for r in records)
    expected = "CUDAExecutionProvider" if HAVE_CUDA else "CPUExecutionProvider"
    ready = [r["msg"] for r in records if r["msg"].startswith("ready:")]
    assert len(ready) == 1 and f"provider={expected}" in ready[0] and SILERO_SHA256 in ready[0]
    assert workers[0]["provider"] == expected
    messages = [r["msg"] for r in records]
    assert "[shutdown] SIGTERM received" in messages
    assert "[shutdown] frames served=50 streams opened=1 errors=0 worker restarts=0" in messages
    assert messages[-1] == "[shutdown] stopped; shared memory and ipc files removed"


@pytest.mark.skipif(HAVE_CUDA, reason="CUDA is available here: --provider cuda would start")
def test_provider_cuda_without_gpu_fails_fast(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--provider", "cuda", "--workers", "1",
                             "--bind", f"ipc://{tmp_path}/engine.sock"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    _, stderr = proc.communicate(timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, stderr
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert "onnxruntime-gpu" in stderr and "--provider cuda" in stderr, stderr
    assert "ready:" not in stderr
    assert not os.path.exists(tmp_path / "engine.sock")
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"ringserve-{proc.pid}-")]


# ---- ringserve status -----------------------------------------------------------------------

def status_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", "status", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_status_command_table_and_json(ops: HttpEngine) -> None:
    send_streams(ops.endpoint, streams=2, frames=10, extra_samples=0, chunk_frames=4)
    settle(ops.endpoint)
    table = status_cli("--endpoint", ops.endpoint)
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert f"ringserve at {ops.endpoint}: READY" in out
    for part in (SILERO_SHA256, f"onnxruntime {onnxruntime.__version__}", "protocol 1", "average batch",
                 "queue (per frame)", "compute (per batch)", "p99", "errors", "shed", "worker restart(s)"):
        assert part in out, out
    as_json = status_cli("--endpoint", ops.endpoint, "--json")
    assert as_json.returncode == 0, as_json.stderr
    stats = json.loads(as_json.stdout)
    assert stats["ready"] is True and stats["model"]["sha256"] == SILERO_SHA256
    for worker in stats["workers"]:
        assert re.search(rf"^  {worker['index']}\s+{worker['pid']}\s+\S+ExecutionProvider\s+yes\s", out, re.M), out
    assert stats["frames"] >= 20 and stats["executions"] >= 1
    assert stats["limits"] == {"max_streams": 4096, "max_streams_per_connection": 4096, "max_items_per_message": 1024,
                               "max_message_bytes": 1 << 20, "max_in_flight_frames": 2048}, stats["limits"]


def test_status_not_ready_while_a_worker_is_replaced(ops: HttpEngine, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit status 1 while a killed worker's replacement warms up, 0 once it is back."""
    before = settle(ops.endpoint)
    os.kill(before["workers"][0]["pid"], signal.SIGKILL)
    codes = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        code = cli_main(["status", "--endpoint", ops.endpoint, "--timeout", "5"])
        out = capsys.readouterr().out
        codes.append(code)
        if code == 1:
            assert "NOT READY" in out and re.search(r"^  0 .* NO ", out, re.M), out
        if code == 0 and 1 in codes:
            break
        time.sleep(0.005)
    assert 1 in codes and codes[-1] == 0, codes[-20:]
    after = settle(ops.endpoint)
    assert after["workers"][0]["restarts"] == before["workers"][0]["restarts"] + 1
    assert after["counters"]["worker_restarts"] == before["counters"].get("worker_restarts", 0) + 1
    assert after["workers"][0]["pid"] != before["workers"][0]["pid"]
    ops.daemon.wait_for_line("worker-0 replaced", 10)


def test_status_of_a_dead_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"ipc://{tempfile.mkdtemp(prefix='rs-')}/nobody.sock"
    result = status_cli("--endpoint", dead, "--timeout", "0.5")
    assert result.returncode == 2
    assert dead in result.stderr and "no answer" in result.stderr and result.stdout == ""
    port = free_port()
    assert cli_main(["status", "--endpoint", f"tcp://127.0.0.1:{port}", "--timeout", "0.3", "--json"]) == 2
    assert f"tcp://127.0.0.1:{port}" in capsys.readouterr().err
    assert cli_main(["status", "--endpoint", "no-such-scheme"]) == 2
    assert "cannot connect to no-such-scheme" in capsys.readouterr().err


def test_histogram_quantile_estimates() -> None:
    bounds = [1.0, 2.0, 4.0]
    assert histogram_quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert histogram_quantile(0.5, bounds, [10, 0, 0, 0]) == 0.5  # interpolated inside [0, 1]
    assert histogram_quantile(0.5, bounds, [0, 10, 0, 0]) == 1.5
    assert histogram_quantile(0.99, bounds, [50, 49, 1, 0]) == pytest.approx(2.0)
    assert histogram_quantile(0.99, bounds, [0, 0, 90, 10]) == math.inf  # beyond the last bound
    assert histogram_quantile(0.5, bounds, [0, 0, 90, 10]) == pytest.approx(2.0 + 2.0 * 50 / 90)
