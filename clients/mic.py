"""`ringserve mic`: live microphone -> engine, with a one-line live display.

Captures with :class:`clients.capture.MicCapture` at the device's own rate and channel
count, downmixed and resampled to 16 kHz mono float32 (soxr), and streams the blocks to
the engine fire-and-forget (a window of chunks in flight per stream). ``--replicate N``
sends the same audio as N streams over the one connection, the "1 mic -> N clients" load
test, and shows chunk-send -> result latency percentiles.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from clients.client import DEFAULT_ENDPOINT, Client, Stream
from clients.errors import EngineTimeout, RingserveError
from clients.results import Event, Result, StreamReset

MIC_HELP = """\
Capture live audio from a microphone and stream it to a running engine.

The device is opened at its own sample rate and channel count; the audio is averaged to
mono and resampled to 16 kHz with soxr, then sent in blocks of --block-ms. On a terminal
one line shows the live state:

    level -23.4 dBFS  p=0.93  SPEECH   frames 1234  overflows 0  dropped 0  lat p50 1.2 p90 2.0 p99 4.1 ms

level: RMS of the last block; p: the last frame's speech probability; SPEECH/silence:
between a start and an end event; overflows: PortAudio input overflows (the device lost
samples); dropped: capture blocks thrown away because sending fell behind. Start and end
events are printed on their own lines with their wall-clock time and their offset into
the capture. When stdout is not a terminal, plain status lines are printed once a second.

--replicate N sends the same audio as N streams over one connection (a load test: one
microphone, N clients) and shows the latency from sending a chunk to receiving its
result, as p50/p90/p99 over the last 2000 results; the summary at the end covers all.

