"""Every code block of the README's "Client guide" runs, as written, against a real daemon.

Python blocks run in a fresh interpreter, shell blocks' `ringserve stream` lines as commands,
in a directory holding a real speech recording as ``speech.wav``; the only change made to the
text is the endpoint (``tcp://127.0.0.1:5555`` -> this test's daemon).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, DaemonProcess, speech_clips
from tests.speech_audio import write_wav

README = REPO / "README.md"
DOC_ENDPOINT = "tcp://127.0.0.1:5555"
# shell lines that are not run here, and why
NOT_RUN = {
    "make install": "the bootstrap itself: `make test` ran it",
    "ringserve mic": "needs a capture device: tests/test_mic.py runs it on a real ALSA device",
}


def guide_blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    match = re.search(r"^## Client guide\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "README.md has no '## Client guide' section"
    return re.findall(r"^```(\w+)\n(.*?)^```", match.group(1), re.S | re.M)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guide")
    clips = [c for c in speech_clips(12.0) if c.rate == 16000]
    clip = next((c for c in clips if c.name == "jfk"), clips[0])
    write_wav(path / "speech.wav", clip.f32, clip.rate)
    return path


def test_guide_has_the_promised_sections() -> None:
    blocks = guide_blocks()
    python = [code for lang, code in blocks if lang == "python"]
    assert len(python) >= 6
    joined = "\n".join(python)
    for needle in ("AsyncClient", "keep_audio=True", "on_event", "on_reset", "errors.BadParamsError", "submit("):
        assert needle in joined


@pytest.mark.parametrize("index", range(len([b for b in guide_blocks() if b[0] in ("python", "sh")])))
def test_guide_code_block_runs(index: int, engine: DaemonProcess, workdir: Path) -> None:
    lang, code = [b for b in guide_blocks() if b[0] in ("python", "sh")][index]
    code = code.replace(DOC_ENDPOINT, engine.endpoint)
    if lang == "python":
        proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, f"--- block:\n{code}\n--- stderr:\n{proc.stderr}"
        assert proc.stdout.strip(), "every example prints what it got"
        print(proc.stdout[-600:])
        return
    ran = 0
    for line in code.splitlines():
        command = line.split("#")[0].strip()
        if not command:
            continue
        if any(command.startswith(prefix) for prefix in NOT_RUN):
            continue
        argv = shlex.split(command)
        assert argv[0] == "ringserve", f"unexpected shell line {line!r}: run it here or list it in NOT_RUN"
        proc = subprocess.run([sys.executable, "-m", "engine.cli", *argv[1:]], cwd=workdir, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        ran += 1
    if "ringserve stream" in code:
        assert ran and (workdir / "events.jsonl").read_text().count('"event"') >= 2
