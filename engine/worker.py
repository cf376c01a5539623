"""Worker process: drain the input ring, run every ready stream's next frame as one batch.

Crash safety comes from the order of the four writes per batch (see docs/architecture.md):

1. new states -> the state slot's *other* parity buffer (the one this frame does not read)
2. results    -> output ring (published)
3. done[slot] = seq + 1
4. input ring space released, only for records whose every frame got past step 3

A replacement worker re-reads every unreleased record and skips frames with
``seq < done[slot]``. A frame that died between 1 and 3 runs again from the same, untouched
input state and gives the same result; the front-end drops the duplicate by ``seq``.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from engine.logs import setup_logging
from engine.layout import StateLayout, WorkerLayout
from engine.models.base import ModelSpec, StreamingModel
from engine.models.silero import load_model
from engine.stats import BUSY_NS, DELAY_US, FRAMES, REPLAYED, SHED, STARTED_NS, WorkerStats
from transport import records
from transport.doorbell import Doorbell
from transport.ring import Ring
from transport.shm import Segment

log = logging.getLogger("ringserve.worker")
_NEVER = 1 << 62  # a due time no frame reaches
_RECHECK_S = 5.0  # bounds the cost of any lost wake-up; normal wake-ups come from the doorbell
_RATE_WINDOW_NS = 250_000_000  # how often the arrival rate and busy share that set the wait are re-measured
_GATHER_MIN_JOINING = 2.0  # wait for a fuller batch only if at least this many more streams may join it
# Stop waiting at this batch size: 128 saves ~5 % CPU at high load but adds ~4 ms to p50 and
# reached the 32 ms p99 budget at fewer streams (docs/benchmarks.md, run 12).
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


class _Record:
    __slots__ = ("end", "remaining", "audio", "rate", "enqueued_ns")

    def __init__(self, end: int, audio: np.ndarray, rate: int, enqueued_ns: int) -> None:
        self.end = end
        self.remaining = 0
        self.audio = audio
        self.rate = rate
        self.enqueued_ns = enqueued_ns


_Pending = tuple[_Record, int, int, int, bool, int]  # record, row, seq, slot, fresh, due_ns


class Worker:
    def __init__(self, cfg: WorkerConfig, model: StreamingModel, in_ring: Ring, out_ring: Ring,
                 states: np.ndarray, done: np.ndarray, stats: WorkerStats) -> None:
        self.cfg = cfg
        self.model = model
        self.in_ring = in_ring
        self.out_ring = out_ring
        self.states = states
        self.done = done
        self.stats = stats
        self.records: collections.deque[_Record] = collections.deque()
        self.queues: dict[int, collections.deque[_Pending]] = {}
        self.window_start_ns = time.monotonic_ns()
        self.window_frames = 0
        self.window_busy_ns = int(stats.counters[BUSY_NS])
        self.window_slots: set[int] = set()
        self.arrival_fps = 0.0
        self.active_streams = 0  # streams that sent frames in the last window
        self.delay_ns = cfg.batch_delay_us * 1000
        stats.counters[DELAY_US] = cfg.batch_delay_us

    def drain_input(self) -> None:
        while (item := self.in_ring.next_record()) is not None:
            body, end = item
            kind, count, width, rate, enqueued_ns, shed_after_ms = records.FRAMES_HEADER.unpack_from(body)
            meta, audio = records.frames_views(body, count, width)
            rec = _Record(end, audio, rate, enqueued_ns)
            seqs, slots, flags = meta["seq"].tolist(), meta["slot"].tolist(), meta["flags"].tolist()
            done = self.done
            # A chunk holding n frames is n frame-durations of audio: its i-th frame is late
            # only once it is shed_after_ms behind the audio's own timeline, so a long chunk
            # (a file sent at once) is never shed just for queueing behind its own frames. A
            # frame set's frames belong to different streams and are all due together.
            frame_ns = 0 if kind == records.KIND_FRAME_SET else 1_000_000_000 * self.model.frame_samples(rate) // rate
            due0 = enqueued_ns + shed_after_ms * 1_000_000 if shed_after_ms else _NEVER
            for row in range(count):
                seq, slot = seqs[row], slots[row]
                if seq < done[slot]:  # replay after a crash: this frame's state is committed
                    self.stats.counters[REPLAYED] += 1
                    continue
                rec.remaining += 1
                queue = self.queues.get(slot)
                if queue is None:
                    queue = self.queues[slot] = collections.deque()
                queue.append((rec, row, seq, slot, bool(flags[row] & records.FLAG_FRESH), due0 + row * frame_ns))
            self.window_frames += rec.remaining
            self.window_slots.update(slots)  # once per record, not per frame; replays count too, harmlessly
            self.records.append(rec)

    def run_batch(self) -> None:
        picked: list[_Pending] = []
        emptied = []
        for slot, queue in self.queues.items():
            picked.append(queue.popleft())  # one frame per stream: frame k+1 needs k's state
            if not queue:
                emptied.append(slot)
            if len(picked) == self.cfg.max_batch:
                break
        for slot in emptied:
            del self.queues[slot]
        picked = self._shed_stale(picked)
        rates = {p[0].rate for p in picked}
        for rate in rates:  # streams at 8 and 16 kHz need separate batches (input width differs)
            group = picked if len(rates) == 1 else [p for p in picked if p[0].rate == rate]
            self._execute(group, rate)
        while self.records and self.records[0].remaining == 0:
            self.in_ring.release(self.records.popleft().end)

    def _shed_stale(self, picked: list[_Pending]) -> list[_Pending]:
        """Overload policy: a frame queued longer than shed_after_ms is not run.

        Its stream's state passes through unchanged (as if the frame were silence the model
        never saw) and its result is NaN, which the front-end reports to the client as shed.
        Skipping inference is what lets an overloaded worker catch up with the present.
        """
        now = time.monotonic_ns()
        stale = [p for p in picked if p[5] < now]
        if not stale:
            return picked
        seq = np.fromiter((p[2] for p in stale), np.uint64, len(stale))
        slot = np.fromiter((p[3] for p in stale), np.intp, len(stale))
        parity = (seq & np.uint64(1)).astype(np.intp)
        carried = self.states[slot, parity]
        carried[np.fromiter((p[4] for p in stale), bool, len(stale))] = 0.0
        self.states[slot, 1 - parity] = carried
        self._publish(seq, slot, np.full(len(stale), np.nan, np.float32))
        self.done[slot] = seq + np.uint64(1)
        for rec, *_ in stale:
            rec.remaining -= 1
        self.stats.counters[SHED] += len(stale)
        return [p for p in picked if p[5] >= now]

    def _execute(self, group: list[_Pending], rate: int) -> None:
        started = time.monotonic_ns()
        n = len(group)
        audio = self._gather_audio(group)
        seq = np.fromiter((p[2] for p in group), np.uint64, n)
        slot = np.fromiter((p[3] for p in group), np.intp, n)
        fresh = np.fromiter((p[4] for p in group), bool, n)
        parity = (seq & np.uint64(1)).astype(np.intp)
        state = self.states[slot, parity]
        state[fresh] = 0.0
        probs, new_state = self.model.run(audio, state, rate)
        self.states[slot, 1 - parity] = new_state
        self._publish(seq, slot, probs)
        self.done[slot] = seq + np.uint64(1)
        for rec, *_ in group:
            rec.remaining -= 1
        finished = time.monotonic_ns()
        enqueued = np.fromiter((p[0].enqueued_ns for p in group), np.float64, n)
        self.stats.record_batch(n, finished - started, np.maximum(started - enqueued, 0) / 1000)

    @staticmethod
    def _gather_audio(group: list[_Pending]) -> np.ndarray:
        """The batch's model inputs, copied out of the ring one run of consecutive rows at a
        time: a frame set's streams usually come back in its row order, so a batch fed by
        frame sets is a few slice copies instead of one copy per frame."""
        n = len(group)
        audio = np.empty((n, group[0][0].audio.shape[1]), np.float32)
        start = 0
        while start < n:
            rec, row = group[start][0], group[start][1]
            stop = start + 1
            while stop < n and group[stop][0] is rec and group[stop][1] == row + stop - start:
                stop += 1
            audio[start:stop] = rec.audio[row:row + stop - start]
            start = stop
        return audio

    def _publish(self, seq: np.ndarray, slot: np.ndarray, probs: np.ndarray) -> None:
        n = len(seq)
        size = records.results_record_bytes(n)
        while (view := self.out_ring.reserve(size)) is None:
            # The front-end drains this ring on every loop turn; being full means it is
            # momentarily behind. Yield the core to it instead of spinning against it.
            time.sleep(0.0002)
        records.RESULTS_HEADER.pack_into(view, 0, records.KIND_RESULTS, n, 0)
        out = records.results_view(view, n)
        out["seq"] = seq
        out["slot"] = slot
        out["prob"] = probs
        del out, view
        self.out_ring.commit()

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
        cut the workers' CPU from 52.3 to 50.4 us per frame, docs/benchmarks.md).
        """
        until = self.records[0].enqueued_ns + self.delay_ns
        enough = min(self.cfg.max_batch, _GATHER_ENOUGH)
        while (left_ns := until - time.monotonic_ns()) > 0 and len(self.queues) < enough:
            joining = min(self.arrival_fps * left_ns / 1e9, self.active_streams - len(self.queues))
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
        self.arrival_fps = self.window_frames * 1e9 / span
        self.active_streams = len(self.window_slots)
        self.window_slots.clear()
        self.delay_ns = self._delay_for((busy_ns - self.window_busy_ns) / span)
        self.stats.counters[DELAY_US] = self.delay_ns // 1000
        self.window_start_ns, self.window_frames, self.window_busy_ns = now, 0, busy_ns

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
            if not self.queues:
                ready = self.in_ring.wait(spin_s, _RECHECK_S, death_fd)
                if death_fd in ready:
                    return
                continue
            if waits:
                self.measure_load()
                if len(self.queues) < min(self.cfg.max_batch, _GATHER_ENOUGH):
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
    ready_conn.send(("ready", {"pid": os.getpid(), "provider": model.provider}))
    ready_conn.close()
    worker.serve(death_conn.fileno())
    log.info("[shutdown] daemon gone; %d frames run in this process", int(stats.counters[FRAMES]))
    os._exit(0)  # skip interpreter teardown: numpy views still point into the mappings
