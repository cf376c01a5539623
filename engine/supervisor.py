"""Worker processes: spawn, wait for ready, notice death, replace, stop.

Lifecycle after vLLM's v1 engine: ``spawn`` start method; every worker reports READY (or the
error that stopped it) over a pipe, and the daemon waits on those pipes *and* the process
sentinels together, so a worker that dies while loading is an error, never a hang. Each
worker holds the read end of a death pipe: when the daemon exits, however it exits, the
pipe reads EOF and the worker leaves.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from engine.worker import WorkerConfig, worker_main
from transport.doorbell import Doorbell

log = logging.getLogger("ringserve.supervisor")
_CTX = multiprocessing.get_context("spawn")


class WorkerStartError(RuntimeError):
    pass


class WorkerProcess:
    def __init__(self, cfg: WorkerConfig, in_bell: Doorbell, out_bell: Doorbell) -> None:
        self.cfg = cfg
        self.in_bell = in_bell
        self.out_bell = out_bell
        self.process: BaseProcess | None = None
        self.ready_conn: Connection | None = None
        self.death_conn: Connection | None = None
        self.ready = False
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self.started_at = 0.0

    def start(self) -> None:
        ready_r, ready_w = _CTX.Pipe(duplex=False)
        death_r, death_w = _CTX.Pipe(duplex=False)
        self.process = _CTX.Process(target=worker_main, name=f"worker-{self.cfg.index}", daemon=True,
                                    args=(self.cfg, self.in_bell, self.out_bell, ready_w, death_r))
        self.process.start()
        ready_w.close()
        death_r.close()
        self.ready_conn, self.death_conn = ready_r, death_w
        self.ready = False
        self.started_at = time.monotonic()

    @property
    def sentinel(self) -> int:
        assert self.process is not None
        return self.process.sentinel

    def check_ready(self) -> None:
        """Consume a READY/error message if one is waiting; raises WorkerStartError on error."""
        conn = self.ready_conn
        if conn is None or not conn.poll(0):
            return
        try:
            status, detail = conn.recv()
        except EOFError:
            status, detail = "error", "exited before reporting ready"
        conn.close()
        self.ready_conn = None
        if status != "ready":
            model = self.cfg.model
            raise WorkerStartError(f"worker-{self.cfg.index} failed to start: {detail} "
                                   f"(check --model {model.path} and --provider {model.provider})")
        self.ready = True
        self.info = detail

    def is_dead(self) -> bool:
        return self.process is not None and self.process.exitcode is not None

    def exit_description(self) -> str:
        code = self.process.exitcode if self.process is not None else None
        if code is not None and code < 0:
            return f"killed by signal {-code}"
        return f"exit code {code}"

    def stop(self, timeout: float) -> None:
        if self.death_conn is not None:
            self.death_conn.close()  # EOF on the death pipe: the worker leaves its loop
            self.death_conn = None
        if self.ready_conn is not None:
            self.ready_conn.close()
            self.ready_conn = None
        proc = self.process
        if proc is None:
            return
        proc.join(timeout)
        if proc.exitcode is None:
            proc.terminate()
            proc.join(1.0)
        if proc.exitcode is None:
            proc.kill()
            proc.join(1.0)
        proc.close()
        self.process = None


def wait_all_ready(workers: list[WorkerProcess], timeout: float, interrupt_fd: int | None = None,
                   stop_requested: Callable[[], bool] = lambda: False) -> None:
    """Block until every worker is ready; raise with the cause and the setting to change.

    ``interrupt_fd`` (the signal wake-up pipe) ends the wait early once ``stop_requested()``:
    a SIGTERM during a slow model load stops the daemon instead of being ignored.
    """
    deadline = time.monotonic() + timeout
    while not all(w.ready for w in workers) and not stop_requested():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            slow = [f"worker-{w.cfg.index}" for w in workers if not w.ready]
            raise WorkerStartError(
                f"{', '.join(slow)} not ready after {timeout:.0f} s: raise --ready-timeout-s, "
                "or lower --workers / --intra-op-threads on a busy machine")
        waiting = [w for w in workers if not w.ready]
        handles: list[Any] = [w.ready_conn for w in waiting] + [w.sentinel for w in waiting]
        if interrupt_fd is not None:
            handles.append(interrupt_fd)
        if interrupt_fd in wait(handles, remaining):
            _drain(interrupt_fd)
        for w in waiting:
            w.check_ready()
            if not w.ready and w.is_dead():
                raise WorkerStartError(
                    f"worker-{w.cfg.index} exited ({w.exit_description()}) before it was ready: "
                    "check --model and --provider, and the log lines above")


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
