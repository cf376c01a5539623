"""Admission control: every limit is refused with an error naming the limit and the setting that
raises it, idle streams expire, and streams are scoped to their connection.

One daemon runs with deliberately small limits; another with a 1 s idle timeout; a third with
a small max_items_per_message (and otherwise default limits, so that one client may hold
many streams).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from clients import errors
from clients.client import Client, Stream
from tests.conftest import (
    vm_rss_mib,
    REPO,
    Clip,
    DaemonProcess,
    reference,
    spawn_daemon,
    speech_clips,
)
from transport import protocol as P
from transport.protocol import DType, ErrorCode, MsgType

MAX_STREAMS = 6
PER_CONNECTION = 4
MAX_MESSAGE_BYTES = 8192
MAX_IN_FLIGHT = 4
MAX_ITEMS = 4
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def limited() -> Iterator[DaemonProcess]:
    daemon = spawn_daemon("--workers", "1", "--max-streams", str(MAX_STREAMS),
                          "--max-streams-per-connection", str(PER_CONNECTION),
                          "--max-message-bytes", str(MAX_MESSAGE_BYTES),
                          "--max-in-flight-frames", str(MAX_IN_FLIGHT))
    yield daemon
    assert daemon.stop() == 0, daemon.log()


@pytest.fixture(scope="module")
def few_items() -> Iterator[DaemonProcess]:
    daemon = spawn_daemon("--workers", "1", "--max-items-per-message", str(MAX_ITEMS))
    yield daemon
    assert daemon.stop() == 0, daemon.log()


@pytest.fixture(scope="module")
def expiring() -> Iterator[DaemonProcess]:
    daemon = spawn_daemon("--workers", "1", "--idle-timeout-s", "1")
    yield daemon
    assert daemon.stop() == 0, daemon.log()


class Raw:
    """A bare DEALER speaking the wire protocol, one request at a time."""

    def __init__(self, endpoint: str) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.rid = 100

    def __enter__(self) -> Raw:  # noqa: PYI034 - final class
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close(0)

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def recv(self, timeout: float = 10.0) -> bytes:
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return self.sock.recv()

    def request(self, payload: bytes) -> bytes:
        self.sock.send(payload)
        return self.recv()

    def open(self, stream_id: int, **params: object) -> bytes:
        """OPEN; retried while LIMIT(max_streams) says the slots of just-closed streams are being recycled."""
        deadline = time.monotonic() + 5
        while True:
            reply = self.request(P.encode_open(self.next_rid(), stream_id, dict(params)))
            if P.parse_header(reply)[0] != MsgType.ERROR or time.monotonic() > deadline:
                return reply
            if "(max_streams)" not in P.decode_error(reply).text:
                return reply
            time.sleep(0.05)

    def audio(self, stream_id: int, pcm: bytes, dtype: DType = DType.INT16) -> bytes:
        rid = self.next_rid()
        return self.request(P.encode_audio(rid, [(stream_id, rid, dtype, pcm)]))

    def op(self, msg_type: MsgType, stream_id: int) -> bytes:
        return self.request(P.encode_stream_op(msg_type, self.next_rid(), stream_id))

    def replies(self, n_units: int, timeout: float = 10.0) -> tuple[list[P.WireError], list[P.WireResult]]:
        """Read until ``n_units`` ERRORs and RESULTS items have arrived (each in arrival order)."""
        errors_: list[P.WireError] = []
        results: list[P.WireResult] = []
        while len(errors_) + len(results) < n_units:
            reply = self.recv(timeout)
            if P.parse_header(reply)[0] == MsgType.ERROR:
                errors_.append(P.decode_error(reply))
            else:
                results += P.decode_results(reply)
        return errors_, results


def error_of(reply: bytes) -> P.WireError:
    assert P.parse_header(reply)[0] == MsgType.ERROR, f"expected an ERROR, got type 0x{reply[3]:02x}"
    return P.decode_error(reply)


def probabilities(reply: bytes) -> list[float]:
    assert P.parse_header(reply)[0] == MsgType.RESULTS, f"expected RESULTS, got type 0x{reply[3]:02x}"
    return [float(p) for item in P.decode_results(reply) for p in item.probabilities]


def stream_clip(raw: Raw, stream_id: int, clip: Clip, start: int, end: int, step: int = 2048) -> list[float]:
    """Send clip.pcm[start:end] in chunks of at most MAX_IN_FLIGHT frames, one at a time."""
    probs: list[float] = []
    for offset in range(start, end, step):
        probs += probabilities(raw.audio(stream_id, clip.pcm[offset:min(end, offset + step)].tobytes()))
    return probs


def open_stream(client: Client, timeout: float = 5.0) -> Stream:
    """Open a stream, waiting out LIMIT while slots of just-closed streams are recycled: a slot
    is reused once its worker released every frame of the old stream, checked every 50 ms."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.open_stream()
        except errors.LimitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_for_open_streams(endpoint: str, expected: int, timeout: float = 5.0) -> dict[str, object]:
    with Raw(endpoint) as raw:
        deadline = time.monotonic() + timeout
        while True:
            stats = P.decode_json(raw.request(P.header(MsgType.STATS, raw.next_rid()))[P.HEADER.size:])
            if stats["open_streams"] == expected or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)


