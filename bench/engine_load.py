"""The engine bench's load generator: one process whose single DEALER carries many streams;
every stream sends one 512-sample int16 frame per message, as a device would, and keeps a
small window of frames in flight (a new frame goes out as soon as a result comes back). Its
running counts are in memory shared with the parent, which measures while it runs."""

from __future__ import annotations

import signal
import struct
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import zmq

from bench.daemon import BenchError
from engine.models.silero import FRAME_SAMPLES
from transport import protocol as P

RATE = 16000
FRAME = FRAME_SAMPLES[RATE]
ANSWERED, SENT, STOP = range(3)  # words of the load generator's shared counters
_PROB = struct.Struct("<f")
Counters = Any  # a lock-free shared int64 array (multiprocessing RawArray "q")


def loadgen_main(endpoint: str, streams: int, window: int, shared: Counters, conn: Connection) -> None:
    """Entry point of the load process: sends ("ready", None) once its streams are open, runs
    until ``shared[STOP]``, then sends ("done", its counts) (or {"failure": ...})."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
        sock.setsockopt(option, value)
    sock.connect(endpoint)
    try:
        report = _generate(sock, streams, window, shared, conn)
    except Exception as exc:  # report, do not hang the parent
        report = {"failure": f"{type(exc).__name__}: {exc}"}
    finally:
        sock.close(0)
        context.term()
    conn.send(("done", report))


def _generate(sock: zmq.Socket, streams: int, window: int, shared: Counters,
              conn: Connection) -> dict[str, Any]:
    """Open ``streams`` streams, keep ``window`` one-frame messages in flight on each until
    told to stop, then wait for every outstanding result and close the streams."""
    for sid in range(1, streams + 1):
        sock.send(P.encode_open(sid, sid, {"sample_rate": RATE, "dtype": "int16"}))
    opened, deadline = 0, time.monotonic() + 30
    while opened < streams:
        if time.monotonic() > deadline or not sock.poll(1000):
            raise BenchError(f"only {opened} of {streams} streams opened")
        msg = sock.recv()
        if msg[3] == P.MsgType.ERROR:
            raise BenchError(f"open failed: {P.decode_error(msg).text}")
        opened += msg[3] == P.MsgType.OPENED
    conn.send(("ready", None))

    rng = np.random.default_rng(1)
    pcm = [(300 * rng.standard_normal(FRAME)).astype("<i2").tobytes() for _ in range(8)]
    next_seq = [1] * (streams + 1)  # chunk_seq of the next frame per stream
    expected = [1] * (streams + 1)  # chunk_seq of the next result per stream
    sent = answered = shed = in_flight = out_of_order = unexpected = closed = 0
    errors: Counter[str] = Counter()
    audio, item_struct, int16 = P.MsgType.AUDIO, P.AUDIO_ITEM, P.DType.INT16
    result_struct, result_size, event_size, prob_struct = P.RESULT_ITEM, P.RESULT_ITEM.size, P.EVENT_ITEM.size, _PROB

    def send(sid: int) -> None:
        nonlocal sent, in_flight
        seq = next_seq[sid]
        next_seq[sid] = seq + 1
        sock.send(P.header(audio, seq) + item_struct.pack(sid, seq, int16, 2 * FRAME) + pcm[seq & 7])
        sent += 1
        in_flight += 1

    for sid in range(1, streams + 1):
        for _ in range(window):
            send(sid)
    stopping, drain_deadline = False, 0.0
    while True:
        if not stopping and shared[STOP]:
            stopping, drain_deadline = True, time.monotonic() + 30
        if stopping and (in_flight == 0 or time.monotonic() > drain_deadline):
            break
        if not sock.poll(100):
            continue
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            kind = msg[3]
            if kind == P.MsgType.RESULTS:
                offset, end = P.HEADER.size, len(msg)
                while offset < end:
                    sid, chunk_seq, _, n_frames, n_events, _ = result_struct.unpack_from(msg, offset)
                    for i in range(n_frames):  # NaN: the engine shed the frame instead of running it
                        prob = prob_struct.unpack_from(msg, offset + result_size + 4 * i)[0]
                        shed += prob != prob
                    offset += result_size + 4 * n_frames + event_size * n_events
                    if chunk_seq != expected[sid]:
                        out_of_order += 1
                    expected[sid] = chunk_seq + 1
                    answered += n_frames
                    in_flight -= 1
                    if not stopping:
                        send(sid)
            elif kind == P.MsgType.ERROR:
                error = P.decode_error(msg)
                errors[error.code.name] += 1
                if error.stream_id:
                    expected[error.stream_id] = error.chunk_seq + 1
                    in_flight -= 1
                    if not stopping:
                        send(error.stream_id)
            else:
                unexpected += 1
        shared[ANSWERED], shared[SENT] = answered - shed, sent

    for sid in range(1, streams + 1):
        sock.send(P.encode_stream_op(P.MsgType.CLOSE, sid, sid))
    deadline = time.monotonic() + 10
    while closed < streams and time.monotonic() < deadline:
        if not sock.poll(200):
            continue
        msg = sock.recv()
        if msg[3] == P.MsgType.RESULTS:
            closed += sum(r.final for r in P.decode_results(msg))
        elif msg[3] == P.MsgType.ERROR:
            errors["close_" + P.decode_error(msg).code.name] += 1
    return {"sent": sent, "answered": answered, "shed": shed, "lost": in_flight, "out_of_order": out_of_order,
            "errors": dict(errors), "unexpected_messages": unexpected, "streams_closed": closed}
