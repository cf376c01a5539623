"""`ringserve tune`: find the engine configuration that serves the most real-time streams here.

    ringserve tune [--budget-ms 32] [--quick] [--out ringserve.toml] [--shape device|gateway]
                   [--json FILE] [--plot FILE.png] [--max-evals N]

Every configuration tried is a real daemon (``spawn_engine``) measured by the replay bench
(``find_capacity``): its real-time capacity (the most live streams whose p99 result latency
stays within the budget) and its saturation throughput. While the bench drives it, a sampler
reads the engine's STATS and /proc every 0.5 s; the busiest 2 s window says what limits the
configuration (cores, the front-end, the model, or the latency budget).

The search, driven by one measurement function (so the tests can drive it over a known
landscape):

1. workers, the dominant knob, coarse to fine over 1 .. cores+1: a coarse grid (1, cores,
   cores+1 and a few between), then the midpoints around the best until its neighbours are
   measured. On a 2-core machine that is simply 1, 2 and 3.
2. hill climbing from the best worker count over the other ServeConfig knobs that move
   throughput or latency (max_batch, batch_delay_us, busy_batch_delay_us, spin_us, intra_op_threads, then workers
   again): one grid step at a time, keep going while it improves by more than the noise
   margin, until a pass moves nothing or the evaluation budget is spent.
3. a same-run final: the best two, the default and the worst configuration are measured
   again, interleaved (A B D W, then W D B A, ...), so that drift on a shared machine hits
   them all alike; the recommendation is the best of that final comparison.

The chosen configuration is written as TOML: a ``[serve]`` table (workers plus every key that
differs from the defaults) that ``ringserve serve --config FILE`` reads, and a ``[tune]``
table with what was measured, which ``serve`` ignores. ``ringserve serve --workers auto`` takes
``workers`` from ``./ringserve.toml`` (or ``$RINGSERVE_TUNED``).
"""

from __future__ import annotations

# The docstring above is also `ringserve tune --help`. Everything callers and tests use is
# re-exported, so `bench.tune.NAME` stays the one import path.
from bench.tune.cli import TUNE_HELP, add_tune_parser, cmd_tune, main, run_tune
from bench.tune.measure import BenchApi, EngineMeasure, bench_api
from bench.tune.model import (
    TUNED_KEYS,
    Diagnostics,
    Knobs,
    MeasureFn,
    Measurement,
    diagnose,
    knob_grid,
)
from bench.tune.output import plot_capacity, result_json
from bench.tune.report import Progress, describe, format_report
from bench.tune.sampler import StatsSampler, busiest_window, request_stats
from bench.tune.search import Plan, Tuner, TuneResult, make_plan
from bench.tune.tuned_file import carried_settings, tune_meta, tuned_toml

__all__ = [
    "TUNED_KEYS", "TUNE_HELP", "BenchApi", "Diagnostics", "EngineMeasure", "Knobs",
    "MeasureFn", "Measurement", "Plan", "Progress", "StatsSampler", "TuneResult", "Tuner", "add_tune_parser",
    "bench_api", "busiest_window", "carried_settings", "cmd_tune", "describe", "diagnose", "format_report", "knob_grid",
    "main", "make_plan", "plot_capacity", "request_stats", "result_json", "run_tune", "tune_meta", "tuned_toml",
]
