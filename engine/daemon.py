"""The daemon: owns every shared resource, starts workers, binds once they are ready, runs
the front-end, and tears everything down on any exit path.

Shutdown is a small state machine: RUNNING -> STOP_REQUESTED (a signal arrived; the loop
notices through the signal wake-up pipe) -> SHUTTING_DOWN (sockets closed with linger 0,
workers told through their death pipes, then terminated/killed if slow) -> STOPPED (shared
memory unlinked, ipc files removed). A SIGKILLed daemon cannot run any of this: its workers
leave when the death pipe reads EOF, multiprocessing's resource tracker unlinks the
segments, and the next daemon removes whatever is left (transport.shm.remove_orphans).
"""

from __future__ import annotations

import enum
import gc
import logging
import multiprocessing
import os
import signal
import time
from contextlib import ExitStack
from types import FrameType
from typing import Any

import onnxruntime
import zmq

from engine import frame_sets, router_batch
from engine.config import ServeConfig
from engine.control import StreamTable
from engine.frontend import FrontEnd, WorkerLink
from engine.http import fetch_stats, start_http
from engine.layout import StateLayout, WorkerLayout
from engine.models.base import ModelSpec
from engine.models.silero import (CONTEXT_SAMPLES, FRAME_SAMPLES, SILERO_SHA256, SileroVad, default_model_path,
                                  file_sha256, resolve_providers)
from engine.stats import WorkerStats
from engine.supervisor import WorkerProcess, wait_all_ready
from engine.worker import WorkerConfig
from transport.doorbell import Doorbell
from transport.endpoints import bind_all, remove_ipc_files
from transport.ring import Ring
from transport.security import check_binds, enable_server_curve
from transport.shm import OwnerLock, Segment, check_free_space, remove_orphans, segment_name

log = logging.getLogger("ringserve.daemon")
ADMIN_ENDPOINT = "inproc://ringserve-admin"


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOP_REQUESTED = "stop_requested"
    SHUTTING_DOWN = "shutting_down"
    STOPPED = "stopped"


