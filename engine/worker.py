"""Worker process: drain the input ring, run every ready stream's next frame as one batch.

Crash safety comes from the order of the four writes per batch (see docs/architecture.md):

1. new states -> the state slot's *other* buffer (the one this frame does not read)
2. results    -> output ring (published)
3. done[slot] = (seq + 1, the buffer written in 1), one store (engine/worker_kernels.py)
4. input ring space released, only for records whose every frame got past step 3

A replacement worker re-reads every unreleased record and skips frames whose seq is below
the one ``done[slot]`` holds. A frame that died between 1 and 3 runs again from the same,
untouched input state and gives the same result; the front-end drops the duplicate by ``seq``.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from engine.logs import setup_logging
from engine import frame_queue
from engine.frame_queue import FrameQueue, model_input_samples
from engine.layout import StateLayout, WorkerLayout
from engine.models.base import ModelSpec, StreamingModel
from engine.models.silero import load_model
from engine.stats import BUSY_NS, DELAY_US, FRAMES, REPLAYED, SHED, STARTED_NS, WorkerStats
from transport import records
from transport.doorbell import Doorbell
from transport.ring import Ring
from transport.shm import Segment

log = logging.getLogger("ringserve.worker")
_RECHECK_S = 5.0  # bounds the cost of any lost wake-up; normal wake-ups come from the doorbell
_RATE_WINDOW_NS = 250_000_000  # how often the arrival rate and busy share that set the wait are re-measured
_GATHER_MIN_JOINING = 2.0  # wait for a fuller batch only if at least this many more streams may join it
# Stop waiting at this batch size: 128 saves ~5 % CPU at high load but adds ~4 ms to p50 and
# reached the 32 ms p99 budget at fewer streams (docs/bench-history.md, run 12).
_GATHER_ENOUGH = 64
# Between these busy shares the wait grows from batch_delay_us to busy_batch_delay_us (see gather).
_BUSY_LOW, _BUSY_HIGH = 0.4, 0.8


@dataclass(frozen=True)
class WorkerConfig:
    index: int
    model: ModelSpec
    worker_segment: str
    layout: WorkerLayout
    state_segment: str
    state_layout: StateLayout
    max_batch: int
    spin_us: int
    batch_delay_us: int
    busy_batch_delay_us: int
    log_level: str = "info"
    log_format: str = "text"


class Worker:
    def __init__(self, cfg: WorkerConfig, model: StreamingModel, in_ring: Ring, out_ring: Ring,
                 states: np.ndarray, done: np.ndarray, stats: WorkerStats) -> None:
        self.cfg = cfg
        self.model = model
        self.in_ring = in_ring
        self.out_ring = out_ring
        self.stats = stats
        self.queue = FrameQueue(in_ring, states, done, cfg.max_batch, model)
        self.window_start_ns = time.monotonic_ns()
        self.window_busy_ns = int(stats.counters[BUSY_NS])
        self.arrival_fps = 0.0
        self.active_streams = 0  # streams that sent frames in the last window
        self.delay_ns = cfg.batch_delay_us * 1000
        stats.counters[DELAY_US] = cfg.batch_delay_us

    def drain_input(self) -> None:
        if replayed := self.queue.take():  # after a crash: these frames' states were committed before it
            self.stats.counters[REPLAYED] += replayed

    def run_batch(self) -> None:
        """One batch: each queued stream's oldest frame, at one sample rate (8 and 16 kHz
        inputs differ in width); frames queued past their stream's shed_after_ms are shed."""
        queue = self.queue
        n_run, n_stale, rate = queue.pick(time.monotonic_ns())
        if n_stale:
            self._shed(n_stale)
        if n_run:
            self._execute(n_run, rate)

    def _shed(self, n: int) -> None:
        """Overload policy: a frame queued longer than shed_after_ms is not run.

        Its stream's state passes through unchanged (as if the frame were silence the model
        never saw) and its result is NaN, which the front-end reports to the client as shed.
        Skipping inference is what lets an overloaded worker catch up with the present.
        """
        self.queue.put_shed(self._reserve_results(n))
        self._publish(self.queue.stale[:n])
        self.stats.counters[SHED] += n

    def _execute(self, n: int, rate: int) -> None:
        started = time.monotonic_ns()
        audio, state, queued_us = self.queue.gather(n, model_input_samples(self.model, rate), started,
                                                    self.stats.queue_hist)
        probs, new_state = self.model.run(audio, state, rate)
        self.queue.put_results(new_state, probs, self._reserve_results(n))
        self._publish(self.queue.run[:n])
        self.stats.record_batch(n, time.monotonic_ns() - started, queued_us)

    def _reserve_results(self, n: int) -> np.ndarray:
        """A RESULTS record of ``n`` items in the output ring, for the queue to fill."""
        size = records.results_record_bytes(n)
        while (view := self.out_ring.reserve(size)) is None:
            # The front-end drains this ring on every loop turn; being full means it is
            # momentarily behind. Yield the core to it instead of spinning against it.
            time.sleep(0.0002)
        records.RESULTS_HEADER.pack_into(view, 0, records.KIND_RESULTS, n, 0)
        return records.results_view(view, n)

    def _publish(self, rows: np.ndarray) -> None:
        """Results out first, then the states committed, then the input space released: the
        order that makes a crash at any point safe to replay (module docstring)."""
        self.out_ring.commit()
        self.queue.finish(rows)

    def gather(self) -> None:
        """Let the oldest queued frame wait a while for a fuller batch.

        A batch has a large fixed cost besides the model's per-frame one: on a machine whose
        cores the front-end and other workers share, every wake-up finds the caches cold, so
        a busy worker spends far less CPU per frame on larger, rarer batches (measured in
        docs/benchmarks.md: 172 -> 125 us per frame when the wait went from 2 to 12 ms).
        The wait costs latency, so it grows with need: ``batch_delay_us`` while the worker's
        model is busy under 40 % of the time, rising to ``busy_batch_delay_us`` at 80 %. On
        a quiet worker nothing more would arrive, and when every active stream already has a
        frame queued the batch cannot grow (one frame per stream), so then it does not wait at
        all. It sleeps rather than spins: the frames it waits for come from a front-end that
        needs a core. It sleeps on the ring's doorbell, not on a timer: it wakes when a record
        comes (or the wait ends), not every millisecond to look (at 768 gateway streams that
        cut the workers' CPU from 52.3 to 50.4 us per frame, docs/bench-history.md, run 12).
        """
        queue = self.queue
        until = queue.oldest_enqueued_ns() + self.delay_ns
        enough = min(self.cfg.max_batch, _GATHER_ENOUGH)
        while (left_ns := until - time.monotonic_ns()) > 0 and queue.streams < enough:
            joining = min(self.arrival_fps * left_ns / 1e9, self.active_streams - queue.streams)
            if joining < _GATHER_MIN_JOINING:
                return
            self.in_ring.wait(0.0, left_ns / 1e9)
            self.drain_input()

    def measure_load(self) -> None:
        """Every _RATE_WINDOW_NS: the arrival rate and busy share, and the wait they call for."""
        now = time.monotonic_ns()
        span = now - self.window_start_ns
        if span < _RATE_WINDOW_NS:
            return
        busy_ns = int(self.stats.counters[BUSY_NS])
        frames, self.active_streams = self.queue.window()
        self.arrival_fps = frames * 1e9 / span
        self.delay_ns = self._delay_for((busy_ns - self.window_busy_ns) / span)
        self.stats.counters[DELAY_US] = self.delay_ns // 1000
        self.window_start_ns, self.window_busy_ns = now, busy_ns

    def _delay_for(self, busy_share: float) -> int:
        low = self.cfg.batch_delay_us * 1000
        high = max(low, self.cfg.busy_batch_delay_us * 1000)
        ramp = min(1.0, max(0.0, (busy_share - _BUSY_LOW) / (_BUSY_HIGH - _BUSY_LOW)))
        return int(low + ramp * (high - low))

    def serve(self, death_fd: int) -> None:
        spin_s = self.cfg.spin_us / 1e6
        waits = self.cfg.batch_delay_us or self.cfg.busy_batch_delay_us
        counters = self.stats.counters
        while True:
            self.drain_input()
            if not self.queue.frames:
                ready = self.in_ring.wait(spin_s, _RECHECK_S, death_fd)
                if death_fd in ready:
                    return
                continue
            if waits:
                self.measure_load()
                if self.queue.streams < min(self.cfg.max_batch, _GATHER_ENOUGH):
                    self.gather()
            busy_from = time.monotonic_ns()
            self.run_batch()
            counters[BUSY_NS] += time.monotonic_ns() - busy_from


