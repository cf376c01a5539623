"""The bench's own ZMTP 3.0 device link (bench/load_zmtp.py): its framing against libzmq's
on both sides (a real ROUTER and a real DEALER), and its parser on awkward reads."""

from __future__ import annotations

import socket
import threading

import pytest
import zmq

from bench.load_zmtp import ZmtpConnection, ZmtpError, command, handshake, message_frame


def _pair(ctx: zmq.Context, kind: int) -> tuple[zmq.Socket, int]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, port


def test_a_zmtp_connection_talks_to_a_libzmq_router_both_ways() -> None:
    ctx = zmq.Context()
    router, port = _pair(ctx, zmq.ROUTER)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        handshake(sock)
        short, long = b"hello", bytes(range(256)) * 5  # one-byte and eight-byte frame sizes
        sock.sendall(message_frame(short) + message_frame(long))
        assert router.poll(5000)
        identity, got = router.recv_multipart()
        assert got == short
        assert router.recv_multipart()[1] == long
        router.send_multipart([identity, long])
        router.send_multipart([identity, short])
        conn = ZmtpConnection(sock)
        received: list[bytes] = []
        while len(received) < 2:  # the ROUTER's READY command comes first and is no message
            received += conn.messages(sock.recv(1 << 16))
        assert received == [long, short]
        sock.close()
    finally:
        router.close()
        ctx.term()


def test_a_curve_server_is_refused_with_a_clear_error() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.curve_server = True
    router.curve_secretkey = zmq.curve_keypair()[1]
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        with pytest.raises(ZmtpError, match="requires CURVE"):
            handshake(sock)
        sock.close()
    finally:
        router.close()
        ctx.term()


def test_frames_split_across_reads_and_pings_are_answered() -> None:
    a, b = socket.socketpair()
    conn = ZmtpConnection(a)
    ping = command(b"PING", b"\x00\x0a" + b"ctx")
    wire = ping + message_frame(b"x" * 300) + message_frame(b"yz")
    out: list[bytes] = []
    for i in range(len(wire)):  # one byte per read: every partial header and body
        out += conn.messages(wire[i:i + 1])
    assert out == [b"x" * 300, b"yz"]
    assert conn.outbox == command(b"PONG", b"ctx")
    with pytest.raises(ZmtpError, match="multi-frame"):
        conn.messages(bytes([1, 1]) + b"a")
    a.close()
    b.close()


def test_the_handshake_fails_clearly_on_a_peer_that_is_not_zeromq() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        peer, _ = server.accept()
        peer.sendall(b"HTTP/1.1 400 Bad Request\r\n" + bytes(64))
        peer.close()

    thread = threading.Thread(target=answer)
    thread.start()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    with pytest.raises(ZmtpError, match="not ZMTP 3"):
        handshake(sock)
    thread.join()
    sock.close()
    server.close()
