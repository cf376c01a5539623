"""The front-end: one synchronous poll loop over the ROUTER socket, worker rings and sentinels.

It never blocks on a client: replies go out with NOBLOCK on a ROUTER_MANDATORY socket, so a
vanished client (EHOSTUNREACH) has its streams closed, and a client that stops reading
(EAGAIN at its high-water mark) has replies dropped and counted rather than stalling
everyone else. It spins briefly when work dries up, then blocks in ``zmq.Poller`` on the
ROUTER, every output ring's doorbell, worker sentinels and the signal wake-up pipe.
"""

from __future__ import annotations

import collections
import errno
import logging
import time
from collections import defaultdict
from typing import Callable

import numpy as np
import zmq

from engine.config import ServeConfig
from engine.control import StreamTable
from engine.device_frames import DeviceFrames
from engine.router_batch import ResultSender, RouterReader, RoutingIds
from engine.stats import WorkerStats
from engine.streams import Stream
from engine.supervisor import WorkerProcess, WorkerStartError
from transport import protocol as P
from transport import records
from transport.ring import Ring

log = logging.getLogger("ringserve.frontend")
_HOUSEKEEPING_S = 0.05
_SPIN_PAYS = 2  # spin after a sleep shorter than this many spins
_MAX_RESTART_FAILURES = 5
# Reading stops after this long so that results waiting in the output rings go back: a few
# costly messages (1,024 items each) must not hold every other stream's answers.
_PUMP_NS = 2_000_000
# Plain ints: pyzmq's flag enums cost an enum operation per call.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


class WorkerLink:
    """The front-end's end of one worker: its rings, backlog and process."""

    def __init__(self, proc: WorkerProcess, in_ring: Ring, out_ring: Ring, stats: WorkerStats,
                 backlog_limit: int) -> None:
        self.proc = proc
        self.stats = stats
        self.in_ring = in_ring
        self.out_ring = out_ring
        self.backlog: collections.deque[bytearray] = collections.deque()  # records waiting for ring space
        self.backlog_bytes = 0
        self.backlog_limit = backlog_limit
        self.streams = 0
        self.restart_failures = 0

    def has_room(self, nbytes: int) -> bool:
        return self.backlog_bytes + nbytes <= self.backlog_limit or not self.backlog

    def flush_backlog(self) -> None:
        while self.backlog:
            record = self.backlog[0]
            if not self.in_ring.write(record):
                return
            self.backlog.popleft()
            self.backlog_bytes -= len(record)


