"""The per-frame baseline: a conventional VAD server, the way most Silero VAD services are written.

One thread per TCP connection (socketserver.ThreadingTCPServer), one connection per
microphone, one ``session.run`` per 512-sample frame at batch 1 on one shared onnxruntime
session guarded by a lock. Per-stream state (the LSTM state and the 64-sample context) lives
in the connection's thread. Nothing is batched across streams: that is the difference the
bench measures.

Wire protocol (all little-endian, over TCP with TCP_NODELAY on both ends)::

    client -> server, once:   b"PF1\\0" | u32 sample_rate (16000 or 8000)
    server -> client, once:   b"PFOK"   (or b"PFER" + a reason, then close)
    client -> server, chunk:  u32 body_len | u32 chunk_seq | int16 PCM (whole frames)
    server -> client, reply:  u32 body_len | u32 chunk_seq | f32 probability per frame

A stream ends when the client closes its connection.

    python -m bench.per_frame_server [--bind 127.0.0.1:0] [--intra-op-threads 1]

prints ``ready: tcp://HOST:PORT`` on stderr once the model is loaded, then serves until
SIGTERM/SIGINT. :func:`spawn_per_frame_server` runs it as a child process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType

import numpy as np

HELLO = b"PF1\0"
HELLO_OK = b"PFOK"
HELLO_ERR = b"PFER"
U32 = struct.Struct("<I")
HEAD = struct.Struct("<II")  # body_len, chunk_seq
MAX_BODY = 1 << 20


class _Model:
    """One onnxruntime session shared by every connection, one call at a time."""

    def __init__(self, model_path: str, intra_op_threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self.lock = threading.Lock()
        self.frames = 0


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def _read(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            part = self.request.recv(n - len(buf))
            if not part:
                return None
            buf += part
        return bytes(buf)

    def handle(self) -> None:
        from engine.models.silero import CONTEXT_SAMPLES, FRAME_SAMPLES

        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = self._read(8)
        if hello is None:
            return
        rate = U32.unpack_from(hello, 4)[0]
        if hello[:4] != HELLO or rate not in FRAME_SAMPLES:
            sock.sendall(HELLO_ERR + f"bad hello or sample rate {rate}".encode())
            return
        sock.sendall(HELLO_OK)
        frame, ctx = FRAME_SAMPLES[rate], CONTEXT_SAMPLES[rate]
        model = self.server.model
        state = np.zeros((2, 1, 128), np.float32)
        window = np.zeros((1, ctx + frame), np.float32)  # [context | frame]
        sr = np.array(rate, np.int64)
        while True:
            head = self._read(HEAD.size)
            if head is None:
                return
            body_len, chunk_seq = HEAD.unpack(head)
            if not 4 <= body_len <= MAX_BODY or (body_len - 4) % (2 * frame):
                return  # a broken client: drop the connection
            pcm = self._read(body_len - 4)
            if pcm is None:
                return
            samples = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
            probs = []
            for start in range(0, len(samples), frame):
                window[0, :ctx] = window[0, -ctx:]
                window[0, ctx:] = samples[start:start + frame]
                with model.lock:
                    out, state = model.session.run(None, {"input": window, "state": state, "sr": sr})
                    model.frames += 1
                probs.append(float(out[0, 0]))
            reply = struct.pack(f"<II{len(probs)}f", 4 + 4 * len(probs), chunk_seq, *probs)
            try:
                sock.sendall(reply)
            except OSError:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096  # a whole fleet of microphones connects at once

    def __init__(self, address: tuple[str, int], model: _Model) -> None:
        self.model = model
        super().__init__(address, _Handler)


def serve(host: str, port: int, intra_op_threads: int = 1) -> None:
    from engine.models.silero import default_model_path

    model = _Model(default_model_path(), intra_op_threads)
    server = _Server((host, port), model)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bound_host, bound_port = server.server_address[:2]
    if isinstance(bound_host, bytes):
        bound_host = bound_host.decode()
    print(f"ready: tcp://{bound_host}:{bound_port} pid {os.getpid()}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


@dataclass
class PerFrameServer:
    """A running per-frame server child: its endpoint and pid; ``stop()`` always ends it."""

    proc: subprocess.Popen[str]
    endpoint: str = ""
    log: deque[str] = field(default_factory=lambda: deque(maxlen=100))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@contextlib.contextmanager
def spawn_per_frame_server(intra_op_threads: int = 1, host: str = "127.0.0.1", timeout: float = 60.0,
                           nice: int = 0) -> Iterator[PerFrameServer]:
    from bench.daemon import BenchError
    from bench.procinfo import REPO, raise_nofile_limit

    raise_nofile_limit()
    cmd = [sys.executable, "-m", "bench.per_frame_server", "--bind", f"{host}:0",
           "--intra-op-threads", str(intra_op_threads)]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    server = PerFrameServer(proc)
    ready = threading.Event()

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            server.log.append(line.rstrip())
            if line.startswith("ready: "):
                server.endpoint = line.split()[1]
                ready.set()

    reader = threading.Thread(target=read_log, name="per-frame-log", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("per-frame server did not start:\n" + "\n".join(server.log))
        yield server
    finally:
        server.stop()
        reader.join(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.per_frame_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    parser.add_argument("--intra-op-threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    args = parser.parse_args(argv)
    host, _, port = args.bind.rpartition(":")
    serve(host or "127.0.0.1", int(port), args.intra_op_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
