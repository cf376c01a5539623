"""The load-generator processes as the bench's parent sees them: started on demand and reused
across points (:class:`LoadFleet`), a point's streams split among them (:func:`point_plans`),
and their reports collected while a point runs (:class:`PointRun`). The processes themselves
are bench/loadgen.py."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from bench.daemon import BenchError
from bench.load_plan import LoadPlan
from bench.loadgen import load_main
from bench.procinfo import raise_nofile_limit
from bench.results import PointSettings

_CTX = multiprocessing.get_context("spawn")
# A load process costs ~20 us of CPU a device frame, most of it the kernel's TCP work: 768
# streams are half a core. Fewer processes each take more replies per wake-up (at 352 streams one
# cost 20 us a frame against 24-27 for two), and at 640 one still kept the schedule (2026-12-07).
_DEVICE_STREAMS_PER_PROC = 768


@dataclass
class LoadProc:
    proc: multiprocessing.process.BaseProcess
    conn: Connection
    pid: int


class LoadFleet:
    """Load-generator processes, started on demand (up to ``max_procs``) and reused across
    points; every one is stopped by ``close()`` / the end of the ``with`` block."""

    def __init__(self, audio_dir: Path | None = None, max_procs: int | None = None, nice: int = 0) -> None:
        if audio_dir is None:
            from bench.corpus import ensure_corpus

            audio_dir = ensure_corpus()
        self.audio_dir = Path(audio_dir)
        self.max_procs = max_procs or max(2, os.cpu_count() or 1)
        self.procs: list[LoadProc] = []
        self.nice = nice  # added to each load process's niceness (negative: higher priority, needs privileges)
        raise_nofile_limit()

    def __enter__(self) -> LoadFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure(self, count: int) -> list[LoadProc]:
        if count > self.max_procs:
            self.max_procs = count
        while len(self.procs) < count:
            parent, child = _CTX.Pipe(duplex=True)
            proc = _CTX.Process(target=load_main, args=(len(self.procs), str(self.audio_dir), child, self.nice),
                                name=f"bench-load-{len(self.procs)}", daemon=True)
            proc.start()
            child.close()
            if not parent.poll(60):
                proc.kill()
                raise BenchError("a load process did not start within 60 s")
            kind, info = parent.recv()
            if kind != "idle":
                proc.join(5)
                raise BenchError(f"load process failed to start: {info}")
            assert proc.pid is not None
            self.procs.append(LoadProc(proc, parent, proc.pid))
        return self.procs[:count]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def close(self) -> None:
        procs, self.procs = self.procs, []
        for p in procs:
            with contextlib.suppress(OSError, ValueError):
                p.conn.send(("quit",))
        for p in procs:
            p.proc.join(10)
            if p.proc.exitcode is None:
                p.proc.kill()
                p.proc.join()
            p.conn.close()


def auto_load_procs(streams: int, shape: str, streams_per_connection: int = 1024, cpus: int | None = None) -> int:
    """Device shape: one load process per ~768 connections, at most one per CPU. Gateway
    shape: one gateway, i.e. one connection and one load process, per ``streams_per_connection``
    streams (the engine's limit): splitting a gateway's streams over more connections than it
    needs costs the engine and the bench a message per connection per tick (measured: 1,152
    streams held on two connections, 1,280 on one)."""
    if shape == "gateway":
        return max(1, -(-streams // max(1, streams_per_connection)))
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(-(-streams // _DEVICE_STREAMS_PER_PROC), cpus, streams))


def point_plans(endpoint: str, streams: int, procs: int, *, target: str, shape: str, pace: str,
                s: PointSettings, curve: tuple[str, str] | None, unopened: int,
                open_params: dict[str, Any]) -> list[LoadPlan]:
    """One plan per load process: the streams split as evenly as they go, the unopened ones
    (fault injection) all with the first process."""
    plans, first = [], 0
    for i in range(procs):
        count = streams // procs + (1 if i < streams % procs else 0)
        plans.append(LoadPlan(target=target, endpoint=endpoint, shape=shape, pace=pace, first_stream=first,
                              streams=count, chunk_frames=s.chunk_frames, window=s.window, tick_ms=s.tick_ms,
                              timeout_ms=s.timeout_ms, window_s=s.window_s, seed=s.seed, curve=curve, link=s.link,
                              unopened_streams=unopened if i == 0 else 0, open_params=open_params))
        first += count + (unopened if i == 0 else 0)
    return plans


class PointRun:
    """A point's reports from its load processes: ``windows`` by index; ``done`` by process,
    with their other messages (e.g. ``ready``) under ``-1 - index``."""

    def __init__(self, procs: list[LoadProc]) -> None:
        self.procs = procs
        self.windows: dict[int, list[dict[str, Any]]] = {}
        self.done: dict[int, dict[str, Any]] = {}

    def recv_until(self, predicate: Callable[[], bool], timeout: float, what: str,
                   check: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"load processes did not report {what} within {timeout:.0f} s")
            ready = wait([p.conn for p in self.procs], min(left, 0.5))
            if check is not None:
                check()
            for conn in ready:
                index = next(i for i, p in enumerate(self.procs) if p.conn is conn)
                try:
                    msg: tuple[Any, ...] = self.procs[index].conn.recv()
                except EOFError:
                    raise BenchError(f"load process {index} died") from None
                if msg[0] == "window":
                    self.windows.setdefault(msg[1], []).append(msg[2])
                elif msg[0] == "done":
                    self.done[index] = msg[1]
                elif msg[0] == "failed":
                    raise BenchError(f"load process {index} failed: {msg[1]}")
                else:
                    self.done.setdefault(-1 - index, {})[msg[0]] = msg[1]

