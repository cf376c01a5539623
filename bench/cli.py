"""`ringserve bench`: how many real-time microphones does a box hold?

The command line of bench/replay.py (whose docstring is the Python API): its arguments here,
the run in bench/cli_run.py, what is measured per target in bench/cli_measure.py, the summary
and output files in bench/cli_summary.py. See docs/benchmarks.md for what each figure means
and how to run it against a remote daemon.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from bench.sigterm import unwind_on_sigterm

BENCH_HELP = """\
Replay N live microphones (WAV files, looped, each stream from its own offset and phase) to
a ringserve daemon and measure latency, loss and throughput; sweep N or search for the
largest N that stays real-time (p99 <= budget, nothing lost, >= 98 % of the needed frames/s);
compare with the raw onnxruntime ceiling and a conventional per-frame server in the same run.

examples:
  ringserve bench --spawn-engine --workers 2 --find-capacity --shape device,gateway \\
      --baseline raw,per-frame --json out.json --csv out.csv --plot out.png
  ringserve bench --spawn-engine --workers 2 --find-capacity --shape device --baseline raw,per-frame \\
      --repeat 3       # the median of three interleaved searches, and their range
  ringserve bench --endpoint tcp://10.0.0.5:5555 --curve server.key bench.key_secret --sweep 50,100,200
  ringserve bench --spawn-engine --workers 2 --streams 300 --soak 30m
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 50,100,200") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: stream counts must be positive")
    return values


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v for v in text.replace(" ", "").split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)} (comma-separated)")
        return values
    return parse


