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

    def next_pcm(self, s: int) -> bytes:
        p, cs, f = self.pos[s], self.chunk_samples[s], self.file[s]
        pcm = f.data[2 * p:2 * (p + cs)]
        p += cs
        self.pos[s] = p - f.samples if p >= f.samples else p
        return pcm
