"""Protocol fuzzing against a live daemon: no client message can crash it, wedge it, make it
allocate without a bound, or disturb another client's stream.

Hypothesis draws > 10,000 malformed or hostile messages (random bytes, truncated and lying
headers and audio items, unknown types and versions, NaN/Inf and wrongly typed audio, odd
byte counts, hostile OPEN JSON, foreign streams, multi-frame and empty ZeroMQ messages,
oversized messages, AUDIO messages with too many items) and throws them in batches over a few DEALER sockets without waiting
for each reply; replies are drained between batches. Meanwhile a clean client streams real
speech whose probabilities must stay bit-exact against the frame-by-frame reference.
Hypothesis picks each message's category and seeds a PRNG for its bulk (sizes, ids, lies),
and builds the OPEN JSON bodies with its structured strategies; a failing run prints the
seed, and RINGSERVE_FUZZ_SEED replays it.

The reply contract under test (docs/protocol.md): every message gets exactly one reply,
except a well-formed AUDIO message of at most max_items_per_message items, where every item
gets exactly one RESULTS item or ERROR. A malformed AUDIO message, or one with too many items,
is refused whole: one ERROR, nothing of it used. The test counts these "reply units" per socket
and requires received == expected after every batch, and for every message that can only be
refused, an ERROR with the right code, echoing the request id (0 where the header itself was
unreadable). It also requires the engine's error counters to have grown by exactly the
number of ERROR replies, and the front-end's RSS to stay within a small bound.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from clients.client import Client
from tests.conftest import vm_rss_mib, Clip, DaemonProcess, reference, spawn_daemon, speech_clips
from transport import protocol as P
from transport.protocol import DType, ErrorCode, MsgType

MAX_MESSAGE_BYTES = 65536  # small, so that oversized-but-readable messages are cheap to send
MAX_ITEMS = 8  # small, so that the other categories' messages (at most 5 items) stay under it
DAEMON_ARGS = ("--workers", "1", "--max-message-bytes", str(MAX_MESSAGE_BYTES), "--max-streams", "64",
               "--max-streams-per-connection", "12", "--max-in-flight-frames", "512",
               "--max-items-per-message", str(MAX_ITEMS))
N_SOCKETS = 4
EXAMPLES = 135  # hypothesis examples, one batch each
BATCH = 80  # messages per batch, spread over the sockets
MIN_MESSAGES = 10_000
RSS_GROWTH_LIMIT_MIB = 50
CLEAN_STREAM_ID = 7  # the clean client's stream; every fuzz socket also targets it as a foreign stream
TOLERANCE = 1e-6

OPEN_ERRORS = frozenset({ErrorCode.BAD_MESSAGE, ErrorCode.BAD_PARAMS, ErrorCode.BAD_DTYPE})
_VAD_KEYS = ("threshold", "neg_threshold", "min_silence_duration_ms", "speech_pad_ms",
             "min_speech_duration_ms", "max_speech_duration_s")
_KNOWN_TYPES = {int(t) for t in MsgType if t < 0x80}




def results_with_flags(msg: bytes) -> list[tuple[int, int, np.ndarray]]:
    """(stream_id, flags, probabilities) per RESULTS item (decode_results keeps only FINAL)."""
    out, offset = [], P.HEADER.size
    while offset < len(msg):
        stream_id, _, _, n_frames, n_events, flags = P.RESULT_ITEM.unpack_from(msg, offset)
        offset += P.RESULT_ITEM.size
        out.append((stream_id, flags, np.frombuffer(msg, "<f4", n_frames, offset)))
        offset += 4 * n_frames + P.EVENT_ITEM.size * n_events
    return out


def reply_units(frames: list[bytes]) -> int:
    """How many replies the protocol promises for one ZeroMQ message (see the module doc)."""
    if len(frames) != 1:
        return 1
    msg = frames[0]
    if len(msg) > MAX_MESSAGE_BYTES or len(msg) < P.HEADER.size or msg[:2] != P.MAGIC or msg[2] != P.VERSION:
        return 1
    if msg[3] != MsgType.AUDIO:
        return 1
    offset, end, items = P.HEADER.size, len(msg), 0
    if offset == end:
        return 1
    while offset < end:
        if end - offset < P.AUDIO_ITEM.size:
            return 1  # malformed: refused whole
        nbytes = P.AUDIO_ITEM.unpack_from(msg, offset)[3]
        offset += P.AUDIO_ITEM.size
        if nbytes > end - offset:
            return 1
        items += 1
        offset += nbytes
    return 1 if items > MAX_ITEMS else items


@dataclass
class Msg:
    frames: list[bytes]
    category: str
    rid: int  # request id the engine echoes (0 when the header cannot be read)
    checks: list[frozenset[ErrorCode]] | None  # refused-only messages: the ERROR code(s) expected, in order


@dataclass
class FuzzSocket:
    index: int
    sock: zmq.Socket[bytes]
    base: dict[int, DType]  # opened at start, never closed by the fuzzer
    hostile_ids: list[int]  # ids this socket OPENs with hostile JSON
    opened: dict[int, DType] = field(default_factory=dict)  # hostile OPENs that succeeded
    next_rid: int = 1
    expected_units: int = 0
    got_units: int = 0
    errors: list[tuple[int, ErrorCode]] = field(default_factory=list)  # (request id, code), arrival order
    error_replies: int = 0  # every ERROR ever received
    shed_after: dict[int, int] = field(default_factory=dict)  # open stream -> its shed_after_ms
    shed_frames: int = 0  # NaN results (flagged SHED) received
    anomalies: list[str] = field(default_factory=list)
    checks: dict[int, list[frozenset[ErrorCode]]] = field(default_factory=dict)
    # int16 streams that only ever get one whole frame each in frame sets, so they stay in the
    # front-end's lane and the bulk path (engine/frame_sets.py) runs whatever else is drawn;
    # not among own(): no other category touches them.
    gateway: list[int] = field(default_factory=list)
    unchecked_rids: set[int] = field(default_factory=set)

    def rid(self) -> int:
        value = self.next_rid
        self.next_rid = self.next_rid % 0x7FFF_FFFF + 1
        return value

    def own(self) -> dict[int, DType]:
        return {**self.base, **self.opened}

    def handle(self, msg: bytes) -> None:
        msg_type = P.parse_header(msg)[0]
        if msg_type == MsgType.ERROR:
            error = P.decode_error(msg)
            self.errors.append((error.request_id, error.code))
            self.error_replies += 1
            self.got_units += 1
        elif msg_type == MsgType.RESULTS:
            for stream_id, flags, probs in results_with_flags(msg):
                self.got_units += 1
                nan = int(np.isnan(probs).sum())
                self.shed_frames += nan
                if bool(nan) != bool(flags & P.ResultFlag.SHED):
                    self.anomalies.append(f"stream {stream_id}: {nan} NaN results but flags {flags}")
                if nan and not self.shed_after.get(stream_id):
                    self.anomalies.append(f"stream {stream_id} (shed_after_ms 0) got {nan} NaN results")
                if flags & P.ResultFlag.FINAL:
                    self.opened.pop(stream_id, None)
        elif msg_type == MsgType.OPENED:
            stream_id = P.STREAM_ID.unpack_from(msg, P.HEADER.size)[0]
            info = P.decode_json(msg[P.HEADER.size + P.STREAM_ID.size:])
            if stream_id not in self.base:
                self.opened[stream_id] = P.DTYPE_NAMES[info["dtype"]]
            self.shed_after[stream_id] = info["shed_after_ms"]
            self.got_units += 1
        else:
            assert msg_type in (MsgType.RESET_DONE, MsgType.PONG, MsgType.STATS_REPLY), hex(msg_type)
            self.got_units += 1


# ---- what hypothesis draws --------------------------------------------------------------
# Hypothesis draws plain data only. Which streams are open, their dtypes and the request ids
# are live state that Fuzzer.build() maps the draws onto (through a PRNG the draw seeds), so
# the shape of every draw stays independent of the daemon's replies, as hypothesis requires.
_json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                 | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_hostile_numbers = st.sampled_from([0, -1, 16000.0, 8000.5, 1e308, -1e308, 2**31, 2**64, 10**300,
                                    float("nan"), float("inf"), -0.0, True, False, "16000", [16000]])
_open_values = {
    "sample_rate": st.sampled_from([16000, 8000, 44100, 0]) | _hostile_numbers | _json_values,
    "dtype": st.sampled_from(["int16", "float32", "int8", "", "INT16"]) | _json_values,
    "shed_after_ms": st.sampled_from([0, 5, None, -1, 2**31, 1.5]) | _hostile_numbers,
    "vad": st.dictionaries(st.sampled_from(_VAD_KEYS + ("bogus",)),
                           st.sampled_from([0, 0.5, 0.99, 1, 1e-300, 3_600_000, 3_600_001, None])
                           | _hostile_numbers | _json_values, max_size=6) | _json_values,
}
_open_bodies = st.fixed_dictionaries({}, optional={**_open_values, "colour": _json_values})


@st.composite
def _hostile_raw_body(draw: st.DrawFn) -> bytes:
    """OPEN bodies that can never open a stream."""
    kind = draw(st.sampled_from(["deep_list", "deep_obj", "huge_int", "huge_exp", "huge_string",
                                 "too_long", "not_utf8", "not_object", "truncated", "nan_rate"]))
    if kind == "deep_list":
        depth = draw(st.integers(500, 4000))
        return b'{"vad":' + b"[" * depth + b"]" * draw(st.sampled_from([0, depth])) + b"}"
    if kind == "deep_obj":
        depth = draw(st.integers(100, 800))
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == "huge_int":
        key = draw(st.sampled_from(["sample_rate", "shed_after_ms", "vad_threshold", "vad_speech_pad_ms"]))
        digits = b"9" * draw(st.integers(30, 4000))
        if key.startswith("vad_"):
            return b'{"vad":{"' + key[4:].encode() + b'":' + digits + b"}}"
        return b'{"' + key.encode() + b'":' + digits + b"}"
    if kind == "huge_exp":
        return b'{"vad":{"speech_pad_ms":1e' + str(draw(st.integers(309, 99999))).encode() + b"}}"
    if kind == "huge_string":
        key = draw(st.sampled_from(["dtype", "sample_rate", "colour"]))
        return json.dumps({key: "x" * draw(st.integers(1000, 4000))}).encode()[:P.MAX_JSON_BYTES]
    if kind == "too_long":
        return json.dumps({"dtype": "int16", "pad": "y" * draw(st.integers(4100, 9000))}).encode()
    if kind == "not_utf8":
        return b'{"dtype":"' + bytes([0xff, 0xfe, 0xc3]) + draw(st.binary(max_size=40)) + b'"}'
    if kind == "not_object":
        return draw(st.sampled_from([b"[]", b"1", b'"x"', b"null", b"", b"NaN", b"[1,2,3]"]))
    if kind == "truncated":
        return b'{"sample_rate": 16000, "vad": {"threshold": 0.'
    return b'{"sample_rate": NaN}'


# Hypothesis draws each message's category and a PRNG seed; the two JSON categories also take
# their body from hypothesis' structured strategies. Everything else (sizes, ids, dtypes, the
# lies in the lengths) comes from the seeded PRNG: one cheap draw per message instead of a
# dozen keeps > 10,000 messages within the time budget on a small machine.
SPECS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "open_hostile_json": st.tuples(_open_bodies),
    "open_malformed_json": st.tuples(_hostile_raw_body()),
}
# Relative frequencies.
WEIGHTS = {"random_bytes": 3, "short_or_empty": 1, "bad_version": 2, "unknown_type": 2, "truncated_stream_op": 1,
           "foreign_stream_op": 3, "audio_no_items": 1, "audio_lying_lengths": 3, "audio_foreign_stream": 2,
           "audio_bad_samples": 3, "audio_own_mixed": 2, "open_hostile_json": 3, "open_malformed_json": 2,
           "own_stream_op": 1, "multi_frame": 2, "oversized_readable": 1, "ping_stats_trailing_junk": 1,
           "audio_too_many_items": 1, "audio_frame_set": 2}
_CATEGORY_LIST = [name for name, weight in WEIGHTS.items() for _ in range(weight)]
_NO_SPEC: st.SearchStrategy[tuple[Any, ...]] = st.just(())


@st.composite
def message_spec(draw: st.DrawFn) -> tuple[int, str, tuple[Any, ...]]:
    """(PRNG seed, which also picks the socket; category; hypothesis-drawn part, if any)."""
    category = draw(st.sampled_from(_CATEGORY_LIST))
    return draw(st.integers(0, 2**32 - 1)), category, draw(SPECS.get(category, _NO_SPEC))


batches_of_messages = st.lists(message_spec(), min_size=BATCH, max_size=BATCH)


def _pcm(dtype: int, n_samples: int, rng: random.Random, speech: np.ndarray) -> bytes:
    start = rng.randrange(0, len(speech) - n_samples) if len(speech) > n_samples else 0
    chunk = speech[start:start + n_samples]
    if dtype == DType.INT16:
        return chunk.astype("<i2").tobytes()
    f32 = chunk.astype(np.float32) / 32768.0
    if rng.random() < 0.2:  # finite but absurd: accepted by the engine (only NaN/Inf are refused)
        f32 = f32 * np.float32(rng.choice([1e3, 1e30, 3.4e38]))
    return f32.astype("<f4").tobytes()


# ---- specs -> messages -------------------------------------------------------------------
class Fuzzer:
    def __init__(self, sockets: list[FuzzSocket], speech: np.ndarray) -> None:
        self.sockets = sockets
        self.speech = speech
        self.foreign: dict[int, list[int]] = {
            s.index: [CLEAN_STREAM_ID] + [sid for o in sockets if o is not s for sid in (*o.base, *o.hostile_ids)]
            for s in sockets}

    def build(self, s: FuzzSocket, rng: random.Random, category: str, spec: tuple[Any, ...]) -> Msg:
        msg: Msg = getattr(self, "build_" + category)(s, rng, *spec)
        return msg

    def _foreign_id(self, s: FuzzSocket, rng: random.Random) -> int:
        """An id another connection owns (the clean stream's, other sockets'), or any id not ours."""
        if rng.random() < 0.6:
            return rng.choice(self.foreign[s.index])
        any_id = rng.choice([0, 1, 2, 7, 2**31, 2**32 - 1, rng.getrandbits(32)])
        return any_id if any_id not in s.base and any_id not in s.hostile_ids else 0xDEAD_BEEF

    def _foreign_items(self, s: FuzzSocket, rng: random.Random, rid: int, count: int) -> list[bytes]:
        items = []
        for _ in range(count):
            nbytes = rng.choice([0, 1, 7, 1024, 4096])
            dtype = rng.choice([0, 1, 2, 3, 0xFFFF_FFFF])
            items.append(P.AUDIO_ITEM.pack(self._foreign_id(s, rng), rid, dtype, nbytes) + rng.randbytes(nbytes))
        return items

    def build_random_bytes(self, s: FuzzSocket, rng: random.Random) -> Msg:
        raw = rng.randbytes(rng.choice([0, 1, 5, 8, 9, 16, 48, 300, 3000]))
        if rng.random() < 0.3:  # make some look like a header
            raw = P.MAGIC + raw[2:]
        if raw[:3] == P.MAGIC + bytes([P.VERSION]):
            raw = b"X" + raw[1:]
        code = ErrorCode.UNSUPPORTED_VERSION if len(raw) >= 8 and raw[:2] == P.MAGIC else ErrorCode.BAD_MESSAGE
        return Msg([raw], "random_bytes", 0, [frozenset({code})])

    def build_short_or_empty(self, s: FuzzSocket, rng: random.Random) -> Msg:
        raw = P.HEADER.pack(P.MAGIC, P.VERSION, rng.choice(sorted(_KNOWN_TYPES)), s.rid())[:rng.randrange(8)]
        return Msg([raw], "short_or_empty", 0, [frozenset({ErrorCode.BAD_MESSAGE})])

    def build_bad_version(self, s: FuzzSocket, rng: random.Random) -> Msg:
        version = rng.choice([0, 2, 255, rng.randrange(2, 256)])
        raw = P.HEADER.pack(P.MAGIC, version, rng.randrange(256), s.rid()) + rng.randbytes(rng.randrange(33))
        return Msg([raw], "bad_version", 0, [frozenset({ErrorCode.UNSUPPORTED_VERSION})])

    def build_unknown_type(self, s: FuzzSocket, rng: random.Random) -> Msg:
        rid = s.rid()
        msg_type = rng.choice([0, 7, 0x7F, 0x81, 0x82, 0x85, 0xE0, 0xFF, rng.randrange(7, 256)])
        raw = P.HEADER.pack(P.MAGIC, P.VERSION, msg_type, rid) + rng.randbytes(rng.randrange(33))
        return Msg([raw], "unknown_type", rid, [frozenset({ErrorCode.UNKNOWN_TYPE})])

    def build_truncated_stream_op(self, s: FuzzSocket, rng: random.Random) -> Msg:
        rid = s.rid()
        op = rng.choice([MsgType.OPEN, MsgType.RESET, MsgType.CLOSE])
        return Msg([P.header(op, rid) + rng.randbytes(rng.randrange(4))], "truncated_stream_op", rid,
                   [frozenset({ErrorCode.BAD_MESSAGE})])

    def build_foreign_stream_op(self, s: FuzzSocket, rng: random.Random) -> Msg:
        rid = s.rid()
        op = rng.choice([MsgType.RESET, MsgType.CLOSE])
        raw = P.encode_stream_op(op, rid, self._foreign_id(s, rng)) + rng.randbytes(rng.choice([0, 0, 3, 8]))
        return Msg([raw], "foreign_stream_op", rid, [frozenset({ErrorCode.UNKNOWN_STREAM})])

    def build_audio_no_items(self, s: FuzzSocket, rng: random.Random) -> Msg:
        rid = s.rid()
        return Msg([P.header(MsgType.AUDIO, rid)], "audio_no_items", rid, [frozenset({ErrorCode.BAD_MESSAGE})])

    def build_audio_lying_lengths(self, s: FuzzSocket, rng: random.Random) -> Msg:
        """Valid items for foreign streams, then an item header cut short or whose nbytes lies (for
        the socket's own stream): the message is refused whole, one BAD_MESSAGE, nothing used."""
        rid = s.rid()
        items = self._foreign_items(s, rng, rid, rng.randrange(5))
        sid = rng.choice(sorted(s.base))
        if rng.random() < 0.4:
            tail = P.AUDIO_ITEM.pack(sid, rid, s.base[sid], 0)[:rng.randrange(1, P.AUDIO_ITEM.size)]
        else:
            present = rng.choice([0, 1, 2, 64, 1000])
            lie = rng.choice([present + 1, present + 2, 2**31, 2**32 - 1, MAX_MESSAGE_BYTES, 2 * MAX_MESSAGE_BYTES])
            tail = P.AUDIO_ITEM.pack(sid, rid, s.base[sid], lie) + rng.randbytes(present)
        raw = P.header(MsgType.AUDIO, rid) + b"".join(items) + tail
        return Msg([raw], "audio_lying_lengths", rid, [frozenset({ErrorCode.BAD_MESSAGE})])

    def build_audio_foreign_stream(self, s: FuzzSocket, rng: random.Random) -> Msg:
        rid = s.rid()
        items = self._foreign_items(s, rng, rid, rng.randrange(1, 5))
        return Msg([P.header(MsgType.AUDIO, rid) + b"".join(items)], "audio_foreign_stream", rid,
                   [frozenset({ErrorCode.UNKNOWN_STREAM})] * len(items))

    def build_audio_bad_samples(self, s: FuzzSocket, rng: random.Random) -> Msg:
        """The socket's own (never closed) streams: NaN/Inf floats, a dtype that is not the
        stream's, byte counts that are not whole samples."""
        rid = s.rid()
        items, checks = [], []
        float_sid = next(k for k, v in s.base.items() if v == DType.FLOAT32)
        for _ in range(rng.randrange(1, 4)):
            sid = rng.choice(sorted(s.base))
            dtype = s.base[sid]
            kind = rng.choice(["nonfinite", "wrong_dtype", "odd_bytes"])
            if kind == "nonfinite":
                samples = np.frombuffer(_pcm(DType.FLOAT32, rng.randrange(1, 2049), rng, self.speech), "<f4").copy()
                for _ in range(rng.randrange(1, 5)):
                    samples[rng.randrange(len(samples))] = rng.choice([np.nan, np.inf, -np.inf])
                items.append(P.AUDIO_ITEM.pack(float_sid, rid, DType.FLOAT32, samples.nbytes) + samples.tobytes())
                checks.append(frozenset({ErrorCode.BAD_AUDIO}))
            elif kind == "wrong_dtype":
                wrong = rng.choice([d for d in (0, 1, 2, 3, 255, 2**32 - 1) if d != dtype])
                pcm = _pcm(dtype, rng.randrange(1025), rng, self.speech)
                items.append(P.AUDIO_ITEM.pack(sid, rid, wrong, len(pcm)) + pcm)
                checks.append(frozenset({ErrorCode.BAD_DTYPE}))
            else:
                size = P.NUMPY_DTYPES[dtype].itemsize
                nbytes = rng.choice([n for n in (1, 3, 5, 513, 1023, 4097, rng.randrange(4096)) if n % size])
                items.append(P.AUDIO_ITEM.pack(sid, rid, dtype, nbytes) + rng.randbytes(nbytes))
                checks.append(frozenset({ErrorCode.BAD_AUDIO}))
        return Msg([P.header(MsgType.AUDIO, rid) + b"".join(items)], "audio_bad_samples", rid, checks)

    def build_audio_own_mixed(self, s: FuzzSocket, rng: random.Random) -> Msg:
        """Valid chunks (incl. absurd finite floats) for own streams, incl. hostile-param ones that
        opened, mixed with foreign items: every item gets one reply, whatever it is."""
        rid = s.rid()
        items = []
        own = s.own()
        for _ in range(rng.randrange(1, 5)):
            if rng.random() < 0.2:
                items += self._foreign_items(s, rng, rid, 1)
                continue
            sid = rng.choice(sorted(own))
            pcm = _pcm(own[sid], rng.choice([0, 1, 100, 511, 512, 513, 2000, 4096]), rng, self.speech)
            items.append(P.AUDIO_ITEM.pack(sid, rid, own[sid], len(pcm)) + pcm)
        return Msg([P.header(MsgType.AUDIO, rid) + b"".join(items)], "audio_own_mixed", rid, None)

    def build_audio_frame_set(self, s: FuzzSocket, rng: random.Random) -> Msg:
        """Gateway-shaped (engine/frame_sets.py takes these in bulk): a clean tick for the
        socket's gateway streams, or 4 to MAX_ITEMS items of one size and dtype, mostly one frame
        each for the socket's own streams, mixed with foreign or unknown streams, streams of the
        other dtype, repeated streams and NaN frames."""
        rid = s.rid()
        if rng.random() < 0.3:  # a gateway's tick: one frame for each of its streams
            frames = [_pcm(DType.INT16, 512, rng, self.speech) for _ in s.gateway]
            tick = [P.AUDIO_ITEM.pack(sid, rid, DType.INT16, len(b)) + b for sid, b in zip(s.gateway, frames)]
            rng.shuffle(tick)
            return Msg([P.header(MsgType.AUDIO, rid) + b"".join(tick)], "audio_frame_set", rid, None)
        dtype = rng.choice([DType.INT16, DType.FLOAT32])
        n_samples = rng.choice([512, 512, 512, 256, 1024])
        own = sorted(s.own())
        items = []
        for _ in range(rng.randrange(4, MAX_ITEMS + 1)):
            sid = rng.randrange(2**32) if rng.random() < 0.15 else rng.choice(own)
            pcm = _pcm(dtype, n_samples, rng, self.speech)
            if dtype == DType.FLOAT32 and rng.random() < 0.1:
                samples = np.frombuffer(pcm, "<f4").copy()
                samples[rng.randrange(n_samples)] = np.nan
                pcm = samples.tobytes()
            items.append(P.AUDIO_ITEM.pack(sid, rid, dtype, len(pcm)) + pcm)
        return Msg([P.header(MsgType.AUDIO, rid) + b"".join(items)], "audio_frame_set", rid, None)

    def build_audio_too_many_items(self, s: FuzzSocket, rng: random.Random) -> Msg:
        """More than max_items_per_message items: valid chunks for the socket's own streams (each
        would get a RESULTS item if it were used), foreign ones, empty ones, sometimes a lying
        tail past the limit: refused whole, one LIMIT, nothing used."""
        rid = s.rid()
        items = []
        own = s.own()
        for _ in range(rng.choice([MAX_ITEMS + 1, MAX_ITEMS + 2, rng.randrange(MAX_ITEMS + 1, 8 * MAX_ITEMS)])):
            if rng.random() < 0.2:
                items += self._foreign_items(s, rng, rid, 1)
                continue
            sid = rng.choice(sorted(own))
            pcm = _pcm(own[sid], rng.choice([0, 1, 100, 512, 1024]), rng, self.speech)
            items.append(P.AUDIO_ITEM.pack(sid, rid, own[sid], len(pcm)) + pcm)
        while len(items) > MAX_ITEMS + 1 and sum(map(len, items)) > MAX_MESSAGE_BYTES - 64:
            items.pop()  # over the item limit, not over max_message_bytes
        if rng.random() < 0.3:
            items.append(P.AUDIO_ITEM.pack(rng.choice(sorted(s.base)), rid, DType.INT16, 2**31))
        return Msg([P.header(MsgType.AUDIO, rid) + b"".join(items)], "audio_too_many_items", rid,
                   [frozenset({ErrorCode.LIMIT})])

    def build_open_hostile_json(self, s: FuzzSocket, rng: random.Random, body: dict[str, Any]) -> Msg:
        """OPEN with hypothesis-built JSON; it may even be valid (the stream then gets audio)."""
        rid = s.rid()
        raw = P.header(MsgType.OPEN, rid) + P.STREAM_ID.pack(rng.choice(s.hostile_ids))
        return Msg([raw + json.dumps(body, allow_nan=True).encode()], "open_hostile_json", rid, None)

    def build_open_malformed_json(self, s: FuzzSocket, rng: random.Random, body: bytes) -> Msg:
        rid = s.rid()
        raw = P.header(MsgType.OPEN, rid) + P.STREAM_ID.pack(rng.choice(s.hostile_ids)) + body
        return Msg([raw], "open_malformed_json", rid, [OPEN_ERRORS])

    def build_own_stream_op(self, s: FuzzSocket, rng: random.Random) -> Msg:
        """RESET a base stream, or RESET/CLOSE a hostile-id stream (open or not)."""
        rid = s.rid()
        if rng.random() < 0.3:
            raw = P.encode_stream_op(MsgType.RESET, rid, rng.choice(sorted(s.base)))
        else:
            raw = P.encode_stream_op(rng.choice([MsgType.RESET, MsgType.CLOSE, MsgType.CLOSE]), rid,
                                     rng.choice(s.hostile_ids))
        return Msg([raw], "own_stream_op", rid, None)

    def build_multi_frame(self, s: FuzzSocket, rng: random.Random) -> Msg:
        heads = [b"", P.header(MsgType.PING, s.rid()), b"junk"]
        frames = [rng.choice(heads) + rng.randbytes(rng.choice([0, 0, 5, 64])) for _ in range(rng.randrange(2, 6))]
        return Msg(frames, "multi_frame", 0, [frozenset({ErrorCode.BAD_MESSAGE})])

    def build_oversized_readable(self, s: FuzzSocket, rng: random.Random) -> Msg:
        size = rng.choice([MAX_MESSAGE_BYTES + 1, 2 * MAX_MESSAGE_BYTES,
                           rng.randrange(MAX_MESSAGE_BYTES + 1, 2 * MAX_MESSAGE_BYTES)])
        raw = P.header(rng.choice([MsgType.AUDIO, MsgType.OPEN, MsgType.PING]), s.rid()) + bytes(size - P.HEADER.size)
        return Msg([raw], "oversized_readable", 0, [frozenset({ErrorCode.LIMIT})])

    def build_ping_stats_trailing_junk(self, s: FuzzSocket, rng: random.Random) -> Msg:
        rid = s.rid()
        msg_type = MsgType.STATS if rng.random() < 0.1 else MsgType.PING
        return Msg([P.header(msg_type, rid) + rng.randbytes(rng.choice([0, 1, 16]))], "ping_stats_trailing_junk",
                   rid, None)


# ---- the clean stream --------------------------------------------------------------------
@dataclass
class CleanReport:
    clips: int = 0
    frames: int = 0
    worst: float = 0.0
    failures: list[str] = field(default_factory=list)


def clean_stream(endpoint: str, clips: list[Clip], stop: threading.Event, report: CleanReport) -> None:
    try:
        with Client(endpoint, timeout=60) as client:
            while not stop.is_set() or report.clips == 0:
                for clip in clips:
                    stream = client.open_stream(clip.rate, stream_id=CLEAN_STREAM_ID)
                    results = []
                    for start in range(0, len(clip.pcm), 4000):
                        results += stream.send(clip.pcm[start:start + 4000])
                        time.sleep(0.02)  # ~10x real time: concurrent, without starving the fuzzer
                    results += stream.close()
                    ref = reference(clip)
                    got = np.array([r.probability for r in results], np.float32)
                    if len(got) != len(ref):
                        report.failures.append(f"{clip.name}: {len(got)} results for {len(ref)} frames")
                        continue
                    diff = float(np.max(np.abs(got - ref)))
                    report.worst = max(report.worst, diff)
                    report.frames += len(got)
                    report.clips += 1
                    if not diff <= TOLERANCE:
                        report.failures.append(f"{clip.name}: max |diff| {diff}")
                    if stop.is_set():
                        break
    except Exception as exc:  # noqa: BLE001 - reported by the test thread
        report.failures.append(f"clean stream failed: {exc!r}")


def raw_stats(endpoint: str) -> dict[str, object]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(P.header(MsgType.STATS, 1))
        assert sock.poll(10_000), "no STATS reply"
        return P.decode_json(sock.recv()[P.HEADER.size:])
    finally:
        sock.close()


def error_total(stats: dict[str, object]) -> int:
    counters = stats["counters"]
    assert isinstance(counters, dict)
    return sum(v for k, v in counters.items() if k.startswith("errors_"))


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[DaemonProcess]:
    daemon = spawn_daemon(*DAEMON_ARGS)
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def open_socket(endpoint: str, index: int) -> FuzzSocket:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    base = 1000 * (index + 1)
    fs = FuzzSocket(index, sock, {base + 1: DType.INT16, base + 2: DType.FLOAT32},
                    [base + 10 + k for k in range(10)], gateway=[base + 100 + k for k in range(6)])
    for sid, dtype in [*fs.base.items(), *((sid, DType.INT16) for sid in fs.gateway)]:
        rid = fs.rid()
        sock.send(P.encode_open(rid, sid, {"dtype": "int16" if dtype == DType.INT16 else "float32"}))
        assert sock.poll(10_000)
        assert P.parse_header(sock.recv()) == (MsgType.OPENED, rid)
    return fs


def drain(sockets: list[FuzzSocket], timeout: float) -> None:
    """Read replies until every socket has all the reply units it was promised."""
    poller = zmq.Poller()
    for s in sockets:
        poller.register(s.sock, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while any(s.got_units < s.expected_units for s in sockets) and time.monotonic() < deadline:
        for sock, _ in poller.poll(100):
            owner = next(s for s in sockets if s.sock is sock)
            while True:
                try:
                    owner.handle(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break


def check_errors(s: FuzzSocket) -> None:
    by_rid: dict[int, list[ErrorCode]] = {}
    for rid, code in s.errors:
        assert code != ErrorCode.INTERNAL, f"socket {s.index}: INTERNAL error for request {rid}"
        by_rid.setdefault(rid, []).append(code)
    for rid, expected in s.checks.items():
        got = by_rid.pop(rid, [])
        assert len(got) == len(expected) and all(c in ok for c, ok in zip(got, expected)), (
            f"socket {s.index}, request {rid}: errors {[c.name for c in got]}, "
            f"expected {[sorted(e.name for e in ok) for ok in expected]}")
    stray = {rid: codes for rid, codes in by_rid.items() if rid not in s.unchecked_rids}
    assert not stray, f"socket {s.index}: unexpected errors {stray}"
    s.errors.clear()
    s.checks.clear()
    s.unchecked_rids.clear()


def test_protocol_fuzz_against_live_daemon(fuzz_daemon: DaemonProcess) -> None:
    endpoint = fuzz_daemon.endpoint
    clips = [Clip(c.name, c.pcm[:8 * c.rate], c.rate) for c in speech_clips() if c.rate == 16000][:2]
    for clip in clips:
        reference(clip)  # computed before the clock starts
    sockets = [open_socket(endpoint, i) for i in range(N_SOCKETS)]
    fuzzer = Fuzzer(sockets, clips[0].pcm)
    stats_before = raw_stats(endpoint)
    rss_before = vm_rss_mib(fuzz_daemon.pid)
    rss_peak = rss_before
    fuzz_seed = int(os.environ.get("RINGSERVE_FUZZ_SEED", random.randrange(2**32)))
    print(f"fuzz seed {fuzz_seed} (RINGSERVE_FUZZ_SEED reproduces it)")
    stop = threading.Event()
    report = CleanReport()
    clean = threading.Thread(target=clean_stream, args=(endpoint, clips, stop, report), daemon=True)
    clean.start()
    totals: Counter[str] = Counter()
    batches = 0
    timing: dict[str, float] = {"generate+send": 0.0, "drain": 0.0}
    started = time.monotonic()

    @seed(fuzz_seed)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(batches_of_messages)
    def batch(specs: list[tuple[int, str, tuple[Any, ...]]]) -> None:
        nonlocal batches, rss_peak
        batch_started = time.monotonic()
        sent: list[tuple[FuzzSocket, Msg]] = []
        for prng_seed, category, spec in specs:
            s = sockets[prng_seed % N_SOCKETS]
            msg = fuzzer.build(s, random.Random(prng_seed), category, spec)
            if len(msg.frames) == 1:
                s.sock.send(msg.frames[0])
            else:
                s.sock.send_multipart(msg.frames)
            units = reply_units(msg.frames)
            s.expected_units += units
            if msg.checks is None:
                s.unchecked_rids.add(msg.rid)
            else:
                assert len(msg.checks) == units, msg.category
                s.checks.setdefault(msg.rid, []).extend(msg.checks)
            sent.append((s, msg))
        generated = time.monotonic()
        drain(sockets, timeout=30)
        timing["generate+send"] += generated - batch_started
        timing["drain"] += time.monotonic() - generated
        assert fuzz_daemon.proc.poll() is None, f"daemon died:\n{fuzz_daemon.log()[-3000:]}"
        for s in sockets:
            assert s.got_units == s.expected_units, (
                f"socket {s.index}: {s.got_units} replies for {s.expected_units} promised; batch: "
                f"{[(m.category, m.frames[0][:24]) for o, m in sent if o is s]}")
            check_errors(s)
        batches += 1
        totals.update(m.category for _, m in sent)
        rss_peak = max(rss_peak, vm_rss_mib(fuzz_daemon.pid))

    try:
        batch()
        fuzz_s = time.monotonic() - started
    finally:
        stop.set()
        clean.join(120)
    # Nothing more may arrive: every promised reply was counted, and no message got two.
    drain(sockets, timeout=0.5)
    time.sleep(0.3)
    drain(sockets, timeout=0.1)
    for s in sockets:
        assert s.sock.poll(0) == 0, f"socket {s.index}: an unpromised reply arrived"
    stats_after = raw_stats(endpoint)
    rss_after = vm_rss_mib(fuzz_daemon.pid)
    errors_received = sum(s.error_replies for s in sockets)
    errors_counted = error_total(stats_after) - error_total(stats_before)
    n_messages = sum(totals.values())
    counters_after = stats_after["counters"]
    assert isinstance(counters_after, dict)
    spent = ", ".join(f"{k} {v:.1f} s" for k, v in timing.items())
    print(f"{n_messages} messages in {batches} batches over {N_SOCKETS} sockets in {fuzz_s:.1f} s "
          f"({n_messages / fuzz_s:.0f}/s; {spent}); by category: {dict(sorted(totals.items()))}")
    print(f"ERROR replies {errors_received}, errors counted by the engine +{errors_counted}; "
          f"front-end RSS {rss_before:.1f} -> {rss_after:.1f} MiB (peak {rss_peak:.1f}); clean stream: "
          f"{report.clips} clips, {report.frames} frames, max |diff| {report.worst:.3g}; "
          f"{counters_after.get('frames_in_frame_sets', 0)} frames taken in frame sets")
    for s in sockets:
        s.sock.close(0)
    assert fuzz_daemon.proc.poll() is None, fuzz_daemon.log()
    assert n_messages >= MIN_MESSAGES
    assert not report.failures, report.failures
    assert report.clips >= 1
    # Shedding is off by default here; only streams whose OPEN asked for a shed_after_ms may
    # get NaN (flagged SHED), and the engine counts exactly those: no NaN came from the model.
    assert [a for s in sockets for a in s.anomalies] == []
    assert counters_after.get("frames_shed", 0) == sum(s.shed_frames for s in sockets)
    assert counters_after.get("errors_internal", 0) == 0
    assert errors_counted == errors_received
    assert counters_after.get("replies_dropped_slow_client", 0) == 0
    # The bulk intake path ran too: the gateway streams' ticks alone are ~100 messages of 6 frames.
    assert counters_after.get("frames_in_frame_sets", 0) >= 100
    assert rss_peak - rss_before < RSS_GROWTH_LIMIT_MIB, (rss_before, rss_peak)


def test_oversized_messages() -> None:
    """Up to twice max_message_bytes: read, refused with LIMIT naming the setting, the connection
    and its streams carry on. Beyond that, libzmq (ZMQ_MAXMSGSIZE = 2 x the limit) drops the
    connection before allocating the message: no reply, the daemon stays up, a DEALER
    reconnects by itself under a new identity (its old streams are not reachable from it), and
    the orphaned stream is reclaimed by the idle timeout."""
    from zmq.utils.monitor import recv_monitor_message

    daemon = spawn_daemon("--workers", "1", "--max-message-bytes", str(MAX_MESSAGE_BYTES), "--idle-timeout-s", "1")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sock.connect(daemon.endpoint)

    def reply(timeout_ms: int = 5000) -> bytes:
        assert sock.poll(timeout_ms), "no reply"
        return sock.recv()

    try:
        sock.send(P.encode_open(1, 5, {}))
        assert P.parse_header(reply())[0] == MsgType.OPENED
        for size in (MAX_MESSAGE_BYTES + 1, 2 * MAX_MESSAGE_BYTES):
            sock.send(P.header(MsgType.AUDIO, 2) + P.AUDIO_ITEM.pack(5, 2, DType.INT16, size - 24) + bytes(size - 24))
            error = P.decode_error(reply())
            assert error.code == ErrorCode.LIMIT and "max_message_bytes" in error.text, error
            assert f"{size} bytes" in error.text and str(MAX_MESSAGE_BYTES) in error.text, error.text
        sock.send(P.encode_audio(3, [(5, 3, DType.INT16, bytes(1024))]))  # the stream is untouched
        results = P.decode_results(reply())
        assert [(r.stream_id, r.chunk_seq, len(r.probabilities)) for r in results] == [(5, 3, 1)]
        assert monitor.poll(5000) and recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED

        sock.send(P.header(MsgType.AUDIO, 4) + bytes(2 * MAX_MESSAGE_BYTES + 1 - P.HEADER.size))
        assert sock.poll(1000) == 0, "a message over 2 x max_message_bytes got a reply"
        events: list[int] = []
        while len(events) < 2 and monitor.poll(5000):
            events.append(recv_monitor_message(monitor)["event"])
        assert events == [zmq.EVENT_DISCONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED], events
        assert daemon.proc.poll() is None
        sock.send(P.header(MsgType.PING, 6))  # the reconnected DEALER is served ...
        assert P.parse_header(reply()) == (MsgType.PONG, 6)
        sock.send(P.encode_audio(7, [(5, 7, DType.INT16, bytes(1024))]))  # ... as a new connection
        error = P.decode_error(reply())
        assert error.code == ErrorCode.UNKNOWN_STREAM, error
        deadline = time.monotonic() + 10
        while raw_stats(daemon.endpoint)["open_streams"] and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = raw_stats(daemon.endpoint)
        assert stats["open_streams"] == 0, "the dropped connection's stream was not reclaimed"
        counters = stats["counters"]
        assert isinstance(counters, dict)
        assert counters["errors_limit"] == 2 and counters["streams_expired"] == 1
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        assert daemon.stop() == 0, daemon.log()
