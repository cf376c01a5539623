"""The shared-memory SPSC ring, its eventfd doorbell and its segments, with real processes.

Every cross-process test starts children with the ``spawn`` context, hands them the
segment *name* and the pickled ``Doorbell`` (as the daemon does for its workers), and
lets them attach by mmapping /dev/shm/NAME. Children report through a ``Pipe``.

Record payloads are a pure function of (sequence number, length): a 16-byte header
(seq, length, crc32 of the body) then a slice of a fixed pseudo-random pattern chosen by
seq, truncated to the length. Both ends also derive the whole length sequence from a
shared seed, so a consumer knows exactly which record must come next and a lost,
duplicated, reordered, torn or resized record (zero-length ones included) fails.

Set RINGTEST_SEED to vary the record sizes and delays of the multiprocess tests.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import traceback
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import pytest

from transport.doorbell import Doorbell
from transport.ring import _SLEEPING, _WRAP, RecordTooLarge, Ring, ring_bytes
from transport.shm import SHM_DIR, Segment, segment_name

CTX = get_context("spawn")
BASE_SEED = int(os.environ.get("RINGTEST_SEED", "20240917"))
CHILD_TIMEOUT = 60.0  # generous: a hang fails the test instead of stalling the suite

# --------------------------------------------------------------------------- records

PATTERN = random.Random(0x5EED).randbytes(1 << 17)
_HDR = struct.Struct("<QII")  # seq, length, crc32(body)


def need(nbytes: int) -> int:
    """Ring bytes one record takes: length word plus payload padded to 8."""
    return 8 + ((nbytes + 7) & ~7)


def make_payload(seq: int, length: int) -> bytes:
    start = (seq * 40503) & 0xFFFF
    body = PATTERN[start:start + max(0, length - _HDR.size)]
    head = _HDR.pack(seq, length, zlib.crc32(body, seq & 0xFFFF_FFFF))
    return (head + body)[:length]


def record_lengths(seed: int, count: int, max_record: int) -> list[int]:
    """Random sizes from 0 to max_record, skewed to small (both ends compute the same list)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        r = rng.random()
        if r < 0.06:
            n = 0
        elif r < 0.26:
            n = rng.randint(1, 16)
        elif r < 0.66:
            n = rng.randint(17, 128)
        elif r < 0.90:
            n = rng.randint(129, 1024)
        elif r < 0.98:
            n = rng.randint(1025, max(1025, max_record))
        else:
            n = max_record
        out.append(min(n, max_record))
    return out


def check_record(view: memoryview, seq: int, length: int, where: str) -> None:
    if len(view) == length and bytes(view) == make_payload(seq, length):
        return
    got = bytes(view)
    claimed: Any = _HDR.unpack(got[:_HDR.size])[:2] if len(got) >= _HDR.size else got.hex()
    if len(got) >= _HDR.size and claimed[0] < seq:
        kind = "duplicated/reordered"
    elif len(got) >= _HDR.size and claimed[0] > seq:
        kind = "lost"
    else:
        kind = "torn or resized"
    raise AssertionError(f"{where}: {kind} record: expected #{seq} of {length} bytes, "
                         f"got {len(got)} bytes claiming (seq, length)={claimed}")


def shm_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def unique_name(label: str) -> str:
    return segment_name(f"ringtest-{label}-{uuid.uuid4().hex[:12]}")


# --------------------------------------------------------------------------- fixtures


