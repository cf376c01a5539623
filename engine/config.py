"""Serve settings: one frozen dataclass, validated once, with errors that name the setting."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_BIND = "tcp://127.0.0.1:5555"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServeConfig:
    bind: tuple[str, ...] = (DEFAULT_BIND,)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    model: str | None = None  # None: the model shipped in the silero-vad wheel
    provider: str = "cpu"
    intra_op_threads: int = 1
    max_streams: int = 4096
    max_batch: int = 512
    batch_delay_us: int = 2000
    busy_batch_delay_us: int = 8000
    spin_us: int = 50
    ring_mib: int = 8
    ready_timeout_s: float = 120.0
    max_message_bytes: int = 1 << 20
    max_items_per_message: int = 1024
    # A gateway multiplexes all its microphones on one connection, so by default one may hold
    # as many as the engine; lower it where several tenants share a daemon.
    max_streams_per_connection: int = 4096
    max_in_flight_frames: int = 2048
    idle_timeout_s: float = 300.0
    shed_after_ms: int = 1000
    http: str | None = None  # HOST:PORT of the optional HTTP health/metrics listener
    curve_secret_key: str | None = None  # server's *.key_secret file: turns CURVE on
    curve_allow: str | None = None  # directory of allowed clients' public *.key files
    insecure: bool = False  # allow a non-loopback TCP bind without CURVE
    log_level: str = "info"
    log_format: str = "text"

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is invalid: must be {allowed}")

        need(len(self.bind) > 0, "bind", "at least one tcp:// or ipc:// endpoint")
        for endpoint in self.bind:
            need(endpoint.startswith(("tcp://", "ipc://")), "bind", "tcp://HOST:PORT or ipc:///path endpoints")
        need(1 <= self.workers <= 256, "workers", "an integer from 1 to 256")
        need(self.provider in ("auto", "cpu", "cuda", "tensorrt"), "provider", "one of auto, cpu, cuda, tensorrt")
        need(1 <= self.intra_op_threads <= 64, "intra_op_threads", "an integer from 1 to 64")
        need(1 <= self.max_streams <= 1_000_000, "max_streams", "an integer from 1 to 1000000")
        need(1 <= self.max_batch <= 65536, "max_batch", "an integer from 1 to 65536")
        need(0 <= self.batch_delay_us <= 1_000_000, "batch_delay_us", "0 to 1000000 microseconds")
        need(0 <= self.busy_batch_delay_us <= 1_000_000, "busy_batch_delay_us", "0 to 1000000 microseconds")
        need(0 <= self.spin_us <= 1_000_000, "spin_us", "0 to 1000000 microseconds")
        need(1 <= self.ring_mib <= 1024, "ring_mib", "1 to 1024 MiB")
        need(self.ready_timeout_s > 0, "ready_timeout_s", "a positive number of seconds")
        need(4096 <= self.max_message_bytes <= 64 << 20, "max_message_bytes", "4096 to 67108864 bytes")
        need(1 <= self.max_items_per_message <= 65536, "max_items_per_message", "an integer from 1 to 65536")
        need(1 <= self.max_streams_per_connection, "max_streams_per_connection", "a positive integer")
        need(1 <= self.max_in_flight_frames, "max_in_flight_frames", "a positive integer")
        need(self.idle_timeout_s > 0, "idle_timeout_s", "a positive number of seconds")
        need(0 <= self.shed_after_ms <= 3_600_000, "shed_after_ms", "0 (never shed) to 3600000 ms")
        need(self.http is None or _host_port(self.http), "http", "HOST:PORT, e.g. 127.0.0.1:8080")
        need((self.curve_secret_key is None) == (self.curve_allow is None), "curve_allow",
             "set together with curve_secret_key (both or neither)")
        need(self.log_format in ("text", "json"), "log_format", "text or json")
        need(self.log_level in ("debug", "info", "warning", "error"), "log_level", "debug, info, warning or error")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def _host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536