# ---- limits ----------------------------------------------------------------------------

def test_streams_per_connection_limit(limited: DaemonProcess) -> None:
    wait_for_open_streams(limited.endpoint, 0)
    with Client(limited.endpoint) as client:
        streams = [open_stream(client) for _ in range(PER_CONNECTION)]
        with pytest.raises(errors.LimitError) as refused:
            client.open_stream()
        text = str(refused.value)
        assert "max_streams_per_connection" in text and f"{PER_CONNECTION} open streams" in text, text
        streams[0].close()
        open_stream(client)  # room again on this connection
    with Client(limited.endpoint) as other:  # the limit is per connection
        open_stream(other)


def test_global_stream_limit(limited: DaemonProcess) -> None:
    wait_for_open_streams(limited.endpoint, 0)
    with Client(limited.endpoint) as first, Client(limited.endpoint) as second:
        held = [open_stream(first) for _ in range(PER_CONNECTION)]
        held += [open_stream(second) for _ in range(MAX_STREAMS - PER_CONNECTION)]
        with pytest.raises(errors.LimitError) as refused:
            second.open_stream()
        assert "(max_streams)" in str(refused.value) and f"{MAX_STREAMS} streams" in str(refused.value)
        held[0].close()  # its slot comes back once its worker has released all its frames
        open_stream(second)


def test_max_message_bytes(limited: DaemonProcess) -> None:
    wait_for_open_streams(limited.endpoint, 0)
    with Raw(limited.endpoint) as raw:
        opened = raw.open(1)
        info = P.decode_json(opened[P.HEADER.size + P.STREAM_ID.size:])
        assert info["max_message_bytes"] == MAX_MESSAGE_BYTES  # clients split their chunks by it
        pcm = bytes(MAX_MESSAGE_BYTES + 1 - P.HEADER.size - P.AUDIO_ITEM.size)
        error = error_of(raw.audio(1, pcm))
        assert error.code == ErrorCode.LIMIT
        assert "max_message_bytes" in error.text and f"{MAX_MESSAGE_BYTES}-byte limit" in error.text, error.text
        assert probabilities(raw.audio(1, bytes(1024))) != []  # refused whole: the stream carries on
        raw.op(MsgType.CLOSE, 1)


def test_in_flight_limit_refuses_the_chunk_and_leaves_the_stream_exact(limited: DaemonProcess) -> None:
    wait_for_open_streams(limited.endpoint, 0)
    clip = Clip(speech_clips()[0].name, speech_clips()[0].pcm[:4 * 16000], 16000)
    frame = 512
    with Raw(limited.endpoint) as raw:
        raw.open(1)
        too_many = clip.pcm[:(MAX_IN_FLIGHT + 1) * frame].tobytes()  # fits in a message, not in flight
        error = error_of(raw.audio(1, too_many))
        assert error.code == ErrorCode.LIMIT and error.stream_id == 1, error
        assert f"max_in_flight_frames={MAX_IN_FLIGHT}" in error.text and "would have 5 frames" in error.text
        probs = stream_clip(raw, 1, clip, 0, len(clip.pcm))
        final = P.decode_results(raw.op(MsgType.CLOSE, 1))
        probs += [float(p) for item in final for p in item.probabilities]
    ref = reference(clip)
    assert len(probs) == len(ref)
    assert np.max(np.abs(np.array(probs, np.float32) - ref)) <= TOLERANCE


