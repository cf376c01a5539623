"""The `ringserve tune` command line (and `python -m bench.tune`)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from types import FrameType
from typing import Any

import bench.tune as package
from bench.tune.measure import EngineMeasure, bench_api
from bench.tune.model import Knobs, MeasureFn, Measurement
from bench.tune.output import plot_capacity, result_json
from bench.tune.report import Progress, format_report
from bench.tune.search import Tuner, make_plan
from bench.tune.tuned_file import carried_settings, tune_meta, tuned_toml

TUNE_HELP = package.__doc__


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="find the best engine configuration for this machine",
                       description=TUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-ms", type=float, default=32.0,
                   help="p99 result latency a stream may see and still count as real time (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="fewer knobs and evaluations, the bench's quick capacity search: < 3 min on 2 cores")
    p.add_argument("--out", default="ringserve.toml", metavar="FILE.toml",
                   help="where to write the chosen configuration (default %(default)s); '-' writes nothing")
    p.add_argument("--shape", choices=("device", "gateway"), default="device",
                   help="traffic shape the capacity is measured with (default %(default)s)")
    p.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also plot capacity against worker count (needs matplotlib: "
                   "the bench extra)")
    p.add_argument("--max-evals", type=int, metavar="N",
                   help="exploration evaluations before the final re-measure (default: quick 5, full 13 on 2 cores)")
    p.add_argument("--minutes", type=float, metavar="M",
                   help="time budget: stop exploring early enough that the final re-measure fits "
                        "(default: quick 2.67, full none)")
    p.add_argument("--audio-dir", metavar="DIR", help="audio the replay bench streams (default: its own)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    if args.budget_ms <= 0:
        print("ringserve tune: --budget-ms must be positive", file=sys.stderr)
        return 2
    if args.max_evals is not None and args.max_evals < 1:
        print("ringserve tune: --max-evals must be at least 1", file=sys.stderr)
        return 2
    if args.minutes is not None and args.minutes <= 0:
        print("ringserve tune: --minutes must be positive", file=sys.stderr)
        return 2
    if args.plot:  # now, not after minutes of tuning
        from bench.report import require_matplotlib

        require_matplotlib("tune")
    try:
        api = bench_api()
    except ImportError as exc:
        print(f"ringserve tune: the replay bench is not available ({exc})", file=sys.stderr)
        return 1
    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwind through every finally: daemons and load generators stop

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    progress = Progress()
    try:
        with EngineMeasure(api, shape=args.shape, budget_ms=args.budget_ms, quick=args.quick,
                           audio_dir=args.audio_dir, on_point=progress.detail) as measure:
            return run_tune(args, measure, api.source, progress=progress)
    except KeyboardInterrupt:
        print("ringserve tune: interrupted; every daemon started was stopped; nothing written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_tune(args: argparse.Namespace, measure: MeasureFn, source: str, *, cores: int | None = None,
             default: Knobs | None = None, progress: Progress | None = None) -> int:
    """Search, report, write: everything `ringserve tune` does after choosing how to measure."""
    from engine.config import ConfigError

    keep: dict[str, Any] = {}
    if args.out != "-":
        try:
            keep = carried_settings(args.out)
        except ConfigError as exc:
            print(f"ringserve tune: will not overwrite {args.out}: {exc}", file=sys.stderr)
            return 2
    cores = cores or os.cpu_count() or 1
    plan = make_plan(cores, args.quick, args.max_evals, getattr(args, "minutes", None))
    loadavg_before = os.getloadavg()
    with progress or Progress() as shown:
        def measure_with_progress(knobs: Knobs, phase: str) -> Measurement:
            shown.begin(knobs, phase)
            return measure(knobs, phase)

        shown.note(f"tuning on {cores} cores, load average {loadavg_before[0]:.2f}; "
                   f"{'quick' if plan.quick else 'full'}: up to {plan.max_evals} configurations, then "
                   f"{plan.final_rounds} interleaved final round(s); shape {args.shape}, "
                   f"p99 budget {args.budget_ms:g} ms; measuring with {source}")
        result = Tuner(measure_with_progress, cores, plan, on_result=shown.done, default=default).run()
    loadavg = os.getloadavg()
    print(format_report(result, budget_ms=args.budget_ms, shape=args.shape, loadavg=loadavg,
                        loadavg_before=loadavg_before))
    if result.final_score(result.recommended)[0] <= 0:
        print("ringserve tune: no configuration was measured successfully; nothing written", file=sys.stderr)
        return 1
    meta = tune_meta(result, budget_ms=args.budget_ms, shape=args.shape, quick=args.quick, source=source,
                     loadavg=loadavg)
    if args.out != "-":
        with open(args.out, "w") as fh:
            fh.write(tuned_toml(result.recommended, meta, keep))
        print(f"wrote {args.out}: `ringserve serve --config {args.out}` (or `--workers auto` from this directory)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result_json(result, meta), fh, indent=2)
    if args.plot:
        plot_capacity(result, args.plot, budget_ms=args.budget_ms)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune")
    sub = parser.add_subparsers(dest="command", required=True)
    add_tune_parser(sub)
    args = parser.parse_args(["tune", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result
