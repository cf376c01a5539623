"""A small labelled speech corpus for tests and benchmarks, made with espeak-ng.

The shared corpus (``<repo>/../shared/audio/corpus``) is used when present; a
clean clone (CI) generates its own here instead. Each file is one synthetic
"microphone": espeak-ng utterances separated by 0.3-3 s of silence, clean or
with coloured noise. Ground truth comes from the clean speech itself, so the
labels are exact rather than hand-drawn.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import soxr

RATE = 16000
FRAME = RATE // 100  # 10 ms label frames
MERGE_GAP_S = 0.25
MIN_RUN_S = 0.05
REL_DB = 35.0  # relative to each utterance's peak, so the level we pick later cannot move it
REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = "apt-get install espeak-ng (make install does this when run as root)"

# Sentences per language; a voice only speaks its own language so the prosody stays natural.
SENTENCES: dict[str, tuple[str, ...]] = {
    "en": (
        "The quick brown fox jumps over the lazy dog.", "Yes.", "Okay, thanks.",
        "Please call Stella and ask her to bring these things from the store.",
        "I think the meeting has been moved to Thursday afternoon.", "No, not yet.",
        "Can you hear me now? The line keeps dropping out.", "Hello?",
        "Turn left at the second traffic light, then keep going straight.",
        "We measured the latency twice and both numbers look reasonable.",
        "Seven hundred and forty two people signed up before noon.",
        "Nobody expected the old train to arrive exactly on time.",
    ),
    "de": ("Guten Morgen, wie geht es dir heute?", "Ja, genau.",
           "Der Zug nach Berlin hat leider zwanzig Minuten Verspätung."),
    "es": ("Buenos días, ¿a qué hora empieza la reunión?", "Claro que sí.",
           "El tren sale de la estación a las ocho y media."),
    "fr": ("Bonjour, je voudrais un café et un croissant, s'il vous plaît.", "D'accord.",
           "Le musée est fermé le lundi, mais ouvert tous les autres jours."),
}
# espeak-ng voice[+variant]; the first two letters pick the sentence language. Male and
# female variants and several accents, so the VAD does not see one synthetic speaker only.
VOICES = ("en-us", "en-us+f3", "en-gb", "en-gb+f2", "en-gb-scotland+m3", "en-us+m5", "en-029+f4",
          "de", "de+f2", "es", "es-419+m2", "fr-fr", "fr-fr+f3")
NOISES = ("white", "pink", "brown")


def espeak_exe() -> str:
    if (exe := shutil.which("espeak-ng")) is None:
        raise FileNotFoundError(f"espeak-ng not found: {INSTALL_HINT}")
    return exe


def espeak_version() -> str:
    run = subprocess.run([espeak_exe(), "--version"], capture_output=True, text=True, check=True)
    return run.stdout.strip()


def synth(text: str, voice: str, speed: int, pitch: int) -> npt.NDArray[np.float64]:
    """One utterance at 16 kHz. --stdout avoids temp files; its WAV header has
    placeholder sizes (streaming), so the PCM is simply everything after byte 44."""
    cmd = [espeak_exe(), "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), text]
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout
    if out[:4] != b"RIFF" or out[36:40] != b"data":
        raise RuntimeError(f"unexpected espeak-ng output for voice {voice!r}")
    rate = int.from_bytes(out[24:28], "little")
    pcm = np.frombuffer(out[44 : 44 + (len(out) - 44) // 2 * 2], dtype="<i2") / 32768.0
    return np.asarray(soxr.resample(pcm, rate, RATE, quality="HQ"), dtype=np.float64)


def speech_runs(x: npt.NDArray[np.float64]) -> list[tuple[int, int]]:
    """Sample intervals of one utterance: 10 ms frames within REL_DB of its loudest
    frame, pauses < MERGE_GAP_S merged (a VAD should bridge them), blips dropped."""
    n = len(x) // FRAME
    db = 10 * np.log10(np.mean(x[: n * FRAME].reshape(n, FRAME) ** 2, axis=1) + 1e-20)
    thr = db.max() - REL_DB
    runs: list[list[int]] = []
    for f in map(int, np.flatnonzero(db >= thr)):
        if runs and f - runs[-1][1] < MERGE_GAP_S * 100:
            runs[-1][1] = f + 1
        else:
            runs.append([f, f + 1])
    # Tighten each edge to the first/last sample whose magnitude reaches the threshold
    # (a frame whose RMS does has at least one), so intervals are not 10 ms-quantised.
    out = []
    for a, b in (r for r in runs if r[1] - r[0] >= MIN_RUN_S * 100):
        loud = a * FRAME + np.flatnonzero(np.abs(x[a * FRAME : b * FRAME]) >= 10 ** (thr / 20))
        out.append((int(loud[0]), int(loud[-1]) + 1))
    return out


def coloured_noise(rng: np.random.Generator, n: int, colour: str) -> npt.NDArray[np.float64]:
    """Unit-RMS white/pink/brown noise: shape white noise's spectrum by f^0, f^-1/2, f^-1."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1 / RATE), 20.0)  # 20 Hz floor keeps DC finite
    spec *= f ** -{"white": 0.0, "pink": 0.5, "brown": 1.0}[colour]
    y = np.fft.irfft(spec, n)
    return np.asarray(y / np.sqrt(np.mean(y**2)), dtype=np.float64)