def stats_of(endpoint: str) -> dict[str, object]:
    with Raw(endpoint) as raw:
        return P.decode_json(raw.request(P.header(MsgType.STATS, raw.next_rid()))[P.HEADER.size:])


def limit_errors(stats: dict[str, object]) -> int:
    counters = stats["counters"]
    assert isinstance(counters, dict)
    return int(counters.get("errors_limit", 0))


def test_too_many_items_refuse_the_whole_message(few_items: DaemonProcess) -> None:
    """More than max_items_per_message items: one LIMIT for the message, none of its items used
    (the stream stays bit-exact); exactly max_items_per_message items: accepted."""
    clip = Clip(speech_clips()[0].name, speech_clips()[0].pcm[:4 * 16000], 16000)
    chunks = [clip.pcm[i:i + 2048].tobytes() for i in range(0, len(clip.pcm), 2048)]
    with Raw(few_items.endpoint) as raw:
        opened = raw.open(1)
        info = P.decode_json(opened[P.HEADER.size + P.STREAM_ID.size:])
        assert info["max_items_per_message"] == MAX_ITEMS  # clients pack their messages by it
        for n_items in (MAX_ITEMS + 1, 3 * MAX_ITEMS):  # clip chunks 0, 1, ... of stream 1
            rid = raw.next_rid()
            raw.sock.send(P.encode_audio(rid, [(1, rid, DType.INT16, chunks[k]) for k in range(n_items)]))
            error = error_of(raw.recv())
            assert (error.code, error.request_id, error.stream_id) == (ErrorCode.LIMIT, rid, 0), error
            assert f"more than max_items_per_message={MAX_ITEMS} audio items" in error.text, error.text
            assert raw.sock.poll(300) == 0, "a refused message got more than one reply"
        # Messages of exactly the limit are served; the stream never saw the refused ones.
        probs: list[float] = []
        for start in range(0, len(chunks), MAX_ITEMS):
            rid = raw.next_rid()
            group = [(1, rid + k, DType.INT16, chunk) for k, chunk in enumerate(chunks[start:start + MAX_ITEMS])]
            raw.rid += len(group)
            raw.sock.send(P.encode_audio(rid, group))
            errors_, results = raw.replies(len(group))
            assert errors_ == [] and [r.chunk_seq for r in results] == [seq for _, seq, _, _ in group]
            probs += [float(p) for r in results for p in r.probabilities]
        probs += [float(p) for item in P.decode_results(raw.op(MsgType.CLOSE, 1)) for p in item.probabilities]
    ref = reference(clip)
    assert len(probs) == len(ref)
    assert np.max(np.abs(np.array(probs, np.float32) - ref)) <= TOLERANCE


def test_client_packs_messages_by_max_items_per_message(few_items: DaemonProcess) -> None:
    """A Client submitting to 10 streams at once (submit_many) sends messages of at most
    max_items_per_message items, as OPENED advertises: every chunk is answered, none refused."""
    clip = Clip(speech_clips()[0].name, speech_clips()[0].pcm[:3 * 16000], 16000)
    limits_before = limit_errors(stats_of(few_items.endpoint))
    with Client(few_items.endpoint) as client:
        streams = [client.open_stream() for _ in range(10)]
        assert client.session.max_items_per_message == MAX_ITEMS
        got: list[list[float]] = [[] for _ in streams]
        for start in range(0, len(clip.pcm), 1600):
            pending = client.submit_many([(stream, clip.pcm[start:start + 1600]) for stream in streams])
            for probs, p in zip(got, pending):
                probs += [r.probability for r in p.result()]
        for probs, stream in zip(got, streams):
            probs += [r.probability for r in stream.close()]
        assert client.notices == []
    assert limit_errors(stats_of(few_items.endpoint)) == limits_before
    ref = reference(clip)
    for probs in got:
        assert len(probs) == len(ref)
        assert np.max(np.abs(np.array(probs, np.float32) - ref)) <= TOLERANCE


