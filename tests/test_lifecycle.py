"""Daemon lifecycle: ready line, clean stops, start-up failures, and what a killed daemon leaves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from clients.client import Client
from engine.models.silero import SILERO_SHA256
from tests.conftest import REPO, spawn_daemon


def shm_names(pid: int) -> list[str]:
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(f"ringserve-{pid}-"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def wait_gone(pids: list[int], timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and [p for p in pids if pid_alive(p)]:
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_by_signal_leaves_nothing_behind(sig: int) -> None:
    daemon = spawn_daemon()
    ready = daemon.wait_for_line("ready:", 1)
    assert daemon.endpoint in ready and "workers=2" in ready and SILERO_SHA256 in ready and "onnxruntime=" in ready
    ipc_file = daemon.endpoint[len("ipc://"):]
    assert oct(os.stat(ipc_file).st_mode & 0o777) == "0o600"
    with Client(daemon.endpoint) as client:
        stream = client.open_stream()
        stream.send(np.zeros(16000, np.int16))
        workers = [w["pid"] for w in client.stats()["workers"]]
        names = shm_names(daemon.pid)
        assert len([n for n in names if not n.endswith(".lock")]) == 3  # state table + one per worker
        assert len([n for n in names if n.endswith(".lock")]) == 1  # the owner lock
    assert daemon.stop(sig) == 0, daemon.log()
    assert "[shutdown]" in daemon.log()
    assert shm_names(daemon.pid) == []
    assert not os.path.exists(ipc_file)
    assert wait_gone(workers) == []


def test_bad_model_fails_fast_naming_the_cause(tmp_path: Path) -> None:
    bogus = tmp_path / "broken.onnx"
    bogus.write_bytes(b"this is not an onnx model")
    started = time.monotonic()
    daemon = spawn_daemon("--model", str(bogus), wait_ready=False)
    code = daemon.proc.wait(120)
    daemon.stop()
    assert code != 0
    assert time.monotonic() - started < 60
    log = daemon.log()
    assert "worker-0 failed to start" in log or "worker-1 failed to start" in log, log
    assert "--model" in log and "ready:" not in log
    assert shm_names(daemon.pid) == []


def test_missing_model_and_bad_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--model", "/nonexistent.onnx"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1 and "/nonexistent.onnx" in result.stderr and "--model" in result.stderr
    result = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--workers", "0"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and "workers = 0 is invalid" in result.stderr


def test_endpoint_in_use_is_refused() -> None:
    first = spawn_daemon("--workers", "1")
    try:
        second = spawn_daemon("--workers", "1", endpoint=first.endpoint, wait_ready=False)
        assert second.proc.wait(120) == 1
        second.stop()
        assert "already listening" in second.log()
        with Client(first.endpoint) as client:
            client.ping()
    finally:
        assert first.stop() == 0


def test_kill_9_cycles_leave_nothing_behind() -> None:
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='rs-')}/engine.sock"
    killed: list[int] = []
    workers: list[int] = []
    for _ in range(10):
        daemon = spawn_daemon("--workers", "1", endpoint=endpoint)
        with Client(endpoint) as client:
            client.open_stream().send(np.zeros(2048, np.int16))
            workers += [w["pid"] for w in client.stats()["workers"]]
        daemon.stop(signal.SIGKILL)
        killed.append(daemon.pid)
    assert wait_gone(workers) == [], "workers must leave when their daemon dies"
    last = spawn_daemon("--workers", "1", endpoint=endpoint)
    with Client(endpoint) as client:
        client.ping()
    assert last.stop() == 0
    leftovers = [name for pid in killed for name in shm_names(pid)]
    assert leftovers == []
    assert not os.path.exists(endpoint[len("ipc://"):])


def test_sigterm_during_start_up_stops_the_daemon() -> None:
    from tests.test_security import free_port

    daemon = spawn_daemon("--workers", "2", "--http", f"127.0.0.1:{free_port()}", wait_ready=False)
    daemon.wait_for_line("HTTP listener", 60)  # logged before the workers are started
    assert daemon.stop(signal.SIGTERM) == 0
    assert "stopped before workers were ready" in daemon.log() or "ready:" in daemon.log()
    assert shm_names(daemon.pid) == []


def test_leftovers_are_judged_by_their_lock_not_their_pid(tmp_path: Path) -> None:
    """A pid from another pid namespace can look dead here; its held lock says it is alive."""
    import fcntl

    prefix = "/dev/shm/ringserve-999999-0badc0de"  # a pid that does not exist in this namespace
    segment, lock = prefix + "-w0", prefix + ".lock"
    Path(segment).write_bytes(b"\0" * 64)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        alive_owner = spawn_daemon("--workers", "1")
        assert alive_owner.stop() == 0
        assert os.path.exists(segment) and os.path.exists(lock), "a live owner's segments were removed"
        fcntl.flock(fd, fcntl.LOCK_UN)  # the owner "dies": the kernel would drop its lock
        next_daemon = spawn_daemon("--workers", "1")
        assert next_daemon.stop() == 0
        assert not os.path.exists(segment) and not os.path.exists(lock)
        assert "removed 2 shared-memory" in next_daemon.log()
    finally:
        os.close(fd)
        for path in (segment, lock):
            if os.path.exists(path):
                os.unlink(path)
