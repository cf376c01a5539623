"""bench.corpus: format, determinism, label accuracy, and that Silero VAD hears the speech."""
from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import corpus

try:
    from silero_reference import read_wav_mono16, reference_probs, silero_model_path
except ImportError:  # tests/ imported as a package
    from tests.silero_reference import read_wav_mono16, reference_probs, silero_model_path

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)"
)
RATE = 16000


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    return corpus.generate_corpus(tmp_path_factory.mktemp("corpus"), n=2, seed=1)


def labels(d: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((d / "labels.json").read_text())
    return out


def speech_mask(entry: dict[str, Any]) -> np.ndarray:
    mask = np.zeros(entry["num_samples"], bool)
    for a, b in entry["speech_samples"]:
        mask[a:b] = True
    return mask


def test_format(small: Path) -> None:
    lab = labels(small)
    assert lab["sample_rate"] == RATE and lab["seed"] == 1 and lab["generator"]
    assert [f["file"] for f in lab["files"]] == ["mic_000.wav", "mic_001.wav"]
    assert sorted(p.name for p in small.iterdir()) == ["labels.json", "mic_000.wav", "mic_001.wav"]
    noises = [f["noise"] for f in lab["files"]]
    assert noises[0] == "none" and noises[1] != "none", "want one clean and one noisy file"
    for f in lab["files"]:
        with wave.open(str(small / f["file"]), "rb") as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
            assert w.getnframes() == f["num_samples"]
        assert f["duration_s"] == pytest.approx(f["num_samples"] / RATE, abs=1e-4)
        assert (f["snr_db"] is None) == (f["noise"] == "none")
        if f["snr_db"] is not None:
            assert f["noise"] in ("white", "pink", "brown") and 10 <= f["snr_db"] <= 30
        flat = [x for s in f["speech_samples"] for x in s]
        assert len(f["speech_samples"]) >= 2, "several utterances per file"
        assert flat == sorted(flat) and 0 < flat[0] and flat[-1] <= f["num_samples"]
        assert all(b > a for a, b in f["speech_samples"])
        seconds = [[round(a / RATE, 4), round(b / RATE, 4)] for a, b in f["speech_samples"]]
        assert f["speech"] == seconds


def test_deterministic(small: Path, tmp_path: Path) -> None:
    again = corpus.generate_corpus(tmp_path / "again", n=2, seed=1)
    for name in ("labels.json", "mic_000.wav", "mic_001.wav"):
        assert (again / name).read_bytes() == (small / name).read_bytes(), name
    # File k depends only on (seed, k): a smaller n is a prefix of a larger one.
    one = corpus.generate_corpus(tmp_path / "one", n=1, seed=1)
    assert (one / "mic_000.wav").read_bytes() == (small / "mic_000.wav").read_bytes()
    other = corpus.generate_corpus(tmp_path / "other", n=1, seed=2)
    assert (other / "mic_000.wav").read_bytes() != (small / "mic_000.wav").read_bytes()


def test_labels_follow_the_signal(small: Path) -> None:
    for f in labels(small)["files"]:
        x, _ = read_wav_mono16(small / f["file"])
        mask = speech_mask(f)
        inside = 10 * np.log10(np.mean(x[mask].astype(np.float64) ** 2))
        outside = 10 * np.log10(np.mean(x[~mask].astype(np.float64) ** 2) + 1e-12)
        assert inside == pytest.approx(f["speech_level_dbfs"], abs=0.5)
        if f["noise"] == "none":
            # Clean: outside the labels is silence or the quiet tails of words.
            assert inside - outside > 30, (f["file"], inside, outside)
            for a, b in f["speech_samples"]:  # every labelled run is itself loud
                run = 10 * np.log10(np.mean(x[a:b].astype(np.float64) ** 2))
                assert run - outside > 20, (f["file"], a, b, run, outside)
        else:
            # Noisy: speech + noise inside vs noise alone outside, about the SNR apart.
            assert inside - outside > 0.8 * f["snr_db"], (f["file"], inside, outside)


def frame_scores(d: Path, entry: dict[str, Any]) -> tuple[float, float]:
    """Frame-level (recall, precision) of Silero at p >= 0.5 against the labels; a 512-sample
    frame counts as speech when at least half of it is labelled."""
    x, rate = read_wav_mono16(d / entry["file"])
    probs = reference_probs(silero_model_path(), x, rate)
    mask = np.zeros(len(probs) * 512, bool)
    mask[: entry["num_samples"]] = speech_mask(entry)
    truth = mask.reshape(-1, 512).mean(axis=1) >= 0.5
    vad = probs >= 0.5
    hits = int(np.sum(vad & truth))
    return hits / max(int(truth.sum()), 1), hits / max(int(vad.sum()), 1)


def test_silero_finds_the_speech(small: Path, record_property: Any) -> None:
    clean = next(f for f in labels(small)["files"] if f["noise"] == "none")
    recall, precision = frame_scores(small, clean)
    record_property("recall", recall)
    record_property("precision", precision)
    print(f"{clean['file']}: silero frame recall {recall:.3f} precision {precision:.3f}")
    assert recall >= 0.8 and precision >= 0.7, (recall, precision)


def test_missing_espeak_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"apt-get install espeak-ng \(make install"):
        corpus.generate_corpus(tmp_path, n=1)


def test_ensure_corpus_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = tmp_path / "mics"
    small.mkdir()
    (small / "labels.json").write_text("{}")
    # The override wins, given either the corpus dir or an audio dir holding corpus/.
    monkeypatch.setenv("RINGSERVE_AUDIO_DIR", str(small))
    assert corpus.ensure_corpus() == small
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "corpus").symlink_to(small)
    monkeypatch.setenv("RINGSERVE_AUDIO_DIR", str(tmp_path / "audio"))
    assert corpus.ensure_corpus() == tmp_path / "audio" / "corpus"
    monkeypatch.setenv("RINGSERVE_AUDIO_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="RINGSERVE_AUDIO_DIR"):
        corpus.ensure_corpus()
    monkeypatch.delenv("RINGSERVE_AUDIO_DIR")
    # Next: the shared corpus beside the repo.
    repo = tmp_path / "work" / "repo"
    shared = tmp_path / "work" / "shared" / "audio" / "corpus"
    shared.mkdir(parents=True)
    (shared / "labels.json").write_text("{}")
    monkeypatch.setattr(corpus, "REPO", repo)
    assert corpus.ensure_corpus() == shared


@needs_espeak
def test_ensure_corpus_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RINGSERVE_AUDIO_DIR", raising=False)
    monkeypatch.setattr(corpus, "REPO", tmp_path / "repo")  # no ../shared beside it
    got = corpus.ensure_corpus(n=1)
    assert got == tmp_path / "repo" / ".cache" / "corpus-n1-seed1"
    assert [f["file"] for f in labels(got)["files"]] == ["mic_000.wav"]
    assert [p.name for p in got.parent.iterdir()] == [got.name], "temp dir left behind"

    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("regenerated a cached corpus")

    monkeypatch.setattr(corpus, "generate_corpus", fail)
    assert corpus.ensure_corpus(n=1) == got
    with pytest.raises(AssertionError, match="regenerated"):
        corpus.ensure_corpus(cache_dir=tmp_path / "elsewhere", n=1)
    assert not (tmp_path / "elsewhere" / "corpus-n1-seed1").exists(), "half corpus left"


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        corpus.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and "--seed" in out and "--n" in out
