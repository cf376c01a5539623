"""What the parent tells a load process to replay for one point (see bench/loadgen.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FRAME_MS = 32.0  # a 512-sample frame at 16 kHz, a 256-sample frame at 8 kHz


@dataclass(frozen=True)
class LoadPlan:
    """One point for one load process."""

    target: str  # "ringserve" | "per-frame"
    endpoint: str
    shape: str  # "device" | "gateway"
    pace: str  # "realtime" | "max"
    first_stream: int  # global index of this process's first stream (stream id = index + 1)
    streams: int
    chunk_frames: int = 1
    window: int = 2  # chunks in flight per stream, max pace
    tick_ms: float = 4.0  # gateway shape, realtime pace
    timeout_ms: float = 2000.0
    window_s: float = 2.0
    seed: int = 1
    curve: tuple[str, str] | None = None  # (server public key file, client secret key file)
    link: str = "zmtp"  # without CURVE: "zmtp" (plain sockets, bench/load_zmtp.py) or "libzmq" (DEALERs)
    unopened_streams: int = 0
    open_params: dict[str, Any] = field(default_factory=dict)
