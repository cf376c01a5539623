"""The daemon under test: `ringserve serve` in a child process that is stopped on every exit path."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from types import TracebackType

from bench.procinfo import REPO, raise_nofile_limit


class BenchError(RuntimeError):
    """The engine, a server or a helper process misbehaved (died, hung, refused to start)."""


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def no_shedding_args() -> tuple[str, ...]:
    """Saturation measures capacity: switch the overload policy (shedding late frames) off
    where the engine has one; a shed frame would still be counted, apart, if one came back."""
    from engine.config import ServeConfig

    return ("--shed-after-ms", "0") if "shed_after_ms" in ServeConfig.keys() else ()


class EngineDaemon:
    """`ringserve serve --workers W` bound to a fresh ipc path and a free loopback TCP port;
    stop() always ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, workers: int, extra_args: Sequence[str] | None = None, nice: int = 0) -> None:
        self.workers = workers
        self.nice = nice  # niceness of the daemon (its workers inherit it)
        self.ipc = f"ipc:///tmp/ringserve-bench-{os.getpid()}-{id(self):x}.sock"
        self.tcp = f"tcp://127.0.0.1:{free_tcp_port()}"
        self.extra_args = tuple(no_shedding_args() if extra_args is None else extra_args)
        self.proc: subprocess.Popen[str] | None = None
        self.log: deque[str] = deque(maxlen=200)
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    def __enter__(self) -> EngineDaemon:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def endpoint(self, transport: str = "tcp") -> str:
        if transport not in ("tcp", "ipc"):
            raise ValueError(f"transport must be tcp or ipc, not {transport!r}")
        return self.tcp if transport == "tcp" else self.ipc

    def start(self, timeout: float = 120.0) -> None:
        raise_nofile_limit()  # one connection per microphone: the daemon inherits the limit
        cmd = [sys.executable, "-m", "engine.cli", "serve", "--workers", str(self.workers),
               "--bind", self.ipc, "--bind", self.tcp, *self.extra_args]
        if self.nice:
            cmd = ["nice", "-n", str(self.nice), *cmd]  # nice execs the command: the pid stays the daemon's
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO)
        self._reader = threading.Thread(target=self._read_log, name="daemon-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        try:
            while not self._ready.wait(0.1):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    time.sleep(0.2)  # let the reader take the last lines
                    raise BenchError(f"daemon did not become ready (exit code {self.proc.poll()}):\n{self.tail()}")
        except BaseException:
            self.stop()
            raise

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            if "ready:" in line:
                self._ready.set()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(list(self.log)[-lines:])

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"daemon exited with code {self.proc.returncode}:\n{self.tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        deadline = time.monotonic() + timeout
        try:
            # A daemon still starting ignores signals until it runs, so repeat SIGTERM.
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)  # a test may have stopped it
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if self._reader is not None:
                self._reader.join(5)
            if proc.stderr is not None:
                proc.stderr.close()


@contextlib.contextmanager
def spawn_engine(workers: int, extra_args: Sequence[str] = (), *, transport: str = "tcp",
                 nice: int = 0) -> Iterator[str]:
    """Start `ringserve serve --workers W *extra_args` and yield its endpoint (loopback TCP by
    default, the path a remote device takes; ``transport="ipc"`` for the ipc one). The daemon
    is stopped when the block exits, however it exits. Unlike :class:`EngineDaemon` the
    engine keeps its own overload policy unless ``extra_args`` says otherwise."""
    with EngineDaemon(workers, tuple(extra_args), nice=nice) as daemon:
        yield daemon.endpoint(transport)
