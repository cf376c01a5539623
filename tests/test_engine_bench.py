"""Smoke test of bench/engine_bench.py at tiny sizes: every number present and positive, no
frame lost. No timing assertions: the machine is shared and noisy."""

from __future__ import annotations

import json
import math

import pytest

from bench import engine_bench as eb

TINY = eb.Sizes(workers=(1,), raw_batch=16, raw_s=0.3, streams_per_worker=8, window=2, warmup_s=0.3,
                load_s=0.7, round_trips=20, rounds=1)


@pytest.fixture(scope="module")
def report() -> dict[str, object]:
    try:
        eb.default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return eb.run_bench(TINY)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_saturation_numbers_present_and_frames_all_answered(report: dict[str, object]) -> None:
    runs = report["saturation"]
    assert isinstance(runs, list) and len(runs) == 1
    summary = runs[0]["summary"]
    for key in ("raw_frames_per_s", "frames_per_s", "ratio", "avg_batch", "model_us_per_frame",
                "model_wall_us_per_frame", "frontend_cpu_us_per_frame", "worker_cpu_us_per_frame",
                "worker_compute_us_per_frame", "loadgen_cpu_us_per_frame"):
        assert _positive(summary[key]), (key, summary[key])
    assert summary["workers"] == 1 and summary["streams"] == 8
    assert summary["sent"] > 0 and summary["shed"] >= 0
    assert summary["sent"] == summary["answered"]
    assert summary["lost"] == 0 and summary["out_of_order"] == 0 and summary["errors"] == {}
    assert summary["streams_closed"] == summary["streams_opened"] == 8


def test_round_trips_present_and_answered(report: dict[str, object]) -> None:
    latency = report["latency"]
    assert isinstance(latency, list)
    assert [lat["transport"] for lat in latency] == ["ipc", "tcp"]
    for lat in latency:
        assert _positive(lat["p50_us"]) and _positive(lat["p99_us"]) and lat["p99_us"] >= lat["p50_us"]
        assert lat["frames_sent"] == lat["frames_answered"] == TINY.round_trips


def test_table_and_json(report: dict[str, object]) -> None:
    table = eb.format_table(report)
    for heading in ("(a) saturation", "(b) CPU per served frame", "(c) idle round trip", "integrity"):
        assert heading in table
    json.dumps(report)  # the --json output is plain JSON


def test_cpu_seconds_reads_proc() -> None:
    import os

    assert eb.cpu_seconds(os.getpid()) > 0
