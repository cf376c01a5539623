"""Configuration: defaults < TOML file < RINGSERVE_* environment < flags.

Every mistake fails fast, before any shared memory, worker or socket exists, with the
setting's name in the message; `--print-config` shows where each value came from; and
`serve` really runs with what the file and environment say.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from clients import errors
from clients.client import Client
from engine.config import ConfigError
from engine.settings import FIELDS, build_config, read_env
from tests.conftest import REPO, spawn_daemon


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any RINGSERVE_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGSERVE_")}
    return {**env, **extra}


def serve(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str, str, int, float]:
    """Run `ringserve serve ARGS`: (exit status, stdout, stderr, pid, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env or clean_env())
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"`ringserve serve {' '.join(args)}` did not fail fast: it was still running:\n{err}")
    return proc.returncode, out, err, proc.pid, time.monotonic() - started


def assert_failed_fast(code: int, out: str, err: str, pid: int, seconds: float, *needles: str) -> None:
    assert code != 0, err
    assert seconds < 5, f"took {seconds:.1f} s to fail"
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    assert "ready:" not in err and "HTTP listener" not in err and out == ""
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"ringserve-{pid}-")]
    assert "Traceback" not in err


FILE_MISTAKES = [
    ("unknown-key", "wrokers = 2\n", ["unknown key(s) ['wrokers']", "known keys:", "workers"]),
    ("unknown-table", "[serve]\nworkers = 2\n[server]\nworkers = 2\n", ["unknown key(s) ['server']"]),
    ("bad-type", 'workers = "two"\n', ["key 'workers' must be an integer", "'two'"]),
    ("bad-list", "bind = 5555\n", ["key 'bind' must be a list of strings"]),
    ("out-of-range", "[serve]\nmax_batch = 0\n", ["max_batch = 0 is invalid", "max_batch"]),
    ("bad-choice", 'provider = "gpu"\n', ["provider = 'gpu' is invalid", "auto, cpu, cuda, tensorrt"]),
    ("not-toml", "workers = = 2\n", ["not valid TOML"]),
]


@pytest.mark.parametrize("name,text,needles", FILE_MISTAKES, ids=[m[0] for m in FILE_MISTAKES])
def test_bad_config_file_fails_fast(tmp_path: Path, name: str, text: str, needles: list[str]) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    code, out, err, pid, seconds = serve("--config", str(path), "--http", "127.0.0.1:1")
    assert code == 2
    assert_failed_fast(code, out, err, pid, seconds, str(path) if name != "out-of-range" else "set by", *needles)


def test_missing_config_file_fails_fast(tmp_path: Path) -> None:
    code, out, err, pid, seconds = serve("--config", str(tmp_path / "nowhere.toml"))
    assert code == 2
    assert_failed_fast(code, out, err, pid, seconds, "nowhere.toml does not exist")


ENV_MISTAKES = [
    ("RINGSERVE_WORKERS", "two", ["environment variable RINGSERVE_WORKERS", "key 'workers' must be an integer"]),
    ("RINGSERVE_WROKERS", "2", ["environment variable RINGSERVE_WROKERS is not a setting", "RINGSERVE_WORKERS"]),
    ("RINGSERVE_MAX_BATCH", "0", ["max_batch = 0 is invalid", "set by environment"]),
    ("RINGSERVE_IDLE_TIMEOUT_S", "soon", ["RINGSERVE_IDLE_TIMEOUT_S", "key 'idle_timeout_s' must be a number"]),
]


@pytest.mark.parametrize("key,raw,needles", ENV_MISTAKES, ids=[m[0] + "=" + m[1] for m in ENV_MISTAKES])
def test_bad_environment_fails_fast(key: str, raw: str, needles: list[str]) -> None:
    code, out, err, pid, seconds = serve(env=clean_env(**{key: raw}))
    assert code == 2
    assert_failed_fast(code, out, err, pid, seconds, *needles)


def test_bad_flag_fails_fast() -> None:
    code, out, err, pid, seconds = serve("--workers", "two")
    assert code == 2
    assert_failed_fast(code, out, err, pid, seconds, "--workers", "must be an integer or 'auto', got 'two'")
    code, out, err, pid, seconds = serve("--wrokers", "2")
    assert code == 2
    assert_failed_fast(code, out, err, pid, seconds, "unrecognized arguments: --wrokers")


