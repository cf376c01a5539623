"""The audio a load process replays: WAV files loaded once per process, and each stream's
position in its file (stream g loops file g mod n, from its own random frame-aligned offset)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FRAME_SAMPLES = {16000: 512, 8000: 256}  # 32 ms


@dataclass
class AudioFile:
    name: str
    rate: int
    samples: int
    data: bytes  # int16 PCM of the whole file + a copy of its start (so any chunk is one slice)


def load_audio(audio_dir: Path, max_files: int = 64, chunk_samples_max: int = 512 * 64) -> list[AudioFile]:
    """Every *.wav in ``audio_dir`` (sorted; 16 or 8 kHz after clients.wav's conversions)."""
    from clients.wav import read_wav

    paths = sorted(Path(audio_dir).glob("*.wav"))[:max_files]
    if not paths:
        raise FileNotFoundError(f"no .wav files in {audio_dir}")
    files = []
    for path in paths:
        audio = read_wav(str(path))
        pcm = np.ascontiguousarray(audio.samples, dtype="<i2")
        frame = FRAME_SAMPLES[audio.sample_rate]
        pcm = pcm[: len(pcm) // frame * frame]
        if len(pcm) < frame:
            continue
        reps = 1 + -(-chunk_samples_max // len(pcm))
        tail = np.tile(pcm, reps)[:chunk_samples_max]
        files.append(AudioFile(path.name, audio.sample_rate, len(pcm), pcm.tobytes() + tail.tobytes()))
    if not files:
        raise FileNotFoundError(f"no usable .wav files (at least one 32 ms frame) in {audio_dir}")
    return files


class StreamAudio:
    """Each stream's file and position; ``next_pcm(s)`` is stream s's next chunk of
    ``chunk_frames`` frames (int16 bytes), looping at the end of its file."""

    def __init__(self, files: list[AudioFile], first_stream: int, streams: int, chunk_frames: int,
                 rng: np.random.Generator) -> None:
        self.file = [files[(first_stream + s) % len(files)] for s in range(streams)]
        self.chunk_samples = [chunk_frames * FRAME_SAMPLES[f.rate] for f in self.file]
        self.pos = [int(rng.integers(0, f.samples // FRAME_SAMPLES[f.rate])) * FRAME_SAMPLES[f.rate]
                    for f in self.file]
        self._pool: np.ndarray | None = None  # built on first use by next_pcm_rows
        self._start = self._samples = np.zeros(0, np.int64)

    def next_pcm(self, s: int) -> bytes:
        p, cs, f = self.pos[s], self.chunk_samples[s], self.file[s]
        pcm = f.data[2 * p:2 * (p + cs)]
        p += cs
        self.pos[s] = p - f.samples if p >= f.samples else p
        return pcm

    def next_pcm_rows(self, streams: list[int]) -> np.ndarray:
        """next_pcm of each of ``streams`` (one chunk size for all of them), as rows of one array."""
        if self._pool is None:
            self._make_pool()
        assert self._pool is not None
        chunk = self.chunk_samples[streams[0]]
        index = np.array(streams, np.intp)
        pos = self._pos_array(streams)
        rows = self._pool[(self._start[index] + pos)[:, None] + np.arange(chunk)]
        pos += chunk
        pos -= np.where(pos >= self._samples[index], self._samples[index], 0)
        for s, p in zip(streams, pos.tolist()):
            self.pos[s] = p
        return rows

    def _pos_array(self, streams: list[int]) -> np.ndarray:
        pos = self.pos
        return np.array([pos[s] for s in streams], np.int64)

    def _make_pool(self) -> None:
        """Every file's samples (with their looped tails) in one array, for gathering rows."""
        files = list({id(f): f for f in self.file}.values())
        offsets, start = {}, 0
        for f in files:
            offsets[id(f)] = start
            start += len(f.data) // 2
        self._pool = np.frombuffer(b"".join(f.data for f in files), "<i2")
        self._start = np.array([offsets[id(f)] for f in self.file], np.int64)
        self._samples = np.array([f.samples for f in self.file], np.int64)