class ShmFactory:
    """Creates owner-side segments/rings/doorbells and always removes them again."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.rings: list[Ring] = []
        self.bells: list[Doorbell] = []

    def segment(self, size: int, label: str = "seg") -> Segment:
        seg = Segment.create(unique_name(label), size)
        self.segments.append(seg)
        return seg

    def bell(self) -> Doorbell:
        bell = Doorbell()
        self.bells.append(bell)
        return bell

    def ring(self, capacity: int, label: str = "ring") -> Ring:
        seg = self.segment(ring_bytes(capacity), label)
        return self.ring_in(seg, 0, capacity)

    def ring_in(self, seg: Segment, offset: int, capacity: int | None) -> Ring:
        ring = Ring(seg, self.bell(), offset, capacity)
        self.rings.append(ring)
        return ring

    def cleanup(self, test_failed: bool) -> None:
        names = [seg.name for seg in self.segments]
        try:
            for seg in self.segments:  # first, so that nothing is left behind whatever happens
                seg.unlink()
        finally:
            for ring in self.rings:
                ring.close()
            for bell in self.bells:
                bell.close()
            for seg in self.segments:
                try:
                    seg.close()
                except BufferError:
                    # A record view outlived the test (a failed test's traceback keeps its
                    # frames). Drop the mapping without closing it, so no __del__ complains
                    # later; report it only when it is not just a side effect of a failure.
                    owner = seg._owner
                    if owner is not None:
                        owner._mmap = None  # type: ignore[attr-defined]
                    if not test_failed:
                        raise
        leftovers = [name for name in names if os.path.exists(shm_path(name))]
        assert not leftovers, f"segments left in {SHM_DIR}: {leftovers}"


@pytest.fixture
def shm(request: pytest.FixtureRequest) -> Iterator[ShmFactory]:
    factory = ShmFactory()
    failed_before = request.session.testsfailed
    try:
        yield factory
    finally:
        factory.cleanup(request.session.testsfailed > failed_before)


def _child_main(fn: Callable[..., Any], conn: Connection, *args: Any) -> None:
    """Spawned child entry: run ``fn(conn, *args)``, send ("ok", result) or ("error", tb)."""
    try:
        result = fn(conn, *args)
    except Exception:  # noqa: BLE001 - the parent shows the child's traceback
        conn.send(("error", traceback.format_exc()))
        conn.close()
        raise SystemExit(1) from None
    conn.send(("ok", result))
    conn.close()


class Children:
    def __init__(self) -> None:
        self.procs: list[BaseProcess] = []

    def start(self, fn: Callable[..., Any], *args: Any) -> tuple[BaseProcess, Connection]:
        mine, theirs = CTX.Pipe()
        proc = CTX.Process(target=_child_main, args=(fn, theirs, *args), daemon=True)
        proc.start()
        theirs.close()
        self.procs.append(proc)
        return proc, mine

    @staticmethod
    def recv(proc: BaseProcess, conn: Connection, timeout: float = CHILD_TIMEOUT) -> Any:
        """The child's next message; fails on its traceback, its death or a timeout."""
        if not conn.poll(timeout):
            pytest.fail(f"child {proc.name} sent nothing for {timeout} s (alive={proc.is_alive()})")
        try:
            msg = conn.recv()
        except EOFError:
            proc.join(5)
            pytest.fail(f"child {proc.name} died without reporting (exitcode {proc.exitcode})")
        if msg[0] == "error":
            pytest.fail(f"child {proc.name} failed:\n{msg[1]}")
        return msg

    def result(self, proc: BaseProcess, conn: Connection, timeout: float = CHILD_TIMEOUT) -> Any:
        tag, value = self.recv(proc, conn, timeout)
        assert tag == "ok", f"unexpected message {tag!r} from {proc.name}"
        proc.join(10)
        assert proc.exitcode == 0, f"{proc.name} exit code {proc.exitcode}"
        return value

    def gather(self, started: list[tuple[BaseProcess, Connection]],
               timeout: float = CHILD_TIMEOUT) -> list[Any]:
        """Results of several children; the first failure fails at once (its peer may hang)."""
        results: dict[int, Any] = {}
        pending = dict(enumerate(started))
        deadline = time.monotonic() + timeout
        while pending:
            ready = wait([conn for _, conn in pending.values()], deadline - time.monotonic())
            if not ready:
                pytest.fail(f"children {[p.name for p, _ in pending.values()]} still running "
                            f"after {timeout} s")
            for i, (proc, conn) in list(pending.items()):
                if conn in ready:
                    results[i] = self.result(proc, conn, 0)
                    del pending[i]
        return [results[i] for i in range(len(started))]

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(10)
            proc.close()


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.cleanup()


def ready_then_go(conn: Connection) -> None:
    """Child side of the start line: timed work begins only once every child is up."""
    conn.send(("ready",))
    assert conn.recv() == "go"


def start_line(kids: Children, started: list[tuple[BaseProcess, Connection]]) -> None:
    for proc, conn in started:
        assert kids.recv(proc, conn) == ("ready",)
    for _, conn in started:
        conn.send("go")


@contextlib.contextmanager
def attached_ring(name: str, bell: Doorbell, offset: int = 0) -> Iterator[Ring]:
    """A child's end of a ring: attach by name, capacity read from the owner's header."""
    seg = Segment.attach(name)
    ring = Ring(seg, bell, offset)
    ok = False
    try:
        yield ring
        ok = True
    finally:
        ring.close()
        if ok:  # a failing child just exits (the OS unmaps); do not hide its error
            seg.close()
            bell.close()


def wait_for_data(ring: Ring, spin_s: float, timeout: float, stats: dict[str, Any]) -> None:
    """Block until ``ring`` has a record; a wait that runs into ``timeout`` is a lost wake-up."""
    while not ring.has_data():
        t0 = time.perf_counter()
        ready = ring.wait(spin_s, timeout)
        waited = time.perf_counter() - t0
        stats["max_wait_s"] = max(stats["max_wait_s"], waited)
        if ready:
            stats["doorbell_wakes"] += 1
        elif waited >= timeout * 0.9:  # every test here commits long before that
            raise AssertionError(f"wait() ran into its {timeout} s timeout: lost wake-up")


# --------------------------------------------------------------------------- 1. many processes

STRESS_PAIRS = [(4096, 20_000), (5000, 20_000), (16384, 20_000)]  # (capacity, records)


def stress_producer(conn: Connection, name: str, bell: Doorbell, seed: int,
                    count: int) -> dict[str, Any]:
    with attached_ring(name, bell) as ring:
        cap = ring.capacity
        lengths = record_lengths(seed, count, ring.max_record)
        rng = random.Random(seed ^ 0xA5A5)
        stats = {"full_events": 0, "full_spins": 0, "wraps": 0, "exact_end": 0}
        mode, left = "burst", 0
        ready_then_go(conn)
        for seq, n in enumerate(lengths):
            if left == 0:  # phases: bursts, a trickle (the consumer sleeps), rare stalls
                mode = rng.choice(("burst", "burst", "trickle", "jitter"))
                left = rng.randint(200, 1500)
            left -= 1
            payload = make_payload(seq, n)
            pos = ring.head_position() % cap
            view = ring.reserve(n)
            if view is None:
                stats["full_events"] += 1
                while view is None:  # the ring has no "space freed" bell: poll
                    stats["full_spins"] += 1
                    time.sleep(0.00005)
                    was_empty = ring.tail_position() == ring.head_position()  # tail only grows
                    view = ring.reserve(n)
                    assert view is not None or not was_empty, f"empty ring refused {n} B"
            if pos + need(n) > cap:
                stats["wraps"] += 1
            elif pos + need(n) == cap:
                stats["exact_end"] += 1
            view[:] = payload
            view.release()
            ring.commit()
            if mode == "trickle" and rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.0002))
            elif mode == "jitter" and rng.random() < 0.01:
                time.sleep(rng.uniform(0, 0.001))
        stats["head"] = ring.head_position()
        stats["payload_bytes"] = sum(lengths)
        return stats


