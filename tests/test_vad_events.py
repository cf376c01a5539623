"""engine.vad_events against silero-vad's own offline get_speech_timestamps_from_probs."""
from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.vad_events import EventKind, SpeechEvent, SpeechSegmenter, VadParams
from tests.silero_reference import (
    load_upstream_timestamps,
    read_wav_mono16,
    reference_probs,
    silero_model_path,
)

FRAME = {16000: 512, 8000: 256}
Segments = list[tuple[int, int]]


def upstream(probs: Sequence[float], sr: int, p: VadParams, n: int | None = None) -> Segments:
    out = load_upstream_timestamps()(
        [float(x) for x in probs],
        sampling_rate=sr,
        threshold=p.threshold,
        neg_threshold=p.neg_threshold,
        min_silence_duration_ms=p.min_silence_duration_ms,
        speech_pad_ms=p.speech_pad_ms,
        min_speech_duration_ms=p.min_speech_duration_ms,
        max_speech_duration_s=p.max_speech_duration_s,
        audio_length_samples=n,
    )
    return [(d["start"], d["end"]) for d in out]


def stream(probs: Sequence[float], sr: int, p: VadParams, n: int | None = None) -> list[SpeechEvent]:
    seg = SpeechSegmenter(p, sr)
    events: list[SpeechEvent] = []
    for i, x in enumerate(probs):
        out = seg.push(float(x))
        assert all(e.frame == i for e in out)  # emitted by the push that decided it
        events += out
        assert seg.in_speech == (bool(events) and events[-1].kind is EventKind.START)
    events += seg.finish(len(probs) * FRAME[sr] if n is None else n)
    assert not seg.in_speech
    return events


