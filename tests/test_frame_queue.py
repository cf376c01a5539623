"""The worker's queue of frames (engine/frame_queue.py) over a real shared-memory ring.

The records are written as the front-end writes them (transport/records.py); each frame's
model input is filled with a value naming it, so a test can see which frame reached which
batch row. The end-to-end behaviour (results against onnxruntime, crash replay, shedding
under overload) is tested with the daemon in test_engine_exact, test_worker_crash and
test_overload; these pin down the queue's own rules.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from engine.frame_queue import FrameQueue
from engine.models.base import ModelSpec
from engine.models.silero import SileroVad, default_model_path, load_model
from engine.stats import N_BUCKETS
from transport import records
from transport.doorbell import Doorbell
from transport.ring import Ring, ring_bytes
from transport.shm import Segment

WIDTH = {16000: 576, 8000: 288}  # Silero's model inputs: context + frame
STATE = SileroVad.state_floats


class Fixture:
    def __init__(self, ring: Ring, max_batch: int, model: SileroVad) -> None:
        self.ring = ring
        self.states = np.zeros((8, 2, STATE), np.float32)
        self.done = np.zeros(8, np.uint64)
        self.queue = FrameQueue(ring, self.states, self.done, max_batch, model)
        self.hist = np.zeros(N_BUCKETS, np.uint64)

    def write(self, kind: int, frames: list[tuple[int, int]], rate: int = 16000, enqueued_ns: int = 0,
              shed_after_ms: int = 0, flags: int = 0) -> None:
        """One record of (slot, seq) frames; frame (slot, seq)'s input is all slot * 1000 + seq."""
        width = WIDTH[rate]
        view = self.ring.reserve(records.frames_record_bytes(len(frames), width))
        assert view is not None
        records.FRAMES_HEADER.pack_into(view, 0, kind, len(frames), width, rate, enqueued_ns, shed_after_ms)
        meta, audio = records.frames_views(view, len(frames), width)
        for row, (slot, seq) in enumerate(frames):
            meta[row] = (seq, slot, flags)
            audio[row] = slot * 1000 + seq
        del meta, audio, view
        self.ring.commit()

    def run_batch(self, now_ns: int = 0) -> list[tuple[int, int]]:
        """The next batch's (slot, seq) in row order, checked against the inputs gathered, and
        committed as the worker does (results out, then states, then ring space)."""
        n, n_stale, rate = self.queue.pick(now_ns)
        assert n_stale == 0
        audio, _, _ = self.queue.gather(n, WIDTH[rate], now_ns, self.hist)
        picked = [(int(slot), int(seq)) for slot, seq in self.queue.run[:n, [3, 2]]]
        assert audio[:, 0].tolist() == [slot * 1000 + seq for slot, seq in picked]
        assert (audio == audio[:, :1]).all()
        out = np.zeros(max(n, 2), records.RESULT)
        self.queue.put_results(np.zeros((n, STATE), np.float32), np.full(n, 0.5, np.float32), out)
        self.queue.finish(self.queue.run[:n])
        return picked


@pytest.fixture(scope="module")
def model() -> SileroVad:
    return load_model(ModelSpec(default_model_path()))


@pytest.fixture
def fx(request: pytest.FixtureRequest, model: SileroVad) -> Iterator[Fixture]:
    segment = Segment.create(f"rs-test-fq-{uuid.uuid4().hex[:8]}", ring_bytes(1 << 16))
    ring = Ring(segment, Doorbell(), 0, 1 << 16)
    fixture = Fixture(ring, getattr(request, "param", 64), model)
    try:
        yield fixture
    finally:
        del fixture.queue  # its numpy views of the ring must go before the segment is unmapped
        ring.close()
        ring.doorbell.close()
        segment.close()
        segment.unlink()


def test_each_batch_takes_every_streams_oldest_frame_and_frees_the_ring(fx: Fixture) -> None:
    fx.write(records.KIND_FRAMES, [(0, 0), (0, 1), (0, 2)])  # one stream's chunk of three frames
    fx.write(records.KIND_FRAME_SET, [(1, 0), (2, 0)])  # a gateway's tick
    fx.write(records.KIND_FRAME_SET, [(2, 1), (1, 1)])
    assert fx.queue.take() == 0
    assert fx.queue.frames == 7 and fx.queue.streams == 3
    assert fx.run_batch() == [(0, 0), (1, 0), (2, 0)]
    assert fx.run_batch() == [(0, 1), (2, 1), (1, 1)]
    assert fx.run_batch() == [(0, 2)]
    assert fx.queue.frames == 0 and fx.queue.streams == 0
    assert fx.ring.tail_position() == fx.ring.head_position()  # every record answered, released
    # Committed: stream 0's frames up to seq 2, its state in buffer 1 (three frames from 0);
    # streams 1 and 2 up to seq 1, in buffer 0 (engine/worker_kernels.py packs both in done).
    assert fx.done.tolist()[:3] == [3 << 1 | 1, 2 << 1, 2 << 1]