def stress_consumer(conn: Connection, name: str, bell: Doorbell, seed: int,
                    count: int) -> dict[str, Any]:
    with attached_ring(name, bell) as ring:
        cap = ring.capacity
        lengths = record_lengths(seed, count, ring.max_record)
        rng = random.Random(seed ^ 0x5A5A)
        stats: dict[str, Any] = {"wraps": 0, "doorbell_wakes": 0, "max_wait_s": 0.0,
                                 "replays": 0, "replayed": 0, "reads": 0, "releases": 0}
        held: list[tuple[int, memoryview]] = []  # read, not yet released
        payloads: dict[int, bytes] = {}  # expected bytes of the held records
        held_end = 0
        batch = 1
        frontier = 0  # furthest cursor ever reached: count each WRAP once despite replays
        seq = 0
        mode, left = "fast", 0
        ready_then_go(conn)

        def release_held() -> None:
            nonlocal batch
            for s, v in held:  # read-but-unreleased space must not have been reused
                if bytes(v) != payloads[s]:
                    check_record(v, s, lengths[s], "held record")
                v.release()
            held.clear()
            payloads.clear()
            ring.release(held_end)
            stats["releases"] += 1
            batch = rng.choice((1, 1, 2, 4, 8, 32))

        while seq < count:
            before = ring.cursor
            item = ring.next_record()
            if item is None:
                if held:
                    release_held()
                wait_for_data(ring, 0.0 if rng.random() < 0.7 else 0.00002, 10.0, stats)
                continue
            view, end = item
            n = lengths[seq]
            payloads[seq] = expected = make_payload(seq, n)
            if len(view) != n or bytes(view) != expected:
                check_record(view, seq, n, "consumer")
            wrapped = before % cap + need(n) > cap
            skip = cap - before % cap if wrapped else 0
            assert end - before == skip + need(n), (before, end, n, cap)
            if wrapped and end > frontier:
                stats["wraps"] += 1
            frontier = max(frontier, end)
            held.append((seq, view))
            held_end = end
            stats["reads"] += 1
            seq += 1
            if len(held) >= batch:
                release_held()
            elif held and rng.random() < 0.003:  # a replacement consumer would start here
                first = held[0][0]
                for _, v in held:
                    v.release()
                held.clear()
                ring.rewind_to_tail()
                assert ring.cursor == ring.tail_position()
                stats["replays"] += 1
                stats["replayed"] += seq - first
                seq = first
            if left == 0:
                mode, left = rng.choice(("fast", "fast", "slow")), rng.randint(200, 1500)
            left -= 1
            if mode == "slow" and rng.random() < 0.02:
                time.sleep(rng.uniform(0, 0.002))  # the producer runs into a full ring
        if held:
            release_held()
        # No duplicate or stray record after the last one: the producer is done by now.
        assert ring.cursor == ring.head_position() == ring.tail_position()
        stats["end"] = ring.cursor
        return stats


def test_many_process_pairs_stress(shm: ShmFactory, children: Children) -> None:
    t0 = time.perf_counter()
    pairs = []
    for i, (cap, count) in enumerate(STRESS_PAIRS):
        ring = shm.ring(cap, f"stress{i}")
        seed = BASE_SEED + 1000 * i
        name = ring.segment.name
        prod = children.start(stress_producer, name, ring.doorbell, seed, count)
        cons = children.start(stress_consumer, name, ring.doorbell, seed, count)
        pairs.append((ring, seed, count, prod, cons))
    total_wraps = total_bytes = total_records = 0
    lines = []
    jobs = [job for pair in pairs for job in pair[3:]]
    start_line(children, jobs)
    results = children.gather(jobs)
    for (ring, seed, count, _, _), p, c in zip(pairs, results[::2], results[1::2], strict=True):
        cap = ring.capacity
        where = f"capacity {cap}, seed {seed}"
        assert p["head"] == c["end"] == ring.head_position() == ring.tail_position(), where
        assert c["reads"] == count + c["replayed"], where
        assert c["wraps"] == p["wraps"] > 0, where
        laps = p["head"] // cap
        assert laps >= 300, f"{where}: only {laps} trips around the ring"
        assert p["full_events"] > 0, f"{where}: the producer never found the ring full"
        assert c["doorbell_wakes"] > 0, f"{where}: the consumer never slept on the doorbell"
        assert c["max_wait_s"] < 5.0, where
        total_wraps += p["wraps"]
        total_bytes += p["head"]
        total_records += count
        lines.append(f"cap={cap}: {count} records, {p['payload_bytes']} payload B, "
                     f"{p['head']} ring B, {laps} laps, {p['wraps']} WRAPs, "
                     f"{p['exact_end']} exact-end fills, {p['full_events']} full events, "
                     f"{c['doorbell_wakes']} doorbell wakes, {c['replays']} replays "
                     f"({c['replayed']} records re-read), {c['releases']} releases")
    assert total_wraps >= 1000
    print(f"\nstress: {total_records} records, {total_bytes} bytes, {total_wraps} WRAPs "
          f"in {time.perf_counter() - t0:.2f} s\n  " + "\n  ".join(lines))


# --------------------------------------------------------------------------- 2. full ring


def fits(ring: Ring, nbytes: int) -> bool:
    """The documented condition, computed independently of Ring.reserve."""
    cap = ring.capacity
    head, tail = ring.head_position(), ring.tail_position()
    pos = head % cap
    skip = cap - pos if pos + need(nbytes) > cap else 0
    return cap - (head - tail) >= skip + need(nbytes)