def pair(events: Sequence[SpeechEvent]) -> Segments:
    kinds = [e.kind for e in events]
    assert kinds == [EventKind.START, EventKind.END] * (len(events) // 2), kinds
    segs = [(a.sample, b.sample) for a, b in zip(events[::2], events[1::2], strict=True)]
    flat = [x for s in segs for x in s]
    assert flat == sorted(flat) and all(x >= 0 for x in flat), segs  # ordered, never overlapping
    return segs


def segments(probs: Sequence[float], p: VadParams, sr: int = 16000, n: int | None = None) -> Segments:
    return pair(stream(probs, sr, p, n))


# ---------------------------------------------------------------- strategies
@st.composite
def vad_params(draw: st.DrawFn, exact: bool) -> VadParams:
    """exact=True: only parameters where no documented difference can occur."""
    thr = draw(st.floats(0.05, 0.95))
    neg = draw(st.none() | st.floats(0.05, 1.0).map(lambda f: thr * f))
    max_s = draw(st.just(math.inf) | st.floats(0.05, 3.0) | st.sampled_from([0.5, 1.0, 2.0]))
    min_speech = draw(st.sampled_from([0.0, 32.0, 64.0, 250.0]) | st.floats(0, 600))
    pad_max = 150.0
    if exact and max_s != math.inf:
        # Differences 2 and 3 need pad > frame/2 (16 ms) plus a segment that a
        # cut restarted and min_speech then dropped, or pad > one frame (32 ms).
        pad_max = 32.0 if min_speech == 0 or draw(st.booleans()) else 16.0
        min_speech = 0.0 if pad_max == 32.0 else min_speech
    pad = draw(st.sampled_from([0.0, 10.0, 16.0, 30.0, 32.0, 100.0]).filter(lambda x: x <= pad_max)
               | st.floats(0, pad_max))
    min_sil = draw(st.sampled_from([0.0, 32.0, 64.0, 100.0, 300.0, 500.0]) | st.floats(0, 600))
    if exact:
        min_sil += 2 * pad  # differences 1, 4 and 5 need min_silence < 2 * pad
    return VadParams(thr, neg, min_sil, pad, min_speech, max_s)


@st.composite
def prob_sequences(draw: st.DrawFn, p: VadParams) -> list[float]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mode = draw(st.sampled_from(["random", "runs", "talk"]))
    if mode == "random":
        return rng.random(draw(st.integers(0, 300))).tolist()
    thr, neg = p.threshold, p.effective_neg_threshold
    bands = {"speech": (thr, 1.0), "pause": (0.0, neg), "between": (neg, thr)}
    if mode == "runs":
        lengths = st.integers(1, 12) | st.integers(1, 60)
        parts = draw(st.lists(st.tuples(st.sampled_from(sorted(bands)), lengths), max_size=16))
    else:  # speech with pauses around 98 ms: where max_speech cuts look for the longest pause
        parts = [part for speech, pause in draw(st.lists(st.tuples(
            st.integers(3, 40), st.integers(2, 9)), min_size=1, max_size=10))
            for part in (("speech", speech), ("pause", pause))]
    out: list[float] = []
    for kind, length in parts:
        lo, hi = bands[kind]
        out += np.clip(rng.uniform(lo, hi, length), 0.0, np.nextafter(hi, 0)).tolist()
    return out


@st.composite
def cases(draw: st.DrawFn, exact: bool) -> tuple[list[float], int, VadParams, int]:
    p = draw(vad_params(exact))
    probs = draw(prob_sequences(p))
    sr = draw(st.sampled_from([16000, 8000]))
    short = draw(st.integers(0, FRAME[sr] - 1)) if probs else 0  # a partial last frame
    return probs, sr, p, len(probs) * FRAME[sr] - short


# database=None: no .hypothesis/ folder in the tree; examples stay random from run to run.
PROPERTY = settings(max_examples=100, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(PROPERTY, max_examples=50)


# ---------------------------------------------------------------- properties
@PROPERTY
@given(cases(exact=True))
def test_matches_upstream_where_no_documented_difference(case: tuple[list[float], int, VadParams, int]) -> None:
    probs, sr, p, n = case
    assert segments(probs, p, sr, n) == upstream(probs, sr, p, n)


@QUICK
@given(cases(exact=True), st.data())
def test_no_lookahead_and_events_are_certain_when_emitted(
    case: tuple[list[float], int, VadParams, int], data: st.DataObject
) -> None:
    probs, sr, p, _ = case
    seg = SpeechSegmenter(p, sr)
    pushed = [e for x in probs for e in seg.push(x)]
    for k in data.draw(st.lists(st.integers(0, len(probs)), max_size=3)):
        seg = SpeechSegmenter(p, sr)
        assert [e for x in probs[:k] for e in seg.push(x)] == [e for e in pushed if e.frame < k]
    # Whatever follows the deciding frame (the stream ending there, a long
    # pause, endless speech), offline keeps that boundary.
    w = FRAME[sr]
    for e in pushed[:8]:  # later ones repeat the same situations, at 3 offline runs each
        head = probs[: e.frame + 1]
        for tail, n in (([], len(head) * w), ([0.0] * 120, None), ([1.0] * 120, None)):
            offline = upstream(head + tail, sr, p, n)
            assert e.sample in [s[e.kind - 1] for s in offline], (e, tail[:1], offline)


@PROPERTY
@given(cases(exact=False))
def test_skipping_quiet_frames_changes_nothing(case: tuple[list[float], int, VadParams, int]) -> None:
    """engine/lane.py pushes only the frames quiet() does not cover and seeks past the rest:
    the events must be those of pushing every frame."""
    probs, sr, p, n = case
    every, skipping = SpeechSegmenter(p, sr), SpeechSegmenter(p, sr)
    expected = [e for x in probs for e in every.push(x)]
    got: list[SpeechEvent] = []
    lo, hi, until = skipping.quiet()
    for i, x in enumerate(probs):
        if lo <= x < hi and i < until:
            continue
        skipping.seek(i)
        got += skipping.push(x)
        lo, hi, until = skipping.quiet()
    skipping.seek(len(probs))
    assert got == expected
    assert skipping.finish(n) == every.finish(n)


def test_quiet_covers_steady_silence_and_speech() -> None:
    seg = SpeechSegmenter(VadParams(max_speech_duration_s=1.0), 16000)
    assert seg.quiet() == (-math.inf, 0.5, 1 << 62)  # silence: anything under the threshold
    for _ in range(9):  # 288 ms of speech: START is out (min_speech 250 ms)
        seg.push(0.9)
    lo, hi, until = seg.quiet()
    assert (lo, hi) == (seg.params.effective_neg_threshold, math.inf)
    # max_speech 1 s = 16000 samples less a frame and two pads: frame 29 (sample 14848) is
    # the first past it, so frames 9..28 are quiet
    assert until == 29
    seg.push(0.1)  # a pause begins: the next frames may end the segment
    assert seg.quiet()[0] == math.inf


@QUICK
@given(cases(exact=False))
def test_any_params_same_segments_within_one_pad(case: tuple[list[float], int, VadParams, int]) -> None:
    """Documented differences only move padded boundaries, by at most speech_pad."""
    probs, sr, p, n = case
    mine, offline = segments(probs, p, sr, n), upstream(probs, sr, p, n)
    assert len(mine) == len(offline)
    pad = math.ceil(sr * p.speech_pad_ms / 1000)
    for (a, b), (c, d) in zip(mine, offline, strict=True):
        assert abs(a - c) <= pad and abs(b - d) <= pad, (mine, offline)


# ---------------------------------------------------------------- documented differences
W16 = 512


def runs(*parts: tuple[float, int]) -> list[float]:
    return [prob for prob, count in parts for _ in range(count)]


def test_difference_1_short_gap_is_not_halved() -> None:
    p = VadParams(min_silence_duration_ms=32, speech_pad_ms=100, min_speech_duration_ms=0)
    probs = runs((0.9, 10), (0.0, 2), (0.9, 10), (0.0, 20))
    # Raw: [0, 5120] and [6144, 11264]; the 1024-sample gap is under 2 * 1600.
    assert upstream(probs, 16000, p) == [(0, 5632), (5632, 12864)]  # offline: half each
    events = stream(probs, 16000, p)
    assert pair(events) == [(0, 6720), (6720, 12864)]  # first END keeps its pad; START waits for it
    assert events[1].frame == 11  # END went out one min_silence (1 frame) into the pause


@pytest.mark.parametrize("min_speech_ms, restarted_survives", [(100, True), (250, False)])
def test_difference_2_max_speech_cut_at_pause(min_speech_ms: float, restarted_survives: bool) -> None:
    p = VadParams(min_silence_duration_ms=300, speech_pad_ms=100,
                  min_speech_duration_ms=min_speech_ms, max_speech_duration_s=1.1)
    # 4-frame pause (2048 samples: > 98 ms, < 2 * pad) at 10240, cut at frame 28.
    probs = runs((0.9, 20), (0.0, 4), (0.9, 5), (0.0, 30))
    events = stream(probs, 16000, p)
    assert (events[1].kind, events[1].sample, events[1].frame) == (EventKind.END, 10240 + 1024, 28)
    # ^ halved at once, although the restarted segment's fate is not known yet
    if restarted_survives:  # [12288, 14848] restarted at the pause's end: identical to offline
        assert pair(events) == upstream(probs, 16000, p) == [(0, 11264), (11264, 16448)]
    else:  # it is too short, so offline pads the first segment against nothing instead
        assert pair(events) == [(0, 11264)]
        assert upstream(probs, 16000, p) == [(0, 10240 + 1600)]


@pytest.mark.parametrize("pad_ms, after, same", [
    (30, 0.9, True),   # speech goes on: one-frame gap halved, like offline
    (30, 0.0, True),   # cut inside the final pause: pad <= one frame, like offline
    (60, 0.0, False),  # pad > one frame: END = cut + W instead of cut + pad
])
def test_difference_3_max_speech_cut_without_pause(pad_ms: float, after: float, same: bool) -> None:
    p = VadParams(speech_pad_ms=pad_ms, max_speech_duration_s=1.0)
    cut_frame = next(i for i in range(99) if i * W16 > 16000 - W16 - 2 * 16 * pad_ms)
    cut = cut_frame * W16
    probs = runs((0.9, cut_frame + 1), (after, 70))
    events = stream(probs, 16000, p)
    mine, offline = pair(events), upstream(probs, 16000, p)
    assert events[1].frame == cut_frame + 1  # the END waited one frame
    expected = cut + (min(16 * pad_ms, W16 // 2) if after > 0.5 else min(16 * pad_ms, W16))
    assert mine[0] == (0, expected)
    assert (mine == offline) is same
    if not same:
        assert offline[0] == (0, cut + 16 * pad_ms)


def test_difference_3_restarted_segment_dropped() -> None:
    p = VadParams(max_speech_duration_s=1.0)  # pad 30 ms > W/2
    probs = runs((0.9, 30), (0.9, 1), (0.0, 40))  # speech restarts for one frame only
    cut = 29 * W16
    assert pair(stream(probs, 16000, p)) == [(0, cut + 256)]
    assert upstream(probs, 16000, p) == [(0, cut + 480)]


def test_difference_4_end_not_clamped_to_stream_length() -> None:
    p = VadParams(min_silence_duration_ms=50, speech_pad_ms=100)
    probs = runs((0.9, 20), (0.0, 3))  # pause from 10240, END decided at frame 22
    n = len(probs) * W16
    assert pair(stream(probs, 16000, p, n)) == [(0, 10240 + 1600)]
    assert upstream(probs, 16000, p, n) == [(0, n)] and n < 10240 + 1600


def test_difference_5_end_never_before_start() -> None:
    p = VadParams(min_silence_duration_ms=0, speech_pad_ms=300, min_speech_duration_ms=0)
    probs = runs((0.9, 10), (0.0, 6), (0.9, 1))  # the last frame's segment lies inside the first's pad
    events = stream(probs, 16000, p)
    assert pair(events) == [(0, 5120 + 4800), (9920, 9920)]  # empty, not inverted
    assert upstream(probs, 16000, p) == [(0, 6656), (6656, 8704)]


# ---------------------------------------------------------------- real audio
AUDIO = Path(os.environ.get("RINGSERVE_SHARED_AUDIO",
                           Path(__file__).resolve().parents[2] / "shared" / "audio"))
REAL_FILES = {"test.wav": AUDIO / "silero-vad" / "test.wav", "mic_000.wav": AUDIO / "corpus" / "mic_000.wav"}


@functools.cache
def real_probs(name: str) -> tuple[list[float], int]:
    path = REAL_FILES[name]
    if not path.exists():
        pytest.skip(f"{path} not present (shared test audio is not checked in)")
    if not silero_model_path().exists():
        pytest.skip(f"{silero_model_path()} missing: silero-vad package data not installed")
    audio, rate = read_wav_mono16(path)
    assert rate == 16000
    return reference_probs(silero_model_path(), audio, rate).tolist(), len(audio)


# 16 kHz only: 8 kHz runs through the same code, and the properties cover it.
@pytest.mark.parametrize("name", sorted(REAL_FILES))
@pytest.mark.parametrize("params", [
    VadParams(),
    VadParams(threshold=0.6, neg_threshold=0.3, min_silence_duration_ms=300, speech_pad_ms=50,
              min_speech_duration_ms=100),
    VadParams(min_silence_duration_ms=0, speech_pad_ms=0, min_speech_duration_ms=0),
    VadParams(max_speech_duration_s=3.0),
], ids=["default", "tuned", "raw", "max3s"])
def test_real_audio_matches_upstream(name: str, params: VadParams) -> None:
    probs, n = real_probs(name)
    mine = segments(probs, params, 16000, n)
    assert mine == upstream(probs, 16000, params, n)
    assert len(mine) > 3


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_audio_documented_differences_stay_within_one_pad(name: str) -> None:
    p = VadParams(min_silence_duration_ms=50, speech_pad_ms=60, max_speech_duration_s=1.5)
    probs, n = real_probs(name)
    mine, offline = segments(probs, p, 16000, n), upstream(probs, 16000, p, n)
    assert len(mine) == len(offline) and mine != offline  # differences 1 and 3 both occur here
    for (a, b), (c, d) in zip(mine, offline, strict=True):
        assert abs(a - c) <= 960 and abs(b - d) <= 960


def test_reference_probs_protocol_on_silence_and_tone() -> None:
    if not silero_model_path().exists():
        pytest.skip(f"{silero_model_path()} missing")
    t = np.arange(16000 * 2 + 100) / 16000  # a partial last frame, zero-padded
    audio = np.concatenate([np.zeros(16000), 0.5 * np.sin(2 * np.pi * 440 * t)]).astype(np.float32)
    probs = reference_probs(silero_model_path(), audio, 16000)
    assert probs.shape == (math.ceil(len(audio) / 512),) and probs.dtype == np.float32
    assert float(probs[:20].max()) < 0.2 and np.all((probs >= 0) & (probs <= 1))


# ---------------------------------------------------------------- one test per parameter
def speech_ms(segs: Segments, sr: int = 16000) -> float:
    return sum(b - a for a, b in segs) * 1000 / sr


def test_threshold_higher_means_less_speech() -> None:
    probs = runs((0.0, 10), (0.6, 15), (0.95, 20), (0.6, 15), (0.0, 20), (0.7, 20), (0.0, 20))
    low, high = segments(probs, VadParams(threshold=0.5)), segments(probs, VadParams(threshold=0.9))
    assert len(low) == 2 and len(high) == 1
    assert speech_ms(high) < speech_ms(low)
    assert high[0][0] > low[0][0] and high[0][1] < low[0][1]


def test_neg_threshold_decides_what_counts_as_pause() -> None:
    probs = runs((0.9, 20), (0.4, 10), (0.9, 20), (0.0, 20))  # a 320 ms dip to 0.4
    assert len(segments(probs, VadParams(threshold=0.5))) == 1  # default neg 0.35: still speech
    assert len(segments(probs, VadParams(threshold=0.5, neg_threshold=0.45))) == 2
    assert VadParams(threshold=0.5).effective_neg_threshold == pytest.approx(0.35)
    assert VadParams(threshold=0.1).effective_neg_threshold == 0.01


def test_min_silence_merges_short_gaps() -> None:
    probs = runs((0.9, 20), (0.0, 6), (0.9, 20), (0.0, 30))  # 192 ms gap
    assert len(segments(probs, VadParams(min_silence_duration_ms=100))) == 2
    merged = segments(probs, VadParams(min_silence_duration_ms=300))
    assert merged == [(0, 46 * W16 + 480)]


def test_speech_pad_widens_both_sides() -> None:
    probs = runs((0.0, 30), (0.9, 20), (0.0, 30))
    for pad_ms in (0, 30, 100):
        pad = 16 * pad_ms
        assert segments(probs, VadParams(speech_pad_ms=pad_ms)) == [(30 * W16 - pad, 50 * W16 + pad)]


def test_min_speech_drops_short_blips() -> None:
    probs = runs((0.0, 10), (0.9, 5), (0.0, 20), (0.9, 20), (0.0, 20))  # a 160 ms blip
    assert len(segments(probs, VadParams())) == 1
    assert len(segments(probs, VadParams(min_speech_duration_ms=100))) == 2
    assert segments(probs, VadParams(min_speech_duration_ms=1000)) == []


def test_max_speech_splits_long_speech() -> None:
    # 12.8 s of speech with a 160 ms pause every second.
    probs = runs(*[part for _ in range(12) for part in ((0.9, 26), (0.0, 5))])
    assert len(segments(probs, VadParams(min_silence_duration_ms=500))) == 1
    p = VadParams(min_silence_duration_ms=500, max_speech_duration_s=3.0)
    split = segments(probs, p)
    assert len(split) >= 4 and all(b - a <= 3 * 16000 for a, b in split)
    assert split == upstream(probs, 16000, p)
    # Without pauses it cuts where the limit is reached (difference 3 does not apply: pad 30 ms).
    solid = runs((0.9, 400))
    assert segments(solid, p) == upstream(solid, 16000, p) and len(segments(solid, p)) == 5
    # A pause seen in one segment must not become a cut point in the next.
    probs = runs((0.9, 20), (0.0, 5), (0.9, 10), (0.0, 15), (0.9, 100))
    p = VadParams(min_silence_duration_ms=300, max_speech_duration_s=2.0)
    assert segments(probs, p) == upstream(probs, 16000, p) and len(segments(probs, p)) == 3


# ---------------------------------------------------------------- behaviour details
def test_start_latency_follows_min_speech() -> None:
    probs = runs((0.0, 5), (0.9, 30), (0.0, 10))
    first = stream(probs, 16000, VadParams(min_speech_duration_ms=0))[0]
    assert (first.kind, first.frame, first.sample) == (EventKind.START, 5, 5 * W16 - 480)
    first = stream(probs, 16000, VadParams())[0]  # 250 ms = 4000 samples: 8 frames in
    assert (first.frame, first.sample) == (13, 5 * W16 - 480)


def test_push_finish_reset_and_in_speech() -> None:
    seg = SpeechSegmenter(VadParams(min_speech_duration_ms=0), 8000)
    assert seg.frame_size == 256
    assert seg.push(0.0) == () and not seg.in_speech
    (start,) = seg.push(0.9)
    assert start == SpeechEvent(EventKind.START, 256 - 240, 1) and seg.in_speech
    assert seg.push(0.9) == ()
    end = seg.finish(700)
    assert [e.kind for e in end] == [EventKind.END] and end[0].sample == 700 and not seg.in_speech
    assert seg.finish(700) == ()  # finish() also resets
    assert seg.push(0.9)[0].sample == 0  # offsets restart
    seg.reset()
    assert not seg.in_speech and seg.push(0.0) == ()


def test_finish_keeps_or_drops_open_segment_like_offline() -> None:
    p = VadParams()
    probs = runs((0.0, 2), (0.9, 7))  # onset at 1024, 7 frames = 3584 samples < 4000
    for n in (len(probs) * W16 - 500, len(probs) * W16):  # 4084 - 500 < 4000 < 4608
        assert segments(probs, p, 16000, n) == upstream(probs, 16000, p, n)
    assert segments(probs, p, 16000, len(probs) * W16 - 500) == []
    probs = runs((0.0, 2), (0.9, 8))  # onset at 1024; offline keeps it iff n - 1024 > 4000
    assert segments(probs, p, 16000, 5024) == upstream(probs, 16000, p, 5024) == []
    assert segments(probs, p, 16000, 5025) == upstream(probs, 16000, p, 5025) == [(544, 5025)]


def test_finish_right_after_a_cut_without_pause_clamps_like_offline() -> None:
    p = VadParams(speech_pad_ms=30, max_speech_duration_s=1.0)  # cut at frame 29
    probs = runs((0.9, 30))
    for n in (29 * W16 + 100, 30 * W16):  # stream ends inside the cut frame / after it
        assert segments(probs, p, 16000, n) == upstream(probs, 16000, p, n) == [(0, min(n, 29 * W16 + 480))]


def test_sample_rate_and_length_validation() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        SpeechSegmenter(VadParams(), 44100)
    with pytest.raises(ValueError, match="audio_length_samples"):
        SpeechSegmenter(VadParams(), 16000).finish(-1)


def test_push_is_cheap() -> None:
    probs = runs(*[(0.9, 40), (0.0, 25)] * 400)
    seg = SpeechSegmenter(VadParams(max_speech_duration_s=1.0), 16000)
    t0 = time.perf_counter()
    for x in probs:
        seg.push(x)
    per_push = (time.perf_counter() - t0) / len(probs)
    assert per_push < 20e-6, f"{per_push * 1e6:.1f} us per push"


# ---------------------------------------------------------------- VadParams
@pytest.mark.parametrize("key, value", [
    ("threshold", 0.0), ("threshold", 1.0), ("threshold", float("nan")), ("threshold", "0.5"),
    ("threshold", True), ("neg_threshold", 0.0), ("neg_threshold", 0.6), ("neg_threshold", "x"),
    ("min_silence_duration_ms", -1), ("min_silence_duration_ms", math.inf),
    ("speech_pad_ms", -0.5), ("speech_pad_ms", float("nan")), ("min_speech_duration_ms", -10),
    ("min_speech_duration_ms", False), ("max_speech_duration_s", 0), ("max_speech_duration_s", -1.0),
    ("max_speech_duration_s", float("nan")), ("max_speech_duration_s", "inf"),
])
def test_params_validation_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        VadParams.from_mapping({key: value})
    with pytest.raises(ValueError, match=key):
        VadParams(**{key: value})  # type: ignore[arg-type]


def test_params_messages_give_the_range() -> None:
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        VadParams(threshold=2)
    with pytest.raises(ValueError, match=r"neg_threshold must be None or in \(0, threshold=0.5\]"):
        VadParams(neg_threshold=0.7)
    with pytest.raises(ValueError, match="speech_pad_ms must be a finite number >= 0"):
        VadParams(speech_pad_ms=-1)


def test_from_mapping_unknown_key_lists_known_keys() -> None:
    with pytest.raises(ValueError, match="'treshold'") as info:
        VadParams.from_mapping({"treshold": 0.5})
    for key in VadParams().to_dict():
        assert key in str(info.value)


def test_to_dict_is_json_and_round_trips() -> None:
    for p in (VadParams(), VadParams(0.7, 0.2, 50, 10, 0, 12.5)):
        text = json.dumps(p.to_dict(), allow_nan=False)
        assert VadParams.from_mapping(json.loads(text)) == p
    assert VadParams().to_dict()["max_speech_duration_s"] is None
    assert VadParams.from_mapping({}) == VadParams()
    assert VadParams.from_mapping({"threshold": 1 / 3, "neg_threshold": None}).threshold == 1 / 3
    numpy_values = VadParams.from_mapping({"threshold": np.float32(0.5), "speech_pad_ms": np.int64(20)})
    assert json.loads(json.dumps(numpy_values.to_dict()))["speech_pad_ms"] == 20.0
