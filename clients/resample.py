"""Streaming conversion of captured audio to the engine's input format.

The engine consumes 16 kHz mono float32.  Microphones deliver whatever their
hardware runs at (usually 44.1 or 48 kHz, often stereo).  ``StreamResampler``
downmixes (mean of the channels) and band-limits/resamples with libsoxr
(quality ``'HQ'``), keeping the filter state between calls so a stream can be
fed block by block without clicks or dropped samples.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

TARGET_RATE = 16000

FloatArray = npt.NDArray[np.float32]


class StreamResampler:
    """Downmix to mono and resample ``in_rate`` -> 16000 Hz, streaming.

    ``process(block)`` takes float32 blocks shaped ``(n, channels)`` (a 1-D
    block is accepted when ``channels == 1``) and returns whatever 16 kHz mono
    samples are ready; soxr holds back a few milliseconds as filter delay, so
    early calls may return fewer samples (even none).  ``flush()`` drains that
    delay at the end of the stream and resets the state, so the object can be
    reused for a new stream.  The concatenation of all outputs is aligned with
    the input (soxr compensates its own filter delay).

    When the input is already 16 kHz mono the data passes through unchanged.
    """

    def __init__(self, in_rate: float, channels: int = 1, *, quality: str = "HQ") -> None:
        if in_rate <= 0:
            raise ValueError(f"in_rate must be positive, got {in_rate}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.in_rate = float(in_rate)
        self.channels = int(channels)
        self.quality = quality
        self.out_rate = TARGET_RATE
        self.passthrough = self.in_rate == TARGET_RATE and self.channels == 1
        self._stream: soxr.ResampleStream | None = None
        self._new_stream()

    def _new_stream(self) -> None:
        if self.passthrough:
            self._stream = None
        else:
            self._stream = soxr.ResampleStream(
                self.in_rate, TARGET_RATE, 1, dtype="float32", quality=self.quality
            )

    def _downmix(self, block: npt.ArrayLike) -> FloatArray:
        arr = np.asarray(block, dtype=np.float32)
        if arr.ndim == 1:
            if self.channels != 1:
                raise ValueError(
                    f"1-D block given but the resampler expects {self.channels} channels"
                )
            mono = arr
        elif arr.ndim == 2:
            if arr.shape[1] != self.channels:
                raise ValueError(
                    f"block has {arr.shape[1]} channels, resampler expects {self.channels}"
                )
            mono = arr[:, 0] if self.channels == 1 else arr.mean(axis=1, dtype=np.float32)
        else:
            raise ValueError(f"block must be (n, channels), got shape {arr.shape}")
        return np.ascontiguousarray(mono, dtype=np.float32)

    def process(self, block: npt.ArrayLike) -> FloatArray:
        """Feed one block; return the 16 kHz mono samples produced so far."""
        mono = self._downmix(block)
        if self._stream is None:
            return mono.copy()
        out: FloatArray = self._stream.resample_chunk(mono, last=False)
        return out

    def flush(self) -> FloatArray:
        """End the stream: return the samples still held as filter delay, then reset."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out: FloatArray = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._new_stream()
        return out
