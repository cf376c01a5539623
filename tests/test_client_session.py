"""The sans-IO core (clients/session.py) against scripted engine replies: no daemon, no sockets.

The replies are built with transport/protocol.py's encoders exactly as engine/control.py
builds them; events come from the engine's own SpeechSegmenter, since what is tested here is
the client's bookkeeping, not the segmentation (tests/test_client.py runs the real engine).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest

from clients import errors
from clients.results import Event, Result, StreamReset, Utterance
from clients.session import (ConnState, Emit, NewSocket, Output, Send, Session, StreamCore, StreamOptions,
                             StreamState, Ticket, Wake)
from clients.utterances import UtteranceKeeper
from engine.vad_events import SpeechSegmenter, VadParams
from transport import protocol as P

W = 512
VAD = VadParams().to_dict()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self, dt: float = 0.0) -> float:
        self.t += dt
        return self.t


def opened(request_id: int, sid: int, dtype: str = "int16", max_message_bytes: int = 1 << 20,
           vad: dict[str, Any] | None = None, max_items_per_message: int | None = 1024) -> bytes:
    info: dict[str, Any] = {"stream": sid, "sample_rate": 16000, "frame_samples": W, "dtype": dtype,
                            "vad": vad or VAD, "max_message_bytes": max_message_bytes}
    if max_items_per_message is not None:  # None: an engine that does not advertise it
        info["max_items_per_message"] = max_items_per_message
    return P.header(P.MsgType.OPENED, request_id) + P.STREAM_ID.pack(sid) + P.encode_json(info)


def results(*items: tuple[int, int, int, list[float], list[tuple[int, int, int]], int]) -> bytes:
    return P.header(P.MsgType.RESULTS) + b"".join(
        P.encode_result_item(sid, seq, first, np.asarray(probs, np.float32).tobytes(), events, flags)
        for sid, seq, first, probs, events, flags in items)


def sent(outputs: list[Output]) -> list[bytes]:
    return [o.payload for o in outputs if isinstance(o, Send)]


def audio_items(msg: bytes) -> list[tuple[int, int, int, int, bytes]]:
    _, request_id = P.parse_header(msg)
    return [(request_id, sid, seq, dtype, msg[off:off + n]) for sid, seq, dtype, off, n in P.audio_items(msg)]


def open_stream(session: Session, clock: Clock, **kwargs: Any) -> StreamCore:
    vad = kwargs.pop("vad", None)
    options = StreamOptions(**kwargs)
    core, request, payload = session.open_stream(16000, "int16", None, {}, options, clock())
    assert P.parse_header(payload) == (P.MsgType.OPEN, request.id)
    out = session.receive(opened(request.id, core.stream_id, vad=vad), 0.0, clock())
    assert Wake(request) in out and request.done and request.error is None
    assert core.ready and core.frame_samples == W
    return core


def test_ids_are_unique_and_skip_reserved_values() -> None:
    session = Session(now=0.0)
    session._id = 0xFFFF_FFFD
    assert [session.new_id() for _ in range(3)] == [0xFFFF_FFFE, 1, 2]  # never 0 or CLOSE_SEQ


def test_submit_encodes_and_results_come_back_in_order_with_times() -> None:
    clock, session = Clock(), Session(now=0.0)
    core = open_stream(session, clock, window=3)
    pcm = (np.arange(1600) % 300).astype(np.int16)
    tickets, messages = session.submit([(core, pcm[:700]), (core, pcm[700:1600])], clock())
    assert len(messages) == 1  # several chunks share a message
    (rid1, sid1, seq1, dtype1, data1), (_, _, seq2, _, data2) = audio_items(messages[0])
    assert (sid1, dtype1, rid1) == (core.stream_id, P.DType.INT16, seq1)
    assert data1 + data2 == pcm.tobytes()
    assert core.tickets_in_flight == 2 and core.has_room
    seg = SpeechSegmenter(VadParams(), 16000)
    assert not seg.push(0.9)
    out = session.receive(results((core.stream_id, seq1, 0, [0.9], [], 0)), 1234.5, clock(0.25))
    assert Wake(tickets[0]) in out and tickets[0].done and tickets[0].latency == pytest.approx(0.25)
    [r] = tickets[0].results
    assert (r.frame, r.probability, r.received_at, r.latency, r.epoch) == (0, pytest.approx(0.9), 1234.5, 0.25, 0)
    out = session.receive(results((core.stream_id, seq2, 1, [0.8, 0.7], [(1, 2, 0)], 0)), 1235.0, clock(0.1))
    r1, r2 = tickets[1].results
    assert (r1.frame, r2.frame) == (1, 2)
    [event] = r2.events  # an event is attached to the frame that produced it (or the chunk's last)
    assert event == Event("start", 0, 2, 16000) and event.received_at == 1235.0 and event.seconds == 0
    assert [o.item for o in out if isinstance(o, Emit)] == [event]
    assert list(core.feed) == [event] and list(core.history) == [event] and core.in_speech
    assert core.tickets_in_flight == 0 and core.max_tickets_in_flight == 2


def test_window_counts_submitted_chunks() -> None:
    clock, session = Clock(), Session(now=0.0)
    core = open_stream(session, clock, window=2)
    session.submit([(core, np.zeros(10, np.int16))], clock())
    assert core.has_room
    session.submit([(core, np.zeros(10, np.int16))], clock())
    assert not core.has_room  # the I/O layers block/await here
    with pytest.raises(ValueError, match="window"):
        StreamOptions(window=0)


def test_engine_errors_are_typed_name_the_stream_and_match_their_chunk() -> None:
    clock, session = Clock(), Session(now=0.0)
    core = open_stream(session, clock)
    (t1, t2), [msg] = session.submit([(core, np.zeros(600, np.int16)), (core, np.zeros(5, np.int16))], clock())
    (rid, _, seq1, _, _), (_, _, seq2, _, _) = audio_items(msg)
    # the error for the second chunk comes before the first chunk's result (engine/control.py does that)
    out = session.receive(P.encode_error(rid, core.stream_id, seq2, P.ErrorCode.LIMIT, "too many frames"), 0, clock())
    assert t2.done and isinstance(t2.error, errors.LimitError)
    assert str(t2.error) == f"stream {core.stream_id}: too many frames" and t2.error.chunk_seq == seq2
    assert Emit(core, t2.error) in out  # on_error sees it too
    session.receive(results((core.stream_id, seq1, 0, [0.1], [], 0)), 0, clock())
    assert t1.done and t1.error is None and core.tickets_in_flight == 0
    # an error for a message the session did not send is kept for wait_for(("req", id))
    session.receive(P.encode_error(99, 4242, 99, P.ErrorCode.UNKNOWN_STREAM, "stream 4242 is not open"), 0, clock())
    found, value = session.take_unclaimed([("req", 99)])
    assert found and value.code == P.ErrorCode.UNKNOWN_STREAM
    assert session.state is ConnState.CONNECTED  # not a stream of ours: no reconnect


def test_open_errors_and_client_side_checks() -> None:
    clock, session = Clock(), Session(now=0.0)
    core, request, _ = session.open_stream(44100, "int16", 7, {}, StreamOptions(), clock())
    session.receive(P.encode_error(request.id, 7, 0, P.ErrorCode.BAD_PARAMS, "sample_rate 44100 is not supported"),
                    0, clock())
    assert isinstance(request.error, errors.BadParamsError) and "stream 7: sample_rate 44100" in str(request.error)
    assert 7 not in session.streams and core.state is StreamState.FAILED
    with pytest.raises(TypeError, match="unknown VAD parameter"):
        session.open_stream(16000, "int16", None, {"treshold": 0.3}, StreamOptions(), clock())
    ok = open_stream(session, clock)
    with pytest.raises(errors.StreamExistsError, match=f"stream {ok.stream_id}"):
        session.open_stream(16000, "int16", ok.stream_id, {}, StreamOptions(), clock())
    with pytest.raises(TypeError, match="float32"):
        session.submit([(ok, np.zeros(4, np.float32))], clock())
    with pytest.raises(ValueError, match="one-dimensional"):
        session.submit([(ok, np.zeros((4, 2), np.int16))], clock())
    assert ok.tickets_in_flight == 0 and ok.submitted == 0  # nothing half-done


def test_big_chunks_are_split_and_answered_as_one() -> None:
    clock, session = Clock(), Session(now=0.0)
    core, request, _ = session.open_stream(16000, "int16", None, {}, StreamOptions(), clock())
    session.receive(opened(request.id, core.stream_id, max_message_bytes=4096), 0, clock())
    [ticket], messages = session.submit([(core, np.zeros(10_000, np.int16))], clock())
    assert len(messages) > 4 and all(len(m) <= 4096 for m in messages)
    first = 0
    for msg in messages:
        [(_, sid, seq, _, data)] = audio_items(msg)
        assert not ticket.done
        n = (first * W + len(data) // 2) // W - first if msg is not messages[-1] else 10_000 // W - first
        session.receive(results((sid, seq, first, [0.5] * n, [], 0)), 0, clock())
        first += n
    assert ticket.done and [r.frame for r in ticket.results] == list(range(10_000 // W))


def test_several_streams_share_messages_up_to_max_items_per_message() -> None:
    clock, session = Clock(), Session(now=0.0)
    assert session.max_items_per_message == 1024  # the engine's default until an OPENED says otherwise
    cores = []
    for _ in range(10):
        core, request, _ = session.open_stream(16000, "int16", None, {}, StreamOptions(), clock())
        session.receive(opened(request.id, core.stream_id, max_items_per_message=3), 0, clock())
        cores.append(core)
    assert session.max_items_per_message == 3
    tickets, messages = session.submit([(core, np.zeros(600, np.int16)) for core in cores], clock())
    per_message = [audio_items(msg) for msg in messages]
    assert [len(items) for items in per_message] == [3, 3, 3, 1]
    assert [sid for items in per_message for _, sid, _, _, _ in items] == [core.stream_id for core in cores]
    for items in per_message:  # every message answered: every ticket done
        session.receive(results(*((sid, seq, 0, [0.5], [], 0) for _, sid, seq, _, _ in items)), 0, clock())
    assert all(t.done and t.error is None and len(t.results) == 1 for t in tickets)
    # An engine that does not advertise the limit leaves the one in force.
    core, request, _ = session.open_stream(16000, "int16", None, {}, StreamOptions(), clock())
    session.receive(opened(request.id, core.stream_id, max_items_per_message=None), 0, clock())
    assert session.max_items_per_message == 3


def test_a_lost_reply_fails_its_chunk_and_the_rest_carries_on() -> None:
    clock, session = Clock(), Session(now=0.0)
    core = open_stream(session, clock)
    (t1, t2), [msg] = session.submit([(core, np.zeros(512, np.int16)), (core, np.zeros(512, np.int16))], clock())
    (_, _, seq1, _, _), (_, _, seq2, _, _) = audio_items(msg)
    session.receive(results((core.stream_id, seq2, 1, [0.2], [], 0)), 0, clock())
    assert isinstance(t1.error, errors.RepliesLostError) and t2.done and t2.error is None
    assert session.counters.replies_lost == 1


def reconnect_cycle(session: Session, clock: Clock, out: list[Output], *cores: StreamCore) -> list[StreamReset]:
    """Drive PROBING -> REOPENING -> CONNECTED with scripted replies; returns the resets."""
    fresh = [i for i, o in enumerate(out) if isinstance(o, NewSocket)]
    assert len(fresh) == 1 and session.state is ConnState.PROBING
    probes = [m for m in sent(out[fresh[0]:]) if P.parse_header(m)[0] == P.MsgType.PING]
    assert probes, "a probe goes out on the fresh socket at once"
    assert not sent(session.tick(0, clock(0.01)))  # not again before the probe interval
    reopen = session.receive(P.header(P.MsgType.PONG, P.parse_header(probes[0])[1]), 0, clock())
    assert session.state is ConnState.REOPENING
    opens = {P.parse_stream_id(m): m for m in sent(reopen)}
    assert set(opens) == {c.stream_id for c in cores}
    resets = []
    for core in cores:
        msg = opens[core.stream_id]
        assert P.decode_json(msg[P.HEADER.size + P.STREAM_ID.size:]) == core.params  # same parameters
        done = session.receive(opened(P.parse_header(msg)[1], core.stream_id), 555.0, clock())
        resets += [o.item for o in done if isinstance(o, Emit) and isinstance(o.item, StreamReset)]
        assert core.ready
    assert session.state is ConnState.CONNECTED
    return resets


def test_unknown_stream_after_a_restart_reconnects_and_reopens() -> None:
    clock, session = Clock(), Session(now=0.0)
    a = open_stream(session, clock)
    b = open_stream(session, clock, keep_audio=True)
    session.submit([(a, np.zeros(1000, np.int16))], clock())
    [t_a], [msg] = session.submit([(a, np.zeros(300, np.int16))], clock())
    [t_b], _ = session.submit([(b, np.zeros(700, np.int16))], clock())
    # the first chunk's result, then the restarted daemon forgets the stream
    session.receive(results((a.stream_id, a.inflight[0].seq, 0, [0.5], [], 0)), 0, clock())
    rid, sid, seq, _, _ = audio_items(msg)[0]
    out = session.receive(P.encode_error(rid, sid, seq, P.ErrorCode.UNKNOWN_STREAM, "not open"), 0, clock())
    for ticket in (t_a, t_b):  # the chunk that hit it and the other stream's
        assert isinstance(ticket.error, errors.StreamResetError) and ticket.error.reason == "reconnect"
    assert not a.ready and not b.ready and a.tickets_in_flight == b.tickets_in_flight == 0
    resets = reconnect_cycle(session, clock, out, a, b)
    by_stream = {r.stream_id: r for r in resets}
    assert by_stream[a.stream_id] == StreamReset(a.stream_id, "reconnect", 1, 1300, 300, 1)
    assert by_stream[b.stream_id] == StreamReset(b.stream_id, "reconnect", 1, 700, 700, 1)
    assert by_stream[b.stream_id].received_at == 555.0 and list(b.feed)[-1] == by_stream[b.stream_id]
    assert session.counters.reconnects == 1
    # the new epoch: offsets from 0, base_sample carried in every event
    [ticket], [msg] = session.submit([(a, np.zeros(512, np.int16))], clock())
    (_, _, seq, _, _), = audio_items(msg)
    session.receive(results((a.stream_id, seq, 0, [0.9], [(1, 0, 0)], 0)), 0, clock())
    [r] = ticket.results
    assert (r.epoch, r.events[0].epoch, r.events[0].base_sample, r.events[0].stream_sample) == (1, 1, 1300, 1300)


def test_heartbeat_ping_and_timeout() -> None:
    clock = Clock()
    session = Session(now=clock(), heartbeat_interval=1.0, heartbeat_timeout=3.0)
    core = open_stream(session, clock)
    assert not sent(session.tick(0, clock(0.5)))
    assert session.next_tick(clock()) == pytest.approx(clock() + 0.5)
    [ping] = sent(session.tick(0, clock(0.6)))
    assert P.parse_header(ping)[0] == P.MsgType.PING
    assert not sent(session.tick(0, clock(0.5)))  # one heartbeat at a time
    session.receive(P.header(P.MsgType.PONG, P.parse_header(ping)[1]), 0, clock(0.1))
    assert session.heartbeat is None and session.state is ConnState.CONNECTED
    [ping] = sent(session.tick(0, clock(1.0)))
    [ticket], _ = session.submit([(core, np.zeros(100, np.int16))], clock())
    out = session.tick(0, clock(3.0))  # silence for heartbeat_timeout: the daemon is gone
    assert isinstance(out[0], NewSocket) and isinstance(ticket.error, errors.StreamResetError)
    assert "heartbeat" in session.lost_reason
    # probes repeat until the daemon answers; then the stream is reopened
    assert sent(session.tick(0, clock(0.3)))
    resets = reconnect_cycle(session, clock, out, core)
    assert resets[0].lost_samples == 100 and resets[0].lost_chunks == 1


def test_idle_expiry_reopens_lazily() -> None:
    clock, session = Clock(), Session(now=0.0)
    core = open_stream(session, clock)
    session.receive(P.encode_error(0, core.stream_id, 0, P.ErrorCode.EXPIRED, "closed after 300 s"), 0, clock())
    assert isinstance(session.notices[-1], errors.StreamExpiredError)
    session.receive(results((core.stream_id, P.CLOSE_SEQ, 0, [], [], P.ResultFlag.FINAL)), 0, clock())
    assert core.state is StreamState.REOPEN and not sent(session.tick(0, clock()))  # not until audio comes
    with pytest.raises(RuntimeError, match="reopen"):
        session.submit([(core, np.zeros(10, np.int16))], clock())
    session.want_reopen(core)
    assert session.next_tick(clock()) <= clock()
    [msg] = sent(session.tick(0, clock()))
    out = session.receive(opened(P.parse_header(msg)[1], core.stream_id), 0, clock())
    [reset] = [o.item for o in out if isinstance(o, Emit)]
    assert isinstance(reset, StreamReset) and reset.reason == "expired" and core.ready


def test_reset_and_close() -> None:
    clock, session = Clock(), Session(now=0.0)
    core = open_stream(session, clock)
    [ticket], [msg] = session.submit([(core, np.zeros(600, np.int16))], clock())
    request, payload = session.reset(core, clock())
    assert not core.ready  # submits wait for RESET_DONE
    (_, _, seq, _, _), = audio_items(msg)
    session.receive(results((core.stream_id, seq, 0, [0.3], [], 0)), 0, clock())
    assert ticket.results[0].epoch == 0  # chunks before the reset keep the old epoch
    out = session.receive(P.header(P.MsgType.RESET_DONE, request.id) + P.STREAM_ID.pack(core.stream_id), 0, clock())
    assert request.done and core.ready and core.epoch == 1 and core.base_sample == 600
    assert [o.item.reason for o in out if isinstance(o, Emit)] == ["reset"]  # type: ignore[union-attr]
    request, payload = session.close(core, clock())
    assert request is not None and payload is not None and core.state is StreamState.CLOSING
    with pytest.raises(errors.StreamClosedError):
        session.submit([(core, np.zeros(10, np.int16))], clock())
    session.receive(results((core.stream_id, P.CLOSE_SEQ, 0, [0.1], [], P.ResultFlag.FINAL)), 0, clock())
    assert request.done and [r.frame for r in request.value] == [0] and core.finished
    assert core.stream_id not in session.streams


# ---- utterances ---------------------------------------------------------------------------

def run_keeper(probs: list[float], params: VadParams, chunk: int, refuse: set[int] = frozenset()) -> tuple[
        UtteranceKeeper, list[Utterance], np.ndarray, list[int]]:
    """Feed a keeper as the session does: chunk by chunk, the engine's events for the frames."""
    rng = np.random.default_rng(0)
    audio = rng.integers(-3000, 3000, len(probs) * W, dtype=np.int16)
    keeper = UtteranceKeeper(1, np.dtype("<i2"), 16000, W, params.to_dict())
    engine = SpeechSegmenter(params, 16000)
    utterances: list[Utterance] = []
    lookbacks = []
    accepted = []
    pos = frame = 0
    for k, start in enumerate(range(0, len(audio), chunk)):
        if k in refuse:  # the engine refused this chunk: it never becomes part of the offsets
            continue
        piece = audio[start:start + chunk]
        accepted.append(piece)
        pos += len(piece)
        n = pos // W - frame
        chunk_probs = np.asarray(probs[frame:frame + n], np.float32)
        events = [Event("start" if e.kind == 1 else "end", e.sample, e.frame, 16000)
                  for p in chunk_probs.tolist() for e in engine.push(p)]
        frame += n
        utterances += keeper.on_chunk(piece, chunk_probs, events)
        lookbacks.append(keeper.kept_samples - (keeper.sent - keeper.processed))
    events = [Event("start" if e.kind == 1 else "end", e.sample, e.frame, 16000) for e in engine.finish(pos)]
    utterances += keeper.on_chunk(None, np.zeros(0, np.float32), events, final=True)
    return keeper, utterances, np.concatenate(accepted), lookbacks


