"""`ringserve tune`: the search, the tuned file, and `serve --config` / `serve --workers auto`.

The search tests drive :class:`bench.tune.Tuner` with a deterministic measurement function
over a known landscape (capacity as a function of the knobs). That tests the search
algorithm itself -- what it visits, its budget, its same-run final -- and is not a mock of the
engine: the real measurement (a real daemon per configuration, measured by the replay bench)
is exercised by `ringserve tune --quick` (see docs/benchmarks.md, "Tuning"). The file tests
use the real `ringserve serve` command line and a real daemon.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import tune as T
from tests.conftest import REPO

DEFAULT_DELAY_US = T.Knobs.default().batch_delay_us
DEFAULT = T.Knobs(workers=2, intra_op_threads=1, max_batch=512, batch_delay_us=DEFAULT_DELAY_US, spin_us=50)
PEAK = T.Knobs(workers=3, intra_op_threads=1, max_batch=128, batch_delay_us=DEFAULT_DELAY_US, spin_us=200)


def landscape(peak: T.Knobs) -> Callable[[T.Knobs], float]:
    """A known capacity landscape with one peak: every step away from it costs streams."""
    grid = T.knob_grid(4, DEFAULT)

    def capacity(k: T.Knobs) -> float:
        steps = {key: abs(grid[key].index(getattr(k, key)) - grid[key].index(getattr(peak, key)))
                 if key != "workers" else abs(k.workers - peak.workers) for key in T.TUNED_KEYS}
        return (400 - 40 * steps["workers"] - 12 * steps["max_batch"] - 8 * steps["spin_us"]
                - 10 * steps["batch_delay_us"] - 30 * steps["intra_op_threads"])

    return capacity


class Landscape:
    """A deterministic measurement function: capacity from the landscape, a clock that advances
    ``eval_s`` per evaluation, and an optional one-off bias (a lucky measurement)."""

    def __init__(self, capacity: Callable[[T.Knobs], float], eval_s: float = 10.0,
                 lucky: dict[T.Knobs, float] | None = None) -> None:
        self.capacity = capacity
        self.eval_s = eval_s
        self.now = 0.0
        self.calls: list[tuple[T.Knobs, str]] = []
        self.lucky = dict(lucky or {})

    def clock(self) -> float:
        return self.now

    def __call__(self, knobs: T.Knobs, phase: str) -> T.Measurement:
        self.now += self.eval_s
        self.calls.append((knobs, phase))
        cap = self.capacity(knobs) + (self.lucky.pop(knobs, 0.0) if phase != "final" else 0.0)
        return T.Measurement(knobs, phase, int(cap), 31.25 * cap, p99_ms=20.0, seconds=self.eval_s)


def run(measure: Landscape, cores: int, plan: T.Plan, default: T.Knobs = DEFAULT) -> T.TuneResult:
    return T.Tuner(measure, cores, plan, clock=measure.clock, default=default).run()


# ---- the search -----------------------------------------------------------------------

def test_full_search_sweeps_workers_then_climbs_to_the_peak_then_remeasures_interleaved() -> None:
    measure = Landscape(landscape(PEAK))
    plan = T.make_plan(2, quick=False)
    result = run(measure, 2, plan)

    explored = [k for k, phase in measure.calls if phase != "final"]
    assert len(explored) == len(set(explored)) <= plan.max_evals  # never measures a configuration twice
    # 1. workers first, coarse to fine: on 2 cores that is 1..3 with every other knob at its default
    assert [k for k, phase in measure.calls if phase == "workers"] == [replace(DEFAULT, workers=w) for w in (2, 1, 3)]
    # 2. then the climb from the best worker count: the first step changes one knob of W=3
    climb = [k for k, phase in measure.calls if phase == "climb"]
    assert climb and climb[0].workers == 3
    assert PEAK in result.explored
    # 3. the same-run final: best, runner-up, default, worst, interleaved A B D W W D B A
    finalists = list(result.final)
    assert finalists[0] == PEAK and finalists[2] == DEFAULT
    assert finalists[3] == result.worst == min(result.explored.values(), key=lambda m: m.score()).knobs
    assert result.final_order == finalists + finalists[::-1]
    assert [k for k, phase in measure.calls if phase == "final"] == result.final_order
    assert measure.calls[-len(result.final_order):] == [(k, "final") for k in result.final_order]
    assert all(len(runs) == plan.final_rounds == 2 for runs in result.final.values())
    assert result.recommended == PEAK


def test_each_climb_move_changes_one_knob_of_the_current_best() -> None:
    measure = Landscape(landscape(PEAK))
    result = run(measure, 2, T.make_plan(2, quick=False))
    best_so_far = max((m for m in result.measurements if m.phase == "workers"), key=lambda m: m.score())
    for m in (m for m in result.measurements if m.phase == "climb"):
        changed = [key for key in T.TUNED_KEYS if getattr(m.knobs, key) != getattr(best_so_far.knobs, key)]
        assert len(changed) == 1, (m.knobs, best_so_far.knobs)
        grid = T.knob_grid(2, DEFAULT)[changed[0]]
        a, b = getattr(m.knobs, changed[0]), getattr(best_so_far.knobs, changed[0])
        assert abs(grid.index(a) - grid.index(b)) == 1  # one grid step
        if m.score() > best_so_far.score():
            best_so_far = m


def test_workers_coarse_to_fine_on_many_cores() -> None:
    """16 cores: a coarse grid over 1..17, then midpoints around the best until its neighbours
    are measured; far fewer than 17 worker counts."""
    peak = replace(PEAK, workers=11)
    measure = Landscape(landscape(peak))
    default = replace(DEFAULT, workers=16)
    plan = replace(T.make_plan(16, quick=False), climb_knobs=())
    result = run(measure, 16, plan, default)
    swept = [k.workers for k, phase in measure.calls if phase == "workers"]
    assert swept[0] == 16  # the default first
    assert {1, 16, 17} <= set(swept[:7])  # coarse grid covers both ends
    assert {10, 11, 12} <= set(swept)  # refined to the peak and both neighbours
    assert len(swept) < 12
    assert result.recommended.workers == 11


def test_quick_mode_stays_within_its_evaluation_and_time_budget() -> None:
    plan = T.make_plan(2, quick=True)
    assert plan.max_evals <= 5 and plan.final_rounds == 1 and len(plan.climb_knobs) < 5
    measure = Landscape(landscape(PEAK), eval_s=10.0)
    result = run(measure, 2, plan)
    explored = [c for c in measure.calls if c[1] != "final"]
    assert len(explored) == plan.max_evals  # cheap evaluations: the evaluation budget binds
    assert {k.max_batch for k, _ in explored} | {k.spin_us for k, _ in explored}  # climbs a quick knob
    assert all(k.intra_op_threads == 1 and k.batch_delay_us == DEFAULT_DELAY_US for k, _ in explored)  # not a quick knob
    assert result.final_order == list(result.final)  # one round, still every finalist measured again
    assert [c for c in measure.calls if c[1] == "final"] == [(k, "final") for k in result.final_order]

    assert "evaluation budget" in result.stopped_by

    slow = Landscape(landscape(PEAK), eval_s=25.0)  # 25 s evaluations: the time budget binds
    result = run(slow, 2, plan)
    assert plan.time_budget_s is not None and slow.now <= plan.time_budget_s <= 180
    assert len([c for c in slow.calls if c[1] != "final"]) < plan.max_evals and "time budget" in result.stopped_by
    # it stopped exploring early to keep room for the final: the top two (W=3, the default W=2)
    assert result.final_order == [replace(DEFAULT, workers=3), DEFAULT]
    assert [c[1] for c in slow.calls].count("final") == len(result.final_order)


def test_the_same_run_final_overrules_a_lucky_first_measurement() -> None:
    """W=1 measures +200 streams once (noise); the final re-measure shows it is not the best."""
    lucky = replace(DEFAULT, workers=1)
    measure = Landscape(landscape(PEAK), lucky={lucky: 200})
    result = run(measure, 2, T.make_plan(2, quick=True))
    assert result.ranked()[0].knobs == lucky  # exploration believed the lucky number
    assert lucky in result.final
    assert result.recommended != lucky
    assert result.final_score(result.recommended) > result.final_score(lucky)


def test_a_win_within_the_run_to_run_spread_keeps_the_default() -> None:
    """Every configuration measures 10 % high the first time and 10 % low the second (spread
    18 %); the best beats the default by 5 %: not a real difference, so the default stays."""
    seen: set[T.Knobs] = set()

    def measure(knobs: T.Knobs, phase: str) -> T.Measurement:
        base = 100.0 if knobs == DEFAULT else 105.0 if knobs == replace(DEFAULT, workers=1) else 60.0
        cap = base * (0.9 if knobs in seen else 1.1)
        seen.add(knobs)
        return T.Measurement(knobs, phase, round(cap), 31.25 * cap)

    result = T.Tuner(measure, 2, T.make_plan(2, quick=True), default=DEFAULT).run()
    assert result.finalists()[0] == replace(DEFAULT, workers=1)
    spread = result.spread()
    assert spread is not None and 0.15 < spread < 0.2
    assert result.recommended == DEFAULT and "keeping the default" in result.note


def test_failed_evaluations_are_never_recommended() -> None:
    base = landscape(PEAK)

    def measure(knobs: T.Knobs, phase: str) -> T.Measurement:
        if knobs.workers == 3:
            return T.Measurement(knobs, phase, 0, 0.0, error="BenchError: daemon did not become ready")
        return T.Measurement(knobs, phase, int(base(knobs)), base(knobs))

    result = T.Tuner(measure, 2, T.make_plan(2, quick=True), default=DEFAULT).run()
    assert result.recommended.workers != 3
    assert result.worst.workers == 3


# ---- report, JSON, plot, file ---------------------------------------------------------

def _args(tmp_path: Path, **extra: object) -> argparse.Namespace:
    values: dict[str, object] = dict(budget_ms=32.0, quick=True, out=str(tmp_path / "ringserve.toml"),
                                     shape="device", json=str(tmp_path / "tune.json"), plot=str(tmp_path / "c.png"),
                                     max_evals=None, audio_dir=None)
    return argparse.Namespace(**(values | extra))


def test_run_tune_writes_report_file_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    progress = io.StringIO()
    (tmp_path / "ringserve.toml").write_text('[serve]\nbind = ["ipc:///tmp/x.sock"]\nworkers = 7\n')
    code = T.run_tune(_args(tmp_path), Landscape(landscape(PEAK)), "landscape", cores=2, default=DEFAULT,
                      progress=T.Progress(progress, live=False))
    assert code == 0
    out = capsys.readouterr().out
    assert "every configuration tried, best first" in out and "same-run final" in out
    assert "recommended: workers=3" in out and "measured in the same run" in out
    lines = progress.getvalue().splitlines()
    assert sum(" workers " in line or " climb " in line or " final " in line for line in lines) >= 8

    data = tomllib.loads((tmp_path / "ringserve.toml").read_text())
    recommended = T.Knobs(**{key: data["serve"].get(key, getattr(DEFAULT, key)) for key in T.TUNED_KEYS})
    assert data["serve"]["workers"] == 3
    assert data["serve"]["bind"] == ["ipc:///tmp/x.sock"]  # the user's own setting is kept
    assert set(data["serve"]) - {"bind"} == {"workers", *recommended.changes()}
    for key in ("date", "machine_cores", "onnxruntime", "budget_ms", "capacity_streams", "shape", "quick"):
        assert key in data["tune"], key
    assert data["tune"]["shape"] == "device" and data["tune"]["budget_ms"] == 32.0

    report = json.loads((tmp_path / "tune.json").read_text())
    assert report["recommended"]["workers"] == 3 and len(report["measurements"]) >= 8
    assert [m["phase"] for m in report["measurements"]][-len(report["final_order"]):] == \
        ["final"] * len(report["final_order"])

    from matplotlib.image import imread

    image = imread(tmp_path / "c.png")
    assert image.shape[:2] == (500, 760)
    rgb = image[..., :3]
    ys, xs = ((rgb[..., 0] > 0.7) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)).nonzero()
    # red twice, apart: the legend entry and the recommendation's own markers
    assert len(xs) >= 40 and max(xs.max() - xs.min(), ys.max() - ys.min()) > 30
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.01  # axes, labels and points were drawn


def test_progress_live_line_on_a_tty_and_one_line_per_result() -> None:
    out = io.StringIO()
    with T.Progress(out, live=True) as progress:
        progress.begin(DEFAULT, "workers")
        progress.detail("32 streams")
        time.sleep(1.6)  # the live line is redrawn every second
        progress.done(T.Measurement(DEFAULT, "workers", 40, 1250.0, p99_ms=12.0, seconds=1.3), 1)
    text = out.getvalue()
    assert re.search(r"\r\033\[K  \.\.\. workers workers=2 \(default\): \d+ s, 32 streams", text), text
    assert " 1 workers workers=2 (default)" in text and "capacity    40 streams" in text


def test_diagnose_names_the_limit() -> None:
    def diag(**kw: Any) -> T.Diagnostics:
        values: dict[str, Any] = dict(window_s=2.0, frames_per_s=5000.0, busy_share=[0.5, 0.5], avg_batch=20.0,
                      queue_ms_per_frame=1.0, compute_us_per_frame=80.0, frontend_cores=0.4, worker_cores=0.6,
                      machine_busy=0.5)
        values.update(kw)
        return T.Diagnostics(**values)

    def limit(d: T.Diagnostics) -> str:
        return T.diagnose(T.Measurement(DEFAULT, "final", 100, 5000.0, diag=d), 2)[0]

    assert limit(diag(frontend_cores=0.97)) == "front-end"
    assert limit(diag(machine_busy=0.95, busy_share=[0.9, 0.9])) == "cores"
    assert limit(diag(busy_share=[0.95], worker_cores=0.95, machine_busy=0.6)) == "model"
    assert limit(diag()) == "latency budget"


# ---- the tuned file in `serve` --------------------------------------------------------

def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RINGSERVE_")}, **extra}


def _serve(*args: str, cwd: Path | str = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", "serve", *args], capture_output=True, text=True,
                          cwd=cwd, env=env or _env(), timeout=60)


TUNED = replace(DEFAULT, workers=1, max_batch=128, spin_us=200)


def _write_tuned(path: Path, knobs: T.Knobs = TUNED) -> Path:
    path.write_text(T.tuned_toml(knobs, {"date": "2025-01-01T00:00:00+00:00", "machine_cores": 2,
                                         "onnxruntime": "1.0", "budget_ms": 32.0, "capacity_streams": 123.0,
                                         "shape": "device"}))
    return path


def test_tuned_file_round_trips_into_print_config(tmp_path: Path) -> None:
    path = _write_tuned(tmp_path / "out.toml")
    serve_table = tomllib.loads(path.read_text())["serve"]
    assert serve_table == {"workers": 1, "max_batch": 128, "spin_us": 200}  # workers + what differs only
    done = _serve("--config", str(path), "--print-config")
    assert done.returncode == 0, done.stderr
    shown = tomllib.loads(done.stdout)["serve"]
    assert (shown["workers"], shown["max_batch"], shown["spin_us"]) == (1, 128, 200)
    assert shown["batch_delay_us"] == DEFAULT_DELAY_US and shown["intra_op_threads"] == 1  # untouched defaults
    assert f"max_batch = 128  # from {path}" in done.stdout
    # flags override the file
    done = _serve("--config", str(path), "--max-batch", "64", "--print-config")
    assert tomllib.loads(done.stdout)["serve"]["max_batch"] == 64 and "max_batch = 64  # from flag" in done.stdout


BAD_TUNED = [
    ("unknown key", "[serve]\nworkers = 2\nmax_bacth = 64\n[tune]\ndate = \"x\"\n", ["unknown key(s) ['max_bacth']"]),
    ("bad value", "[serve]\nworkers = 2\nmax_batch = 0\n[tune]\ndate = \"x\"\n", ["max_batch = 0 is invalid"]),
    ("bad type", "[serve]\nworkers = \"many\"\n[tune]\n", ["key 'workers' must be an integer", "'many'"]),
    ("unknown table", "[serve]\nworkers = 2\n[tuning]\n", ["unknown key(s) ['tuning']"]),
]


@pytest.mark.parametrize("name,text,needles", BAD_TUNED, ids=[b[0] for b in BAD_TUNED])
def test_bad_tuned_file_names_the_bad_key(tmp_path: Path, name: str, text: str, needles: list[str]) -> None:
    path = tmp_path / "ringserve.toml"
    path.write_text(text)
    for args, cwd, env in ((("--config", str(path)), REPO, None),  # --config
                           (("--workers", "auto"), tmp_path, None),  # ./ringserve.toml
                           (("--workers", "auto"), REPO, _env(RINGSERVE_TUNED=str(path)))):  # $RINGSERVE_TUNED
        done = _serve(*args, "--print-config", cwd=cwd, env=env)
        assert done.returncode == 2 and done.stdout == "", (args, done.stdout)
        for needle in needles:
            assert needle in done.stderr, (args, needle, done.stderr)
        assert "Traceback" not in done.stderr


def test_workers_auto_with_and_without_a_tuned_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _serve("--workers", "auto", "--print-config", cwd=empty)
    assert done.returncode == 0, done.stderr
    cpus = os.cpu_count() or 1
    assert f"workers = {cpus}  # from --workers auto: the CPU count ({cpus}): no ./ringserve.toml" in done.stdout

    _write_tuned(tmp_path / "ringserve.toml", replace(TUNED, workers=5))
    done = _serve("--workers", "auto", "--print-config", cwd=tmp_path)
    assert "workers = 5  # from --workers auto: the tuned file ./ringserve.toml" in done.stdout
    # only workers comes from the tuned file with `auto`; --config reads the rest
    assert tomllib.loads(done.stdout)["serve"]["max_batch"] == 512

    other = _write_tuned(tmp_path / "elsewhere.toml", replace(TUNED, workers=4))
    done = _serve("--workers", "auto", "--print-config", cwd=tmp_path, env=_env(RINGSERVE_TUNED=str(other)))
    assert f"workers = 4  # from --workers auto: the tuned file $RINGSERVE_TUNED={other}" in done.stdout

    done = _serve("--workers", "auto", "--print-config", cwd=empty,
                  env=_env(RINGSERVE_TUNED=str(tmp_path / "missing.toml")))
    assert done.returncode == 2 and "$RINGSERVE_TUNED" in done.stderr and "does not exist" in done.stderr

    done = _serve("--workers", "three", "--print-config")
    assert done.returncode == 2 and "must be an integer or 'auto'" in done.stderr


class _Daemon:
    """`ringserve serve ARGS` in ``cwd``; the log is collected until it stops."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.endpoint = f"ipc://{tempfile.mkdtemp(prefix='rs-tune-')}/engine.sock"
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--bind", self.endpoint,
                                      "--shed-after-ms", "0", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env or _env())
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_ready(self, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if "ready: endpoints=" in line:  # the daemon's, not a worker's
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError("no ready line:\n" + "".join(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.proc.returncode


@pytest.mark.parametrize("how", ["--config", "--workers auto"])
def test_a_real_daemon_runs_the_tuned_worker_count(tmp_path: Path, how: str) -> None:
    """The written file starts a real daemon whose ready line shows the tuned worker count;
    with `--workers auto` the log also says where the count came from."""
    cpus = os.cpu_count() or 1
    tuned = replace(TUNED, workers=1 if cpus != 1 else 2)  # differs from the CPU-count default
    path = _write_tuned(tmp_path / "ringserve.toml", tuned)
    args = ("--config", str(path)) if how == "--config" else ("--workers", "auto")
    daemon = _Daemon(*args, cwd=tmp_path)
    try:
        ready = daemon.wait_ready()
        assert f"workers={tuned.workers} " in ready, ready
        batch = tuned.max_batch if how == "--config" else DEFAULT.max_batch  # auto takes only workers
        assert f"max batch {batch}" in "".join(daemon.lines)  # the workers' own ready lines
        if how == "--workers auto":
            log = "".join(daemon.lines)
            assert f"--workers auto: {tuned.workers} workers, from the tuned file ./ringserve.toml" in log, log
        stats = T.request_stats(daemon.endpoint)
        assert len(stats["workers"]) == tuned.workers
    finally:
        code = daemon.stop()
    assert code == 0, "".join(daemon.lines)


def test_busiest_window_reads_real_engine_stats(tmp_path: Path) -> None:
    """The sampler against a real daemon: two STATS + /proc samples make a window."""
    daemon = _Daemon("--workers", "1", cwd=REPO)
    try:
        daemon.wait_ready()
        with T.StatsSampler(daemon.endpoint, interval=0.2) as sampler:
            time.sleep(1.5)
        assert sampler.error is None and len(sampler.samples) >= 4
        d = T.busiest_window(sampler.samples, window_s=1.0)
        assert d is not None and len(d.busy_share) == 1
        assert 0 <= d.machine_busy <= 1 and d.frontend_cores >= 0 and math.isfinite(d.worker_cores)
    finally:
        assert daemon.stop() == 0


@pytest.mark.slow
def test_one_real_evaluation() -> None:
    """The real measurement path once, kept small: a real daemon (W=1, max_batch=64) started by
    the replay bench, its capacity searched up to 4 streams, a max-pace saturation point, the
    engine sampled meanwhile. No timing assertions: the machine is shared."""
    api = T.bench_api()
    points: list[str] = []
    with T.EngineMeasure(api, shape="device", budget_ms=32.0, quick=True, max_streams=4,
                         on_point=points.append) as measure:
        m = measure(replace(DEFAULT, workers=1, max_batch=64), "workers")
    assert m.error is None, m.error
    assert 0 <= m.capacity_streams <= 4 and m.saturation_fps > 0
    assert any("max pace" in p for p in points) and any(p.endswith(" streams") for p in points)
    assert m.diag is not None and len(m.diag.busy_share) == 1 and m.diag.avg_batch >= 1
    assert m.detail["capacity"]["points"] and m.detail["saturation_point"]["pace"] == "max"
    assert T.diagnose(m, os.cpu_count() or 1)[0] in ("cores", "front-end", "model", "latency budget")