Exit status: 0 after --duration or Ctrl-C; 1 when the engine or the device fails; 2 for
bad arguments (an unknown --device lists the devices that can capture).
"""


def add_mic_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mic", help="stream a live microphone to the engine", description=MIC_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", metavar="N|NAME",
                   help="input device: index, exact name or part of a name (default: the system default)")
    p.add_argument("--list-devices", action="store_true", help="list the input devices and exit")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="engine endpoint (default %(default)s)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds of audio (default: Ctrl-C)")
    p.add_argument("--replicate", type=int, default=1, metavar="N",
                   help="send the audio as N streams on one connection and show latency percentiles")
    p.add_argument("--block-ms", type=float, default=20.0, help="capture block in ms (default %(default)s)")
    p.add_argument("--window", type=int, default=32,
                   help="chunks in flight per stream before sending waits (default %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for the engine to answer (default %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5, help="speech threshold (default %(default)s)")
    p.add_argument("--min-silence-duration-ms", type=float, default=100, help="(default %(default)s)")
    p.add_argument("--speech-pad-ms", type=float, default=30, help="(default %(default)s)")
    p.add_argument("--min-speech-duration-ms", type=float, default=250, help="(default %(default)s)")
    p.set_defaults(func=cmd_mic)


def _percentiles(values: Any) -> tuple[float, float, float, float] | None:
    if not len(values):
        return None
    a = np.fromiter(values, float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return float(p50), float(p90), float(p99), float(a.max())


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"


@dataclass
class LiveState:
    """What the display shows; updated by the stream callbacks."""

    out: IO[str]
    tty: bool
    replicate: int
    level_db: float = -math.inf
    probability: float = math.nan
    frames: int = 0
    samples: int = 0
    speech_start: Event | None = None
    segments: int = 0
    errors: int = 0
    resets: int = 0
    unsent: int = 0  # samples captured while the engine was unreachable
    recent: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=2000))
    all_latencies: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=1_000_000))
    events: list[list[tuple[str, int]]] = field(default_factory=list)
    status_len: int = 0
    last_status: float = 0.0

    def line(self, text: str) -> None:
        """A line of its own (events, notes): above the live status line on a terminal."""
        if self.tty:
            self.out.write("\r\x1b[2K")
        self.out.write(text + "\n")
        self.out.flush()
        self.last_status = 0.0 if self.tty else self.last_status

    def status(self, overflows: int, dropped: int, dropped_frames: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_status < (0.1 if self.tty else 1.0):
            return
        self.last_status = now
        state = "SPEECH" if self.speech_start is not None else "silence"
        level = f"{self.level_db:6.1f}" if math.isfinite(self.level_db) else "  -inf"
        prob = f"{self.probability:4.2f}" if self.probability == self.probability else "  --"
        text = (f"t={self.samples / 16000:7.2f}s  level {level} dBFS  p={prob}  {state:<7}  "
                f"frames {self.frames}  overflows {overflows}  dropped {dropped}")
        pct = _percentiles(self.recent)
        if pct is not None:
            text += f"  lat p50 {pct[0] * 1e3:.1f} p90 {pct[1] * 1e3:.1f} p99 {pct[2] * 1e3:.1f} ms"
        if self.errors:
            text += f"  errors {self.errors}"
        if self.unsent:
            text += f"  unsent {self.unsent / 16000:.1f}s"
        if self.tty:
            self.out.write("\r\x1b[2K" + text)
        else:
            self.out.write("status " + text + "\n")
        self.out.flush()

    # ---- callbacks ---------------------------------------------------------------------
    def on_result(self, result: Result) -> None:
        self.recent.append(result.latency)
        self.all_latencies.append(result.latency)

    def on_result_main(self, result: Result) -> None:
        self.on_result(result)
        self.frames += 1
        self.probability = result.probability

    def on_event_main(self, event: Event) -> None:
        if event.kind == "start":
            self.speech_start = event
            self.line(f"{_clock(event.received_at)}  speech start  t={event.stream_seconds:8.3f} s")
        else:
            start = self.speech_start
            self.speech_start = None
            self.segments += 1
            took = f"  ({(event.stream_sample - start.stream_sample) / event.sample_rate:.3f} s)" if start else ""
            self.line(f"{_clock(event.received_at)}  speech end    t={event.stream_seconds:8.3f} s{took}")

    def on_error(self, error: RingserveError) -> None:
        self.errors += 1
        if self.errors <= 5:
            self.line(f"engine error: {error}")

    def on_reset(self, reset: StreamReset) -> None:
        self.resets += 1

    def on_reset_main(self, reset: StreamReset) -> None:
        self.resets += 1
        self.line(f"{_clock(reset.received_at)}  stream reset ({reset.reason}): the engine lost its state; "
                      f"{reset.lost_samples / 16000:.2f} s of audio unanalysed, offsets continue at "
                      f"t={reset.base_sample / 16000:.3f} s")


def cmd_mic(args: argparse.Namespace) -> int:
    try:
        from clients.capture import CaptureDeviceError, MicCapture, list_devices
    except ImportError as exc:  # pragma: no cover - sounddevice is a dependency
        print(f"ringserve mic: {exc}", file=sys.stderr)
        return 1
    if args.list_devices:
        try:
            print(list_devices())
        except RuntimeError as exc:
            print(f"ringserve mic: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.replicate < 1:
        print("ringserve mic: --replicate must be >= 1", file=sys.stderr)
        return 2
    if args.duration is not None and args.duration <= 0:
        print("ringserve mic: --duration must be > 0 seconds", file=sys.stderr)
        return 2
    try:
        mic = MicCapture(args.device, block_ms=args.block_ms)
    except CaptureDeviceError as exc:
        print(f"ringserve mic: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as exc:
        print(f"ringserve mic: {exc}", file=sys.stderr)
        return 1
    out = sys.stdout
    live = LiveState(out, out.isatty(), args.replicate)
    vad = {"threshold": args.threshold, "min_silence_duration_ms": args.min_silence_duration_ms,
           "speech_pad_ms": args.speech_pad_ms, "min_speech_duration_ms": args.min_speech_duration_ms}
    code = 0
    with Client(args.endpoint, timeout=args.timeout) as client:
        streams: list[Stream] = []
        try:
            for i in range(args.replicate):
                main = i == 0
                streams.append(client.open_stream(
                    16000, "float32", window=args.window,
                    on_result=live.on_result_main if main else live.on_result,
                    on_event=live.on_event_main if main else None,
                    on_reset=live.on_reset_main if main else live.on_reset, on_error=live.on_error, **vad))
        except EngineTimeout as exc:
            print(f"ringserve mic: {exc}", file=sys.stderr)
            return 1
        except RingserveError as exc:
            print(f"ringserve mic: the engine refused the stream: {exc}", file=sys.stderr)
            return 2
        live.line(f"capturing {mic.device.name!r} ({mic.device.hostapi}) at {mic.samplerate:g} Hz x "
                  f"{mic.channels} ch -> 16000 Hz mono; {args.replicate} stream(s) to {args.endpoint}; "
                  + (f"{args.duration:g} s" if args.duration else "Ctrl-C to stop"))
        limit = math.inf if args.duration is None else args.duration * 16000
        try:
            with mic:
                stall = max(2.0, 10 * args.block_ms / 1000)
                last_block = time.monotonic()
                while live.samples < limit:
                    # Replies are read while waiting for audio, so latencies are measured when the
                    # results arrive, not when the next block does.
                    try:
                        block = mic.read(timeout=0)
                    except TimeoutError:
                        try:
                            client.poll(timeout=0.002)
                        except EngineTimeout:
                            pass
                        if time.monotonic() - last_block > stall:
                            live.line(f"ringserve mic: no audio from {mic.device.name!r} for {stall:g} s")
                            code = 1
                            break
                        live.status(mic.overflows, mic.dropped_blocks, mic.dropped_frames)
                        continue
                    except EOFError:
                        break
                    last_block = time.monotonic()
                    if live.samples + len(block) > limit:
                        block = block[:int(limit - live.samples)]
                    live.samples += len(block)
                    rms = float(np.sqrt(np.mean(np.square(block, dtype=np.float64)))) if len(block) else 0.0
                    live.level_db = 20 * math.log10(rms) if rms > 0 else -math.inf
                    try:
                        # While the client reconnects to a restarted engine, blocks that cannot be
                        # sent at once are dropped (counted) rather than stalling the capture.
                        client.submit_many([(s, block) for s in streams],
                                           timeout=args.timeout if client.connected else 0.01)
                    except EngineTimeout as exc:
                        if client.connected:
                            live.line(f"ringserve mic: {exc}")
                            code = 1
                            break
                        if not live.unsent:
                            live.line(f"ringserve mic: the engine is unreachable ({client.session.lost_reason}); "
                                      "reconnecting")
                        live.unsent += len(block)
                    live.status(mic.overflows, mic.dropped_blocks, mic.dropped_frames)
        except KeyboardInterrupt:
            live.line("interrupted")
        except CaptureDeviceError as exc:
            print(f"\nringserve mic: {exc}", file=sys.stderr)
            return 1
        try:
            for stream in streams:
                stream.close(timeout=args.timeout)
        except RingserveError as exc:
            live.line(f"ringserve mic: closing the streams: {exc}")
            code = code or 1
        live.status(mic.overflows, mic.dropped_blocks, mic.dropped_frames, force=True)
        if live.tty:
            out.write("\n")
        events = [[(e.kind, e.stream_sample) for e in s.events] for s in streams]
        reconnects = client.reconnects
    _summary(live, mic, events, reconnects)
    return code


def _summary(live: LiveState, mic: Any, events: list[list[tuple[str, int]]], reconnects: int) -> None:
    p = live.line
    p(f"summary: {live.samples / 16000:.2f} s captured from {mic.device.name!r} ({mic.samplerate:g} Hz x "
      f"{mic.channels} ch -> 16000 Hz mono); {live.frames} frames; {live.segments} speech segment(s)")
    p(f"summary: overflows {mic.overflows}, dropped blocks {mic.dropped_blocks} ({mic.dropped_frames} frames), "
      f"engine errors {live.errors}, reconnects {reconnects}, unsent while reconnecting "
      f"{live.unsent / 16000:.2f} s")
    pct = _percentiles(live.all_latencies)
    if pct is not None:
        p(f"summary: latency chunk sent -> result ({len(events)} stream(s), {len(live.all_latencies)} results): "
          f"p50 {pct[0] * 1e3:.2f} ms  p90 {pct[1] * 1e3:.2f} ms  p99 {pct[2] * 1e3:.2f} ms  "
          f"max {pct[3] * 1e3:.2f} ms")
    if len(events) > 1:
        differ = sum(1 for e in events[1:] if e != events[0])
        p(f"summary: replicas agree: {'yes' if not differ else 'NO'} ({len(events)} streams, "
          f"{len(events[0])} events each, {differ} differ)")