def test_a_stream_whose_seqs_skip_reads_the_state_its_last_frame_left(fx: Fixture) -> None:
    # The front-end numbers a frame it sheds at intake but never sends it: stream 0's frame 1
    # never comes, and frame 2 must read the state frame 0 wrote, whatever the seqs' parity.
    fx.write(records.KIND_FRAMES, [(0, 0)], flags=records.FLAG_FRESH)
    fx.queue.take()
    n, _, rate = fx.queue.pick(0)
    _, state, _ = fx.queue.gather(n, WIDTH[rate], 0, fx.hist)
    assert (state == 0.0).all()
    fx.queue.put_results(np.full((n, STATE), 5.0, np.float32), np.full(n, 0.5, np.float32),
                         np.zeros(2, records.RESULT))
    fx.queue.finish(fx.queue.run[:n])
    for seq, expected in ((2, 5.0), (3, 6.0), (6, 7.0)):
        fx.write(records.KIND_FRAMES, [(0, seq)])
        fx.queue.take()
        n, _, rate = fx.queue.pick(0)
        _, state, _ = fx.queue.gather(n, WIDTH[rate], 0, fx.hist)
        assert n == 1 and (state == expected).all(), (seq, state[0, :3])
        fx.queue.put_results(np.full((n, STATE), expected + 1.0, np.float32), np.full(n, 0.5, np.float32),
                             np.zeros(2, records.RESULT))
        fx.queue.finish(fx.queue.run[:n])


@pytest.mark.parametrize("fx", [2], indirect=True)
def test_streams_queued_longest_go_first_when_a_batch_is_full(fx: Fixture) -> None:
    fx.write(records.KIND_FRAME_SET, [(0, 0), (1, 0)])
    fx.write(records.KIND_FRAME_SET, [(2, 0), (3, 0)])
    fx.write(records.KIND_FRAME_SET, [(0, 1)])
    fx.queue.take()
    assert fx.run_batch() == [(0, 0), (1, 0)]
    # Stream 0's queue never emptied: it keeps its place ahead of streams 2 and 3, although
    # its next frame came after theirs (oldest-frame-first would run 2 and 3 now, and under
    # overload every stream's frames just before their shed time). Rows stay in arrival order.
    assert fx.run_batch() == [(2, 0), (0, 1)]
    fx.write(records.KIND_FRAME_SET, [(1, 1)])
    fx.queue.take()
    assert fx.run_batch() == [(3, 0), (1, 1)]


def test_frames_whose_state_is_committed_are_skipped_on_replay(fx: Fixture) -> None:
    fx.done[0] = 2 << 1  # a crashed worker committed frames 0 and 1 of stream 0
    fx.write(records.KIND_FRAMES, [(0, 0), (0, 1), (0, 2), (0, 3)])
    fx.write(records.KIND_FRAMES, [(1, 0), (1, 1)])
    fx.done[1] = 2 << 1
    assert fx.queue.take() == 4
    assert fx.queue.frames == 2
    assert fx.run_batch() == [(0, 2)]
    assert fx.run_batch() == [(0, 3)]
    # The second record had nothing left to run: released with the first.
    assert fx.ring.tail_position() == fx.ring.head_position()


def test_each_batch_holds_one_sample_rate(fx: Fixture) -> None:
    fx.write(records.KIND_FRAMES, [(0, 0)], rate=8000)
    fx.write(records.KIND_FRAMES, [(1, 0)], rate=16000)
    fx.write(records.KIND_FRAMES, [(2, 0)], rate=8000)
    fx.queue.take()
    assert fx.run_batch() == [(0, 0), (2, 0)]
    assert fx.run_batch() == [(1, 0)]


def test_late_frames_are_shed_their_state_carried_over(fx: Fixture) -> None:
    fx.states[0, 1] = 7.0  # stream 0's state after its frame 0, in buffer 1
    fx.states[1] = 9.0  # a closed stream's leftovers in the slot stream 1 now has
    fx.done[0] = 1 << 1 | 1
    fx.write(records.KIND_FRAMES, [(0, 1), (0, 2)], enqueued_ns=1_000_000_000, shed_after_ms=100)
    fx.write(records.KIND_FRAMES, [(1, 0)], enqueued_ns=1_000_000_000, shed_after_ms=100, flags=records.FLAG_FRESH)
    fx.queue.take()
    # Due at 1.1 s: stream 0's frame 1 and stream 1's frame; stream 0's frame 2 one frame
    # duration later, at 1.132 s. At 1.11 s the first two are late.
    n_run, n_stale, _ = fx.queue.pick(1_110_000_000)
    assert (n_run, n_stale) == (0, 2)
    out = np.zeros(n_stale, records.RESULT)
    fx.queue.put_shed(out)
    assert np.isnan(out["prob"]).all() and out["slot"].tolist() == [0, 1] and out["seq"].tolist() == [1, 0]
    assert (fx.states[0, 0] == 7.0).all()  # frame 2 reads buffer 0: the state passed through
    assert (fx.states[1, 1] == 0.0).all()  # a fresh stream's shed frame leaves it at zero
    fx.queue.finish(fx.queue.stale[:n_stale])
    assert fx.done.tolist()[:2] == [2 << 1, 1 << 1 | 1]
    assert fx.run_batch(now_ns=1_110_000_000) == [(0, 2)]  # due at 1.132 s: runs
