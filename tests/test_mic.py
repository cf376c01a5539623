"""`ringserve mic` end to end: a real ALSA capture device playing speech -> resample -> engine -> events.

The device is tests/alsa_device.py's: an ALSA ``file`` PCM over a private jackd's dummy
clock, so capture runs in real time at 48 kHz stereo like a USB microphone, and PortAudio
runs in a subprocess with the device's environment. Where the speech is comes from the
WAV itself: reference probabilities (onnxruntime, frame by frame) and silero-vad's own
get_speech_timestamps_from_probs, nothing of the engine.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.alsa_device import APT_INSTALL, AlsaTestDevice, alsa_test_device, missing_packages
from tests.conftest import REPO, DaemonProcess
from tests.silero_reference import load_upstream_timestamps, reference_probs, silero_model_path
from tests.speech_audio import read_wav, speech_wav

LEAD_S, TRAIL_S, SPEECH_S = 0.5, 0.5, 4.0
EVENT = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3})  speech (start|end)\s+t=\s*([\d.]+) s")
LATENCY = re.compile(r"latency chunk sent -> result \((\d+) stream\(s\), (\d+) results\): "
                     r"p50 ([\d.]+) ms  p90 ([\d.]+) ms  p99 ([\d.]+) ms")


def _require_apt(missing: list[str]) -> None:
    if not missing:
        return
    msg = f"apt packages missing: {' '.join(missing)} (install: {APT_INSTALL} espeak-ng)"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.fail(msg + "; running as root, so `make` should have installed them")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return speech_wav(tmp_path_factory.mktemp("speech"), lead_s=LEAD_S, trail_s=TRAIL_S, max_speech_s=SPEECH_S)
    except FileNotFoundError:
        _require_apt(["espeak-ng"])
        raise


@pytest.fixture(scope="module")
def mic(tmp_path_factory: pytest.TempPathFactory, speech_file: Path) -> Iterator[AlsaTestDevice]:
    _require_apt(missing_packages(paced=True))
    with alsa_test_device(speech_file, tmp_path_factory.mktemp("mic")) as dev:
        yield dev


def run_mic(dev: AlsaTestDevice, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", "mic", *args], env=dev.env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def expected_segments(wav: Path) -> list[tuple[float, float]]:
    """Speech in the WAV, by silero-vad's offline function on reference probabilities."""
    x, rate = read_wav(wav)
    probs = reference_probs(silero_model_path(), x[:, 0], rate)
    stamps = load_upstream_timestamps()(probs.tolist(), sampling_rate=rate, audio_length_samples=len(x))
    return [(s["start"] / rate, s["end"] / rate) for s in stamps]


def test_mic_streams_live_capture_and_finds_the_speech(mic: AlsaTestDevice, engine: DaemonProcess,
                                                       speech_file: Path) -> None:
    duration = LEAD_S + SPEECH_S + TRAIL_S + 0.5
    started = time.time()
    proc = run_mic(mic, "--device", "ringserve_mic", "--endpoint", engine.endpoint, "--duration", str(duration))
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}\n--- jackd:\n{mic.jackd_log()}"
    # capture at the device's own format, resampled by us
    assert "at 48000 Hz x 2 ch -> 16000 Hz mono" in out
    events = [(m.group(5), float(m.group(6)), m) for m in map(EVENT.match, out.splitlines()) if m]
    kinds = [kind for kind, _, _ in events]
    assert kinds and kinds == ["start", "end"] * (len(kinds) // 2), out
    expected = expected_segments(speech_file)
    assert expected, "the reference finds no speech in the test WAV"
    first_start, last_end = events[0][1], events[-1][1]
    print(f"mic: {len(kinds) // 2} segments {[round(t, 3) for _, t, _ in events]}; "
          f"offline reference {[(round(a, 3), round(b, 3)) for a, b in expected]}")
    # the live path (48 kHz capture, 0.75 gain, resampling) moves boundaries by a frame or two
    assert abs(first_start - expected[0][0]) < 0.15, (events, expected)
    assert abs(last_end - expected[-1][1]) < 0.25, (events, expected)
    assert all(LEAD_S - 0.1 < t < LEAD_S + SPEECH_S + 0.3 for _, t, _ in events)  # none in the silence
    assert abs(len(kinds) // 2 - len(expected)) <= 2
    # events carry wall-clock times of when they arrived
    for _, _, m in events:
        h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3))
        clock = time.localtime(started)
        arrived = (h - clock.tm_hour) * 3600 + (mi - clock.tm_min) * 60 + s - clock.tm_sec
        assert -2 <= arrived % 86400 <= duration + 30
    # counters: live status lines (stdout is not a terminal: plain lines) and the summary
    status = [line for line in out.splitlines() if line.startswith("status ")]
    assert len(status) >= duration - 1
    assert all(re.search(r"overflows \d+  dropped \d+", line) for line in status)
    assert any("SPEECH" in line for line in status) and any("silence" in line for line in status)
    assert re.search(r"level +-?[\d.]+ dBFS", "\n".join(status))
    summary = re.search(r"summary: overflows (\d+), dropped blocks (\d+) \((\d+) frames\), engine errors (\d+)", out)
    assert summary, out
    assert summary.group(2) == "0" and summary.group(4) == "0"
    assert f"summary: {duration:.2f} s captured from 'ringserve_mic'" in out
    assert LATENCY.search(out)


