"""Streams in their steady state, held as arrays: the front-end's per-frame work done in bulk.

The front-end is one process, so its time per frame caps what any number of workers can
serve. A stream that sends whole frames, one per chunk, with nothing else pending, needs per
frame only a sequence number and its chunk's ids and arrival time on the way in, and on the
way out its chunk found, its counters moved on, its speech-event machine fed and a reply item.
Kept in a Stream object that is a few microseconds of Python per frame; here it is a few
calls per message or per results record, for all its frames at once (the loops over them
compiled, engine/lane_kernels.py):

- frame_sets.take_frames takes the frames of lane streams in bulk (the `Lane` arrays);
- ``answer`` answers every in-order result of a lane stream: one reply item each, one bytes
  object per client. The speech-event machine (engine/vad_kernels.py) moves in the same loop,
  and only for the frames that could move it (``quiet``: in silence, a probability under the
  threshold changes nothing; in speech, one at or over neg_threshold); a frame that gives
  events gets a reply item of its own, its events appended in Python.

Shedding stays in the lane: a frame the worker shed comes back NaN and is answered like any
other, flagged SHED; a frame shed at intake (late, or its worker's queue full) takes its
stream's next seq without going to a worker (``unsent``) and is answered, shed, right after
the frame before it. An overload therefore costs the front-end no more per frame than
serving does, and it keeps serving what the workers can run.

A stream joins the lane (``promote``) when its Stream object has nothing pending. Whatever
else touches it — a partial frame, RESET or CLOSE, a refused frame, an error, expiry, its
client leaving — first takes it out (``demote``): its counters go back to the Stream and its
frames in flight become PendingChunks, the state the item-by-item code would have built
(an unsent frame one that StreamTable.complete_chunks answers when its turn comes).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from engine import lane_kernels as kernels
from engine import vad_kernels as vad
from engine.router_batch import RoutingIds
from engine.stats import BUCKETS_US
from engine.streams import PendingChunk, Stream
from engine.vad_events import SpeechSegmenter
from transport import protocol as P

if TYPE_CHECKING:
    from engine.control import Outlet

# Frames in flight a lane stream may have (a second of audio); one with more leaves the lane.
IN_FLIGHT = 32
_BUCKETS_S = np.array(BUCKETS_US, np.float64) / 1e6
# A reply item with one probability and no events: P.RESULT_ITEM, then the float.
REPLY_ITEM = np.dtype([("stream", "<u4"), ("chunk", "<u4"), ("first", "<u8"), ("frames", "<u4"),
                       ("events", "<u2"), ("flags", "<u2"), ("prob", "<f4")])
assert REPLY_ITEM.itemsize == P.RESULT_ITEM.size + 4
_SHED = int(P.ResultFlag.SHED)


# Stream fields the lane moves on while it holds the stream: copied in at promote, back at demote.
_CARRIED = ("next_seq", "expected_seq", "fresh", "samples_in", "samples_out", "last_active", "audio_ns", "clock_ns")
# Stream fields that stay as they are for the stream's life in the lane: copied in only.
_FIXED = ("frame_base", "frame", "ns_per_sample", "shed_after_ms", "worker", "stream_id")


def shape_key(dtype: int, rate: int) -> int:
    return dtype << 32 | rate


class Lane:
    """Per stream slot: whether the stream is in the lane, and its state while it is."""

    def __init__(self, max_streams: int) -> None:
        n = max_streams
        self.on = np.zeros(n, np.bool_)
        self.next_seq = np.zeros(n, np.int64)
        self.expected_seq = np.zeros(n, np.int64)
        self.frame_base = np.zeros(n, np.int64)
        self.fresh = np.zeros(n, np.bool_)
        self.frame = np.zeros(n, np.int64)
        self.samples_in = np.zeros(n, np.int64)
        self.samples_out = np.zeros(n, np.int64)
        self.last_active = np.zeros(n, np.float64)
        self.audio_ns = np.zeros(n, np.int64)
        self.clock_ns = np.zeros(n, np.int64)
        self.ns_per_sample = np.zeros(n, np.int64)
        self.shed_after_ms = np.zeros(n, np.int64)
        self.worker = np.zeros(n, np.int64)
        self.shape = np.zeros(n, np.int64)  # shape_key of the frames it takes
        self.stream_id = np.zeros(n, np.uint32)
        self.conn = np.zeros(n, np.int64)
        # Each slot's speech-event machine (engine/vad_kernels.py); its stream's SpeechSegmenter
        # wraps the rows, so the machine stays where it is whether the stream is in the lane or not.
        self.vad_state = np.zeros((n, vad.N_STATE), np.int64)
        self.vad_limits = np.zeros((n, vad.N_LIMITS), np.float64)
        # SpeechSegmenter.quiet() of the stream, as of its last push.
        self.quiet_lo = np.zeros(n, np.float64)
        self.quiet_hi = np.zeros(n, np.float64)
        self.quiet_until = np.zeros(n, np.int64)
        # Frames in flight, by seq % IN_FLIGHT: their chunk's ids and arrival.
        self.chunk_seq = np.zeros((n, IN_FLIGHT), np.uint32)
        self.request_id = np.zeros((n, IN_FLIGHT), np.uint32)
        self.arrived_ns = np.zeros((n, IN_FLIGHT), np.int64)
        # Frames shed at intake (frame_sets.take_frames): in flight with a seq, but never sent to a
        # worker; each is answered, shed, right after the frame before it. ``n_unsent``: how many.
        self.unsent = np.zeros((n, IN_FLIGHT), np.bool_)
        self.n_unsent = 0
        # Client identities as small ints (reply items are grouped and sent per client),
        # reference-counted; conn_streams[conn] is 0 for a free one.
        self.routing_ids = RoutingIds()
        self.conn_of: dict[bytes, int] = {}
        self.conn_streams: list[int] = []
        self.free_conns: list[int] = []
        self._reply_buffers(64)

    # ---- joining and leaving ----------------------------------------------------------------
    @staticmethod
    def eligible(stream: Stream) -> bool:
        """Nothing buffered, and nothing pending but one-frame audio chunks with no result yet."""
        if stream.closing or stream.buf_len != stream.context:
            return False
        chunks = stream.chunks
        if len(chunks) != stream.next_seq - stream.expected_seq or len(chunks) >= IN_FLIGHT:
            return False
        seq = stream.expected_seq
        for chunk in chunks:
            seq += 1
            if chunk.end_seq != seq or chunk.kind != "audio" or chunk.shed or chunk.first_frame >= 0:
                return False
        return True

    def promote(self, stream: Stream) -> None:
        """Into the lane; ``stream`` must be eligible()."""
        s = stream.slot
        if stream.buf is not stream.row:  # a large chunk grew a private buffer: back to the matrix
            stream.row[:stream.context] = stream.buf[:stream.context]
            stream.buf = stream.row
        for chunk in stream.chunks:
            k = (chunk.end_seq - 1) % IN_FLIGHT
            self.chunk_seq[s, k] = chunk.chunk_seq
            self.request_id[s, k] = chunk.request_id
            self.arrived_ns[s, k] = round(chunk.arrived * 1e9)
            self.unsent[s, k] = False
        stream.chunks.clear()
        self.on[s] = True
        for name in _CARRIED + _FIXED:
            getattr(self, name)[s] = getattr(stream, name)
        self.shape[s] = shape_key(stream.dtype, stream.rate)
        self.conn[s] = self._conn(stream.identity)
        self.set_quiet(s, stream.segmenter)

    def demote(self, stream: Stream) -> None:
        s = stream.slot
        if not self.on[s]:
            return
        self.on[s] = False
        for name in _CARRIED:
            setattr(stream, name, getattr(self, name)[s].item())  # .item(): a Python int, float or bool
        stream.segmenter.seek(stream.expected_seq - stream.frame_base)
        for seq in range(stream.expected_seq, stream.next_seq):
            k = seq % IN_FLIGHT
            unsent = bool(self.unsent[s, k])
            stream.chunks.append(PendingChunk(int(self.chunk_seq[s, k]), int(self.request_id[s, k]), seq + 1,
                                              arrived=int(self.arrived_ns[s, k]) / 1e9, shed=int(unsent),
                                              unsent=unsent))
            if unsent:
                self.unsent[s, k] = False
                self.n_unsent -= 1
        self._release_conn(stream.identity)

    def set_quiet(self, slot: int, segmenter: SpeechSegmenter) -> None:
        self.quiet_lo[slot], self.quiet_hi[slot], self.quiet_until[slot] = segmenter.quiet()

    def _conn(self, identity: bytes) -> int:
        conn = self.conn_of.get(identity)
        if conn is None:
            if self.free_conns:
                conn = self.free_conns.pop()
            else:
                conn = len(self.conn_streams)
                self.conn_streams.append(0)
            self.routing_ids.set(conn, identity)
            self.conn_of[identity] = conn
        self.conn_streams[conn] += 1
        return conn

    def _release_conn(self, identity: bytes) -> None:
        conn = self.conn_of[identity]
        self.conn_streams[conn] -= 1
        if not self.conn_streams[conn]:
            del self.conn_of[identity]
            self.free_conns.append(conn)

    # ---- results -----------------------------------------------------------------------------
    def answer(self, seqs: np.ndarray, slots: np.ndarray, probs: np.ndarray, out: Outlet, hist: np.ndarray,
               counters: Counter[str]) -> tuple[np.ndarray | None, float]:
        """Answer every result of a lane stream that comes in order, and the frames shed at intake
        that follow each: (the results left for the caller as a mask, or None if none are;
        seconds their chunks waited, arrival to reply, summed into ``hist``)."""
        n = len(seqs)
        room = n + self.n_unsent  # reply items: one per result, one per frame shed at intake
        if room > len(self._mine):
            self._reply_buffers(room)
        counts = self._counts
        waited = kernels.answer(
            seqs, slots, probs, self.on, self.expected_seq, self.next_seq, self.unsent, self.samples_out, self.frame,
            self.frame_base, self.quiet_lo, self.quiet_hi, self.quiet_until, self.vad_state, self.vad_limits,
            self.stream_id, self.chunk_seq, self.conn, self.arrived_ns, _BUCKETS_S, time.monotonic(), _SHED,
            self._words[:room], self._floats[:room], self._mine[:n], self._conns[:room], self._scratch,
            self._events, hist, counts)
        plain, evented, n_events, shed, unsent, results = counts.tolist()
        self.n_unsent -= unsent
        count = plain + evented
        rest = None if results == n else ~self._mine[:n]
        if not count:
            return rest, 0.0
        counters["frames_out"] += count
        if shed:
            counters["frames_shed"] += shed
            counters["frames_shed_in_worker"] += shed - unsent
        if evented:
            self._answer_events(self._events[:n_events].tolist(), out)
        self._send(plain, out)
        return rest, waited

    def _reply_buffers(self, n: int) -> None:
        """Room for the reply items of a results record of ``n`` frames (kernels.answer)."""
        self._items = np.empty(n, REPLY_ITEM)
        self._words = self._items.view(np.uint32).reshape(n, REPLY_ITEM.itemsize // 4)
        self._item_bytes = self._items.view(np.uint8)
        self._floats = self._items.view(np.float32).reshape(n, REPLY_ITEM.itemsize // 4)
        self._mine, self._conns = np.empty(n, np.bool_), np.empty(n, np.int64)
        # The same, sorted by client, when a record answers several (kernels.by_client).
        self._sorted_items = np.empty(n, REPLY_ITEM)
        self._sorted_words = self._sorted_items.view(np.uint32).reshape(n, REPLY_ITEM.itemsize // 4)
        self._sorted_item_bytes = self._sorted_items.view(np.uint8)
        self._sorted_conns, self._bounds = np.empty(n, np.int64), np.empty(n + 1, np.int64)
        self._scratch = np.empty((vad.MAX_EVENTS, 3), np.int64)
        self._counts = np.zeros(6, np.int64)
        self._events = np.empty((n * vad.MAX_EVENTS, 4), np.int64)

    def _answer_events(self, events: list[list[int]], out: Outlet) -> None:
        """Each item whose frame gave speech events (rows: item, kind, frame, sample) as its
        own reply: the item (its event count set by the loop), then its events."""
        for at, rows in itertools.groupby(events, key=lambda row: row[0]):
            out.queue_result(self.routing_ids[int(self._conns[at])], self._items[at:at + 1].tobytes() + b"".join(
                [P.EVENT_ITEM.pack(kind, frame, sample) for _, kind, frame, sample in rows]))

    def _send(self, plain: int, out: Outlet) -> None:
        """The first ``plain`` reply items, one RESULTS message per client (a gateway's whole
        record is one), sent now."""
        if not plain:
            return
        words, conns, bounds = self._words[:plain], self._conns[:plain], self._bounds
        runs = kernels.by_client(conns, words, self._sorted_conns, self._sorted_words, bounds)
        size = REPLY_ITEM.itemsize
        if runs == 1:
            bounds[0], bounds[1] = 0, plain
            out.send_results(self._item_bytes[:plain * size], size, bounds, 1, conns, self.routing_ids)
        else:
            out.send_results(self._sorted_item_bytes[:plain * size], size, bounds, runs, self._sorted_conns[:plain],
                             self.routing_ids)
