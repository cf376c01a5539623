"""Streams in the front-end's lane (engine/lane.py): one-frame chunks taken and answered in
bulk, the speech-event machine run only where a frame could move it. What comes back must be
what frame-by-frame onnxruntime and offline segmentation give, also when a stream leaves the
lane with frames in flight (a RESET, a partial frame, a NaN frame, a CLOSE) and comes back."""

from __future__ import annotations

from typing import Any

import numpy as np

from clients.client import Client, Pending, Result, Stream
from tests.conftest import Clip, DaemonProcess, reference, speech_clips
from tests.test_engine_events import engine_segments, upstream_segments

FRAME = 512
TOLERANCE = 1e-6
IN_FLIGHT = 6  # ticks sent before the oldest one's results are collected


def frames_in_sets(client: Client) -> int:
    return int(client.stats()["counters"].get("frames_in_frame_sets", 0))


def gateway_segments(endpoint: str, clips: list[Clip], **vad: Any) -> tuple[list[list[tuple[int, int]]], float]:
    """Each clip a stream, one frame of each per message (a gateway's tick), IN_FLIGHT ticks in
    flight; the trailing partial frame alone, then CLOSE. Returns every stream's segments and
    the share of the frames that could go in bulk (messages of >= 4 of them) which did."""
    with Client(endpoint, timeout=60) as client:
        before = frames_in_sets(client)
        streams = [client.open_stream(16000, **vad) for _ in clips]
        ticks = max(len(c.pcm) // FRAME for c in clips)
        in_flight: list[list[Pending]] = []
        could = 0
        for tick in range(ticks):
            due = [(s, c.pcm[tick * FRAME:(tick + 1) * FRAME]) for s, c in zip(streams, clips)
                   if (tick + 1) * FRAME <= len(c.pcm)]
            could += len(due) if len(due) >= 4 else 0
            in_flight.append(client.submit_many(due))
            if len(in_flight) > IN_FLIGHT:
                for pending in in_flight.pop(0):
                    pending.result()
        for batch in in_flight:
            for pending in batch:
                pending.result()
        for stream, clip in zip(streams, clips):
            tail = len(clip.pcm) % FRAME
            if tail:
                stream.send(clip.pcm[-tail:])
            stream.close()
        bulk = (frames_in_sets(client) - before) / could
        out = []
        for stream in streams:
            starts = [e.sample for e in stream.events if e.kind == "start"]
            ends = [e.sample for e in stream.events if e.kind == "end"]
            out.append(list(zip(starts, ends)))
    return out, bulk


def test_events_of_lane_streams_match_upstream(engine: DaemonProcess) -> None:
    clips = [c for c in speech_clips() if c.rate == 16000][:6]
    segments, bulk = gateway_segments(engine.endpoint, clips)
    assert bulk == 1.0, f"only {bulk:.0%} of the frames that could went through the lane"
    for clip, found in zip(clips, segments):
        assert found == upstream_segments(clip), clip.name


def test_lane_events_equal_the_item_by_item_path_with_max_speech(engine: DaemonProcess) -> None:
    """max_speech_duration_s: the lane must push the frame where a segment is cut although
    every probability around it is quiet (SpeechSegmenter.quiet's frame limit)."""
    clips = [c for c in speech_clips() if c.rate == 16000][:4]
    vad = {"max_speech_duration_s": 1.5, "min_silence_duration_ms": 300}
    segments, _ = gateway_segments(engine.endpoint, clips, **vad)
    for clip, found in zip(clips, segments):
        assert found == engine_segments(engine.endpoint, clip, **vad), clip.name


def test_streams_leave_and_rejoin_the_lane_with_frames_in_flight(engine: DaemonProcess) -> None:
    """Five streams, one frame each per message, several messages in flight. Mid-run, with
    frames of it in flight: stream 1 is RESET, stream 2 sends 100 samples alone (a partial
    frame from then on), stream 4 is CLOSEd; streams 0 and 3 carry on. Every stream's results
    must be frame-by-frame onnxruntime's over exactly the audio it was given, numbered from
    its last reset."""
    clips = [c for c in speech_clips() if c.rate == 16000][:5]
    ticks, change_at = 40, 14
    with Client(engine.endpoint, timeout=60) as client:
        before = frames_in_sets(client)
        streams: list[Stream] = [client.open_stream(16000) for _ in clips]
        position = [0] * len(clips)
        epoch_start = [0] * len(clips)  # where the audio of the stream's current epoch begins
        results: list[list[Result]] = [[] for _ in clips]
        before_reset: list[Result] = []
        in_flight: list[list[tuple[int, Pending]]] = []

        def collect(batch: list[tuple[int, Pending]], only: int | None = None) -> list[tuple[int, Pending]]:
            kept = []
            for k, pending in batch:
                if only is None or k == only:
                    results[k] += pending.result()
                else:
                    kept.append((k, pending))
            return kept

        for tick in range(ticks):
            if tick == change_at:
                in_flight = [collect(batch, only=1) for batch in in_flight]
                streams[1].reset()
                before_reset, results[1], epoch_start[1] = results[1], [], position[1]
                in_flight.append([(2, streams[2].submit(clips[2].pcm[position[2]:position[2] + 100]))])
                position[2] += 100
                results[4] += streams[4].close()
            due = [k for k in range(len(clips)) if not (k == 4 and tick >= change_at)]
            pending = client.submit_many([(streams[k], clips[k].pcm[position[k]:position[k] + FRAME]) for k in due])
            for k in due:
                position[k] += FRAME
            in_flight.append(list(zip(due, pending)))
            if len(in_flight) > IN_FLIGHT:
                collect(in_flight.pop(0))
        for batch in in_flight:
            collect(batch)
        for k in range(4):
            results[k] += streams[k].close()
        bulk = frames_in_sets(client) - before
    assert bulk >= 3 * ticks, f"only {bulk} frames went through the lane"
    epochs = [(k, clips[k].pcm[epoch_start[k]:position[k]], results[k]) for k in range(len(clips))]
    epochs.append((1, clips[1].pcm[:epoch_start[1]], before_reset))
    for k, audio, got in epochs:
        ref = reference(Clip(clips[k].name, audio, clips[k].rate))
        assert [r.frame for r in got] == list(range(len(ref))), f"stream {k}: frames missing or out of order"
        diff = np.max(np.abs(np.array([r.probability for r in got], np.float32) - ref))
        assert diff <= TOLERANCE, f"stream {k}: max |diff| {diff}"
