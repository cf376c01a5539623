"""Overload: driven at twice its capacity, the engine sheds late frames instead of falling
behind, stays responsive, answers every frame, counts what it shed, and recovers by itself.

The daemon runs one worker with ``--shed-after-ms 200``. A load process (a bare DEALER and
the wire encoders) first measures capacity closed-loop, then drives paced streams, each
sending one 512-sample int16 frame every 32 ms with a random phase. Phases: 0.4x capacity
(baseline), 2x (overload), then 0.35x of the capacity the overload itself showed (recovery;
the load process's own CPU lowers capacity on a small machine, and other jobs on a shared
one make it wander: the margin keeps the recovery check about the engine).

Two bottlenecks, one case each:

- worker: one frame per message and ``--max-batch 1`` make inference the bottleneck; late
  frames wait in the worker's queue and the worker sheds them.
- front-end: the default configuration with every due frame in one message (a gateway);
  the single-threaded front-end usually saturates first, messages wait in ZeroMQ's queue
  before it reads them, and it sheds them at intake by their estimated arrival
  (engine/control.py). On a shared machine the worker may saturate first instead, so where
  frames are shed is not asserted here; the last test pins intake shedding down on its own.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from clients.client import Client
from tests.conftest import vm_rss_mib, REPO, spawn_daemon
from transport import protocol as P
from transport.protocol import DType, MsgType

SHED_AFTER_MS = 200
PERIOD_S = 512 / 16000  # one frame of real-time audio per stream
BASELINE_S, OVERLOAD_S, RECOVERY_S = 2.0, 10.0, 6.0
SETTLE_S = 3.0  # shedding must have stopped (for CLEAN_S at least) within this long after the load drops
CLEAN_S = 2.0
RECOVERY_SHARE = 0.35  # of the capacity the overload showed: headroom for other jobs on a shared machine
BUCKET_S = 0.5
PING_LIMIT_S = 1.0
RSS_GROWTH_LIMIT_MIB = 50
# Items of one gateway message: under the engine's defaults (max_items_per_message 1024, and
# max_message_bytes 1 MiB: 1008 one-frame items); 2x a fast machine's capacity may be more streams.
ITEMS_PER_MESSAGE = 1000
# The burst of the intake test: ~15 ms of front-end work per message on a 2.5 GHz core.
FLOOD_MESSAGES = 80
AFTER_BURST_S = 1.0


# ---- the load process -----------------------------------------------------------------------

def _socket(endpoint: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    return sock


def _open(sock: zmq.Socket[bytes], first_id: int, count: int, params: dict[str, Any]) -> None:
    for i in range(count):
        sock.send(P.encode_open(first_id + i, first_id + i, params))
    for _ in range(count):
        assert sock.poll(30_000), "no OPENED"
        assert P.parse_header(sock.recv())[0] == MsgType.OPENED


def _counter_delta(before: dict[str, Any], after: dict[str, Any], name: str) -> int:
    """How much a front-end counter grew between two STATS replies."""
    return int(after["counters"].get(name, 0) - before["counters"].get(name, 0))


def _items(msg: bytes) -> list[tuple[int, int, int, np.ndarray]]:
    """(stream_id, chunk_seq, flags, probabilities) per RESULTS item, flags included."""
    out, offset = [], P.HEADER.size
    while offset < len(msg):
        stream_id, chunk_seq, _, n_frames, n_events, flags = P.RESULT_ITEM.unpack_from(msg, offset)
        offset += P.RESULT_ITEM.size
        out.append((stream_id, chunk_seq, flags, np.frombuffer(msg, "<f4", n_frames, offset)))
        offset += 4 * n_frames + P.EVENT_ITEM.size * n_events
    return out


def measure_capacity(endpoint: str, batched: bool, seconds: int = 3, streams: int = 32,
                     window: int = 2) -> dict[str, Any]:
    """Closed loop, nothing shed (these streams open with shed_after_ms=0): frames/s answered,
    the best of ``seconds`` one-second windows (other jobs on a shared machine only lower it)."""
    sock = _socket(endpoint)
    _open(sock, 1, streams, {"shed_after_ms": 0})
    pcm = (np.random.default_rng(1).standard_normal(512) * 2000).astype("<i2").tobytes()
    seq = 0

    def send(stream_ids: list[int]) -> None:
        nonlocal seq
        items = []
        for stream_id in stream_ids:
            seq += 1
            items.append((stream_id, seq, DType.INT16, pcm))
        for group in [items] if batched else [[item] for item in items]:
            sock.send(P.encode_audio(seq, group))

    for _ in range(window):
        send(list(range(1, streams + 1)))
    per_second = [0] * seconds
    warm_until = time.monotonic() + 0.5
    end = warm_until + seconds
    while (now := time.monotonic()) < end:
        if not sock.poll(100):
            continue
        msg = sock.recv()
        assert P.parse_header(msg)[0] == MsgType.RESULTS, P.decode_error(msg)
        answered = _items(msg)
        if now >= warm_until:
            per_second[min(seconds - 1, int(now - warm_until))] += sum(len(probs) for *_, probs in answered)
        send([stream_id for stream_id, *_ in answered])
    outstanding = streams * window  # let them finish, then close
    deadline = time.monotonic() + 30
    while outstanding and time.monotonic() < deadline and sock.poll(1000):
        outstanding -= len(_items(sock.recv()))
    for stream_id in range(1, streams + 1):
        sock.send(P.encode_stream_op(MsgType.CLOSE, 0, stream_id))
    sock.close(0)
    return {"fps": max(per_second), "per_second": per_second}


def paced_load(endpoint: str, baseline: int, high: int, batched: bool, first_id: int = 1000,
               seed: int = 0) -> dict[str, Any]:
    """Paced streams: ``baseline`` streams for BASELINE_S, ``high`` for OVERLOAD_S, then
    RECOVERY_SHARE of what the engine answered per second during the overload (its capacity under this load, which
    this process's own CPU use lowers) for RECOVERY_S. A stream not active in a phase pauses and
    keeps its phase. Returns per-bucket counts and latencies, by the frame's send time."""
    phases = [(BASELINE_S, baseline), (OVERLOAD_S, high), (RECOVERY_S, -1)]
    n_streams = max(baseline, high)
    sock = _socket(endpoint)
    _open(sock, first_id, n_streams, {})
    rng = np.random.default_rng(seed)
    speech = (rng.standard_normal(512 * 64) * 3000).astype("<i2")
    frames = [speech[k * 512:(k + 1) * 512].tobytes() for k in range(64)]
    starts = np.cumsum([0.0] + [seconds for seconds, _ in phases])
    total = float(starts[-1])
    t0 = time.monotonic() + 0.1
    due = t0 + rng.uniform(0, PERIOD_S, n_streams)
    seqs = [0] * n_streams
    sent_at: dict[tuple[int, int], float] = {}
    n_buckets = math.ceil(total / BUCKET_S)
    buckets: list[dict[str, Any]] = [{"sent": 0, "answered": 0, "shed": 0, "latency": []} for _ in range(n_buckets)]
    anomalies: list[str] = []
    errors: dict[str, int] = {}
    measure_from = t0 + BASELINE_S + OVERLOAD_S / 2  # answered/s over the overload's second half
    measured = 0
    capacity_fps = 0.0

    def bucket(at: float) -> dict[str, Any]:
        return buckets[min(n_buckets - 1, max(0, int((at - t0) / BUCKET_S)))]

    def drain() -> None:
        nonlocal measured
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.monotonic()
            msg_type = P.parse_header(msg)[0]
            if msg_type == MsgType.ERROR:
                error = P.decode_error(msg)
                errors[error.code.name] = errors.get(error.code.name, 0) + 1
                sent_at.pop((error.stream_id, error.chunk_seq), None)
                continue
            assert msg_type == MsgType.RESULTS, hex(msg_type)
            for stream_id, chunk_seq, flags, probs in _items(msg):
                sent = sent_at.pop((stream_id, chunk_seq))
                target = bucket(sent)
                shed = bool(np.isnan(probs).any())
                if len(probs) != 1 or shed != bool(flags & P.ResultFlag.SHED):
                    anomalies.append(f"stream {stream_id} chunk {chunk_seq}: {probs} flags {flags}")
                if shed:
                    target["shed"] += 1
                else:
                    target["answered"] += 1
                    target["latency"].append(now - sent)
                    measured += now >= measure_from

    while (now := time.monotonic()) < t0 + total:
        phase = min(int(np.searchsorted(starts, now - t0, side="right")) - 1, len(phases) - 1)
        active = phases[max(phase, 0)][1]
        if active < 0:  # entering recovery: a share of the capacity the overload showed
            capacity_fps = measured / (now - measure_from)
            phases[-1] = (RECOVERY_S, max(1, min(high, round(RECOVERY_SHARE * capacity_fps * PERIOD_S))))
            active = phases[-1][1]
        items = []
        for i in np.nonzero(due[:active] <= now)[0]:
            seqs[i] += 1
            stream_id = first_id + int(i)
            items.append((stream_id, seqs[i], DType.INT16, frames[seqs[i] % 64]))
            sent_at[(stream_id, seqs[i])] = now
            bucket(now)["sent"] += 1
            due[i] += PERIOD_S
            if due[i] < now:  # this process fell behind: skip ahead, keep the phase
                due[i] += PERIOD_S * math.ceil((now - due[i]) / PERIOD_S)
        step = ITEMS_PER_MESSAGE if batched else 1  # a gateway: as few messages as the engine takes
        for start in range(0, len(items), step):
            sock.send(P.encode_audio(0, items[start:start + step]))
        paused = due[active:] < now  # paused streams keep their phase for when they resume
        due[active:][paused] += PERIOD_S * np.ceil((now - due[active:][paused]) / PERIOD_S)
        drain()
        wait = float(due[:active].min()) - time.monotonic() if active else 0.005
        if wait > 0:
            sock.poll(max(1, int(wait * 1000)))
    deadline = time.monotonic() + 30
    while sent_at and time.monotonic() < deadline:
        if sock.poll(100):
            drain()
    sock.close(0)
    summary = []
    for b in buckets:
        lat = np.array(b["latency"])
        summary.append({"sent": b["sent"], "answered": b["answered"], "shed": b["shed"],
                        "latency": [round(float(x), 5) for x in lat]})
    return {"buckets": summary, "unanswered": len(sent_at), "errors": errors, "anomalies": anomalies[:20],
            "n_anomalies": len(anomalies), "capacity_under_load_fps": capacity_fps, "recovery_streams": phases[-1][1]}


def run_in_process(task: str, kwargs: dict[str, Any], out: Path, timeout: float) -> dict[str, Any]:
    """Run measure_capacity / paced_load in a separate process (its own core and GIL)."""
    subprocess.run([sys.executable, "-m", "tests.test_overload", task, json.dumps(kwargs), str(out)],
                   cwd=REPO, check=True, timeout=timeout)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# ---- the test -----------------------------------------------------------------------------



def window(buckets: list[dict[str, Any]], start_s: float, end_s: float) -> dict[str, Any]:
    """Totals and answered-frame latency of the frames sent in [start_s, end_s)."""
    chosen = buckets[int(start_s / BUCKET_S):int(end_s / BUCKET_S)]
    sent = sum(b["sent"] for b in chosen)
    shed = sum(b["shed"] for b in chosen)
    latency = np.array([x for b in chosen for x in b["latency"]])
    stats = {f"p{q}": float(np.percentile(latency, q)) if len(latency) else None for q in (50, 99)}
    return {"sent": sent, "shed": shed, "shed_share": shed / sent if sent else 0.0, **stats,
            "max": float(latency.max()) if len(latency) else None}


def recovery(buckets: list[dict[str, Any]]) -> tuple[float | None, dict[str, Any]]:
    """Seconds from the load drop to the first CLEAN_S stretch without a shed frame, and that
    stretch's numbers. A later blip (another job stalling this shared machine) is not a relapse
    of the engine; it is reported, not judged."""
    drop = BASELINE_S + OVERLOAD_S
    step = 0.0
    while drop + step + CLEAN_S <= drop + RECOVERY_S + 1e-9:
        stretch = window(buckets, drop + step, drop + step + CLEAN_S)
        if stretch["shed"] == 0 and stretch["sent"]:
            return step, stretch
        step += BUCKET_S
    return None, window(buckets, drop + SETTLE_S, drop + RECOVERY_S)


@pytest.mark.parametrize("bottleneck", ["worker", "front-end"])
def test_overload_sheds_stays_responsive_and_recovers(tmp_path: Path, bottleneck: str) -> None:
    batched = bottleneck == "front-end"
    daemon = spawn_daemon("--workers", "1", "--shed-after-ms", str(SHED_AFTER_MS),
                          *([] if batched else ["--max-batch", "1"]),
                          "--max-streams", "4096", "--max-streams-per-connection", "4096")
    try:
        capacity = run_in_process("measure_capacity", {"endpoint": daemon.endpoint, "batched": batched},
                                  tmp_path / "capacity.json", 60)
        capacity_streams = capacity["fps"] / (1 / PERIOD_S)
        high = max(2, round(2 * capacity_streams))
        baseline = max(1, round(0.4 * capacity_streams))

        rss_before = vm_rss_mib(daemon.pid)
        rss_peak = rss_before
        pings: list[float] = []
        done = threading.Event()
        load_result: dict[str, Any] = {}

        def load() -> None:
            try:
                load_result.update(run_in_process("paced_load", {"endpoint": daemon.endpoint, "baseline": baseline,
                                                                  "high": high, "batched": batched}, tmp_path / "load.json", 120))
            finally:
                done.set()

        thread = threading.Thread(target=load)
        with Client(daemon.endpoint, timeout=10) as admin:
            stats_before = admin.stats()
            thread.start()
            while not done.is_set():
                pings.append(admin.ping(timeout=10))
                rss_peak = max(rss_peak, vm_rss_mib(daemon.pid))
                time.sleep(0.2)
            thread.join()
            stats = admin.stats()

        buckets = load_result["buckets"]
        before = window(buckets, 0.5, BASELINE_S)
        overload = window(buckets, BASELINE_S + 1.0, BASELINE_S + OVERLOAD_S)
        recovered_after, recovered = recovery(buckets)
        rest = window(buckets, BASELINE_S + OVERLOAD_S + SETTLE_S, BASELINE_S + OVERLOAD_S + RECOVERY_S)
        sent = sum(b["sent"] for b in buckets)
        shed = sum(b["shed"] for b in buckets)
        answered = sum(b["answered"] for b in buckets)
        counters = stats["counters"]
        executed = sum(w["frames"] for w in stats["workers"]) - sum(w["frames"] for w in stats_before["workers"])
        frames_out = counters["frames_out"] - stats_before["counters"].get("frames_out", 0)
        shed_counted = counters.get("frames_shed", 0) - stats_before["counters"].get("frames_shed", 0)
        at_intake = counters.get("frames_shed_at_intake", 0) - stats_before["counters"].get("frames_shed_at_intake", 0)

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{1000 * value:.0f} ms"

        under_load = load_result["capacity_under_load_fps"] * PERIOD_S
        print(f"capacity {capacity['fps']:.0f} frames/s closed-loop (per second: {capacity['per_second']}) = "
              f"{capacity_streams:.1f} real-time streams ({under_load:.1f} answered during the overload); "
              f"offered {baseline} -> {high} -> "
              f"{load_result['recovery_streams']} streams ({high / capacity_streams:.2f}x closed-loop capacity, "
              f"{high / max(under_load, 1e-9):.2f}x the capacity under load)")
        print(f"  shedding stopped {recovered_after} s after the load dropped; last "
              f"{RECOVERY_S - SETTLE_S:.0f} s: shed {rest['shed']} of {rest['sent']}, max {ms(rest['max'])}")
        for name, w in (("before", before), ("overload", overload), ("recovered", recovered)):
            print(f"  {name:9s}: {w['sent']} frames sent, shed {100 * w['shed_share']:.1f}%, "
                  f"answered latency p50 {ms(w['p50'])}, p99 {ms(w['p99'])}, max {ms(w['max'])}")
        print(f"  total: {sent} sent = {answered} answered + {shed} shed; engine frames_shed {shed_counted}, "
              f"worker ran {executed} of {frames_out}; shed at intake {at_intake}; ping max {ms(max(pings))} over {len(pings)} pings; "
              f"front-end RSS {rss_before:.1f} -> peak {rss_peak:.1f} MiB")

        assert daemon.proc.poll() is None, daemon.log()
        assert load_result["n_anomalies"] == 0, load_result["anomalies"]  # NaN <=> SHED flag, one frame each
        assert load_result["errors"] == {} and load_result["unanswered"] == 0
        assert answered + shed == sent
        assert max(pings) < PING_LIMIT_S
        # Overload: shedding, the median answered frame within the budget and the tail bounded
        # (slack for a shared machine's stalls). Without shedding, latency would grow by ~0.5 s
        # per second of a 2x overload.
        assert overload["shed_share"] >= 0.1, overload
        # A frame is shed when it has not *started* by its deadline; one that started still has to
        # run and, through a saturated front-end, travel back: hence the margin for that case.
        deadline_s = SHED_AFTER_MS / 1000 * (1.5 if batched else 1.0)
        assert overload["p50"] is not None and overload["p50"] < deadline_s, overload
        assert overload["p99"] is not None and overload["p99"] < 5 * SHED_AFTER_MS / 1000, overload
        # Every shed frame is reported to its client and counted, and the worker skipped it.
        assert shed_counted == shed
        assert frames_out - executed == shed
        in_workers = sum(w["shed_frames"] for w in stats["workers"]) - sum(
            w["shed_frames"] for w in stats_before["workers"])
        assert in_workers + at_intake == shed
        # Where frames are shed (worker or intake) depends on which part saturates first, and on a
        # shared machine that varies; the bounded p99 above is what fails if either sheds too
        # little. Intake shedding on its own: test_frames_queued_behind_a_flood_are_shed_at_intake.
        # Recovery, by itself: within SETTLE_S no more shedding, and no queue: the median answered
        # frame is back far under the budget (it sat at about half of it during the overload). The
        # tail gets slack for scheduling stalls of a shared machine.
        assert recovered_after is not None and recovered_after <= SETTLE_S, (recovered_after, recovered)
        assert recovered["p50"] is not None and recovered["p50"] < SHED_AFTER_MS / 1000 / 4, recovered
        assert recovered["p99"] is not None and recovered["p99"] < 1.5 * SHED_AFTER_MS / 1000, recovered
        assert rss_peak - rss_before < RSS_GROWTH_LIMIT_MIB
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_frames_queued_behind_a_flood_are_shed_at_intake() -> None:
    """One connection carries a paced stream and, on another of its streams, a burst of costly
    messages (1,024 tiny items each): the paced frames queue behind the burst in ZeroMQ, and those
    the front-end reads past their deadline are shed at intake, not sent to a worker (one it reads
    just before its deadline may pass it in the worker's queue, behind the burst's items, and be
    shed there); frames sent after the burst are answered on time. Nothing is lost."""
    daemon = spawn_daemon("--workers", "1", "--shed-after-ms", str(SHED_AFTER_MS))
    try:
        with Client(daemon.endpoint, timeout=10) as admin:
            before = admin.stats()
        sock = _socket(daemon.endpoint)
        _open(sock, 1, 1, {})
        _open(sock, 2, 1, {"shed_after_ms": 0})
        pcm = (np.random.default_rng(1).standard_normal(512) * 2000).astype("<i2").tobytes()
        burst = [P.encode_audio(0, [(2, m * 1024 + k + 1, DType.INT16, pcm[:32]) for k in range(1024)])
                 for m in range(FLOOD_MESSAGES)]
        sent_at: dict[int, float] = {}
        outcome: dict[int, tuple[bool, float]] = {}  # chunk -> (shed, latency)
        burst_replies = 0  # a RESULTS item per chunk or an ERROR per refused item

        def take(msg: bytes) -> None:
            nonlocal burst_replies
            if P.parse_header(msg)[0] != MsgType.RESULTS:
                # The burst's stream is refused in part (LIMIT: too many chunks awaiting results).
                assert P.decode_error(msg).stream_id == 2, P.decode_error(msg)
                burst_replies += 1
                return
            for stream_id, chunk_seq, flags, probs in _items(msg):
                if stream_id == 1:
                    assert len(probs) == 1 and bool(np.isnan(probs[0])) == bool(flags & P.ResultFlag.SHED)
                    outcome[chunk_seq] = (bool(flags & P.ResultFlag.SHED), time.monotonic() - sent_at[chunk_seq])
                else:
                    burst_replies += 1

        # Paced frames before, during and for AFTER_BURST_S after the burst (however long the
        # shared machine takes over it: it ends when every item of it has its reply).
        t0 = time.monotonic()
        burst_at = t0 + 1.0
        burst_done_at = math.inf
        seq = 0
        while (now := time.monotonic()) < burst_done_at + AFTER_BURST_S:
            assert now < t0 + 120, f"the burst got {burst_replies} of {FLOOD_MESSAGES * 1024} replies in 2 min"
            if now >= t0 + seq * PERIOD_S:
                seq += 1
                sent_at[seq] = now
                sock.send(P.encode_audio(seq, [(1, seq, DType.INT16, pcm)]))
            if burst and now >= burst_at:
                for msg in burst:
                    sock.send(msg)
                burst = []
            while sock.poll(0):
                take(sock.recv())
            if burst_replies == FLOOD_MESSAGES * 1024 and burst_done_at == math.inf:
                burst_done_at = time.monotonic()
            time.sleep(0.002)
        deadline = time.monotonic() + 30
        while len(outcome) < seq and time.monotonic() < deadline:
            if sock.poll(100):
                take(sock.recv())
        sock.close(0)
        with Client(daemon.endpoint, timeout=10) as admin:
            after = admin.stats()
    finally:
        assert daemon.stop() == 0, daemon.log()

    shed = sorted(chunk for chunk, (was_shed, _) in outcome.items() if was_shed)
    late = [round(latency, 3) for was_shed, latency in outcome.values() if not was_shed and latency > 0.1]
    print(f"burst answered {burst_done_at - burst_at:.2f} s after it was sent; "
          f"{seq} paced frames: {len(shed)} shed at intake (chunks {shed[:1]}..{shed[-1:]}), "
          f"answered ones over 100 ms: {late}")
    assert len(outcome) == seq, "a paced frame got no answer"
    assert len(shed) >= 3, "the burst did not hold the front-end past the deadline"
    assert _counter_delta(before, after, "frames_shed") == len(shed)
    at_intake = _counter_delta(before, after, "frames_shed_at_intake")
    in_worker = _counter_delta(before, after, "frames_shed_in_worker")
    assert at_intake + in_worker == len(shed) and at_intake >= 3 and in_worker <= 2, (at_intake, in_worker)
    assert sum(w["shed_frames"] for w in after["workers"]) - sum(w["shed_frames"] for w in before["workers"]) == in_worker
    # The shed frames are those sent early in the burst (they waited longest), one run of them;
    # the paced frames sent after the burst was through are all answered, promptly.
    assert shed == list(range(shed[0], shed[-1] + 1))
    assert sent_at[shed[0]] >= burst_at - PERIOD_S
    after_burst = [outcome[chunk] for chunk in sent_at if sent_at[chunk] >= burst_done_at]
    assert len(after_burst) >= AFTER_BURST_S / PERIOD_S - 2
    assert not any(was_shed for was_shed, _ in after_burst), after_burst
    assert float(np.median([latency for _, latency in after_burst])) < 0.05, after_burst



def test_a_full_worker_queue_sheds_or_refuses_a_gateways_frames() -> None:
    """A gateway floods one slow worker (one frame per model call) with frame sets until its
    ring and backlog are full: frames of streams that may be shed are shed at intake (NaN,
    SHED), frames of streams that asked never to be shed are refused (ERROR OVERLOADED); every
    chunk gets exactly one answer, each stream's in order, and the counters say how many."""
    streams, messages = 128, 60
    daemon = spawn_daemon("--workers", "1", "--max-batch", "1", "--ring-mib", "1", "--shed-after-ms", "60000",
                          "--max-streams-per-connection", "1024")
    try:
        with Client(daemon.endpoint, timeout=10) as admin:
            before = admin.stats()
        sock = _socket(daemon.endpoint)
        _open(sock, 1, streams // 2, {})
        _open(sock, 1 + streams // 2, streams // 2, {"shed_after_ms": 0})
        pcm = (np.random.default_rng(2).standard_normal(512) * 2000).astype("<i2").tobytes()
        for m in range(messages):
            sock.send(P.encode_audio(m, [(sid, m + 1, DType.INT16, pcm) for sid in range(1, streams + 1)]))
        answers: dict[int, list[tuple[int, str]]] = {sid: [] for sid in range(1, streams + 1)}
        deadline = time.monotonic() + 120
        while sum(map(len, answers.values())) < streams * messages:
            assert time.monotonic() < deadline, f"{sum(map(len, answers.values()))} of {streams * messages} answered"
            if not sock.poll(1000):
                continue
            msg = sock.recv()
            if P.parse_header(msg)[0] == MsgType.ERROR:
                error = P.decode_error(msg)
                assert error.code == P.ErrorCode.OVERLOADED and error.stream_id > streams // 2, error
                answers[error.stream_id].append((error.chunk_seq, "refused"))
                continue
            for stream_id, chunk_seq, flags, probs in _items(msg):
                assert len(probs) == 1 and bool(np.isnan(probs[0])) == bool(flags & P.ResultFlag.SHED)
                answers[stream_id].append((chunk_seq, "shed" if flags & P.ResultFlag.SHED else "run"))
        sock.close(0)
        with Client(daemon.endpoint, timeout=10) as admin:
            after = admin.stats()
    finally:
        assert daemon.stop() == 0, daemon.log()

    outcomes = [outcome for sid in answers for _, outcome in answers[sid]]
    shed, refused = outcomes.count("shed"), outcomes.count("refused")
    print(f"{streams * messages} frames: {outcomes.count('run')} run, {shed} shed at intake, {refused} refused")
    for sid, got in answers.items():
        # One answer per chunk; results in order (an ERROR goes out at once, ahead of results)
        assert sorted(chunk for chunk, _ in got) == list(range(1, messages + 1)), (sid, got)
        results = [chunk for chunk, outcome in got if outcome != "refused"]
        assert results == sorted(results), (sid, got)
    assert shed > 0 and refused > 0, "the worker's queue never filled"
    assert all(outcome != "shed" for sid in answers if sid > streams // 2 for _, outcome in answers[sid])
    assert _counter_delta(before, after, "frames_shed_queue_full") == shed
    assert _counter_delta(before, after, "frames_shed_at_intake") == shed
    assert _counter_delta(before, after, "frames_refused_overloaded") == refused


def _reference_with_shed_frames(session: Any, audio: np.ndarray, shed: np.ndarray) -> np.ndarray:
    """Frame-by-frame onnxruntime, as upstream's OnnxWrapper runs it, except that a shed frame
    is not run: its probability is NaN and the state passes it by, but its samples still become
    the context of the next frame (the policy docs/reliability.md states)."""
    state, context = np.zeros((2, 1, 128), np.float32), np.zeros(64, np.float32)
    sr = np.array(16000, np.int64)
    probs = np.full(len(shed), np.nan, np.float32)
    for k in range(len(shed)):
        x = np.concatenate([context, audio[k * 512:(k + 1) * 512]])[None, :]
        if not shed[k]:
            out, state = session.run(None, {"input": x, "state": state, "sr": sr})
            probs[k] = out.reshape(-1)[0]
        context = x[0, -64:]
    return probs


def test_frames_shed_at_intake_leave_the_rest_of_each_stream_exact(tmp_path: Path) -> None:
    """A gateway floods one slow worker with real speech on 48 streams until its queue is full,
    so that some of each stream's frames are shed at intake, between frames that run. Each
    stream still gets one result per frame, in order, numbered frame by frame, and every frame
    that ran has the probability frame-by-frame onnxruntime gives when the shed frames are
    skipped (state passed on, their audio kept as context). Each stream sits out every fifth
    message at its own offset, so the runs of shed frames between frames that run differ in
    length from stream to stream, odd and even (a frame shed at intake still takes a number)."""
    import onnxruntime as ort

    from tests.silero_reference import silero_model_path
    from tests.speech_audio import read_wav, speech_wav

    streams, messages = 48, 90
    speech, _ = read_wav(speech_wav(tmp_path))
    speech = speech.reshape(len(speech), -1)[:, 0]
    starts = np.linspace(0, len(speech) - messages * 512, streams).astype(int)
    sends = {sid: [m for m in range(messages) if (m + sid) % 5] for sid in range(1, streams + 1)}
    frames = {sid: len(in_messages) for sid, in_messages in sends.items()}
    audio = [speech[start:start + frames[sid] * 512] for sid, start in zip(sends, starts)]
    daemon = spawn_daemon("--workers", "1", "--max-batch", "1", "--ring-mib", "1", "--shed-after-ms", "60000")
    try:
        sock = _socket(daemon.endpoint)
        _open(sock, 1, streams, {})
        sent = dict.fromkeys(sends, 0)
        for m in range(messages):
            items = []
            for sid in (sid for sid in sends if (m + sid) % 5):
                k = sent[sid]
                sent[sid] = k + 1
                pcm = (audio[sid - 1][k * 512:(k + 1) * 512] * 32768).clip(-32768, 32767).astype("<i2")
                items.append((sid, k + 1, DType.INT16, pcm.tobytes()))
            sock.send(P.encode_audio(m, items))
        got: dict[int, list[tuple[int, int, bool, float]]] = {sid: [] for sid in range(1, streams + 1)}
        deadline = time.monotonic() + 120
        while sum(map(len, got.values())) < sum(frames.values()):
            assert time.monotonic() < deadline, f"{sum(map(len, got.values()))} of {sum(frames.values())} answered"
            if not sock.poll(1000):
                continue
            msg = sock.recv()
            assert P.parse_header(msg)[0] == MsgType.RESULTS, msg[:64]
            offset = P.HEADER.size
            while offset < len(msg):
                sid, chunk, first, n_frames, n_events, flags = P.RESULT_ITEM.unpack_from(msg, offset)
                offset += P.RESULT_ITEM.size
                prob = float(np.frombuffer(msg, "<f4", 1, offset)[0])
                offset += 4 * n_frames + P.EVENT_ITEM.size * n_events
                assert n_frames == 1 and bool(flags & P.ResultFlag.SHED) == math.isnan(prob)
                got[sid].append((chunk, first, math.isnan(prob), prob))
        sock.close(0)
    finally:
        assert daemon.stop() == 0, daemon.log()

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(silero_model_path()), options, providers=["CPUExecutionProvider"])
    pcm16 = [(a * 32768).clip(-32768, 32767).astype(np.int16).astype(np.float32) / 32768 for a in audio]
    shed_streams, worst, gaps = 0, 0.0, set()
    for sid, results in got.items():
        assert [chunk for chunk, _, _, _ in results] == list(range(1, frames[sid] + 1)), sid
        assert [first for _, first, _, _ in results] == list(range(frames[sid])), sid
        shed = np.array([was_shed for _, _, was_shed, _ in results])
        shed_streams += bool(shed.any() and not shed.all() and not shed[shed.argmax():].all())
        ran_at = np.flatnonzero(~shed)
        gaps.update((np.diff(ran_at) - 1)[np.diff(ran_at) > 1].tolist())
        expected = _reference_with_shed_frames(session, pcm16[sid - 1], shed)
        probs = np.array([prob for _, _, _, prob in results], np.float32)
        ran = ~shed
        worst = max(worst, float(np.abs(probs[ran] - expected[ran]).max(initial=0.0)))
    print(f"{streams} streams, {sum(frames.values())} frames: {sum(s for r in got.values() for _, _, s, _ in r)} "
          f"shed; {shed_streams} streams ran frames after shed ones, after runs of {sorted(gaps)} shed frames; "
          f"max |diff| {worst:.2e}")
    assert shed_streams >= streams // 4, "too few streams had frames run after shed ones to show anything"
    assert any(gap % 2 for gap in gaps) and any(gap % 2 == 0 for gap in gaps), f"shed runs of {sorted(gaps)}"
    assert worst <= 1e-5


if __name__ == "__main__":
    task, kwargs, out_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    tasks: dict[str, Callable[..., dict[str, Any]]] = {"measure_capacity": measure_capacity, "paced_load": paced_load}
    Path(out_path).write_text(json.dumps(tasks[task](**kwargs)))
    os._exit(0)