def test_full_ring_exact_condition_in_process(shm: ShmFactory) -> None:
    ring = shm.ring(256)
    rng = random.Random(BASE_SEED)
    written: deque[tuple[int, int]] = deque()  # (seq, length) not yet consumed
    wseq = rseq = 0
    full_events = 0
    for _ in range(400):
        # producer: write until reserve says no, then check the exact reason
        while True:
            n = rng.choice((0, 1, 8, 9, 24, 56, 100, ring.max_record))
            view = ring.reserve(n)
            if view is None:
                break
            view[:] = make_payload(wseq, n)
            view.release()
            ring.commit()
            written.append((wseq, n))
            wseq += 1
        full_events += 1
        cap, free = ring.capacity, ring.free_bytes()
        pos = ring.head_position() % cap
        skip = cap - pos if pos + need(n) > cap else 0
        assert 0 <= free < skip + need(n)
        head = ring.head_position()
        for size in range(ring.max_record + 1):  # every size: fits exactly when the rule says
            view = ring.reserve(size)
            assert (view is not None) == fits(ring, size), (size, free, pos)
            if view is not None:
                assert len(view) == size
                view.release()
        assert ring.head_position() == head  # a reservation is not a write
        # consumer frees some records; the producer then proceeds only if it now fits
        for _ in range(rng.randint(1, len(written))):
            rec = ring.next_record()
            assert rec is not None
            s, length = written.popleft()
            check_record(rec[0], s, length, "in-process")
            rec[0].release()
            ring.release(rec[1])
            rseq += 1
        assert ring.free_bytes() > free
        view = ring.reserve(n)
        assert (view is not None) == fits(ring, n)
        if view is not None:
            view[:] = make_payload(wseq, n)
            view.release()
            ring.commit()
            written.append((wseq, n))
            wseq += 1
    while (rec := ring.next_record()) is not None:
        s, length = written.popleft()
        check_record(rec[0], s, length, "drain")
        rec[0].release()
        ring.release(rec[1])
        rseq += 1
    assert not written and rseq == wseq and full_events == 400
    assert ring.free_bytes() == ring.capacity


def test_completely_full_ring(shm: ShmFactory) -> None:
    ring = shm.ring(256)
    for i in range(4):
        assert ring.write(make_payload(i, 56))  # 4 x 64 bytes: head - tail == capacity
    assert ring.free_bytes() == 0
    assert ring.reserve(0) is None
    rec = ring.next_record()
    assert rec is not None
    rec[0].release()
    assert ring.reserve(0) is None  # read is not released
    ring.release(rec[1])
    assert ring.free_bytes() == 64
    assert ring.reserve(57) is None  # needs 72
    assert ring.write(make_payload(4, 56))
    assert ring.free_bytes() == 0


def full_producer(conn: Connection, name: str, bell: Doorbell, seed: int,
                  count: int) -> dict[str, Any]:
    """Writes ``count`` records; on every refusal reports the state and waits for a "go"."""
    with attached_ring(name, bell) as ring:
        lengths = record_lengths(seed, count, ring.max_record)
        refusals = 0
        for seq, n in enumerate(lengths):
            while (view := ring.reserve(n)) is None:
                refusals += 1
                conn.send(("full", seq, n, ring.head_position(), ring.tail_position()))
                assert conn.recv() == "go"
            view[:] = make_payload(seq, n)
            view.release()
            ring.commit()
        return {"refusals": refusals, "head": ring.head_position()}


def test_full_ring_across_processes(shm: ShmFactory, children: Children) -> None:
    """The parent consumes only while the producer is stopped, so each refusal is exact."""
    ring = shm.ring(2048)
    seed, count = BASE_SEED + 7, 3000
    lengths = record_lengths(seed, count, ring.max_record)
    rng = random.Random(seed)
    proc, conn = children.start(full_producer, ring.segment.name, ring.doorbell, seed, count)
    seq = refusals = 0

    def consume(limit: int) -> None:
        nonlocal seq
        for _ in range(limit):
            rec = ring.next_record()
            if rec is None:
                return
            check_record(rec[0], seq, lengths[seq], "parent")
            rec[0].release()
            ring.release(rec[1])
            seq += 1

    while True:
        msg = children.recv(proc, conn)
        if msg[0] == "ok":
            result = msg[1]
            break
        _, wseq, n, head, tail = msg
        refusals += 1
        cap = ring.capacity
        assert head != tail, f"an empty ring refused a {n}-byte record"
        assert (head, tail) == (ring.head_position(), ring.tail_position())
        pos = head % cap
        skip = cap - pos if pos + need(n) > cap else 0
        free = cap - (head - tail)
        assert free < skip + need(n), (free, skip, n)
        assert head - tail >= sum(need(x) for x in lengths[seq:wseq])  # plus WRAP skips
        consume(rng.randint(1, 6))  # free a little; the producer may be refused again
        conn.send("go")
    consume(count)
    proc.join(10)
    assert proc.exitcode == 0
    assert seq == count
    assert result["refusals"] == refusals > 50
    assert result["head"] == ring.head_position() == ring.tail_position()


# --------------------------------------------------------------------------- 3. wrap edge cases


def advance_to(ring: Ring, position: int) -> None:
    """Move an empty ring's head, tail and cursor to ``position`` (never wrapping)."""
    assert ring.head_position() == ring.tail_position() == ring.cursor
    cap = ring.capacity
    while (head := ring.head_position()) < position:
        step = min(position - head, cap - head % cap, 8 + (ring.max_record & ~7))
        assert ring.write(bytes(step - 8))
        rec = ring.next_record()
        assert rec is not None and len(rec[0]) == step - 8
        rec[0].release()
        ring.release(rec[1])
    assert ring.head_position() == position


