"""The small interface the engine needs from a streaming model.

The engine owns framing, per-stream state storage and batching; a model only says how big
its frames and its per-stream state are, and runs one batch. Silero VAD is the first
implementation; a stateless model is a streaming model whose state has zero floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build its model; picklable, so it crosses ``spawn``."""

    path: str
    provider: str = "cpu"
    intra_op_threads: int = 1


class StreamingModel(Protocol):
    name: str
    provider: str  # the onnxruntime execution provider actually in use
    sample_rates: tuple[int, int] | tuple[int, ...]
    state_floats: int  # per-stream state size, in float32 values

    def frame_samples(self, sample_rate: int) -> int:
        """New samples each frame consumes."""

    def context_samples(self, sample_rate: int) -> int:
        """Samples of the previous frame prepended to each model input."""

    def run(self, audio: np.ndarray, state: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
        """audio [B, context+frame] f32, state [B, state_floats] f32 -> (probs [B], new state [B, state_floats])."""

    def warm_up(self, max_batch: int) -> None:
        """Run representative batches so the first real request pays no one-off cost."""