def test_chunks_awaiting_results_are_bounded_per_stream(limited: DaemonProcess) -> None:
    """Tiny chunks pile up behind a stream's frames in flight, each held until answered: beyond
    max_in_flight_frames of them the next is refused with LIMIT naming the setting, nothing of
    it used; the engine and the stream carry on, bit-exact."""
    wait_for_open_streams(limited.endpoint, 0)
    clip = Clip(speech_clips()[0].name, speech_clips()[0].pcm[:4 * 16000], 16000)
    frames = MAX_IN_FLIGHT * 512
    n_tiny = 10
    limits_before = limit_errors(stats_of(limited.endpoint))
    with Raw(limited.endpoint) as raw:
        raw.open(1)
        rid = raw.next_rid()
        # One message: MAX_IN_FLIGHT frames, then one-sample chunks (the next samples of the clip),
        # all read before any result can come back.
        items = [(1, rid, DType.INT16, clip.pcm[:frames].tobytes())]
        items += [(1, rid + 1 + k, DType.INT16, clip.pcm[frames + k:frames + k + 1].tobytes()) for k in range(n_tiny)]
        raw.rid += n_tiny
        raw.sock.send(P.encode_audio(rid, items))
        accepted = MAX_IN_FLIGHT  # the chunk of frames, then tiny ones until MAX_IN_FLIGHT await results
        errors_, results = raw.replies(1 + n_tiny)
        assert [r.chunk_seq for r in results] == [seq for _, seq, _, _ in items[:accepted]]
        assert [len(r.probabilities) for r in results] == [MAX_IN_FLIGHT] + [0] * (accepted - 1)
        assert [e.chunk_seq for e in errors_] == [seq for _, seq, _, _ in items[accepted:]]
        for error in errors_:
            assert error.code == ErrorCode.LIMIT and error.stream_id == 1, error
            assert f"already has {MAX_IN_FLIGHT} chunks awaiting results" in error.text, error.text
            assert f"max_in_flight_frames={MAX_IN_FLIGHT}" in error.text, error.text
        assert raw.sock.poll(300) == 0
        assert P.parse_header(raw.request(P.header(MsgType.PING, 7))) == (MsgType.PONG, 7)
        # The refused samples were not used: resending from the first of them keeps the stream exact.
        probs = [float(p) for r in results for p in r.probabilities]
        probs += stream_clip(raw, 1, clip, frames + accepted - 1, len(clip.pcm))
        probs += [float(p) for item in P.decode_results(raw.op(MsgType.CLOSE, 1)) for p in item.probabilities]
    assert limited.proc.poll() is None
    assert limit_errors(stats_of(limited.endpoint)) - limits_before == n_tiny + 1 - accepted
    ref = reference(clip)
    assert len(probs) == len(ref)
    assert np.max(np.abs(np.array(probs, np.float32) - ref)) <= TOLERANCE


# ---- streams belong to their connection ---------------------------------------------------

