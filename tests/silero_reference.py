"""Reference implementations taken from (or mirroring) the silero-vad package.

Only numpy + onnxruntime are needed: torch is not installed in this venv.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def silero_package_dir() -> Path:
    """Directory of the installed silero_vad package (its __init__ is not run)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("silero_vad is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def silero_model_path() -> Path:
    return silero_package_dir() / "data" / "silero_vad.onnx"


@functools.cache
def load_upstream_timestamps() -> Callable[..., list[dict[str, Any]]]:
    """silero_vad.utils_vad.get_speech_timestamps_from_probs, loaded without torch.

    utils_vad.py imports torch at module level and uses it in decorators,
    annotations and a default argument, but this function never touches it, so
    a stand-in torch is placed in sys.modules for the duration of the import
    only. The module is executed under a private name and is not registered in
    sys.modules, so nothing else can pick up the half-working module.
    """
    path = silero_package_dir() / "utils_vad.py"
    fake_torch = types.ModuleType("torch")
    fake_torch.no_grad = lambda: (lambda f: f)  # type: ignore[attr-defined]
    fake_torch.Tensor = type("Tensor", (), {})  # type: ignore[attr-defined]
    fake_torch.device = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    stand_ins: dict[str, types.ModuleType] = {"torch": fake_torch}
    if importlib.util.find_spec("packaging") is None:  # normally installed; stub if not
        fake_version = types.ModuleType("packaging.version")
        fake_version.parse = lambda v: v  # type: ignore[attr-defined]
        fake_packaging = types.ModuleType("packaging")
        fake_packaging.version = fake_version  # type: ignore[attr-defined]
        stand_ins |= {"packaging": fake_packaging, "packaging.version": fake_version}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location("_silero_utils_vad_reference", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    fn: Callable[..., list[dict[str, Any]]] = module.get_speech_timestamps_from_probs
    return fn


def read_wav_mono16(path: str | Path) -> tuple[np.ndarray, int]:
    """16-bit mono PCM WAV -> (float32 samples in [-1, 1), sample rate)."""
    import wave

    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: need 16-bit mono PCM")
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0, rate


def reference_probs(model_path: str | Path, audio_f32: np.ndarray, sample_rate: int) -> np.ndarray:
    """Per-frame speech probabilities, following silero_vad's OnnxWrapper protocol.

    W new samples per call (512 at 16 kHz, 256 at 8 kHz) with the previous
    call's last C input samples prepended (C = 64 / 32, zeros at the start),
    state float32 [2, 1, 128] fed back, sr as an int64 scalar, and the last
    partial frame zero-padded, as OnnxWrapper.audio_forward does.
    """
    import onnxruntime as ort

    frame, context_size = {16000: (512, 64), 8000: (256, 32)}[sample_rate]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    audio = np.asarray(audio_f32, dtype=np.float32).reshape(-1)
    if len(audio) % frame:
        audio = np.concatenate([audio, np.zeros(frame - len(audio) % frame, np.float32)])
    state = np.zeros((2, 1, 128), dtype=np.float32)
    context = np.zeros(context_size, dtype=np.float32)
    sr = np.array(sample_rate, dtype=np.int64)
    probs = np.empty(len(audio) // frame, dtype=np.float32)
    for k in range(len(probs)):
        x = np.concatenate([context, audio[k * frame : (k + 1) * frame]])[None, :]
        out, state = session.run(None, {"input": x, "state": state, "sr": sr})
        probs[k] = out.reshape(-1)[0]
        context = x[0, -context_size:]
    return probs
