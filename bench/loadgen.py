"""Load-generator processes: replay many microphones, paced, and account for every frame.

A load process (``load_main``) lives for a whole bench run and replays one *point* at a time
when its parent (bench/fleet.py, for bench/point.py) sends it a :class:`LoadPlan`. Per point it

1. opens its streams: ``device`` shape = one connection per stream, ``gateway`` shape = one
   connection carrying all of this process's streams, each a plain socket speaking ZMTP
   (bench/load_zmtp.py) or, with ``link="libzmq"`` or CURVE, a DEALER socket; the per-frame
   baseline server gets one TCP connection per stream (device shape only);
2. on ``go`` replays audio from WAV files (stream g loops file g mod n, from its own random
   frame-aligned offset), ``chunk_frames`` 512-sample frames per message:

   * ``realtime``: stream i sends chunk k at ``t0 + phase_i + k * chunk_period`` (absolute
     schedule, random phase in [0, period), so nothing drifts and nothing bunches). The
     gateway shape sends on ``tick_ms`` ticks one AUDIO message carrying every stream whose
     chunk is due. The send-time error against the schedule is recorded per chunk.
   * ``max``: closed loop, ``window`` chunks in flight per stream; a reply (or error, or
     time-out) releases the next chunk of that stream at once.

3. matches each reply to its chunk by (stream id, chunk_seq); latency = arrival of the
   result - the moment the chunk's message (and so its last sample) left this process;
4. every ``window_s`` (on the absolute grid ``t0 + j * window_s``) sends the window's
   counters and raw latencies to the parent; on ``stop`` stops sending, waits up to the
   time-out for what is in flight, reports the remainder, closes its streams.

Frame accounting (frames, not messages): ``sent = answered + refused + timed_out`` once a
point has drained. ``answered`` includes ``shed`` frames (the engine's overload policy
answered them with NaN, without inference). ``refused``: an ERROR reply for the chunk, by
error code. ``timed_out``: no reply within ``timeout_ms``; a reply arriving later is counted
``late`` and not answered. ``lost = shed + refused + timed_out`` (an unanswered or unusable
frame), and ``unexplained = sent - answered_ok - lost`` must be 0.

Fault injection for tests: ``unopened_streams`` extra streams are scheduled like the others
but never OPENed, so the engine refuses each of their frames (UNKNOWN_STREAM).

The parts: bench/load_plan.py (the plan), bench/load_audio.py (the audio), bench/load_pacer.py
(a point's schedule and loop), bench/load_zmq.py and bench/load_tcp.py (the connections to
ringserve and to the per-frame server), bench/load_ledger.py (the frame accounting).
"""

from __future__ import annotations

import errno
import gc
import os
import signal
from multiprocessing.connection import Connection
from pathlib import Path

import zmq

from bench.load_audio import AudioFile, load_audio
from bench.load_pacer import LoadRun, Quit
from bench.load_plan import FRAME_MS, LoadPlan

__all__ = ["FRAME_MS", "AudioFile", "LoadPlan", "load_audio", "load_main"]


def load_main(index: int, audio_dir: str, conn: Connection, nice: int = 0) -> None:
    """Entry point of a load process: load the audio once, then run points until ``quit``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    if nice:
        try:
            os.nice(nice)
        except OSError as exc:
            conn.send(("failed", f"nice {nice}: {exc} (a negative niceness needs privileges)"))
            return
    from bench.procinfo import raise_nofile_limit

    raise_nofile_limit()
    try:
        files = load_audio(Path(audio_dir))
    except Exception as exc:  # report, do not hang the parent
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    ctx = zmq.Context(io_threads=1)
    ctx.setsockopt(zmq.MAX_SOCKETS, 65536)
    conn.send(("idle", {"pid": os.getpid(), "files": [f.name for f in files]}))
    try:
        while True:
            try:
                cmd = conn.recv()
            except (EOFError, OSError):
                return
            if cmd[0] == "quit":
                return
            if cmd[0] != "point":
                continue
            run = None
            try:
                run = LoadRun(cmd[1], files, ctx, conn)
                opened = run.open()
                # A full collection during the point (~13 ms: numba's objects) would stall every
                # stream's sends and receives and read as the engine's latency.
                gc.collect()
                gc.freeze()
                conn.send(("ready", opened))
                cmd = conn.recv()
                if cmd[0] == "go":
                    run.run(int(cmd[1]))
                    conn.send(("done", run.close()))
                else:
                    run.shutdown()
                    conn.send(("done", {"aborted": True}))
                    if cmd[0] == "quit":
                        return
            except Quit:
                if run is not None:
                    run.shutdown()
                return
            except Exception as exc:  # report, do not hang the parent
                if run is not None:
                    run.shutdown()
                import traceback

                try:
                    conn.send(("failed", "".join(traceback.format_exception_only(type(exc), exc)).strip()))
                except OSError as send_exc:
                    if send_exc.errno != errno.EPIPE:
                        raise
                    return
            finally:
                gc.unfreeze()  # the point's objects may be collected once it is over
    finally:
        ctx.term()