def test_print_config_precedence(tmp_path: Path) -> None:
    path = tmp_path / "ringserve.toml"
    path.write_text('[serve]\nworkers = 3\nmax_batch = 64\nspin_us = 10\nlog_format = "json"\n'
                    'bind = ["ipc:///tmp/from-file.sock"]\n')
    env = clean_env(RINGSERVE_MAX_BATCH="128", RINGSERVE_SPIN_US="20", RINGSERVE_IDLE_TIMEOUT_S="42.5")
    code, out, err, _, _ = serve("--config", str(path), "--spin-us", "30", "--bind", "tcp://127.0.0.1:6000",
                                 "--print-config", env=env)
    assert code == 0, err
    settings = tomllib.loads(out)["serve"]
    assert settings["workers"] == 3  # file
    assert settings["max_batch"] == 128  # environment over file
    assert settings["spin_us"] == 30  # flag over environment over file
    assert settings["idle_timeout_s"] == 42.5  # environment over default
    assert settings["log_format"] == "json"  # file over default
    assert settings["bind"] == ["tcp://127.0.0.1:6000"]  # a repeated flag replaces the file's list
    assert settings["max_streams"] == 4096  # default
    notes = {line.split(" = ")[0]: line for line in out.splitlines() if " = " in line}
    assert notes["workers"].endswith(f"# from {path}")
    assert notes["max_batch"].endswith("# from environment")
    assert notes["spin_us"].endswith("# from flag")
    assert "# from" not in notes["max_streams"]
    assert set(settings) | {line[2:].split(" = ")[0] for line in out.splitlines() if line.startswith("# ")} \
        == set(FIELDS)  # every setting is shown, None ones as comments


def test_print_config_output_is_a_valid_config_file(tmp_path: Path) -> None:
    code, first, err, _, _ = serve("--max-streams", "77", "--provider", "auto", "--print-config")
    assert code == 0, err
    path = tmp_path / "effective.toml"
    path.write_text(first)
    code, second, err, _, _ = serve("--config", str(path), "--print-config")
    assert code == 0, err
    assert tomllib.loads(second) == tomllib.loads(first)
    assert tomllib.loads(second)["serve"]["max_streams"] == 77


def test_non_setting_variables_are_not_settings() -> None:
    """RINGSERVE_AUDIO_DIR / RINGSERVE_SHARED_AUDIO point tests and the corpus at audio, and
    RINGSERVE_FUZZ_SEED replays a fuzz run: a daemon started from such an environment must not
    refuse to start."""
    assert read_env({"RINGSERVE_SHARED_AUDIO": "/x", "RINGSERVE_AUDIO_DIR": "/y", "RINGSERVE_FUZZ_SEED": "1",
                     "PATH": "/bin"}) == {}
    cfg, origin = build_config({"workers": 2}, None, {"RINGSERVE_WORKERS": "5", "RINGSERVE_MAX_STREAMS": "9"})
    assert (cfg.workers, cfg.max_streams) == (2, 9)
    assert origin["workers"] == "flag" and origin["max_streams"] == "environment" and origin["spin_us"] == "default"


@pytest.mark.parametrize("value", [0, 65537])
def test_max_items_per_message_range(value: int) -> None:
    with pytest.raises(ConfigError, match=rf"max_items_per_message = {value} is invalid: must be an integer "
                       "from 1 to 65536"):
        build_config({}, None, {"RINGSERVE_MAX_ITEMS_PER_MESSAGE": str(value)})
    assert build_config({"max_items_per_message": 65536}, None, {})[0].max_items_per_message == 65536
    assert build_config({}, None, {})[0].max_items_per_message == 1024


def test_serve_uses_the_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "ringserve.toml"
    path.write_text("[serve]\nmax_streams_per_connection = 2\nmax_streams = 64\n")
    daemon = spawn_daemon("--config", str(path), "--workers", "1",
                          env={"RINGSERVE_MAX_STREAMS": "3"})  # the environment beats the file's 64
    try:
        with Client(daemon.endpoint) as first, Client(daemon.endpoint) as second:
            first.open_stream()
            first.open_stream()
            with pytest.raises(errors.LimitError, match="max_streams_per_connection"):
                first.open_stream()
            second.open_stream()
            with pytest.raises(errors.LimitError, match=r"3 streams \(max_streams\)"):
                second.open_stream()
    finally:
        assert daemon.stop() == 0, daemon.log()
