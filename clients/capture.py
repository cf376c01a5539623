"""Microphone capture for ``ringserve mic``: PortAudio input -> 16 kHz mono float32.

``MicCapture`` opens a ``sounddevice.InputStream`` on an input device at the
device's own default sample rate and channel count (at most 2), so PortAudio
and ALSA do no hidden conversion.  The PortAudio callback only copies each
block into a bounded queue; the consumer (``read()`` / iteration) downmixes and
resamples to 16 kHz with :class:`clients.resample.StreamResampler`.

Nothing is lost silently: ``overflows`` counts callbacks in which PortAudio
reported an input overflow (the device dropped samples because the callback
ran late), ``dropped_blocks`` / ``dropped_frames`` count blocks thrown away
because the consumer fell behind and the queue was full.  ``close()`` logs a
warning when either is non-zero, and ``summary()`` reports them.

``sounddevice`` is imported lazily: importing it initialises PortAudio, which
enumerates the sound devices, and raises ``OSError`` when the PortAudio
library is missing (Debian: ``apt-get install libportaudio2``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from clients.resample import TARGET_RATE, StreamResampler

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

MAX_CHANNELS = 2
_POLL_S = 0.05


class CaptureDeviceError(ValueError):
    """The requested input device does not exist or cannot capture."""


def _sounddevice() -> types.ModuleType:
    try:
        import sounddevice
    except OSError as exc:  # PortAudio shared library missing
        raise RuntimeError(
            f"cannot load PortAudio ({exc}); install it, e.g. `apt-get install libportaudio2`"
        ) from exc
    return sounddevice


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    hostapi: str
    max_input_channels: int
    default_samplerate: float


def _all_devices() -> list[InputDevice]:
    sd = _sounddevice()
    hostapis = sd.query_hostapis()
    out = []
    for info in sd.query_devices():
        out.append(
            InputDevice(
                index=int(info["index"]),
                name=str(info["name"]),
                hostapi=str(hostapis[info["hostapi"]]["name"]),
                max_input_channels=int(info["max_input_channels"]),
                default_samplerate=float(info["default_samplerate"]),
            )
        )
    return out


def input_devices() -> list[InputDevice]:
    """All devices PortAudio can capture from."""
    return [d for d in _all_devices() if d.max_input_channels > 0]


def _default_input_index() -> int | None:
    sd = _sounddevice()
    try:
        info = sd.query_devices(kind="input")
    except (ValueError, sd.PortAudioError):
        return None
    return int(info["index"])


def list_devices() -> str:
    """A readable table of the input devices; ``*`` marks the default one."""
    devices = input_devices()
    if not devices:
        return "(no input devices found: PortAudio sees no capture device)"
    default = _default_input_index()
    hostapi_w = max(8, *(len(d.hostapi) for d in devices))
    lines = [f"    idx  in-ch  rate(Hz)  {'host API':<{hostapi_w}}  name"]
    for d in devices:
        mark = "*" if d.index == default else " "
        lines.append(
            f"  {mark}{d.index:>3}  {d.max_input_channels:>5}  {d.default_samplerate:>8.0f}"
            f"  {d.hostapi:<{hostapi_w}}  {d.name}"
        )
    return "\n".join(lines)


def _not_found(msg: str) -> CaptureDeviceError:
    return CaptureDeviceError(f"{msg}\nAvailable input devices:\n{list_devices()}")


def find_input_device(device: int | str | None = None) -> InputDevice:
    """Resolve ``device`` to an input-capable device.

    ``device`` is an index (also as a digit string), an exact device name, a
    case-insensitive substring of one name (devices with inputs win when
    several names match), or ``None`` for the default input device.  Raises
    :class:`CaptureDeviceError`, listing the input devices, otherwise.
    """
    devices = _all_devices()
    if isinstance(device, str) and device.strip().isdigit():
        device = int(device)  # "3" from a command line means index 3
    if device is None:
        index = _default_input_index()
        if index is None:
            raise _not_found("no default input device")
        matches = [d for d in devices if d.index == index]
    elif isinstance(device, int):
        matches = [d for d in devices if d.index == device]
        if not matches:
            raise _not_found(f"input device index {device} does not exist")
    else:
        matches = [d for d in devices if d.name == device]
        if not matches:
            needle = device.lower()
            matches = [d for d in devices if needle in d.name.lower()]
            if len(matches) > 1:
                # prefer the devices that can actually capture
                capturing = [d for d in matches if d.max_input_channels > 0]
                matches = capturing or matches
        if not matches:
            raise _not_found(f"input device {device!r} not found")
        if len(matches) > 1:
            names = ", ".join(f"{d.index}: {d.name!r}" for d in matches)
            raise _not_found(f"input device {device!r} is ambiguous (matches {names})")
    found = matches[0]
    if found.max_input_channels < 1:
        raise _not_found(
            f"device {found.index} {found.name!r} ({found.hostapi}) has no input channels"
        )
    return found


class MicCapture:
    """Capture from an input device as 16 kHz mono float32 chunks.

    Use as a context manager (the stream is opened and started on entry and
    closed on exit), then ``read(timeout)`` or iterate::

        with MicCapture("USB") as mic:
            for chunk in mic:          # np.float32, 16 kHz mono
                ...

    ``samplerate`` and ``channels`` default to the device's default sample
    rate and its input channel count capped at 2; the blocks are downmixed by
    the mean of the channels and resampled with soxr.
    """

    out_rate = TARGET_RATE

    def __init__(
        self,
        device: int | str | None = None,
        *,
        block_ms: float = 20.0,
        queue_blocks: int = 200,
        samplerate: float | None = None,
        channels: int | None = None,
    ) -> None:
        if block_ms <= 0:
            raise ValueError(f"block_ms must be positive, got {block_ms}")
        if queue_blocks < 1:
            raise ValueError(f"queue_blocks must be >= 1, got {queue_blocks}")
        self.device = find_input_device(device)
        self.samplerate = float(samplerate or self.device.default_samplerate)
        self.channels = int(channels or min(self.device.max_input_channels, MAX_CHANNELS))
        if not 1 <= self.channels <= self.device.max_input_channels:
            raise CaptureDeviceError(
                f"device {self.device.name!r} has {self.device.max_input_channels} input "
                f"channels, {self.channels} requested"
            )
        self.blocksize = max(1, round(self.samplerate * block_ms / 1000.0))
        self.queue_blocks = queue_blocks
        self._queue: queue.Queue[np.ndarray[Any, Any]] = queue.Queue(maxsize=queue_blocks)
        self._resampler = StreamResampler(self.samplerate, self.channels)
        self._stream: Any = None
        self._closed = False
        self._flushed = False
        self._lock = threading.Lock()
        # counters (written by the PortAudio callback thread only)
        self.overflows = 0
        self.dropped_blocks = 0
        self.dropped_frames = 0
        self.frames_captured = 0
        self.callbacks = 0

    # -- PortAudio side -------------------------------------------------
    def _callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        self.callbacks += 1
        self.frames_captured += frames
        if status.input_overflow:
            self.overflows += 1
        try:
            self._queue.put_nowait(indata.copy())
        except queue.Full:
            self.dropped_blocks += 1
            self.dropped_frames += frames

    def start(self) -> Self:
        """Open and start the input stream (idempotent)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("MicCapture is closed")
            if self._stream is not None:
                return self
            sd = _sounddevice()
            try:
                stream = sd.InputStream(
                    device=self.device.index,
                    samplerate=self.samplerate,
                    channels=self.channels,
                    dtype="float32",
                    blocksize=self.blocksize,
                    callback=self._callback,
                )
            except sd.PortAudioError as exc:
                raise CaptureDeviceError(
                    f"cannot open input device {self.device.index} {self.device.name!r} at "
                    f"{self.samplerate:g} Hz x {self.channels} ch: {exc}\n"
                    f"Available input devices:\n{list_devices()}"
                ) from exc
            try:
                stream.start()
            except BaseException:
                stream.close()
                raise
            self._stream = stream
        return self

    def close(self) -> None:
        """Stop and close the stream; queued audio can still be read afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop()
            finally:
                stream.close()
        if self.overflows or self.dropped_blocks:
            log.warning("%s", self.summary())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- consumer side --------------------------------------------------
    @property
    def active(self) -> bool:
        """True while the stream is open and delivering audio."""
        stream = self._stream
        return stream is not None and not self._closed and bool(stream.active)

    def stats(self) -> dict[str, int]:
        return {
            "frames_captured": self.frames_captured,
            "callbacks": self.callbacks,
            "overflows": self.overflows,
            "dropped_blocks": self.dropped_blocks,
            "dropped_frames": self.dropped_frames,
            "queued_blocks": self._queue.qsize(),
        }

    def summary(self) -> str:
        s = self.stats()
        return (
            f"capture {self.device.name!r} @ {self.samplerate:g} Hz x {self.channels} ch: "
            f"{s['frames_captured']} frames in {s['callbacks']} callbacks, "
            f"{s['overflows']} input overflows, {s['dropped_blocks']} blocks "
            f"({s['dropped_frames']} frames) dropped on a full queue"
        )

    def read(self, timeout: float | None = None) -> FloatArray:
        """Return the next non-empty chunk of 16 kHz mono float32 audio.

        Waits up to ``timeout`` seconds (``None``: indefinitely) and raises
        ``TimeoutError`` when no audio arrived.  After the stream is closed
        (or stops) the queued audio is still returned, then the resampler's
        tail, then ``EOFError``.
        """
        if self._stream is None and not self._closed:
            raise RuntimeError("MicCapture not started: use `with MicCapture(...)` or start()")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            try:
                block = self._queue.get(timeout=max(wait, 0.0))
            except queue.Empty:
                if not self.active:
                    if not self._flushed:
                        self._flushed = True
                        tail = self._resampler.flush()
                        if tail.size:
                            return tail
                    raise EOFError(f"capture from {self.device.name!r} has ended") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"no audio from {self.device.name!r} within {timeout} s"
                    ) from None
                continue
            out = self._resampler.process(block)
            if out.size:
                return out

    def __iter__(self) -> Iterator[FloatArray]:
        while True:
            try:
                yield self.read()
            except EOFError:
                return