def test_record_exactly_filling_to_the_end(shm: ShmFactory) -> None:
    ring = shm.ring(256)
    advance_to(ring, 200)
    assert ring.write(make_payload(1, 48))  # 8 + 48 == 56 == the bytes left before the end
    assert ring.head_position() == 256  # no WRAP word, no skip
    assert ring._len_words[200 >> 3] == 48
    assert ring.write(make_payload(2, 5))  # the next record starts at offset 0
    assert ring._len_words[0] == 5
    assert ring.head_position() == 256 + 16
    rec1, rec2 = ring.next_record(), ring.next_record()
    assert rec1 is not None and rec2 is not None
    assert rec1[1] == 256 and rec2[1] == 272
    check_record(rec1[0], 1, 48, "end")
    check_record(rec2[0], 2, 5, "start")
    rec1[0].release()
    rec2[0].release()
    assert ring.next_record() is None


def test_record_needing_a_wrap_marker(shm: ShmFactory) -> None:
    ring = shm.ring(256)
    advance_to(ring, 200)
    assert ring.write(make_payload(1, 49))  # needs 64, only 56 left before the end
    assert ring._len_words[200 >> 3] == _WRAP
    assert ring._len_words[0] == 49
    assert ring.head_position() == 256 + 64  # the 56 skipped bytes count as used
    assert ring.free_bytes() == 256 - 120
    rec = ring.next_record()
    assert rec is not None and rec[1] == 320
    check_record(rec[0], 1, 49, "wrapped")
    rec[0].release()
    ring.release(rec[1])
    assert ring.free_bytes() == 256

    # only one word left before the end: the WRAP word takes exactly that word
    advance_to(ring, 256 * 2 + 248)
    assert ring.write(make_payload(2, 1))
    assert ring._len_words[248 >> 3] == _WRAP
    assert ring.head_position() == 256 * 3 + 16
    rec = ring.next_record()
    assert rec is not None and rec[1] == 256 * 3 + 16
    check_record(rec[0], 2, 1, "after one-word skip")
    rec[0].release()
    ring.release(rec[1])


def test_wrap_skip_counts_against_free_space(shm: ShmFactory) -> None:
    ring = shm.ring(256)
    advance_to(ring, 72)
    for i in range(2):
        assert ring.write(make_payload(i, 56))  # head 200, tail 72: 128 bytes free
    assert ring.free_bytes() == 128
    assert ring.reserve(72) is None  # needs 80 <= 128 free, but 56 skipped + 80 > 128
    view = ring.reserve(64)  # needs 72: 56 skipped + 72 == 128, fits exactly
    assert view is not None
    view[:] = make_payload(2, 64)
    view.release()
    ring.commit()
    assert ring.free_bytes() == 0
    for i in range(3):
        rec = ring.next_record()
        assert rec is not None
        check_record(rec[0], i, 64 if i == 2 else 56, "skip accounting")
        rec[0].release()
        ring.release(rec[1])
    assert ring.free_bytes() == 256


def test_zero_length_records(shm: ShmFactory) -> None:
    ring = shm.ring(64)
    view = ring.reserve(0)
    assert view is not None and len(view) == 0
    view.release()
    ring.commit()
    assert ring.head_position() == 8
    ends = []
    for i in range(100):  # around the ring 12 times; a zero-length record never wraps
        pos = ring.head_position() % ring.capacity
        assert ring.write(b"")
        assert ring._len_words[pos >> 3] == 0
        if i % 3 == 0:
            while (rec := ring.next_record()) is not None:
                assert len(rec[0]) == 0 and rec[0].tobytes() == b""
                rec[0].release()
                ends.append(rec[1])
                ring.release(rec[1])
    while (rec := ring.next_record()) is not None:
        rec[0].release()
        ends.append(rec[1])
        ring.release(rec[1])
    assert ends == [8 * (i + 1) for i in range(101)]  # no WRAP anywhere
    for _ in range(8):  # eight of them fill a 64-byte ring completely
        assert ring.write(b"")
    assert ring.free_bytes() == 0 and ring.reserve(0) is None


def test_record_too_large(shm: ShmFactory) -> None:
    for cap in (64, 72, 256, 4096):
        ring = shm.ring(cap)
        assert ring.max_record == cap // 2 - 16
        with pytest.raises(RecordTooLarge):
            ring.reserve(ring.max_record + 1)
        with pytest.raises(RecordTooLarge):
            ring.write(bytes(ring.max_record + 1))
        assert isinstance(RecordTooLarge("x"), ValueError)
        assert ring.head_position() == 0
        # the largest record fits into an empty ring at every position, wrap or not
        for pos in range(0, cap, 8):
            advance_to(ring, ring.head_position() - ring.head_position() % cap + cap + pos)
            assert ring.write(make_payload(pos, ring.max_record))
            rec = ring.next_record()
            assert rec is not None
            check_record(rec[0], pos, ring.max_record, f"cap {cap} pos {pos}")
            rec[0].release()
            ring.release(rec[1])


def test_bad_capacity(shm: ShmFactory) -> None:
    seg = shm.segment(ring_bytes(256))
    for cap in (100, 56, 0):
        with pytest.raises(ValueError):
            Ring(seg, shm.bell(), 0, cap)