def test_utterance_audio_and_the_hovering_pause_case() -> None:
    # A dip below neg_threshold, then probabilities between neg_threshold and threshold for
    # 10 s: the engine keeps the onset pending, and its START finally points 10 s back.
    probs = [0.01] * 40 + [0.9] * 3 + [0.1] + [0.4] * 300 + [0.9] * 30 + [0.01] * 40 + [0.9] * 20 + [0.01] * 30
    params = VadParams()
    keeper, utterances, audio, lookbacks = run_keeper(probs, params, chunk=700)
    assert keeper.mirror_ok
    assert len(utterances) == 2
    first = utterances[0]
    assert first.start.sample == 40 * W - 480  # the onset 10 s before the START went out
    assert first.start.frame > 300
    for u in utterances:
        assert not u.truncated
        np.testing.assert_array_equal(u.audio, audio[u.start.sample:u.end.sample])
    assert max(lookbacks) > 300 * W  # it had to keep the 10 s


def test_utterance_memory_bound_with_max_speech() -> None:
    rng = np.random.default_rng(5)
    probs: list[float] = []
    while len(probs) < 6000:  # ~3 min of speech-like probabilities, hovering pauses included
        probs += [float(rng.uniform(0.6, 1))] * int(rng.integers(1, 200))
        probs += [float(rng.choice([0.05, 0.4]))] * int(rng.integers(1, 40))
    params = VadParams(max_speech_duration_s=2.0)
    keeper, utterances, audio, lookbacks = run_keeper(probs, params, chunk=1000)
    bound = 2.0 * 16000 + W - 480 + 1  # documented in clients/utterances.py
    assert keeper.lookback_bound() == bound
    assert max(lookbacks) <= bound and keeper.max_lookback <= bound
    assert len(utterances) > 20 and not any(u.truncated for u in utterances)
    for u in utterances:
        np.testing.assert_array_equal(u.audio, audio[u.start.sample:u.end.sample])
    # in silence only speech_pad + 1 stays
    quiet, _, _, lookbacks = run_keeper([0.01] * 200, params, chunk=333)
    assert max(lookbacks) <= 480 + 1 and quiet.kept_samples <= 480 + 1 + W