class Daemon:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.state = State.STARTING
        self.started = time.time()
        self.model_path = cfg.model or default_model_path()
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"model file {self.model_path} does not exist: check --model")
        self.model_sha256 = file_sha256(self.model_path)
        if cfg.model is None and self.model_sha256 != SILERO_SHA256:
            raise RuntimeError(f"{self.model_path} has sha256 {self.model_sha256}, expected {SILERO_SHA256}: "
                               "reinstall silero-vad (make install) or pass --model")
        resolve_providers(cfg.provider)  # fail before spawning anything if e.g. CUDA is missing
        self.endpoints: list[str] = []
        self.frontend: FrontEnd | None = None

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        if self.state in (State.STARTING, State.RUNNING):
            log.info("[shutdown] %s received", signal.Signals(signum).name)
            self.state = State.STOP_REQUESTED

    def run(self) -> None:
        cfg = self.cfg
        multiprocessing.current_process().name = "front-end"  # log lines say which process
        removed = remove_orphans()
        if removed:
            log.warning("removed %d shared-memory segment(s) left by a dead daemon: %s", len(removed), removed)
        ring_capacity = cfg.ring_mib << 20
        layout = WorkerLayout(ring_capacity, ring_capacity // 2)
        state_layout = StateLayout(cfg.max_streams, SileroVad.state_floats)
        check_free_space(cfg.workers * layout.total + state_layout.total)
        check_binds(cfg.bind, cfg.curve_secret_key is not None, cfg.insecure)
        spec = ModelSpec(self.model_path, cfg.provider, cfg.intra_op_threads)
        with ExitStack() as cleanup:
            owner = OwnerLock()
            cleanup.callback(owner.release)  # runs last: segments are unlinked before the lock goes
            context = zmq.Context()
            cleanup.callback(context.term)
            if cfg.http:
                server = start_http(cfg.http, lambda: self.http_status(context))
                cleanup.callback(server.server_close)
                cleanup.callback(server.shutdown)
            wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            cleanup.callback(os.close, wake_r)
            cleanup.callback(os.close, wake_w)
            previous_fd = signal.set_wakeup_fd(wake_w)
            cleanup.callback(signal.set_wakeup_fd, previous_fd)
            for signum in (signal.SIGINT, signal.SIGTERM):
                cleanup.callback(signal.signal, signum, signal.signal(signum, self.request_stop))

            state_segment = Segment.create(segment_name("state"), state_layout.total)
            cleanup.callback(_close_segment, state_segment)
            links = []
            for index in range(cfg.workers):
                segment = Segment.create(segment_name(f"w{index}"), layout.total)
                cleanup.callback(_close_segment, segment)
                in_bell, out_bell = Doorbell(), Doorbell()
                cleanup.callback(in_bell.close)
                cleanup.callback(out_bell.close)
                in_ring = Ring(segment, in_bell, 0, layout.in_capacity)
                out_ring = Ring(segment, out_bell, layout.out_offset, layout.out_capacity)
                cleanup.callback(in_ring.close)
                cleanup.callback(out_ring.close)
                worker_cfg = WorkerConfig(index, spec, segment.name, layout, state_segment.name, state_layout,
                                          cfg.max_batch, cfg.spin_us, cfg.batch_delay_us,
                                          cfg.busy_batch_delay_us, cfg.log_level, cfg.log_format)
                proc = WorkerProcess(worker_cfg, in_bell, out_bell)
                cleanup.callback(proc.stop, 2.0)
                stats = WorkerStats(segment.buf[layout.stats_offset:layout.total])
                cleanup.callback(stats.release)
                link = WorkerLink(proc, in_ring, out_ring, stats, backlog_limit=ring_capacity)
                links.append(link)
            for link in links:
                link.proc.start()
            frame_sets.warm_up()  # while the workers load their models
            router_batch.warm_up()
            wait_all_ready(self.workers_of(links), cfg.ready_timeout_s, interrupt_fd=wake_r,
                           stop_requested=lambda: self.state != State.STARTING)
            if self.state != State.STARTING:
                log.info("[shutdown] stopped before workers were ready")
                return

            router = context.socket(zmq.ROUTER)
            cleanup.callback(router.close, 0)
            if cfg.curve_secret_key is not None and cfg.curve_allow is not None:
                auth = enable_server_curve(context, router, cfg.curve_secret_key, cfg.curve_allow)
                cleanup.callback(auth.stop)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.SNDHWM, 100_000)
            router.setsockopt(zmq.RCVHWM, 100_000)
            # Messages up to twice the limit are read and refused with a LIMIT error naming the
            # setting; beyond that libzmq drops the connection before allocating anything.
            router.setsockopt(zmq.MAXMSGSIZE, 2 * cfg.max_message_bytes)
            ipc_paths = bind_all(router, cfg.bind)
            router.bind(ADMIN_ENDPOINT)  # the HTTP thread's way in (see engine/http.py)
            cleanup.callback(remove_ipc_files, ipc_paths)
            self.endpoints = list(cfg.bind)

            table = StreamTable(
                max_streams=cfg.max_streams, max_per_connection=cfg.max_streams_per_connection,
                max_in_flight=cfg.max_in_flight_frames, max_message_bytes=cfg.max_message_bytes,
                max_items_per_message=cfg.max_items_per_message,
                idle_timeout_s=cfg.idle_timeout_s, shed_after_ms=cfg.shed_after_ms, n_workers=cfg.workers,
                frame_samples=FRAME_SAMPLES, context_samples=CONTEXT_SAMPLES,
                stats_provider=self.stats)
            self.frontend = FrontEnd(cfg, router, links, table, wake_r, lambda: self.state != State.RUNNING)
            self.state = State.RUNNING
            providers = sorted({str(link.proc.info.get("provider")) for link in links})
            log.info("ready: endpoints=%s workers=%d model=%s sha256=%s onnxruntime=%s provider=%s pid=%d",
                     ",".join(self.endpoints), cfg.workers, self.model_path, self.model_sha256,
                     onnxruntime.__version__, ",".join(providers), os.getpid())
            # A full collection walks every object numba, llvmlite, onnxruntime and numpy made at
            # import: ~25 ms on an idle box, 44 ms under load, stalling every stream (the soak's
            # p99 spikes). Frozen, they are never walked; what serving allocates still is.
            gc.freeze()
            try:
                self.frontend.run()
            finally:
                self.state = State.SHUTTING_DOWN
                counters = table.counters
                log.info("[shutdown] frames served=%d streams opened=%d errors=%d worker restarts=%d",
                         counters["frames_out"], counters["streams_opened"],
                         sum(v for k, v in counters.items() if k.startswith("errors_")),
                         counters["worker_restarts"])
        self.state = State.STOPPED
        log.info("[shutdown] stopped; shared memory and ipc files removed")

    @staticmethod
    def workers_of(links: list[WorkerLink]) -> list[WorkerProcess]:
        return [link.proc for link in links]

    def http_status(self, context: zmq.Context) -> dict[str, Any]:
        if self.state != State.RUNNING:
            return {"live": True, "ready": False, "state": self.state.value}
        return fetch_stats(context, ADMIN_ENDPOINT)

    def stats(self) -> dict[str, object]:
        from engine.metrics import collect_stats

        assert self.frontend is not None
        return collect_stats(self)


def _close_segment(segment: Segment) -> None:
    segment.unlink()
    try:
        segment.close()
    except BufferError:
        pass  # a numpy view still points into it; the mapping goes with the process
