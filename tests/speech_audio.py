"""Real speech for tests: a 16 kHz mono 16-bit WAV with silence around it.

Uses the shared Silero test clip (``/work/shared/audio/silero-vad/jfk.wav``, or
under ``$RINGSERVE_SHARED_AUDIO``) when it exists, otherwise
synthesises speech with ``espeak-ng`` (Debian package ``espeak-ng``; it writes
22050 Hz mono, resampled here to 16 kHz with soxr).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soxr

RATE = 16000
# same override as tests/conftest.py; by default the checkout's sibling shared/audio
_DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared" / "audio"
SHARED_AUDIO = Path(os.environ.get("RINGSERVE_SHARED_AUDIO", _DEFAULT_SHARED))
SHARED_SPEECH = (
    SHARED_AUDIO / "silero-vad" / "jfk.wav",
    SHARED_AUDIO / "corpus" / "mic_000.wav",
)
ESPEAK_TEXT = (
    "And so, my fellow Americans, ask not what your country can do for you. "
    "Ask what you can do for your country."
)


def read_wav(path: Path) -> tuple[npt.NDArray[np.float32], int]:
    """16-bit PCM WAV -> (float32 samples shaped (n, channels), rate)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit")
        raw = w.readframes(w.getnframes())
        channels, rate = w.getnchannels(), w.getframerate()
    data = np.frombuffer(raw, dtype="<i2").reshape(-1, channels)
    return (data.astype(np.float32) / 32768.0), rate


def write_wav(path: Path, samples: npt.ArrayLike, rate: int = RATE) -> Path:
    """Write mono float samples in [-1, 1) as 16-bit PCM."""
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def _espeak(tmp_dir: Path) -> npt.NDArray[np.float32]:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError(
            "no shared speech audio and no `espeak-ng` to synthesise some "
            "(apt-get install espeak-ng)"
        )
    out = tmp_dir / "espeak_raw.wav"
    subprocess.run([exe, "-w", str(out), ESPEAK_TEXT], check=True, capture_output=True, timeout=60)
    x, rate = read_wav(out)
    mono: npt.NDArray[np.float32] = np.asarray(x.mean(axis=1), dtype=np.float32)
    if rate != RATE:
        mono = np.asarray(soxr.resample(mono, rate, RATE, quality="HQ"), dtype=np.float32)
    return mono


def speech_wav(
    tmp_dir: Path,
    *,
    lead_s: float = 0.5,
    trail_s: float = 0.5,
    max_speech_s: float | None = None,
    use_shared: bool = True,
) -> Path:
    """Return ``tmp_dir/speech_16k.wav``: ``lead_s`` of digital silence, speech
    (the shared clip if present, else espeak-ng), ``trail_s`` of silence."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    speech: npt.NDArray[np.float32] | None = None
    if use_shared:
        for path in SHARED_SPEECH:
            if path.is_file():
                x, rate = read_wav(path)
                speech = x.mean(axis=1, dtype=np.float32)
                if rate != RATE:
                    speech = np.asarray(
                        soxr.resample(speech, rate, RATE, quality="HQ"), dtype=np.float32
                    )
                break
    if speech is None:
        speech = _espeak(tmp_dir)
    if max_speech_s is not None:
        speech = speech[: int(max_speech_s * RATE)]
    out = np.concatenate(
        [
            np.zeros(int(lead_s * RATE), np.float32),
            speech,
            np.zeros(int(trail_s * RATE), np.float32),
        ]
    )
    return write_wav(tmp_dir / "speech_16k.wav", out)