def test_refused_chunks_do_not_shift_utterance_offsets() -> None:
    probs = [0.01] * 30 + [0.95] * 40 + [0.01] * 30
    keeper, utterances, audio, _ = run_keeper(probs, VadParams(), chunk=512 * 3, refuse={4})
    [u] = utterances
    np.testing.assert_array_equal(u.audio, audio[u.start.sample:u.end.sample])


def test_a_disagreeing_engine_falls_back_to_the_nominal_window(caplog: pytest.LogCaptureFixture) -> None:
    keeper = UtteranceKeeper(1, np.dtype("<i2"), 16000, W, VadParams().to_dict())
    with caplog.at_level(logging.WARNING, "ringserve.client"):
        keeper.on_chunk(np.zeros(W, np.int16), np.asarray([0.9], np.float32), [Event("start", 0, 0, 16000)])
    assert not keeper.mirror_ok and "differ from the replayed segmenter" in caplog.text
    keeper.on_chunk(np.zeros(100 * W, np.int16), np.full(100, 0.01, np.float32), [Event("end", 4000, 10, 16000)])
    assert keeper.kept_samples <= W + 250 * 16 + 480 + 2  # processed - W - min_speech - pad


def test_keep_audio_through_the_session() -> None:
    clock, session = Clock(), Session(now=0.0)
    core = open_stream(session, clock, keep_audio=True)
    assert core.keeper is not None and core.utterance_feed is not None
    params = VadParams()
    seg = SpeechSegmenter(params, 16000)
    probs = [0.01] * 10 + [0.95] * 30 + [0.01] * 20
    audio = (np.arange(len(probs) * W) % 1000).astype(np.int16)
    frame = 0
    for start in range(0, len(audio), 4 * W):
        [ticket], [msg] = session.submit([(core, audio[start:start + 4 * W])], clock())
        (_, _, seq, _, _), = audio_items(msg)
        chunk = probs[frame:frame + 4]
        events = [(int(e.kind), e.frame, e.sample) for p in chunk for e in seg.push(p)]
        session.receive(results((core.stream_id, seq, frame, chunk, events, 0)), 0, clock())
        frame += 4
    [u] = list(core.utterance_feed)
    assert (u.start.sample, u.end.sample) == (10 * W - 480, 40 * W + 480)
    np.testing.assert_array_equal(u.audio, audio[u.start.sample:u.end.sample])
    assert math.isnan(Ticket(core, 0, 0.0).latency)
    assert Result(0, float("nan")).shed