class FrontEnd:
    def __init__(self, cfg: ServeConfig, router: zmq.Socket, links: list[WorkerLink],
                 table: StreamTable, wakeup_fd: int, should_stop: Callable[[], bool]) -> None:
        self.cfg = cfg
        self.router = router
        self.links = links
        self.table = table
        self.wakeup_fd = wakeup_fd
        self.should_stop = should_stop
        self.outbox: dict[bytes, list[bytes]] = defaultdict(list)
        self.counters = table.counters
        self.device_frames = DeviceFrames(table)
        self.reader = RouterReader(router)
        self.sender = ResultSender(router, P.header(P.MsgType.RESULTS))
        self.gone: set[bytes] = set()  # clients a send found gone, their streams closed at the turn's end
        table.outlet = self

    # ---- replies -------------------------------------------------------------------
    def queue_result(self, identity: bytes, item: bytes) -> None:
        self.outbox[identity].append(item)

    def send(self, identity: bytes, payload: bytes) -> None:
        """Send a control reply after any results already queued for that client."""
        if identity in self.outbox:
            self._flush_one(identity, self.outbox.pop(identity))
        self._send(identity, payload)

    def _flush_one(self, identity: bytes, items: list[bytes]) -> None:
        self._send(identity, P.header(P.MsgType.RESULTS) + b"".join(items))

    def send_results(self, items: np.ndarray, item_size: int, bounds: np.ndarray, runs: int, conns: np.ndarray,
                     ids: RoutingIds) -> None:
        """Runs of reply items, one client's each, sent now as one RESULTS message each (after
        what the outbox holds, so each client's replies keep their order)."""
        self.flush_outbox()
        for conn, code in self.sender.send(items, item_size, bounds, runs, conns, ids):
            self._count_failed_send(ids[conn], code)

    def flush_outbox(self) -> None:
        if self.outbox:
            outbox, self.outbox = self.outbox, defaultdict(list)
            for identity, items in outbox.items():
                self._flush_one(identity, items)

    def drop_gone(self) -> None:
        """Close the streams of clients a send found gone: between loop turns, never while a
        results record is being answered."""
        if self.gone:
            gone, self.gone = self.gone, set()
            for identity in gone:
                self.table.drop_connection(identity)

    def _send(self, identity: bytes, payload: bytes) -> None:
        try:
            # Two plain sends cost less than send_multipart; a ROUTER_MANDATORY socket decides
            # on the identity frame (unreachable, or at its high-water mark): the payload then goes.
            self.router.send(identity, _NOBLOCK_MORE)
            self.router.send(payload, _NOBLOCK)
        except zmq.ZMQError as exc:
            self._count_failed_send(identity, exc.errno or 0)

    def _count_failed_send(self, identity: bytes, code: int) -> None:
        if code == errno.EAGAIN:
            self.counters["replies_dropped_slow_client"] += 1
        elif code == errno.EHOSTUNREACH:
            self.counters["replies_dropped_client_gone"] += 1
            self.gone.add(identity)
        else:
            raise zmq.ZMQError(code)

    # ---- frames to workers ---------------------------------------------------------------
    def room_for(self, worker: int, nbytes: int) -> bool:
        return self.links[worker].has_room(nbytes)

    def _reserve(self, link: WorkerLink, size: int) -> tuple[memoryview, bool]:
        """Room for a record: in the ring, or (if it is full, or records already wait) at the
        end of the worker's backlog. The bool says whether it must be committed to the ring."""
        view = None if link.backlog else link.in_ring.reserve(size)
        if view is not None:
            return view, True
        spill = bytearray(size)
        link.backlog.append(spill)
        link.backlog_bytes += size
        return memoryview(spill), False

    def write_frames(self, stream: Stream, count: int, arrived_ns: int) -> None:
        link = self.links[stream.worker]
        width = stream.context + stream.frame
        target, in_ring = self._reserve(link, records.frames_record_bytes(count, width))
        records.FRAMES_HEADER.pack_into(target, 0, records.KIND_FRAMES, count, width, stream.rate,
                                        arrived_ns, stream.shed_after_ms)
        flags = records.FLAG_FRESH if stream.fresh else 0
        stream.fresh = False
        if count == 1:  # a device's one-frame message: the common case, kept free of numpy setup
            records.FRAME_META_STRUCT.pack_into(target, records.FRAMES_HEADER.size, stream.next_seq, stream.slot, flags)
            audio = np.frombuffer(target, np.float32, width, records.FRAMES_HEADER.size + records.FRAME_META.itemsize)
        else:
            meta, audio = records.frames_views(target, count, width)
            meta["seq"] = np.arange(stream.next_seq, stream.next_seq + count, dtype=np.uint64)
            meta["slot"] = stream.slot
            meta["flags"] = 0
            meta["flags"][0] = flags
            del meta
        stream.take_frames(count, audio)
        del audio, target
        stream.next_seq += count
        if in_ring:
            link.in_ring.commit()

    def write_frame_set(self, worker: int, count: int, width: int, rate: int, shed_after_ms: int,
                        fill: Callable[[np.ndarray, np.ndarray], int]) -> None:
        """One record holding one frame each of ``count`` streams (engine/frame_sets.py);
        ``fill`` writes its frame metadata and model inputs in place, and returns the
        earliest arrival among them."""
        link = self.links[worker]
        target, in_ring = self._reserve(link, records.frames_record_bytes(count, width))
        arrived_ns = fill(*records.frames_views(target, count, width))
        records.FRAMES_HEADER.pack_into(target, 0, records.KIND_FRAME_SET, count, width, rate, arrived_ns,
                                        shed_after_ms)
        del target
        if in_ring:
            link.in_ring.commit()

    # ---- results from workers ------------------------------------------------------------
    def drain_results(self, link: WorkerLink) -> int:
        handled = 0
        while (item := link.out_ring.next_record()) is not None:
            body, end = item
            count = records.RESULTS_HEADER.unpack_from(body)[1]
            res = records.results_view(body, count)
            # Copies: the ring's memory is released below.
            seqs, slots, probs = res["seq"].astype(np.int64), res["slot"].astype(np.intp), res["prob"].copy()
            del res, body
            link.out_ring.release(end)
            self.table.on_results(seqs, slots, probs)
            handled += count
        link.flush_backlog()
        return handled

    # ---- the loop --------------------------------------------------------------------
    def pump_router(self, budget: int = 64) -> int:
        """Take up to ``budget`` client messages, or what arrives within _PUMP_NS; small, so
        results flow back between bursts. Devices' one-frame messages among them are taken
        together at the end (engine/device_frames.py), any other message in its turn."""
        n, drained_ns = self._read_router(budget)
        self.device_frames.flush()
        # Only now: the messages just taken were read before the socket was found empty, and
        # are judged for lateness by the time it last was (StreamTable.arrival).
        if drained_ns:
            self.table.drained_ns = drained_ns
        return n

    def _read_router(self, budget: int) -> tuple[int, int]:
        """Messages read, and when the socket was found empty (0: it was not)."""
        handle, clock = self.table.on_message, time.monotonic_ns
        collect, flush, counters = self.device_frames.offer, self.device_frames.flush, self.counters
        stop_at = clock() + _PUMP_NS
        n = 0
        while n < budget:
            batch, empty = self.reader.read(budget - n)
            drained_ns = clock() if empty else 0
            for identity, msg, frames in batch:
                counters["messages_in"] += 1  # before it is handled: a STATS reply then counts its own request
                if frames > 1:
                    flush()
                    counters["errors_bad_message"] += 1
                    self._send(identity, P.encode_error(0, 0, 0, P.ErrorCode.BAD_MESSAGE,
                                                        "send each message as a single ZeroMQ frame"))
                elif not collect(identity, msg):
                    flush()
                    handle(identity, msg)
            n += len(batch)
            if drained_ns or not batch:
                return n, drained_ns
            if clock() > stop_at:
                return n, 0
        return n, 0

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wakeup_fd, zmq.POLLIN)
        doorbells = {link.out_ring.doorbell.fileno(): link.out_ring.doorbell for link in self.links}
        for fd in doorbells:
            poller.register(fd, zmq.POLLIN)
        # Registered for good: a death wakes the loop at once, and housekeeping (which replaces
        # the worker) runs before the next poll, so a dead sentinel never spins it.
        sentinels = self._watch_sentinels(poller, [])
        spin_s = self.cfg.spin_us / 1e6
        spin = spin_s  # 0 while spinning does not pay (see below)
        last_work = last_housekeeping = time.monotonic()
        while not self.should_stop():
            work = self.pump_router()
            for link in self.links:
                work += self.drain_results(link)
            self.flush_outbox()
            self.drop_gone()
            now = time.monotonic()
            if now - last_housekeeping > _HOUSEKEEPING_S:
                self.housekeeping(now)
                sentinels = self._watch_sentinels(poller, sentinels)
                last_housekeeping = now
            if work:
                last_work = now
                continue
            if now - last_work < spin:
                continue
            if not all(link.out_ring.prepare_sleep() for link in self.links):
                for link in self.links:
                    link.out_ring.end_sleep()
                continue
            ready = poller.poll(timeout=int(1000 * _HOUSEKEEPING_S * 4))
            woke = time.monotonic()
            # Poll returns as soon as a message is ready: whatever is queued now arrived just now.
            self.table.drained_ns = time.monotonic_ns()
            # Spin next time only if this sleep was short: devices' messages a few tens of
            # microseconds apart are caught by spinning, a gateway's every few milliseconds are
            # not, and ~2,400 empty turns a second cost it ~1 us of CPU per frame.
            spin = spin_s if woke - now < _SPIN_PAYS * spin_s else 0.0
            for link in self.links:
                link.out_ring.end_sleep()
            for fd, _ in ready:
                if fd in doorbells:
                    doorbells[fd].clear()
                elif fd in sentinels:
                    last_housekeeping = 0.0  # a worker died: replace it in the next turn
            last_work = woke

    def _watch_sentinels(self, poller: zmq.Poller, watched: list[int]) -> list[int]:
        """Poll the current workers' sentinels (a replaced worker has a new one)."""
        current = [link.proc.sentinel for link in self.links]
        if current != watched:
            for fd in watched:
                poller.unregister(fd)
            for fd in current:
                poller.register(fd, zmq.POLLIN)
        return current

    def housekeeping(self, now: float) -> None:
        for index, link in enumerate(self.links):
            proc = link.proc
            if proc.is_dead():
                self.replace_worker(index)
            elif not proc.ready:
                try:
                    proc.check_ready()
                except WorkerStartError as exc:
                    log.error("%s", exc)
                if proc.ready:
                    link.restart_failures = 0
                    log.info("worker-%d replaced (pid %s); its streams carry on", index, proc.info.get("pid"))
        self.table.housekeeping(now, [link.in_ring for link in self.links])

    def replace_worker(self, index: int) -> None:
        link = self.links[index]
        was_ready = link.proc.ready
        log.warning("worker-%d died (%s); starting a replacement", index, link.proc.exit_description())
        self.counters["worker_restarts"] += 1
        # Results it published before dying are still in the output ring: take them first.
        self.drain_results(link)
        link.proc.stop(0.1)
        if not was_ready:
            link.restart_failures += 1
            if link.restart_failures > _MAX_RESTART_FAILURES:
                raise WorkerStartError(f"worker-{index} failed to start {_MAX_RESTART_FAILURES} times in a row")
            time.sleep(min(2.0, 0.1 * 2 ** link.restart_failures))
        link.proc.restarts += 1
        link.proc.start()