def worker_main(cfg: WorkerConfig, in_bell: Doorbell, out_bell: Doorbell,
                ready_conn: Connection, death_conn: Connection) -> None:
    """Entry point of a worker process (spawned)."""
    # The daemon decides when to stop; a terminal's Ctrl-C reaches the whole group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(cfg.log_level, cfg.log_format)
    try:
        model = load_model(cfg.model)
        # At the largest batch: onnxruntime's arena then holds what the biggest batch needs from
        # the start, instead of growing in steps after the first bursts (a 30-minute soak saw
        # that as slow RSS growth); ~40 ms and ~6 MiB more at start for 512.
        model.warm_up(cfg.max_batch)
        frame_queue.warm_up(model)
        segment = Segment.attach(cfg.worker_segment)
        state_segment = Segment.attach(cfg.state_segment)
        in_ring = Ring(segment, in_bell, 0)
        out_ring = Ring(segment, out_bell, cfg.layout.out_offset)
        stats = WorkerStats(segment.buf[cfg.layout.stats_offset:cfg.layout.total])
        states, done = cfg.state_layout.views(state_segment.buf)
    except BaseException as exc:  # report any start-up failure to the daemon, then exit
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        try:
            ready_conn.send(("error", detail))
        except OSError:
            pass  # the daemon already gave up (another worker failed first)
        os._exit(1)
    if not stats.counters[STARTED_NS]:  # a replacement keeps the first start: busy share stays <= 1
        stats.counters[STARTED_NS] = time.monotonic_ns()
    log.info("model loaded and warmed up (pid %d, provider %s, max batch %d)", os.getpid(), model.provider,
             cfg.max_batch)
    worker = Worker(cfg, model, in_ring, out_ring, states, done, stats)  # before READY: it sets the stats' gauge
    gc.freeze()  # the imports' objects out of every full collection (engine/daemon.py says why)
    ready_conn.send(("ready", {"pid": os.getpid(), "provider": model.provider}))
    ready_conn.close()
    worker.serve(death_conn.fileno())
    log.info("[shutdown] daemon gone; %d frames run in this process", int(stats.counters[FRAMES]))
    os._exit(0)  # skip interpreter teardown: numpy views still point into the mappings
