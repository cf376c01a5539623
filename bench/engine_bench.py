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
import os
import platform
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import onnxruntime
import zmq

from bench.daemon import BenchError, EngineDaemon, free_tcp_port, no_shedding_args
from bench.engine_load import FRAME, RATE
from bench.engine_saturation import EngineResult, measure_engine
from bench.procinfo import cpu_seconds, runq_wait_seconds, source_version
from bench.raw import RawResult, measure_raw
from bench.sigterm import unwind_on_sigterm
from clients.client import Client
from engine.models.silero import CONTEXT_SAMPLES, default_model_path

WIDTH = FRAME + CONTEXT_SAMPLES[RATE]
# The saturation measurement lives in bench/engine_saturation.py, its load generator in
# bench/engine_load.py; these names stay importable from here.
__all__ = ["BenchError", "EngineDaemon", "EngineResult", "RawResult", "cpu_seconds", "default_model_path",
           "free_tcp_port", "measure_engine", "measure_raw", "no_shedding_args", "runq_wait_seconds",
           "source_version"]


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
    unwind_on_sigterm()
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
