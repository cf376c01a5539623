"""The tuned file: a TOML `[serve]` table that `ringserve serve` reads, and `[tune]` metadata."""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from bench.tune.model import TUNED_KEYS, Knobs, diagnose
from bench.tune.search import TuneResult


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is JSON-compatible for what we write
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "nan"
    return str(value)


def tuned_toml(knobs: Knobs, meta: dict[str, Any], keep: dict[str, Any] | None = None) -> str:
    """A `[serve]` table (workers, every tuned key that differs from the defaults, and the
    settings ``keep`` carries over from an existing file) and a `[tune]` table of metadata."""
    serve = {**(keep or {}), "workers": knobs.workers, **knobs.changes()}
    lines = ["# Written by `ringserve tune`. `ringserve serve --config THIS_FILE` reads [serve] (flags and",
             "# RINGSERVE_* variables override it); `ringserve serve --workers auto` takes its workers from",
             "# ./ringserve.toml or $RINGSERVE_TUNED. [tune] records what was measured; serve ignores it.",
             "", "[serve]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in serve.items()]
    lines += ["", "[tune]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in meta.items() if value is not None]
    return "\n".join(lines) + "\n"


def carried_settings(path: str) -> dict[str, Any]:
    """Settings of an existing file at ``path`` that the tuner does not own (bind, http, ...)."""
    from engine.settings import read_file

    if not os.path.isfile(path):
        return {}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in read_file(path).items()
            if key not in TUNED_KEYS}


def tune_meta(result: TuneResult, *, budget_ms: float, shape: str, quick: bool, source: str,
              loadavg: Sequence[float]) -> dict[str, Any]:
    import onnxruntime

    try:
        from bench.procinfo import source_version
    except ImportError:  # before the bench helpers were split out of engine_bench
        from bench.engine_bench import source_version

    best, default = result.final_score(result.recommended), result.final_score(result.default)
    rec = [m for m in result.final.get(result.recommended, []) if m.diag is not None]
    limit = diagnose(rec[0], result.cores)[0] if rec else "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine_cores": result.cores,
        "onnxruntime": onnxruntime.__version__,
        "ringserve_source": source_version(),
        "bench": source,
        "shape": shape,
        "budget_ms": float(budget_ms),
        "quick": quick,
        "capacity_streams": round(best[0], 1),
        "saturation_fps": round(best[1], 1),
        "default_capacity_streams": round(default[0], 1),
        "limited_by": limit,
        "run_to_run_spread": None if result.spread() is None else round(result.spread() or 0.0, 3),
        "configurations_tried": len(result.explored),
        "measurements": len(result.measurements),
        "load_average": [round(x, 2) for x in loadavg],
    }
