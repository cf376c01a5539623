"""WAV input for the file client and the bench: 16-bit PCM, any rate, any channel count.

Conversion is explicit and documented: channels are averaged to mono, and rates other
than 16000 and 8000 Hz are resampled to 16000 Hz with soxr (anti-aliased). 8-bit, 24-bit
and float WAVs are refused with a clear error rather than misread.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass

import numpy as np

SUPPORTED_RATES = (16000, 8000)


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # int16 mono
    sample_rate: int
    converted: str  # human-readable note of what was done, "" if nothing


def read_wav(path: str) -> Audio:
    try:
        with wave.open(path, "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except wave.Error as exc:
        raise ValueError(f"{path}: not a PCM WAV file ({exc}); convert it with e.g. "
                         "`sox in.ext -b 16 out.wav`") from None
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples; ringserve reads 16-bit PCM WAV "
                         "(convert with `sox in.wav -b 16 out.wav`)")
    pcm = np.frombuffer(raw, "<i2").reshape(-1, channels)
    notes = []
    if channels > 1:
        pcm = np.round(pcm.mean(axis=1)).astype(np.int16)[:, None]
        notes.append(f"{channels} channels averaged to mono")
    mono = pcm[:, 0]
    if rate not in SUPPORTED_RATES:
        import soxr

        resampled = soxr.resample(mono.astype(np.float32) / 32768.0, rate, 16000, quality="HQ")
        mono = np.clip(np.round(resampled * 32768.0), -32768, 32767).astype(np.int16)
        notes.append(f"resampled {rate} Hz -> 16000 Hz (soxr HQ)")
        rate = 16000
    return Audio(np.ascontiguousarray(mono), rate, "; ".join(notes))