def make_file(seed: int, k: int, duration_s: float) -> tuple[bytes, dict[str, Any]]:
    """File k depends only on (seed, k), so a larger n is a superset of a smaller one."""
    rng = np.random.default_rng([seed, k])
    total = int(round(duration_s * RATE))
    clean, pos = np.zeros(total), int(rng.uniform(0.3, 3.0) * RATE)
    spans: list[tuple[int, int]] = []
    while True:
        voice = VOICES[rng.integers(len(VOICES))]
        text = SENTENCES[voice[:2]][rng.integers(len(SENTENCES[voice[:2]]))]
        utt = synth(text, voice, int(rng.integers(130, 200)), int(rng.integers(25, 75)))
        # Per-utterance level spread: a talker moving relative to the mic.
        utt *= 10 ** (rng.uniform(-6, 0) / 20) / max(np.abs(utt).max(), 1e-9)
        if pos + len(utt) + int(0.3 * RATE) > total:
            break  # keep >= 0.3 s of trailing silence; the file is padded to duration_s
        clean[pos : pos + len(utt)] = utt
        spans += [(pos + a, pos + b) for a, b in speech_runs(utt)]
        pos += len(utt) + int(rng.uniform(0.3, 3.0) * RATE)
    if not spans:
        raise ValueError(f"duration_s={duration_s} is too short for any utterance")
    mask = np.zeros(total, bool)
    for a, b in spans:
        mask[a:b] = True
    # Even files clean, odd ones cycle the noise colours: even a tiny n covers each case.
    colour = "none" if k % 2 == 0 else NOISES[k // 2 % len(NOISES)]
    snr = None if colour == "none" else round(float(rng.uniform(10, 30)), 1)
    # File level: active-speech RMS from -32 to -16 dBFS, quiet to hot microphones.
    clean *= 10 ** (rng.uniform(-32, -16) / 20) / np.sqrt(np.mean(clean[mask] ** 2))
    noise = np.zeros(total)
    if snr is not None:  # SNR over the labelled speech, not the whole file with its pauses
        power = np.mean(clean[mask] ** 2) / 10 ** (snr / 10)
        noise = coloured_noise(rng, total, colour) * np.sqrt(power)
    peak = np.abs(clean + noise).max()
    if peak > 0.97:  # never clip: scale both, which keeps the SNR
        clean, noise = clean * 0.97 / peak, noise * 0.97 / peak
    pcm = np.clip(np.round((clean + noise) * 32768), -32768, 32767).astype("<i2").tobytes()
    meta = {
        "file": f"mic_{k:03d}.wav", "num_samples": total, "duration_s": round(total / RATE, 4),
        "noise": colour, "snr_db": snr,
        "speech_level_dbfs": round(10 * float(np.log10(np.mean(clean[mask] ** 2))), 2),
        "speech_fraction": round(float(mask.mean()), 4),
        "speech": [[round(a / RATE, 4), round(b / RATE, 4)] for a, b in spans],
        "speech_samples": [[a, b] for a, b in spans],
    }
    return pcm, meta


def generate_corpus(out_dir: Path, n: int = 8, seed: int = 1, duration_s: float = 20.0) -> Path:
    """Write mic_000.wav ... and labels.json into out_dir; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    version = espeak_version()  # fails early with the install hint
    # Files are independent and espeak runs in subprocesses, so threads parallelise well.
    with ThreadPoolExecutor(max_workers=min(n, os.cpu_count() or 1) or 1) as pool:
        results = list(pool.map(lambda k: make_file(seed, k, duration_s), range(n)))
    for pcm, meta in results:
        with wave.open(str(out_dir / meta["file"]), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(pcm)
    labels = {
        "generator": "bench/corpus.py", "seed": seed, "sample_rate": RATE,
        "sample_format": "s16le mono WAV", "merge_gap_s": MERGE_GAP_S,
        "ground_truth_rule": f"10 ms frames within {REL_DB:g} dB of the utterance's loudest "
        f"frame, merged across pauses < merge_gap_s, runs < {MIN_RUN_S * 1000:g} ms dropped, "
        "edges tightened to the first/last sample reaching that level; noise is non-speech",
        "tools": {"espeak-ng": version},
        "files": [meta for _, meta in results],
    }
    (out_dir / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    return out_dir


def ensure_corpus(cache_dir: Path | None = None, n: int = 8) -> Path:
    """A directory holding labels.json: $RINGSERVE_AUDIO_DIR (a corpus dir, or an audio
    dir with corpus/ inside), else the shared corpus, else one generated once into
    cache_dir (default <repo>/.cache). The shared corpus may hold more or fewer than n files."""
    override = os.environ.get("RINGSERVE_AUDIO_DIR")
    if override:
        for d in (Path(override), Path(override) / "corpus"):
            if (d / "labels.json").is_file():
                return d
        raise FileNotFoundError(f"RINGSERVE_AUDIO_DIR={override}: no labels.json in it or corpus/")
    shared = REPO.parent / "shared" / "audio" / "corpus"
    if (shared / "labels.json").is_file():
        return shared
    cache = Path(cache_dir) if cache_dir is not None else REPO / ".cache"
    target = cache / f"corpus-n{n}-seed1"
    if (target / "labels.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a crash leaves only a tmp dir, never a half corpus.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    try:
        generate_corpus(tmp, n=n, seed=1)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        try:
            tmp.rename(target)
        except OSError:  # a concurrent run finished first; its corpus is identical
            if not (target / "labels.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.corpus",
                                description="Generate a labelled espeak-ng speech corpus.")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--n", type=int, default=8, help="number of files (default 8)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per file (default 20)")
    a = p.parse_args(argv)
    out = generate_corpus(a.out, n=a.n, seed=a.seed, duration_s=a.duration)
    print(f"wrote {a.n} files + labels.json to {out}")


if __name__ == "__main__":
    main()