@pytest.mark.parametrize("cap", [64, 72, 256, 1000])
def test_random_operations_against_a_model(shm: ShmFactory, cap: int) -> None:
    """Reserve (committed or abandoned), read, release, rewind in random order."""
    ring = shm.ring(cap)
    rng = random.Random(BASE_SEED + cap)
    head = tail = 0
    recs: deque[tuple[int, int, int, int]] = deque()  # (start, end, seq, length), unreleased
    read = 0  # how many of recs the cursor has passed
    seq = 0
    for _ in range(6000):
        op = rng.random()
        if op < 0.45:
            n = rng.choice((0, rng.randint(0, 16), rng.randint(0, ring.max_record),
                            ring.max_record))
            pos = head % cap
            skip = cap - pos if pos + need(n) > cap else 0
            ok = cap - (head - tail) >= skip + need(n)
            view = ring.reserve(n)
            assert (view is not None) == ok
            if view is not None:
                view[:] = make_payload(seq, n)
                view.release()
                if rng.random() < 0.1:
                    continue  # abandoned reservation: nothing published
                ring.commit()
                recs.append((head, head + skip + need(n), seq, n))
                head += skip + need(n)
                seq += 1
        elif op < 0.8:
            rec = ring.next_record()
            if read == len(recs):
                assert rec is None
            else:
                assert rec is not None
                _, end, s, n = recs[read]
                assert rec[1] == end
                check_record(rec[0], s, n, "model")
                rec[0].release()
                read += 1
        elif op < 0.95:
            if read:
                k = rng.randint(1, read)
                for _ in range(k):
                    tail = recs.popleft()[1]
                read -= k
                ring.release(tail)
        else:
            ring.rewind_to_tail()
            read = 0
        cursor = recs[read][0] if read < len(recs) else head
        assert (ring.head_position(), ring.tail_position(), ring.cursor) == (head, tail, cursor)
        assert ring.free_bytes() == cap - (head - tail)
        assert ring.pending_bytes() == head - cursor
        assert ring.has_data() == (read < len(recs))
    assert seq > 500


# --------------------------------------------------------------------------- 4. cursor vs release


def test_read_but_unreleased_records_are_replayed(shm: ShmFactory) -> None:
    ring = shm.ring(512)
    sizes = [10, 0, 33, 100, 7]
    for i, n in enumerate(sizes):
        assert ring.write(make_payload(i, n))
    free = ring.free_bytes()
    ends = []
    for i in range(3):
        rec = ring.next_record()
        assert rec is not None
        check_record(rec[0], i, sizes[i], "first read")
        rec[0].release()
        ends.append(rec[1])
    assert ring.free_bytes() == free  # reading gives nothing back
    assert ring.tail_position() == 0
    assert ring.pending_bytes() == sum(need(n) for n in sizes[3:])

    # fill the ring; read everything; still no space until release
    k = len(sizes)
    while ring.write(make_payload(k, 40)):
        sizes.append(40)
        k += 1
    while (rec := ring.next_record()) is not None:
        rec[0].release()
    assert not ring.has_data() and not fits(ring, 40)
    assert ring.reserve(40) is None

    ring.rewind_to_tail()  # crash replay: everything unreleased comes back, unchanged
    for i in range(k):
        rec = ring.next_record()
        assert rec is not None
        check_record(rec[0], i, sizes[i], "replay")
        rec[0].release()
        if i < 3:
            assert rec[1] == ends[i]
    assert ring.next_record() is None

    ring.release(ends[1])
    assert ring.free_bytes() == ring.capacity - (ring.head_position() - ends[1])
    ring.rewind_to_tail()
    rec = ring.next_record()
    assert rec is not None
    check_record(rec[0], 2, sizes[2], "after partial release")
    rec[0].release()

    # a fresh consumer (a replacement worker) starts at the released tail as well
    replacement = Ring(ring.segment, ring.doorbell, 0)
    try:
        assert replacement.capacity == ring.capacity and replacement.cursor == ends[1]
        rec = replacement.next_record()
        assert rec is not None
        check_record(rec[0], 2, sizes[2], "replacement")
        rec[0].release()
    finally:
        replacement.close()
    ring.release_all_read()
    assert ring.tail_position() == ring.cursor and ring.reserve(40) is not None


def crashing_consumer(conn: Connection, name: str, bell: Doorbell, count: int,
                      keep: int) -> None:
    """Reads everything, releases only the first ``count - keep`` records, then dies."""
    seg = Segment.attach(name)
    ring = Ring(seg, bell, 0)
    for seq in range(count):
        rec = ring.next_record()
        assert rec is not None
        check_record(rec[0], seq, 20 + seq, "doomed consumer")
        if seq < count - keep:
            ring.release(rec[1])
    conn.send(("read", ring.cursor, ring.tail_position()))
    os.kill(os.getpid(), signal.SIGKILL)


def replacement_consumer(conn: Connection, name: str, bell: Doorbell) -> list[int]:
    with attached_ring(name, bell) as ring:
        seqs = []
        while (rec := ring.next_record()) is not None:
            seqs.append(_HDR.unpack(rec[0][:_HDR.size])[0])
            check_record(rec[0], seqs[-1], 20 + seqs[-1], "replacement")
            rec[0].release()
            ring.release(rec[1])
        return seqs


def test_crash_replay_across_processes(shm: ShmFactory, children: Children) -> None:
    ring = shm.ring(4096)
    count, keep = 40, 15
    for seq in range(count):
        assert ring.write(make_payload(seq, 20 + seq))
    head = ring.head_position()
    proc, conn = children.start(crashing_consumer, ring.segment.name, ring.doorbell, count, keep)
    tag, cursor, tail = children.recv(proc, conn)
    assert tag == "read" and cursor == head
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    assert ring.tail_position() == tail < head
    seqs = children.result(*children.start(replacement_consumer, ring.segment.name, ring.doorbell))
    assert seqs == list(range(count - keep, count))
    assert ring.tail_position() == head


# --------------------------------------------------------------------------- 5. doorbell


