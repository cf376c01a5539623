"""Silero VAD (ONNX) behind the StreamingModel interface.

Model contract (silero-vad's OnnxWrapper): 512 new samples at 16 kHz (256 at 8 kHz) with
64 (32) samples of the previous input prepended; LSTM state float32 [2, B, 128] fed back;
``sr`` an int64 scalar. Rows of a batch are independent, so a batch of streams gives the
same probabilities as each stream run alone (checked in tests against a B=1 reference).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

import numpy as np

from engine.models.base import ModelSpec

# The official silero-vad wheel, installed with --no-deps (see Makefile).
SILERO_VERSION = "6.2.3"
SILERO_SHA256 = "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"
FRAME_SAMPLES = {16000: 512, 8000: 256}
CONTEXT_SAMPLES = {16000: 64, 8000: 32}


def default_model_path() -> str:
    # find_spec locates the package without importing it: its __init__ imports torch.
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the silero-vad package is not installed: run `make install` (pip install --no-deps "
            f"silero-vad=={SILERO_VERSION}) or pass --model PATH"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "silero_vad.onnx")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_providers(provider: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        "auto": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    }[provider]
    if provider in ("cuda", "tensorrt") and wanted[0] not in available:
        raise RuntimeError(
            f"--provider {provider} needs {wanted[0]}, but onnxruntime offers {available}: "
            "install onnxruntime-gpu, or use --provider auto|cpu"
        )
    return [p for p in wanted if p in available]


class SileroVad:
    name = "silero_vad"
    sample_rates: tuple[int, ...] = (16000, 8000)
    state_floats = 2 * 128

    def __init__(self, spec: ModelSpec) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = spec.intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(spec.path, options, providers=resolve_providers(spec.provider))
        self.provider = self.session.get_providers()[0]
        self._sr = {rate: np.array(rate, dtype=np.int64) for rate in self.sample_rates}

    def frame_samples(self, sample_rate: int) -> int:
        return FRAME_SAMPLES[sample_rate]

    def context_samples(self, sample_rate: int) -> int:
        return CONTEXT_SAMPLES[sample_rate]

    def run(self, audio: np.ndarray, state: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
        batch = audio.shape[0]
        # Slots store each stream's state as [2, 128]; the model wants [2, B, 128].
        model_state = np.ascontiguousarray(state.reshape(batch, 2, 128).transpose(1, 0, 2))
        out, new_state = self.session.run(
            None, {"input": audio, "state": model_state, "sr": self._sr[sample_rate]})
        return out[:, 0], new_state.transpose(1, 0, 2).reshape(batch, self.state_floats)

    def warm_up(self, max_batch: int) -> None:
        for rate in self.sample_rates:
            width = FRAME_SAMPLES[rate] + CONTEXT_SAMPLES[rate]
            for batch in sorted({1, max(1, max_batch)}):
                self.run(np.zeros((batch, width), np.float32), np.zeros((batch, self.state_floats), np.float32), rate)


def load_model(spec: ModelSpec) -> SileroVad:
    return SileroVad(spec)