def test_no_client_can_touch_another_clients_stream(limited: DaemonProcess) -> None:
    wait_for_open_streams(limited.endpoint, 0)
    clips = [Clip(c.name, c.pcm[:3 * 16000], 16000) for c in speech_clips() if c.rate == 16000][:2]
    half = len(clips[0].pcm) // 2 // 2048 * 2048
    with Raw(limited.endpoint) as victim, Raw(limited.endpoint) as intruder:
        for stream_id in (1, 2):
            assert P.parse_header(victim.open(stream_id))[0] == MsgType.OPENED
        got = {sid: stream_clip(victim, sid, clips[sid - 1], 0, half) for sid in (1, 2)}

        # The intruder's own stream 1 is a different stream: ids are scoped to the connection.
        assert P.parse_header(intruder.open(1))[0] == MsgType.OPENED
        mine = P.decode_results(intruder.audio(1, bytes(2048)))
        assert [(r.stream_id, r.first_frame, len(r.probabilities)) for r in mine] == [(1, 0, 2)]
        # The victim's stream 2 does not exist for the intruder: audio, reset and close all fail.
        for reply in (intruder.audio(2, clips[1].pcm[:2048].tobytes()), intruder.op(MsgType.RESET, 2),
                      intruder.op(MsgType.CLOSE, 2)):
            error = error_of(reply)
            assert error.code == ErrorCode.UNKNOWN_STREAM and error.stream_id == 2, error
            assert "stream 2 is not open on this connection" in error.text
        assert P.decode_results(intruder.op(MsgType.CLOSE, 1))[-1].final  # closes the intruder's own

        for sid in (1, 2):  # the victim's streams never noticed
            clip = clips[sid - 1]
            got[sid] += stream_clip(victim, sid, clip, half, len(clip.pcm))
            got[sid] += [float(p) for item in P.decode_results(victim.op(MsgType.CLOSE, sid))
                         for p in item.probabilities]
            ref = reference(clip)
            assert len(got[sid]) == len(ref)
            assert np.max(np.abs(np.array(got[sid], np.float32) - ref)) <= TOLERANCE


# ---- slow clients ----------------------------------------------------------------------------



def test_a_client_that_stops_reading_loses_replies_not_the_engine(limited: DaemonProcess) -> None:
    """Replies go out with NOBLOCK: once a client's queue is full (ROUTER SNDHWM, 100,000
    messages) further replies to it are dropped and counted (EAGAIN), never waited for."""
    n_requests = 130_000
    stats_before = wait_for_open_streams(limited.endpoint, 0)
    rss_before = vm_rss_mib(limited.pid)
    with Raw(limited.endpoint) as slow, Raw(limited.endpoint) as other:
        slow.sock.setsockopt(zmq.SNDHWM, 0)
        ping = P.header(MsgType.PING, 1)
        for _ in range(n_requests):  # and never read
            slow.sock.send(ping)
        counters_before = stats_before["counters"]
        assert isinstance(counters_before, dict)
        dropped_before = counters_before.get("replies_dropped_slow_client", 0)
        dropped = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            started = time.monotonic()
            stats = P.decode_json(other.request(P.header(MsgType.STATS, other.next_rid()))[P.HEADER.size:])
            assert time.monotonic() - started < 1.0, "another client waited on the slow one"
            dropped = stats["counters"].get("replies_dropped_slow_client", 0) - dropped_before
            if dropped >= n_requests - 100_000:
                break
            time.sleep(0.2)
        rss_peak = vm_rss_mib(limited.pid)
        received = 0
        while slow.sock.poll(500):
            assert P.parse_header(slow.sock.recv()) == (MsgType.PONG, 1)
            received += 1
        assert received + dropped == n_requests, (received, dropped)
        assert dropped > 0
        assert P.parse_header(slow.request(P.header(MsgType.PING, 2))) == (MsgType.PONG, 2)  # served again
    assert limited.proc.poll() is None
    assert rss_peak - rss_before < 50


# ---- idle expiry ---------------------------------------------------------------------------

def test_idle_stream_expires_and_an_active_one_does_not(expiring: DaemonProcess) -> None:
    with Client(expiring.endpoint) as client:
        idle = client.open_stream()
        active = client.open_stream()
        frames = 0
        started = time.monotonic()
        while time.monotonic() - started < 3.0:  # > 2 x idle_timeout_s
            frames += len(active.send(np.zeros(512, np.int16)))
            time.sleep(0.2)
        client.poll(0.2)
        expired = [n for n in client.notices if isinstance(n, errors.StreamExpiredError)]
        assert [n.stream_id for n in expired] == [idle.stream_id], client.notices
        assert "idle_timeout_s" in str(expired[0]) and "without audio" in str(expired[0])
        assert frames >= 10
        stats = client.stats()
        assert stats["open_streams"] == 1 and stats["counters"]["streams_expired"] >= 1
        assert len(active.send(np.zeros(512, np.int16))) == 1  # the active stream is still there