def test_sleep_handshake_interleavings(shm: ShmFactory) -> None:
    """Each order of "consumer announces sleep" and "producer publishes", step by step."""
    ring = shm.ring(256)
    bell = ring.doorbell
    fd = bell.fileno()
    # publish before the consumer looks: it must not sleep, and nobody rings
    assert ring.write(b"a")
    assert not ring.prepare_sleep() and not ring._words[_SLEEPING]
    assert bell.wait(0) == []
    assert ring.wait(0, 10.0) == []  # data is there: returns at once without blocking
    rec = ring.next_record()
    assert rec is not None
    rec[0].release()
    ring.release(rec[1])
    # consumer saw an empty ring, then the producer published, then the consumer announces
    # sleep: prepare_sleep must notice the record (the commit saw no sleeper and rang nothing)
    assert not ring.has_data()
    assert ring.write(b"b")
    assert bell.wait(0) == []
    assert not ring.prepare_sleep(), "would sleep on a record nobody will ring for"
    assert not ring._words[_SLEEPING]
    rec = ring.next_record()
    assert rec is not None
    rec[0].release()
    ring.release(rec[1])
    # announced first, then published: the commit rings the bell
    assert ring.prepare_sleep() and ring._words[_SLEEPING]
    assert ring.write(b"c")
    assert bell.wait(0) == [fd]
    ring.end_sleep()
    assert not ring._words[_SLEEPING]
    assert bell.wait(0) == []  # the wait cleared it
    # no sleeper: commits do not ring
    assert ring.write(b"d")
    assert bell.wait(0) == []
    # spinning consumer sees the data without the bell
    assert ring.wait(0.001, 10.0) == []
    # an empty ring with a short timeout: returns empty-handed after the timeout
    while (rec := ring.next_record()) is not None:
        rec[0].release()
        ring.release(rec[1])
    t0 = time.perf_counter()
    assert ring.wait(0, 0.05) == []
    assert time.perf_counter() - t0 >= 0.04
    assert not ring._words[_SLEEPING]


def sleeper(conn: Connection, name: str, bell: Doorbell, rounds: int) -> None:
    with attached_ring(name, bell) as ring:
        fd = ring.doorbell.fileno()
        for r in range(rounds):
            t0 = time.perf_counter()
            ready = ring.wait(0, 10.0)
            t1 = time.perf_counter()
            rec = ring.next_record()
            assert rec is not None, f"round {r}: woke without data after {t1 - t0:.3f} s"
            check_record(rec[0], r, 32, "sleeper")
            rec[0].release()
            ring.release(rec[1])
            conn.send(("woke", t0, t1, fd in ready))


def test_blocked_consumer_wakes_when_producer_commits(shm: ShmFactory,
                                                     children: Children) -> None:
    ring = shm.ring(1024)
    rounds = 5
    proc, conn = children.start(sleeper, ring.segment.name, ring.doorbell, rounds)
    for r in range(rounds):
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not ring._words[_SLEEPING]:  # the consumer announced its sleep
            assert time.monotonic() < deadline and proc.is_alive()
            time.sleep(0.001)
        time.sleep(0.02)  # and is inside select() by now
        committed = time.perf_counter()
        assert ring.write(make_payload(r, 32))
        _, started, woke, by_bell = children.recv(proc, conn)
        assert by_bell, "woke by timeout, not by the doorbell"
        assert started < committed < woke
        assert woke - committed < 5.0, f"took {woke - committed:.3f} s to wake (timeout 10 s)"
    assert children.result(proc, conn) is None


PING_CAP = 1024
PING_OFFSET = ring_bytes(PING_CAP)  # a second ring in the same segment, 64-byte aligned


def echo(conn: Connection, name: str, req_bell: Doorbell, ack_bell: Doorbell, cycles: int,
         seed: int) -> dict[str, Any]:
    """Waits for each request (spin 0, timeout 10 s), acknowledges it on the second ring."""
    seg = Segment.attach(name)
    req, ack = Ring(seg, req_bell, 0), Ring(seg, ack_bell, PING_OFFSET)
    rng = random.Random(seed)
    stats: dict[str, Any] = {"doorbell_wakes": 0, "max_wait_s": 0.0}
    ready_then_go(conn)
    for i in range(cycles):
        wait_for_data(req, 0.0, 10.0, stats)
        rec = req.next_record()
        assert rec is not None
        check_record(rec[0], i, 8 + i % 24, "request")
        rec[0].release()
        req.release(rec[1])
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0, 0.0001))
        assert ack.write(make_payload(i, i % 16))
    assert not req.has_data()
    req.close()
    ack.close()
    seg.close()
    return stats


def test_no_lost_wakeups_ping_pong(shm: ShmFactory, children: Children) -> None:
    """One record, then wait for its acknowledgement: a lost wake-up costs a 10 s timeout."""
    cycles, timeout = 2000, 10.0
    seg = shm.segment(PING_OFFSET + ring_bytes(PING_CAP), "pingpong")
    req = shm.ring_in(seg, 0, PING_CAP)
    ack = shm.ring_in(seg, PING_OFFSET, PING_CAP)
    rng = random.Random(BASE_SEED + 5)
    stats: dict[str, Any] = {"doorbell_wakes": 0, "max_wait_s": 0.0}
    proc, conn = children.start(echo, seg.name, req.doorbell, ack.doorbell, cycles, BASE_SEED)
    start_line(children, [(proc, conn)])
    t0 = time.perf_counter()
    for i in range(cycles):
        r = rng.random()
        if r < 0.3:
            time.sleep(rng.uniform(0, 0.0002))  # the echo side is asleep by now
        elif r < 0.5:
            for _ in range(rng.randint(0, 200)):  # land in the middle of its going to sleep
                pass
        assert req.write(make_payload(i, 8 + i % 24))
        wait_for_data(ack, 0.0, timeout, stats)
        rec = ack.next_record()
        assert rec is not None
        check_record(rec[0], i, i % 16, "ack")
        rec[0].release()
        ack.release(rec[1])
    theirs = children.result(proc, conn)
    elapsed = time.perf_counter() - t0
    assert elapsed < cycles * timeout / 200, f"{elapsed:.1f} s: some wait ran into its timeout"
    assert max(stats["max_wait_s"], theirs["max_wait_s"]) < timeout / 2
    assert theirs["doorbell_wakes"] >= cycles // 4, theirs  # it really slept on the doorbell
    assert stats["doorbell_wakes"] >= cycles // 4, stats
    print(f"\nping-pong: {cycles} round trips in {elapsed:.2f} s, doorbell wakes "
          f"{theirs['doorbell_wakes']} (echo) / {stats['doorbell_wakes']} (parent), longest wait "
          f"{max(stats['max_wait_s'], theirs['max_wait_s']) * 1e3:.1f} ms")


