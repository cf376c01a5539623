"""Engine benchmark: saturation throughput against raw onnxruntime, CPU per frame, idle round trip.

    python -m bench.engine_bench [--quick] [--json OUT]

(a) Saturation. Raw baseline: W processes each run the Silero model in-process (1 intra-op
    thread, batch B, LSTM state fed back) in a closed loop. Engine: a daemon with W workers,
    driven by one load-generator *process* whose single DEALER carries many streams; every
    stream sends one 512-sample int16 frame per message, as a device would, and keeps a
    small window of frames in flight (a new frame goes out as soon as a result comes back).
(b) CPU per served frame over the same measurement window, from /proc/PID/stat: the daemon's
    main process (front-end + ZeroMQ I/O thread), the workers, the load generator; next to
    the model's batched per-frame time measured in-process by the raw baseline.
(c) One idle stream's round trip (send a frame, wait for its result) with the sync Client,
    over ipc and tcp loopback.

The machine is shared and noisy: compare ratios taken within one run, not absolute numbers
across runs. Every daemon and helper process started here is stopped on every exit path.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import signal
import struct
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

import numpy as np
import onnxruntime
import zmq

from bench.daemon import BenchError, EngineDaemon, free_tcp_port, no_shedding_args
from bench.procinfo import cpu_seconds, runq_wait_seconds, source_version
from bench.raw import RawResult, measure_raw
from clients.client import Client
from engine.models.silero import CONTEXT_SAMPLES, FRAME_SAMPLES, default_model_path
from transport import protocol as P

RATE = 16000
FRAME = FRAME_SAMPLES[RATE]
WIDTH = FRAME + CONTEXT_SAMPLES[RATE]
_CTX = multiprocessing.get_context("spawn")
_ANSWERED, _SENT, _STOP = range(3)  # words of the load generator's shared counters
_PROB = struct.Struct("<f")
Counters = Any  # a lock-free shared int64 array (multiprocessing RawArray "q")
__all__ = ["BenchError", "EngineDaemon", "RawResult", "cpu_seconds", "default_model_path", "free_tcp_port",
           "measure_raw", "no_shedding_args", "runq_wait_seconds", "source_version"]


@dataclass(frozen=True)
class Sizes:
    workers: tuple[int, ...] = (1, 2)
    raw_batch: int = 256
    raw_s: float = 6.0  # per round
    streams_per_worker: int = 256  # the engine's per-worker batch can reach raw_batch
    window: int = 3  # frames in flight per stream
    warmup_s: float = 2.0  # per round, before the engine's measurement window
    load_s: float = 8.0  # per round
    round_trips: int = 2000
    rounds: int = 3  # raw and engine measured alternately, so that drifting noise hits both


FULL = Sizes()
QUICK = Sizes(raw_s=2.0, warmup_s=1.0, load_s=3.0, round_trips=300, rounds=1)


# ---- (a)+(b) engine under saturation -----------------------------------------------------

def _loadgen_main(endpoint: str, streams: int, window: int, shared: Counters,
                  conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
        sock.setsockopt(option, value)
    sock.connect(endpoint)
    try:
        report = _generate(sock, streams, window, shared, conn)
    except Exception as exc:  # report, do not hang the parent
        report = {"failure": f"{type(exc).__name__}: {exc}"}
    finally:
        sock.close(0)
        context.term()
    conn.send(("done", report))


def _generate(sock: zmq.Socket, streams: int, window: int, shared: Counters,
              conn: Connection) -> dict[str, Any]:
    """Open ``streams`` streams, keep ``window`` one-frame messages in flight on each until
    told to stop, then wait for every outstanding result and close the streams."""
    for sid in range(1, streams + 1):
        sock.send(P.encode_open(sid, sid, {"sample_rate": RATE, "dtype": "int16"}))
    opened, deadline = 0, time.monotonic() + 30
    while opened < streams:
        if time.monotonic() > deadline or not sock.poll(1000):
            raise BenchError(f"only {opened} of {streams} streams opened")
        msg = sock.recv()
        if msg[3] == P.MsgType.ERROR:
            raise BenchError(f"open failed: {P.decode_error(msg).text}")
        opened += msg[3] == P.MsgType.OPENED
    conn.send(("ready", None))

    rng = np.random.default_rng(1)
    pcm = [(300 * rng.standard_normal(FRAME)).astype("<i2").tobytes() for _ in range(8)]
    next_seq = [1] * (streams + 1)  # chunk_seq of the next frame per stream
    expected = [1] * (streams + 1)  # chunk_seq of the next result per stream
    sent = answered = shed = in_flight = out_of_order = unexpected = closed = 0
    errors: Counter[str] = Counter()
    audio, item_struct, int16 = P.MsgType.AUDIO, P.AUDIO_ITEM, P.DType.INT16
    result_struct, result_size, event_size, prob_struct = P.RESULT_ITEM, P.RESULT_ITEM.size, P.EVENT_ITEM.size, _PROB

    def send(sid: int) -> None:
        nonlocal sent, in_flight
        seq = next_seq[sid]
        next_seq[sid] = seq + 1
        sock.send(P.header(audio, seq) + item_struct.pack(sid, seq, int16, 2 * FRAME) + pcm[seq & 7])
        sent += 1
        in_flight += 1

    for sid in range(1, streams + 1):
        for _ in range(window):
            send(sid)
    stopping, drain_deadline = False, 0.0
    while True:
        if not stopping and shared[_STOP]:
            stopping, drain_deadline = True, time.monotonic() + 30
        if stopping and (in_flight == 0 or time.monotonic() > drain_deadline):
            break
        if not sock.poll(100):
            continue
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            kind = msg[3]
            if kind == P.MsgType.RESULTS:
                offset, end = P.HEADER.size, len(msg)
                while offset < end:
                    sid, chunk_seq, _, n_frames, n_events, _ = result_struct.unpack_from(msg, offset)
                    for i in range(n_frames):  # NaN: the engine shed the frame instead of running it
                        prob = prob_struct.unpack_from(msg, offset + result_size + 4 * i)[0]
                        shed += prob != prob
                    offset += result_size + 4 * n_frames + event_size * n_events
                    if chunk_seq != expected[sid]:
                        out_of_order += 1
                    expected[sid] = chunk_seq + 1
                    answered += n_frames
                    in_flight -= 1
                    if not stopping:
                        send(sid)
            elif kind == P.MsgType.ERROR:
                error = P.decode_error(msg)
                errors[error.code.name] += 1
                if error.stream_id:
                    expected[error.stream_id] = error.chunk_seq + 1
                    in_flight -= 1
                    if not stopping:
                        send(error.stream_id)
            else:
                unexpected += 1
        shared[_ANSWERED], shared[_SENT] = answered - shed, sent

    for sid in range(1, streams + 1):
        sock.send(P.encode_stream_op(P.MsgType.CLOSE, sid, sid))
    deadline = time.monotonic() + 10
    while closed < streams and time.monotonic() < deadline:
        if not sock.poll(200):
            continue
        msg = sock.recv()
        if msg[3] == P.MsgType.RESULTS:
            closed += sum(r.final for r in P.decode_results(msg))
        elif msg[3] == P.MsgType.ERROR:
            errors["close_" + P.decode_error(msg).code.name] += 1
    return {"sent": sent, "answered": answered, "shed": shed, "lost": in_flight, "out_of_order": out_of_order,
            "errors": dict(errors), "unexpected_messages": unexpected, "streams_closed": closed}


@dataclass
class EngineResult:
    workers: int
    streams: int
    window: int
    seconds: float
    frames_per_s: float
    avg_batch: float
    frontend_cpu_us_per_frame: float  # daemon main process: front-end loop + ZeroMQ I/O thread
    frontend_loop_us_per_frame: float  # its main thread alone: the poll loop, incl. shm ring writes
    frontend_cores: float  # its CPU seconds per wall second
    worker_cpu_us_per_frame: float  # all workers together
    worker_compute_us_per_frame: float  # the workers' own timing of their batches (stats)
    loadgen_cpu_us_per_frame: float
    loadgen_cores: float
    frontend_runq_wait_share: float  # share of the wall time its main thread waited for a CPU
    worker_runq_wait_share: float  # the same, averaged over the workers
    stalled_intervals: int  # 0.5 s samples in which no result came back
    sent: int = 0
    answered: int = 0  # results received, shed frames included
    shed: int = 0  # answered without inference (the engine's overload policy); not in frames_per_s
    lost: int = 0
    out_of_order: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    streams_closed: int = 0
    engine_counters: dict[str, int] = field(default_factory=dict)


@dataclass
class _Snapshot:
    wall: float
    answered: int
    frontend_cpu: float
    frontend_loop_cpu: float
    worker_cpu: float
    loadgen_cpu: float
    frontend_wait: float
    worker_wait: float
    frames: int
    executions: int
    compute_s: float


def _snapshot(daemon: EngineDaemon, stats_client: Client, worker_pids: list[int], loadgen_pid: int,
              shared: Counters) -> _Snapshot:
    wall, answered = time.perf_counter(), shared[_ANSWERED]  # frames that were run, shed ones not counted
    try:
        frontend, workers = cpu_seconds(daemon.pid), sum(cpu_seconds(pid) for pid in worker_pids)
        frontend_loop = cpu_seconds(daemon.pid, daemon.pid)
        loadgen = cpu_seconds(loadgen_pid)
    except FileNotFoundError as exc:
        daemon.check_alive()
        raise BenchError(f"a measured process is gone (a worker restarted?): {exc}\n{daemon.tail()}") from None
    frontend_wait, worker_wait = runq_wait_seconds(daemon.pid), sum(runq_wait_seconds(pid) for pid in worker_pids)
    stats = stats_client.stats()
    return _Snapshot(wall, answered, frontend, frontend_loop, workers, loadgen, frontend_wait, worker_wait,
                     stats["frames"], stats["executions"], stats["compute_s_total"])


def measure_engine(daemon: EngineDaemon, streams: int, window: int, warmup_s: float, seconds: float) -> EngineResult:
    shared = _CTX.Array("q", 3, lock=False)
    parent, child = _CTX.Pipe(duplex=False)
    loadgen = _CTX.Process(target=_loadgen_main, args=(daemon.ipc, streams, window, shared, child),
                           name="loadgen", daemon=True)
    stats_client = Client(daemon.ipc, timeout=30)
    try:
        worker_pids = [int(w["pid"]) for w in stats_client.stats()["workers"]]
        loadgen.start()
        child.close()
        assert loadgen.pid is not None
        if not parent.poll(60) or parent.recv()[0] != "ready":
            daemon.check_alive()
            raise BenchError(f"load generator did not open its {streams} streams")
        time.sleep(warmup_s)
        before = _snapshot(daemon, stats_client, worker_pids, loadgen.pid, shared)
        stalled, last, until = 0, before.answered, before.wall + seconds
        while (now := time.perf_counter()) < until:
            time.sleep(min(0.5, until - now))
            daemon.check_alive()
            stalled += shared[_ANSWERED] == last
            last = shared[_ANSWERED]
        after = _snapshot(daemon, stats_client, worker_pids, loadgen.pid, shared)
        shared[_STOP] = 1
        if not parent.poll(60):
            raise BenchError(f"load generator did not finish: sent {shared[_SENT]}, "
                             f"answered {shared[_ANSWERED]}\n{daemon.tail()}")
        _, report = parent.recv()
        if "failure" in report:
            raise BenchError(f"load generator failed: {report['failure']}\n{daemon.tail()}")
        counters = {k: int(v) for k, v in stats_client.stats()["counters"].items()}
    finally:
        stats_client.close()
        if loadgen.pid is not None:  # started
            loadgen.join(5)
            if loadgen.exitcode is None:
                loadgen.kill()
                loadgen.join()
            loadgen.close()
        parent.close()
        child.close()
    frames = max(after.answered - before.answered, 1)
    wall = after.wall - before.wall
    executions = after.executions - before.executions
    return EngineResult(
        workers=daemon.workers, streams=streams, window=window, seconds=round(wall, 3),
        frames_per_s=frames / wall,
        avg_batch=(after.frames - before.frames) / executions if executions else 0.0,
        frontend_cpu_us_per_frame=1e6 * (after.frontend_cpu - before.frontend_cpu) / frames,
        frontend_loop_us_per_frame=1e6 * (after.frontend_loop_cpu - before.frontend_loop_cpu) / frames,
        frontend_cores=(after.frontend_cpu - before.frontend_cpu) / wall,
        worker_cpu_us_per_frame=1e6 * (after.worker_cpu - before.worker_cpu) / frames,
        worker_compute_us_per_frame=1e6 * (after.compute_s - before.compute_s) / max(after.frames - before.frames, 1),
        loadgen_cpu_us_per_frame=1e6 * (after.loadgen_cpu - before.loadgen_cpu) / frames,
        loadgen_cores=(after.loadgen_cpu - before.loadgen_cpu) / wall,
        frontend_runq_wait_share=(after.frontend_wait - before.frontend_wait) / wall,
        worker_runq_wait_share=(after.worker_wait - before.worker_wait) / wall / daemon.workers,
        stalled_intervals=stalled, sent=report["sent"], answered=report["answered"], shed=report["shed"],
        lost=report["lost"], out_of_order=report["out_of_order"], errors=report["errors"],
        streams_closed=report["streams_closed"], engine_counters=counters)


# ---- (c) idle round trip -----------------------------------------------------------------

@dataclass
class LatencyResult:
    transport: str
    round_trips: int
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float
    frames_sent: int
    frames_answered: int


def measure_round_trips(endpoint: str, count: int, warm: int = 50) -> LatencyResult:
    pcm = (300 * np.random.default_rng(2).standard_normal(FRAME)).astype(np.int16)
    times = np.empty(count, np.float64)
    answered = 0
    with Client(endpoint, timeout=10) as client:
        stream = client.open_stream(sample_rate=RATE)
        for _ in range(warm):
            stream.send(pcm)
        for i in range(count):
            started = time.perf_counter_ns()
            answered += len(stream.send(pcm))
            times[i] = time.perf_counter_ns() - started
        stream.close()
    us = times / 1000
    return LatencyResult(endpoint.split("://")[0], count, float(np.percentile(us, 50)), float(np.percentile(us, 99)),
                         float(us.mean()), float(us.max()), count, answered)


# ---- the whole run -----------------------------------------------------------------------

def _median(values: list[float]) -> float:
    return float(np.median(values))


def summarize(raws: list[RawResult], engines: list[EngineResult]) -> dict[str, Any]:
    """Medians over the rounds; sums for the integrity counts."""
    eng: dict[str, Any] = {key: _median([getattr(e, key) for e in engines]) for key in (
        "frames_per_s", "avg_batch", "frontend_cpu_us_per_frame", "frontend_loop_us_per_frame", "frontend_cores",
        "worker_cpu_us_per_frame", "worker_compute_us_per_frame", "loadgen_cpu_us_per_frame", "loadgen_cores",
        "frontend_runq_wait_share", "worker_runq_wait_share")}
    ratios = [e.frames_per_s / r.frames_per_s for r, e in zip(raws, engines)]
    model = _median([r.cpu_us_per_frame for r in raws])
    errors: Counter[str] = Counter()
    for e in engines:
        errors.update(e.errors)
    counters = engines[-1].engine_counters  # the daemon's counters are cumulative
    return eng | {
        "workers": engines[0].workers, "streams": engines[0].streams, "window": engines[0].window,
        "rounds": len(engines), "raw_batch": raws[0].batch,
        "raw_frames_per_s": _median([r.frames_per_s for r in raws]),
        "raw_runq_wait_share": _median([r.runq_wait_share for r in raws]),
        "ratio": _median(ratios), "ratios": ratios,
        "model_us_per_frame": model, "model_wall_us_per_frame": _median([r.wall_us_per_frame for r in raws]),
        "frontend_over_model": eng["frontend_cpu_us_per_frame"] / model,
        "sent": sum(e.sent for e in engines), "answered": sum(e.answered for e in engines),
        "shed": sum(e.shed for e in engines),
        "lost": sum(e.lost for e in engines), "out_of_order": sum(e.out_of_order for e in engines),
        "errors": dict(errors), "stalled_intervals": sum(e.stalled_intervals for e in engines),
        "streams_opened": sum(e.streams for e in engines), "streams_closed": sum(e.streams_closed for e in engines),
        "engine_problems": {k: v for k, v in counters.items() if v and (
            k.startswith(("errors_", "replies_dropped", "frames_refused", "duplicate")) or k == "worker_restarts")},
    }


def run_bench(sizes: Sizes, progress: bool = False) -> dict[str, Any]:
    def say(text: str) -> None:
        if progress:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "sizes": asdict(sizes),
        "machine": {"source": source_version(), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                    "zmq": zmq.zmq_version()},
        "saturation": [], "latency": []}
    for workers in sizes.workers:
        streams = sizes.streams_per_worker * workers
        raws: list[RawResult] = []
        engines: list[EngineResult] = []
        with EngineDaemon(workers) as daemon:
            for round_ in range(1, sizes.rounds + 1):
                say(f"W={workers} round {round_}/{sizes.rounds}: raw onnxruntime, B={sizes.raw_batch}, "
                    f"{sizes.raw_s:g} s")
                raws.append(measure_raw(workers, sizes.raw_batch, sizes.raw_s, warm_s=min(1.0, sizes.raw_s / 4)))
                say(f"W={workers} round {round_}/{sizes.rounds}: engine, {streams} streams x {sizes.window} "
                    f"in flight, {sizes.load_s:g} s")
                engines.append(measure_engine(daemon, streams, sizes.window, sizes.warmup_s, sizes.load_s))
            if workers == sizes.workers[0]:
                for endpoint in (daemon.ipc, daemon.tcp):
                    say(f"idle round trips over {endpoint}")
                    report["latency"].append(asdict(measure_round_trips(endpoint, sizes.round_trips)))
                    daemon.check_alive()
        report["saturation"].append({"summary": summarize(raws, engines), "raw_rounds": [asdict(r) for r in raws],
                                     "engine_rounds": [asdict(e) for e in engines],
                                     "daemon_args": list(daemon.extra_args)})
    report["machine"]["loadavg_after"] = os.getloadavg()
    return report


def format_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    rows = [run["summary"] for run in report["saturation"]]
    lines = [f"ringserve engine bench at {m['source']}: {m['cpus']} CPUs, onnxruntime {m['onnxruntime']}, "
             f"libzmq {m['zmq']}, load avg {m['loadavg_before'][0]:.2f} -> {m['loadavg_after'][0]:.2f}; "
             "medians over rounds", "",
             "(a) saturation, frames/s (512-sample frames, one per message)",
             f"  {'W':>2} {'raw':>7} {'engine':>7} {'engine/raw':>10} {'per round':>20} {'avg batch':>9} "
             f"{'raw B':>5} {'streams x window':>16}"]
    for r in rows:
        per_round = " ".join(f"{100 * x:.0f}" for x in r["ratios"])
        lines.append(f"  {r['workers']:>2} {r['raw_frames_per_s']:>7.0f} {r['frames_per_s']:>7.0f} "
                     f"{100 * r['ratio']:>9.1f}% {per_round:>19}% {r['avg_batch']:>9.1f} {r['raw_batch']:>5} "
                     f"{r['streams']:>7} x {r['window']:<6}")
    lines += ["", "(b) CPU per served frame, us (cores = CPU s per wall s)",
              f"  {'W':>2} {'front-end':>9} {'loop':>5} {'zmq io':>6} {'cores':>5} {'model':>6} {'fe/model':>8} "
              f"{'workers':>7} {'compute':>7} {'load-gen':>8} {'cores':>5} | {'waiting for a CPU: raw':>22} "
              f"{'workers':>7} {'front-end':>9}"]
    for r in rows:
        zmq_io = r["frontend_cpu_us_per_frame"] - r["frontend_loop_us_per_frame"]
        lines.append(f"  {r['workers']:>2} {r['frontend_cpu_us_per_frame']:>9.1f} "
                     f"{r['frontend_loop_us_per_frame']:>5.1f} {zmq_io:>6.1f} {r['frontend_cores']:>5.2f} "
                     f"{r['model_us_per_frame']:>6.1f} {r['frontend_over_model']:>8.2f} "
                     f"{r['worker_cpu_us_per_frame']:>7.1f} {r['worker_compute_us_per_frame']:>7.1f} "
                     f"{r['loadgen_cpu_us_per_frame']:>8.1f} {r['loadgen_cores']:>5.2f} | "
                     f"{100 * r['raw_runq_wait_share']:>21.0f}% {100 * r['worker_runq_wait_share']:>6.0f}% "
                     f"{100 * r['frontend_runq_wait_share']:>8.0f}%")
    lines += ["  front-end: the daemon's main process = loop (main thread: poll loop, protocol, shm rings)",
              "    + zmq io (its other threads); model: raw in-process CPU per frame at batch B;",
              "  workers: CPU of all workers; compute: the workers' own wall-clock timing of their batches;",
              "  waiting for a CPU: share of wall time runnable but not running (/proc/PID/schedstat)"]
    lines += ["", "(c) idle round trip, one stream, sync Client, us",
              f"  {'transport':>9} {'trips':>6} {'p50':>7} {'p99':>7} {'mean':>7} {'max':>7}"]
    for lat in report["latency"]:
        lines.append(f"  {lat['transport']:>9} {lat['round_trips']:>6} {lat['p50_us']:>7.0f} {lat['p99_us']:>7.0f} "
                     f"{lat['mean_us']:>7.0f} {lat['max_us']:>7.0f}")
    lines += ["", "integrity (all rounds)"]
    for r in rows:
        lines.append(f"  W={r['workers']}: frames sent {r['sent']}, answered {r['answered']} (shed {r['shed']}), "
                     f"lost {r['lost']}, out of order {r['out_of_order']}, errors {r['errors'] or 0}, "
                     f"stalled 0.5 s intervals {r['stalled_intervals']}, "
                     f"streams closed {r['streams_closed']}/{r['streams_opened']}, "
                     f"engine counters {r['engine_problems'] or 'clean'}")
    for lat in report["latency"]:
        lines.append(f"  {lat['transport']}: frames sent {lat['frames_sent']}, answered {lat['frames_answered']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 60 s)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts to measure (default 1 2)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.workers:
        sizes = replace(sizes, workers=tuple(args.workers))

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwind through every finally: daemons and helpers stop

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    try:
        report = run_bench(sizes, progress=True)
    except BenchError as exc:
        print(f"engine bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every daemon started was stopped", file=sys.stderr)
        return 130
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
