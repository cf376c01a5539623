"""Network exposure needs CURVE (or an explicit --insecure); only allowed keys get answers."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import zmq

from engine.cli import main as cli_main
from tests.conftest import REPO, spawn_daemon
from transport import protocol as P
from transport.security import enable_client_curve, is_loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exchange(endpoint: str, payload: bytes, curve: tuple[str, str] | None, timeout_ms: int) -> bytes | None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        enable_client_curve(sock, *curve)
    sock.connect(endpoint)
    try:
        sock.send(payload)
        return sock.recv() if sock.poll(timeout_ms) else None
    finally:
        sock.close()


def test_loopback_detection() -> None:
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://[::1]:5555") and is_loopback("ipc:///x")
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://*:5555")
    assert not is_loopback("tcp://10.1.2.3:5555") and not is_loopback("tcp://example.org:1")


def test_exposed_bind_without_curve_is_refused() -> None:
    result = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--workers", "1",
                             "--bind", f"tcp://0.0.0.0:{free_port()}"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1
    assert "--curve-secret-key" in result.stderr and "--insecure" in result.stderr


def test_insecure_flag_allows_it_with_a_warning() -> None:
    endpoint = f"tcp://0.0.0.0:{free_port()}"
    daemon = spawn_daemon("--workers", "1", "--insecure", endpoint=endpoint)
    try:
        assert "WITHOUT encryption" in daemon.log()
        reply = exchange(endpoint.replace("0.0.0.0", "127.0.0.1"), P.header(P.MsgType.PING, 1), None, 5000)
        assert reply is not None and P.parse_header(reply)[0] == P.MsgType.PONG
    finally:
        assert daemon.stop() == 0


def test_only_allowed_client_keys_get_answers(tmp_path: Path) -> None:
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    for name in ("server", "client", "rogue"):
        assert cli_main(["keys", "generate", "--dir", str(keys), "--name", name]) == 0
    assert oct((keys / "client.key_secret").stat().st_mode & 0o777) == "0o600"
    allowed.mkdir()
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    port = free_port()
    daemon = spawn_daemon("--workers", "1", "--curve-secret-key", str(keys / "server.key_secret"),
                          "--curve-allow", str(allowed), endpoint=f"tcp://0.0.0.0:{port}")
    endpoint = f"tcp://127.0.0.1:{port}"
    server_public = str(keys / "server.key")
    try:
        ping = P.header(P.MsgType.PING, 7)
        reply = exchange(endpoint, ping, (server_public, str(keys / "client.key_secret")), 5000)
        assert reply is not None and P.parse_header(reply) == (P.MsgType.PONG, 7)
        # A real stream over the encrypted connection.
        opened = exchange(endpoint, P.encode_open(3, 1, {"sample_rate": 16000}),
                          (server_public, str(keys / "client.key_secret")), 5000)
        assert opened is not None and P.parse_header(opened)[0] == P.MsgType.OPENED
        assert exchange(endpoint, ping, (server_public, str(keys / "rogue.key_secret")), 1500) is None
        assert exchange(endpoint, ping, None, 1500) is None  # plaintext client: handshake never completes
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0