# --------------------------------------------------------------------------- 6. pickling


def attach_and_ring(conn: Connection, name: str, ring_bell: Doorbell, plain_bell: Doorbell,
                    capacity: int) -> dict[str, Any]:
    with attached_ring(name, ring_bell) as ring:
        assert ring.capacity == capacity  # read from the owner's header
        assert isinstance(plain_bell, Doorbell) and plain_bell.fileno() >= 0
        plain_bell.ring()
        assert ring.write(make_payload(7, 77))  # the parent sleeps on ring_bell: this rings it
        plain_bell.close()
        return {"pid": os.getpid()}


def test_doorbell_and_segment_name_cross_spawn(shm: ShmFactory, children: Children) -> None:
    ring = shm.ring(2048)
    plain = shm.bell()
    assert ring.prepare_sleep()  # the consumer (parent) announces sleep before the child exists
    try:
        proc, conn = children.start(attach_and_ring, ring.segment.name, ring.doorbell, plain,
                                    ring.capacity)
        assert plain.wait(CHILD_TIMEOUT) == [plain.fileno()]
        assert ring.doorbell.wait(CHILD_TIMEOUT) == [ring.doorbell.fileno()]
    finally:
        ring.end_sleep()
    result = children.result(proc, conn)
    assert result["pid"] != os.getpid()
    rec = ring.next_record()
    assert rec is not None
    check_record(rec[0], 7, 77, "from child")
    rec[0].release()
    ring.release(rec[1])
    # the child's copies are gone; the parent's fds still work
    plain.ring()
    assert plain.wait(1.0) == [plain.fileno()]
    assert plain.wait(0) == []  # cleared by the wait
    ring.doorbell.ring()
    assert ring.doorbell.wait(1.0) == [ring.doorbell.fileno()]


# --------------------------------------------------------------------------- 7. cleanup


def test_owner_close_and_unlink_leave_nothing() -> None:
    name = unique_name("owner")
    seg = Segment.create(name, ring_bytes(256))
    try:
        assert os.path.exists(shm_path(name))
        ring = Ring(seg, Doorbell(), 0, 256)
        assert ring.write(b"x")
        ring.doorbell.close()
        ring.close()
        seg.close()
        assert os.path.exists(shm_path(name))  # closing unmaps; only unlink removes
        seg.unlink()
        assert not os.path.exists(shm_path(name))
        seg.unlink()  # a second unlink is harmless
        with pytest.raises(FileNotFoundError):
            Segment.attach(name)
    finally:
        seg.unlink()
    assert not [n for n in os.listdir(SHM_DIR) if n == name]


def attach_write_exit(conn: Connection, name: str, bell: Doorbell, seq: int, die: bool) -> None:
    with attached_ring(name, bell) as ring:
        assert ring.write(make_payload(seq, 40))
    if die:
        conn.send(("attached", seq))
        seg = Segment.attach(name)  # and is still mapped when it is killed
        assert seg.size > 0
        os.kill(os.getpid(), signal.SIGKILL)


_SUBPROCESS_ATTACH = textwrap.dedent("""
    import sys
    from transport.doorbell import Doorbell
    from transport.ring import Ring
    from transport.shm import Segment
    seg = Segment.attach(sys.argv[1])
    ring = Ring(seg, Doorbell(), 0)
    assert ring.write(b"independent process")
    ring.close()
    seg.close()
""")


def test_attached_process_exit_keeps_owner_segment(shm: ShmFactory, children: Children) -> None:
    ring = shm.ring(4096)
    name = ring.segment.name
    # a spawned child (shares the owner's resource tracker) exits normally
    job = children.start(attach_write_exit, name, ring.doorbell, 0, False)
    assert children.result(*job) is None
    assert os.path.exists(shm_path(name))
    # a spawned child is SIGKILLed while attached
    proc, conn = children.start(attach_write_exit, name, ring.doorbell, 1, True)
    assert children.recv(proc, conn) == ("attached", 1)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    assert os.path.exists(shm_path(name))
    # an unrelated process (its own resource tracker: the gh-82300 case) attaches and exits
    done = subprocess.run([sys.executable, "-c", _SUBPROCESS_ATTACH, name], check=False,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert os.path.exists(shm_path(name))
    # the owner still uses the very same segment
    for seq in range(2):
        rec = ring.next_record()
        assert rec is not None
        check_record(rec[0], seq, 40, "child record")
        rec[0].release()
        ring.release(rec[1])
    rec = ring.next_record()
    assert rec is not None and bytes(rec[0]) == b"independent process"
    rec[0].release()
    ring.release(rec[1])
    assert ring.write(make_payload(9, 99))
    rec = ring.next_record()
    assert rec is not None
    check_record(rec[0], 9, 99, "owner after children")
    rec[0].release()
    ring.release(rec[1])
    assert ring.free_bytes() == ring.capacity
