"""Shared fixtures: a real daemon in a subprocess, real speech audio, reference probabilities."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from bench.procinfo import rss_bytes
from tests.silero_reference import reference_probs, silero_model_path

REPO = Path(__file__).resolve().parents[1]
SHARED_AUDIO = Path(os.environ.get("RINGSERVE_SHARED_AUDIO", REPO.parent / "shared" / "audio"))


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[str]
    endpoint: str
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader thread take the last lines
                raise RuntimeError(f"daemon exited with {self.proc.returncode} before {needle!r}:\n{self.log()}")
            time.sleep(0.02)
        raise TimeoutError(f"no {needle!r} within {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.reader is not None:
            self.reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def spawn_daemon(*args: str, endpoint: str | None = None, wait_ready: bool = True,
                 env: dict[str, str] | None = None) -> DaemonProcess:
    """Start `ringserve serve` as a real subprocess bound to a fresh ipc endpoint."""
    if endpoint is None:
        endpoint = f"ipc://{tempfile.mkdtemp(prefix='rs-')}/engine.sock"
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--bind", endpoint, *args]
    if "--workers" not in args:
        cmd += ["--workers", "2"]
    if "--shed-after-ms" not in args:
        # Tests push audio faster than real time on a shared 2-core box: that is offline
        # work, which must never be shed. Overload tests turn shedding on explicitly.
        cmd += ["--shed-after-ms", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})
    daemon = DaemonProcess(proc, endpoint)
    _SPAWNED.append(daemon)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            daemon.lines.append(line)

    daemon.reader = threading.Thread(target=pump, daemon=True)
    daemon.reader.start()
    if wait_ready:
        try:
            daemon.wait_for_line("ready:", 90)
        except BaseException:
            daemon.stop(signal.SIGKILL)
            raise
    return daemon


_SPAWNED: list[DaemonProcess] = []


@pytest.fixture(scope="session", autouse=True)
def _no_daemon_outlives_the_session() -> Iterator[None]:
    """A test that fails before stopping its daemon must not leave it running (and busy) after."""
    yield
    for daemon in _SPAWNED:
        if daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def engine() -> Iterator[DaemonProcess]:
    daemon = spawn_daemon()
    yield daemon
    code = daemon.stop()
    assert code == 0, daemon.log()


# ---- audio ------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # hash by identity: clips are cached singletons
class Clip:
    name: str
    pcm: np.ndarray  # int16 mono
    rate: int

    @property
    def f32(self) -> np.ndarray:
        return self.pcm.astype(np.float32) / 32768.0


def _read_int16(path: Path) -> tuple[np.ndarray, int]:
    import wave

    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1, path
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").copy(), w.getframerate()


@functools.cache
def corpus_dir() -> Path:
    """A labelled corpus: the shared one when present, else one the project generates."""
    if (SHARED_AUDIO / "corpus" / "labels.json").is_file():
        return SHARED_AUDIO / "corpus"
    from bench.corpus import ensure_corpus

    return ensure_corpus()


@functools.cache
def speech_clips(max_seconds: float = 20.0) -> tuple[Clip, ...]:
    """Real speech: shared silero-vad recordings + corpus microphones, each cut to max_seconds."""
    paths = sorted((SHARED_AUDIO / "silero-vad").glob("*.wav")) if (SHARED_AUDIO / "silero-vad").is_dir() else []
    paths += sorted(corpus_dir().glob("*.wav"))
    clips = []
    for path in paths:
        pcm, rate = _read_int16(path)
        clips.append(Clip(path.stem, pcm[: int(max_seconds * rate)], rate))
    return tuple(clips)


_REFERENCE: dict[tuple[str, int, int], np.ndarray] = {}


def reference(clip: Clip) -> np.ndarray:
    key = (clip.name, clip.rate, len(clip.pcm))
    if key not in _REFERENCE:
        _REFERENCE[key] = reference_probs(silero_model_path(), clip.f32, clip.rate)
    return _REFERENCE[key]


def resample_to_8k(clip: Clip) -> Clip:
    import soxr

    f32 = soxr.resample(clip.f32, clip.rate, 8000, quality="HQ")
    pcm = np.clip(np.round(f32 * 32768.0), -32768, 32767).astype(np.int16)
    return Clip(clip.name + "@8k", pcm, 8000)


def vm_rss_mib(pid: int) -> float:
    rss = rss_bytes(pid)
    if rss is None:
        raise RuntimeError(f"no VmRSS for pid {pid}: the process is gone")
    return rss / 2**20


def have_espeak_or_shared() -> bool:
    return SHARED_AUDIO.is_dir() or shutil.which("espeak-ng") is not None