def test_expired_stream_is_gone(expiring: DaemonProcess) -> None:
    with Raw(expiring.endpoint) as raw:
        raw.open(9)
        notice = error_of(raw.recv(timeout=5))
        assert notice.code == ErrorCode.EXPIRED and notice.stream_id == 9
        assert (notice.request_id, notice.chunk_seq) == (0, 0)  # unsolicited
        assert "idle_timeout_s" in notice.text
        final = P.decode_results(raw.recv())  # the engine closed it: its FINAL result follows
        assert [(r.stream_id, r.final) for r in final] == [(9, True)]
        error = error_of(raw.audio(9, bytes(1024)))
        assert error.code == ErrorCode.UNKNOWN_STREAM and error.stream_id == 9


def test_vanished_client_streams_are_reclaimed(expiring: DaemonProcess) -> None:
    """A client that disappears without closing (killed, network gone): its idle streams expire,
    the EXPIRED notice finds nobody (EHOSTUNREACH) and the stream is released; the daemon stays up."""
    before = wait_for_open_streams(expiring.endpoint, 0)
    with Raw(expiring.endpoint) as raw:
        for stream_id in (1, 2, 3):
            raw.open(stream_id)
        raw.audio(1, bytes(4000))
    stats = wait_for_open_streams(expiring.endpoint, 0, timeout=10)
    assert expiring.proc.poll() is None, expiring.log()
    assert stats["open_streams"] == 0
    counters, counters_before = stats["counters"], before["counters"]
    assert isinstance(counters, dict) and isinstance(counters_before, dict)
    assert counters.get("replies_dropped_client_gone", 0) > counters_before.get("replies_dropped_client_gone", 0)
    assert counters["streams_closed"] - counters_before.get("streams_closed", 0) == 3


def test_results_for_a_vanished_client_are_counted_and_its_streams_closed(engine: DaemonProcess) -> None:
    """A client that disappears with frames still in the workers: their results find nobody
    (EHOSTUNREACH on the results' send), are counted, and its streams close at once, not at
    their idle timeout; the daemon stays up and serves the next client."""
    before = wait_for_open_streams(engine.endpoint, 0)
    workers = before["workers"]
    assert isinstance(workers, list)
    n_streams, n_ticks = 64, 4
    counters_before = before["counters"]
    assert isinstance(counters_before, dict)
    try:
        with Raw(engine.endpoint) as raw, Raw(engine.endpoint) as observer:
            for stream_id in range(n_streams):
                assert P.parse_header(raw.open(stream_id))[0] == MsgType.OPENED
            # The workers held still: every result comes back after its client has gone.
            for worker in workers:
                os.kill(worker["pid"], signal.SIGSTOP)
            silence = bytes(1024)  # one 512-sample int16 frame
            for tick in range(n_ticks):  # a gateway's ticks: one frame of every stream each
                raw.sock.send(P.encode_audio(raw.next_rid(),
                                             [(s, tick, DType.INT16, silence) for s in range(n_streams)]))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                stats = P.decode_json(observer.request(P.header(MsgType.STATS, observer.next_rid()))[P.HEADER.size:])
                if stats["counters"].get("frames_in", 0) - counters_before.get("frames_in", 0) >= n_streams * n_ticks:
                    break
                time.sleep(0.02)
        time.sleep(0.3)  # the engine sees the connection close
    finally:
        for worker in workers:
            os.kill(worker["pid"], signal.SIGCONT)
    stats = wait_for_open_streams(engine.endpoint, 0, timeout=10)
    assert engine.proc.poll() is None, engine.log()
    assert stats["open_streams"] == 0, stats
    counters = stats["counters"]
    assert isinstance(counters, dict)
    assert counters.get("replies_dropped_client_gone", 0) > counters_before.get("replies_dropped_client_gone", 0)
    with Client(engine.endpoint) as client:
        assert len(client.open_stream().send(np.zeros(512, np.int16))) == 1


def test_default_idle_timeout_is_generous() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RINGSERVE_")}
    out = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--print-config"], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=60, check=True).stdout
    config = tomllib.loads(out)
    serve = config.get("serve", config)
    assert serve["idle_timeout_s"] >= 60