def _load_procs(text: str) -> int | None:
    if text == "auto":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("--load-procs must be auto or a positive integer")
    return value


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="multi-microphone replay bench: real-time capacity, latency, baselines",
                       description=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("target")
    where = t.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="a running daemon's ZeroMQ endpoint (tcp://HOST:PORT or ipc:///path)")
    where.add_argument("--spawn-engine", action="store_true", help="start a daemon for the run and stop it after")
    t.add_argument("--workers", type=int, help="spawned engine: worker processes (default: the CPU count); "
                   "also the raw baseline's process count (default for --endpoint: the daemon's worker count)")
    t.add_argument("--serve-args", default="", metavar="'ARGS'",
                   help="spawned engine: more `ringserve serve` flags, e.g. '--max-batch 256 --shed-after-ms 0'")
    t.add_argument("--transport", choices=("tcp", "ipc"), default="tcp",
                   help="spawned engine: connect over loopback TCP (default, the path devices take) or ipc")
    t.add_argument("--curve", nargs=2, metavar=("SERVER_KEY", "CLIENT_SECRET"),
                   help="ZeroMQ CURVE for a daemon that requires it: the server's public .key and a client "
                   ".key_secret allowed by it (ringserve keys generate)")
    load = p.add_argument_group("load")
    load.add_argument("--audio", type=Path, metavar="DIR", help="directory of WAV files (default: the bench "
                      "corpus, ../shared/audio/corpus or one generated with espeak-ng)")
    load.add_argument("--shape", type=_choices(("device", "gateway")), default=["device"],
                      help="device: one connection per stream, one chunk per message (default); gateway: one "
                      "connection per load process carrying all its streams, one message per tick; "
                      "'device,gateway' measures both")
    load.add_argument("--pace", choices=("realtime", "max"), default="realtime",
                      help="realtime: absolute 32 ms schedule per stream (default); max: closed loop, --window "
                      "chunks in flight per stream")
    load.add_argument("--chunk-ms", type=int, default=32, help="audio per message, a multiple of 32 (default 32)")
    load.add_argument("--tick-ms", type=float, default=4.0, help="gateway shape: one message per tick (default 4)")
    load.add_argument("--window", type=int, default=2, help="max pace: chunks in flight per stream (default 2)")
    load.add_argument("--load-procs", type=_load_procs, default=None, metavar="auto|K",
                      help="load-generator processes (default auto: ~768 device streams per process, at most "
                      "one per CPU; gateway: one process per gateway connection, each holding up to the "
                      "engine's max_streams_per_connection)")
    load.add_argument("--link", "--device-link", dest="link", choices=("zmtp", "libzmq"), default="zmtp",
                      help="how the load processes hold their connections (one per stream, or a gateway's one); "
                      "zmtp: plain sockets speaking ZeroMQ's wire protocol, one send and one recv per message, "
                      "as a device's firmware would (default); libzmq: a pyzmq DEALER each, which costs the "
                      "load processes about 1.7x the CPU per frame in the device shape (--curve always uses "
                      "libzmq)")
    load.add_argument("--nice", type=int, default=0, metavar="N",
                      help="run every process the bench starts (spawned engine, baselines, load processes) at "
                      "niceness N, and, where the kernel groups processes by session (autogroup), this session's "
                      "group too (restored afterwards); a negative N (needs privileges) favours them over other "
                      "tenants of a shared machine, all alike (default 0)")
    load.add_argument("--budget-ms", type=float, default=32.0, help="latency budget for p99 (default 32)")
    load.add_argument("--timeout-ms", type=float, default=2000.0,
                      help="a chunk without a reply for this long is lost (timed out; default 2000)")
    hold = p.add_argument_group("holding a point")
    hold.add_argument("--window-s", type=float, help="measurement window (default 2; quick 1)")
    hold.add_argument("--warmup-s", type=float, help="not measured at the start of a point (default 2)")
    hold.add_argument("--stable-windows", type=int, help="windows that must agree within 10 %% (default 3)")
    hold.add_argument("--max-point-s", type=float, help="most measuring per point (default 24)")
    hold.add_argument("--quick", action="store_true", help="short windows, coarse capacity search (smoke runs)")
    what = p.add_argument_group("what to measure")
    mode = what.add_mutually_exclusive_group()
    mode.add_argument("--streams", type=int, metavar="N", help="one point with N streams (with --soak: the "
                      "capacity the soak load is a share of)")
    mode.add_argument("--sweep", type=_int_list, metavar="N1,N2,...", help="one point per N")
    mode.add_argument("--find-capacity", action="store_true",
                      help="search the largest N that stays real-time (doubling, then bisection)")
    what.add_argument("--max-streams", type=int, help="capacity search: stop growing at this N (default 4096)")
    what.add_argument("--start-streams", type=int, help="capacity search: first N (default 16; quick 32)")
    what.add_argument("--repeat", type=int, default=1, metavar="K",
                      help="capacity search: run every target's search K times, interleaved (each round searches "
                      "every shape and the per-frame baseline, the raw baseline runs between rounds); each "
                      "target's capacity is the median of its K (the lower one of the middle two when K is even), "
                      "the ratios and targets are taken from the medians, and the report gives every search and "
                      "each round's ratios: one search on a noisy host can move by a fifth (default 1)")
    what.add_argument("--saturation", type=int, default=0, metavar="N",
                      help="also measure closed-loop throughput (--pace max, --window chunks in flight) with N "
                      "streams per server and shape: the saturation frames/s, insensitive to latency noise")
    what.add_argument("--no-profile", action="store_true",
                      help="after --find-capacity, skip the latency points at 10 %% and 80 %% of capacity")
    what.add_argument("--baseline", type=_choices(("raw", "per-frame")), action="append", default=[],
                      help="raw: in-process onnxruntime ceiling (measured before and after); per-frame: the "
                      "conventional one-thread-per-connection server, same load and search (comma-separated)")
    what.add_argument("--raw-seconds", type=float, default=5.0, help="raw baseline duration per run (default 5)")
    what.add_argument("--raw-batch", type=_int_list, default=[64, 256], metavar="B1,B2",
                      help="raw baseline batch sizes; the best frames/s of each run is the ceiling (default 64,256)")
    what.add_argument("--per-frame-threads", type=int, default=1,
                      help="per-frame baseline: onnxruntime intra-op threads of its one session (default 1)")
    what.add_argument("--per-frame-endpoint", metavar="tcp://HOST:PORT",
                      help="per-frame baseline: drive this running server (python -m bench.per_frame_server, "
                      "e.g. on a remote engine's machine) instead of starting one here")
    what.add_argument("--soak", metavar="DURATION", help="hold 80 %% of a capacity (--streams, else found first) "
                      "for DURATION (e.g. 30m) and watch engine RSS")
    what.add_argument("--soak-load", type=float, default=0.8, help="soak: share of the capacity held (default 0.8)")
    what.add_argument("--soak-window-s", type=float, default=10.0, help="soak: RSS sample period (default 10)")
    noise = p.add_argument_group("a shared, noisy machine")
    noise.add_argument("--quiet-gate", type=float, default=0.0, metavar="PCT",
                       help="measure only while other tenants' CPU + hypervisor steal is at most PCT %% of one core "
                       "(waiting before each point and raw run), and measure a failed point again (twice at most) "
                       "when they took more during it; 0: off (default)")
    noise.add_argument("--quiet-wait-s", type=float, default=300.0,
                       help="longest wait for a quiet machine before measuring anyway (default 300)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    out.add_argument("--csv", metavar="FILE", help="write one row per point")
    out.add_argument("--plot", metavar="FILE.png", help="latency percentiles and throughput vs N; with --soak, each "
                     "process's RSS and each window's latency over time (needs matplotlib: the bench extra)")
    out.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_bench)


def _check_args(args: argparse.Namespace) -> str | None:
    if args.chunk_ms < 32 or args.chunk_ms % 32:
        return "--chunk-ms must be a positive multiple of 32 (whole 512-sample frames)"
    if not (args.streams or args.sweep or args.find_capacity or args.soak or args.saturation):
        return ("say what to measure: --streams N, --sweep N1,N2,..., --find-capacity, --saturation N "
                "or --soak DURATION")
    if args.soak and args.sweep:
        return "--soak holds one load: give the capacity with --streams N or let --find-capacity find it"
    if args.workers is not None and args.workers < 1:
        return "--workers must be at least 1"
    if args.repeat < 1:
        return "--repeat must be at least 1"
    if args.repeat > 1 and not args.find_capacity:
        return "--repeat repeats capacity searches: add --find-capacity"
    if args.pace == "max" and args.find_capacity:
        return "--find-capacity searches real-time capacity: use --pace realtime (and --saturation N for throughput)"
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    problem = _check_args(args)
    if problem:
        print(f"ringserve bench: {problem}", file=sys.stderr)
        return 2
    if args.plot:
        from bench.report import require_matplotlib

        require_matplotlib()
    unwind_on_sigterm()
    from bench.cli_run import run
    from bench.daemon import BenchError

    try:
        report = run(args)
    except BenchError as exc:
        print(f"ringserve bench failed: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"ringserve bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ringserve bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    return 0 if report.get("ok", True) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
