"""`ringserve stream FILE.wav`: run a WAV file through the engine, write probabilities and events."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time

from clients.client import DEFAULT_ENDPOINT, Client, Result
from clients.wav import read_wav

STREAM_HELP = """\
Stream a WAV file to a running engine, one 512-sample frame (256 at 8 kHz) per message.

16-bit PCM WAVs at 16000 or 8000 Hz are sent as they are; other rates are resampled to
16000 Hz (soxr) and several channels are averaged to mono, and the command says so.
"""


def add_stream_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stream", help="run a WAV file through the engine", description=STREAM_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE.wav")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="engine endpoint (default %(default)s)")
    p.add_argument("--probs", metavar="OUT.csv", help="write frame,probability for every frame")
    p.add_argument("--events", metavar="OUT.jsonl", help="write one JSON object per speech event")
    p.add_argument("--realtime", action="store_true", help="send at the audio's own pace, as a microphone would")
    p.add_argument("--chunk-ms", type=float, default=32.0, help="audio per message in ms (default %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5, help="speech threshold (default %(default)s)")
    p.add_argument("--min-silence-duration-ms", type=float, default=100)
    p.add_argument("--speech-pad-ms", type=float, default=30)
    p.add_argument("--min-speech-duration-ms", type=float, default=250)
    p.set_defaults(func=cmd_stream)


def cmd_stream(args: argparse.Namespace) -> int:
    try:
        audio = read_wav(args.file)
    except (OSError, ValueError) as exc:
        print(f"ringserve stream: {exc}", file=sys.stderr)
        return 2
    if audio.converted:
        print(f"note: {args.file}: {audio.converted}", file=sys.stderr)
    chunk = max(1, int(audio.sample_rate * args.chunk_ms / 1000))
    results: list[Result] = []
    with Client(args.endpoint) as client:
        # A file sent faster than real time is offline work: never shed its frames.
        stream = client.open_stream(audio.sample_rate, "int16", shed_after_ms=None if args.realtime else 0,
                                    threshold=args.threshold,
                                    min_silence_duration_ms=args.min_silence_duration_ms,
                                    speech_pad_ms=args.speech_pad_ms,
                                    min_speech_duration_ms=args.min_speech_duration_ms)
        started = time.monotonic()
        for offset in range(0, len(audio.samples), chunk):
            if args.realtime:
                delay = started + offset / audio.sample_rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            results.extend(stream.send(audio.samples[offset:offset + chunk]))
        results.extend(stream.close())
    if args.probs:
        with open(args.probs, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["frame", "probability"])
            writer.writerows((r.frame, f"{r.probability:.7f}") for r in results)
    if args.events:
        with open(args.events, "w") as fh:
            for event in stream.events:
                fh.write(json.dumps({"event": event.kind, "sample": event.sample, "time_s": round(event.seconds, 4),
                                     "frame": event.frame}) + "\n")
    start = None
    for event in stream.events:
        if event.kind == "start":
            start = event.seconds
        elif start is not None:
            print(f"speech {start:8.3f} s - {event.seconds:8.3f} s")
            start = None
    print(f"{len(results)} frames, {sum(1 for e in stream.events if e.kind == 'start')} speech segments",
          file=sys.stderr)
    return 0
