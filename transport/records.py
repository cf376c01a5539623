"""Record formats on the inner hop (front-end <-> worker rings). Never seen by clients.

FRAMES (front-end -> worker): the frames one chunk of one stream completed (kind 1), or one
frame each of ``count`` different streams that one client message carried (kind 3, FRAME_SET)::

    u32 kind=1|3 | u32 count | u32 samples_per_frame | u32 sample_rate | u64 enqueued_ns
    | u32 shed_after_ms (0: never shed) | u32 reserved
    count x FRAME_META {u64 seq, u32 slot, u32 flags}
    count x samples_per_frame float32        (model input: context + new samples)

RESULTS (worker -> front-end): one record per executed batch::

    u32 kind=2 | u32 count | u64 reserved
    count x RESULT {u64 seq, u32 slot, f32 probability}

``enqueued_ns`` is when the chunk reached the daemon, as the front-end estimates it (it may
have waited in ZeroMQ's queue first, see engine/control.py ``arrival``): the worker's shed
deadlines count from it. ``seq`` is the stream's frame counter since it opened; it can skip
(a frame shed at intake takes a number but is never sent). The worker reads the state buffer
of the stream's slot that its ``done`` word names and writes the other
(engine/worker_kernels.py), so a frame that is run twice (after a worker crash) reads the
same state both times.

In a FRAMES record frame *i* is *i* frame-durations later in its stream's audio than frame 0,
so its shed deadline is that much later too; in a FRAME_SET every frame has the same deadline
(``enqueued_ns`` is then the earliest arrival among the set's chunks).
"""

from __future__ import annotations

import struct

import numpy as np

KIND_FRAMES = 1
KIND_RESULTS = 2
KIND_FRAME_SET = 3

FLAG_FRESH = 1  # start from zero state: first frame after open or reset

FRAMES_HEADER = struct.Struct("<IIIIQI4x")  # enqueued_ns: CLOCK_MONOTONIC, comparable across processes
RESULTS_HEADER = struct.Struct("<IIQ")
FRAME_META = np.dtype([("seq", "<u8"), ("slot", "<u4"), ("flags", "<u4")])
FRAME_META_STRUCT = struct.Struct("<QII")  # the same layout, for writing one frame without numpy
RESULT = np.dtype([("seq", "<u8"), ("slot", "<u4"), ("prob", "<f4")])


def frames_record_bytes(count: int, samples_per_frame: int) -> int:
    return FRAMES_HEADER.size + count * (FRAME_META.itemsize + 4 * samples_per_frame)


def frames_views(buf: memoryview, count: int, samples_per_frame: int) -> tuple[np.ndarray, np.ndarray]:
    """(meta[count], audio[count, samples_per_frame]) views into a FRAMES record body."""
    meta = np.frombuffer(buf, FRAME_META, count, FRAMES_HEADER.size)
    audio = np.frombuffer(buf, np.float32, count * samples_per_frame,
                          FRAMES_HEADER.size + count * FRAME_META.itemsize)
    return meta, audio.reshape(count, samples_per_frame)


def results_record_bytes(count: int) -> int:
    return RESULTS_HEADER.size + count * RESULT.itemsize


def results_view(buf: memoryview, count: int) -> np.ndarray:
    return np.frombuffer(buf, RESULT, count, RESULTS_HEADER.size)