def run_on_terminal(dev: AlsaTestDevice, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run ``ringserve mic`` with a pseudo-terminal as stdout; returns (status, what it printed)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "mic", *args], env=dev.env, cwd=REPO,
                                stdout=slave, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    return code, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_mic_replicate_shows_latency_percentiles_on_one_live_line(mic: AlsaTestDevice,
                                                                  engine: DaemonProcess) -> None:
    code, out = run_on_terminal(mic, "--device", "ringserve_mic", "--endpoint", engine.endpoint,
                                "--duration", "2.5", "--replicate", "5")
    assert code == 0, out
    assert "5 stream(s)" in out
    # a terminal gets one status line redrawn in place (carriage return + erase line), not a
    # line per update, and the events on lines of their own
    redraws = out.count("\r\x1b[2K")
    assert redraws > 10 and not re.search(r"^status ", out, re.M)
    live = [part for part in out.split("\r\x1b[2K") if "lat p50" in part and "dBFS" in part]
    assert live and all("\n" not in part.rstrip("\n") for part in live[:-1])
    assert any(EVENT.match(line.split("\x1b[2K")[-1]) for line in out.split("\n"))
    m = LATENCY.search(out)
    assert m, out
    streams, n, p50, p90, p99 = int(m.group(1)), int(m.group(2)), *map(float, m.group(3, 4, 5))
    assert streams == 5 and n >= 5 * 70  # 2.5 s = 78 frames per stream
    assert 0 < p50 <= p90 <= p99 < 2000
    assert "replicas agree: yes" in out
    print(f"mic --replicate 5: chunk sent -> result latency p50 {p50} ms, p90 {p90} ms, p99 {p99} ms "
          f"over {n} results")


def test_mic_devices_help_and_errors(mic: AlsaTestDevice, tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import contextlib, io, json, sys
        from engine.cli import main

        out = {}
        for name, argv in [("list", ["mic", "--list-devices"]),
                           ("missing", ["mic", "--device", "no_such_mic"]),
                           ("index", ["mic", "--device", "99"]),
                           ("output_only", ["mic", "--device", "ringserve_mic_speaker"]),
                           ("no_engine", ["mic", "--device", "ringserve_mic", "--endpoint", sys.argv[1],
                                          "--timeout", "0.5", "--duration", "1"])]:
            o, e = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
                rc = main(argv)
            out[name] = [rc, o.getvalue(), e.getvalue()]
        print(json.dumps(out))
        """
    )
    proc = mic.run_python(code, f"ipc://{tmp_path}/nobody.sock")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    rc, listing, _ = got["list"]
    assert rc == 0 and "ringserve_mic" in listing and "48000" in listing
    assert "ringserve_mic_speaker" not in listing  # no inputs: not a capture device
    for name, needle in (("missing", "'no_such_mic' not found"), ("index", "index 99 does not exist"),
                         ("output_only", "no input channels")):
        rc, _, err = got[name]
        assert rc == 2 and needle in err and "Available input devices" in err and "ringserve_mic" in err, got[name]
    rc, _, err = got["no_engine"]
    assert rc == 1 and "no reply from" in err and "ringserve serve" in err
    helptext = subprocess.run([sys.executable, "-m", "engine.cli", "mic", "--help"], capture_output=True,
                              text=True, cwd=REPO, timeout=60, check=True).stdout
    for needle in ("--replicate", "--list-devices", "--device", "overflows", "p50/p90/p99", "16 kHz"):
        assert needle in helptext
