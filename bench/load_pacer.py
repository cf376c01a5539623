"""One point in a load process: its streams paced on the absolute schedule (``realtime``) or in
a closed loop (``max``), a report to the parent every window, then the drain and the close
(the schedule is described in bench/loadgen.py)."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import zmq

from bench.load_audio import AudioFile, StreamAudio
from bench.load_device import ZmtpDeviceLink
from bench.load_gateway import GatewayLedger, GatewayLink
from bench.load_ledger import Ledger
from bench.load_plan import FRAME_MS, LoadPlan
from bench.load_tcp import PerFrameLink
from bench.load_zmq import ZmqLink
from bench.load_zmtp import ZmtpGatewayLink, ZmtpLink

_HOUSEKEEPING_NS = 20_000_000


class Stop(Exception):
    """The parent said ``stop``: the sending phase ends."""


class Quit(Exception):
    """The parent said ``quit`` (or is gone): the process ends."""


class LoadRun:
    """One point: the streams' schedule, the pacing loop, the drain and the close; the
    connections are a :class:`ZmqLink` (ringserve) or a :class:`PerFrameLink`, the frame
    accounting a :class:`Ledger`."""

    def __init__(self, plan: LoadPlan, files: list[AudioFile], ctx: zmq.Context, conn: Connection) -> None:
        if plan.shape not in ("device", "gateway"):
            raise ValueError(f"shape must be device or gateway, not {plan.shape!r}")
        if plan.pace not in ("realtime", "max"):
            raise ValueError(f"pace must be realtime or max, not {plan.pace!r}")
        if plan.target == "per-frame" and (plan.shape != "device" or plan.unopened_streams):
            raise ValueError("the per-frame baseline speaks the device shape only")
        self.plan = plan
        self.conn = conn
        self.n = plan.streams + plan.unopened_streams
        rng = np.random.default_rng([plan.seed, plan.first_stream])
        sid = [plan.first_stream + s + 1 for s in range(self.n)]
        audio = StreamAudio(files, plan.first_stream, self.n, plan.chunk_frames, rng)
        self.period_ns = int(plan.chunk_frames * FRAME_MS * 1e6)
        self.phase = [int(p) for p in rng.integers(0, self.period_ns, self.n)]
        self.next_seq = [1] * self.n
        self.stopping = False
        self.ledger = Ledger(plan.chunk_frames, plan.timeout_ms, self._released)
        self.link: ZmqLink | PerFrameLink
        zmtp = plan.curve is None and plan.link == "zmtp"
        compiled = plan.pace == "realtime" and plan.target != "per-frame" and (plan.shape == "gateway" or zmtp)
        if compiled:
            self.ledger = GatewayLedger(plan.chunk_frames, plan.timeout_ms, self.n, plan.first_stream + 1,
                                        self.period_ns)
            fast = GatewayLink if not zmtp else ZmtpGatewayLink if plan.shape == "gateway" else ZmtpDeviceLink
            self.link = fast(plan, ctx, sid, plan.streams, audio, self.ledger, self._released)
        elif plan.target == "per-frame":
            self.link = PerFrameLink(plan, sid, audio, self.ledger, self._released)
        elif plan.shape == "device" and zmtp:
            self.link = ZmtpLink(plan, ctx, sid, plan.streams, audio, self.ledger, self._released)
        else:
            self.link = ZmqLink(plan, ctx, sid, plan.streams, audio, self.ledger, self._released)

    def open(self) -> dict[str, Any]:
        """Open the streams: {"opened", "failures", "wanted"}."""
        return self.link.open()

    def _released(self, sid: int) -> None:
        """Max pace: a chunk of stream ``sid`` came back (or failed): send its next one."""
        if self.plan.pace == "max" and not self.stopping:
            s = sid - 1 - self.plan.first_stream
            seq = self.next_seq[s]
            self.next_seq[s] = seq + 1
            self.link.send(s, seq, 0)

    def _control(self) -> None:
        """Between windows: a ``stop`` from the parent ends the sending phase."""
        try:
            while self.conn.poll(0):
                cmd = self.conn.recv()
                if cmd[0] == "stop":
                    raise Stop
                if cmd[0] == "quit":
                    raise Quit
        except (EOFError, OSError):
            raise Quit from None

    def _report(self, index: int) -> None:
        self.conn.send(("window", index, self.ledger.take_window()))

    def run(self, t0: int) -> None:
        """Send until the parent says ``stop``, then wait for what is in flight (up to the time-out)."""
        plan = self.plan
        link, ledger = self.link, self.ledger
        window_ns = int(plan.window_s * 1e9)
        next_report = t0 + window_ns
        report_index = 0
        next_house = t0
        tick_ns = int(plan.tick_ms * 1e6) if plan.shape == "gateway" else 0
        gateway = plan.shape == "gateway"
        order = sorted(range(self.n), key=self.phase.__getitem__)
        base = [t0 + self.phase[s] for s in order]
        idx = cycle = 0
        n = len(order)
        period = self.period_ns
        next_due = base[0]
        send = link.send
        if plan.pace == "max":
            for s in range(self.n):
                for _ in range(plan.window):
                    seq = self.next_seq[s]
                    self.next_seq[s] = seq + 1
                    send(s, seq, 0)
            link.flush()
            next_due = 1 << 62

        fast = link if isinstance(link, GatewayLink) else None
        if fast is not None:
            fast.schedule(order, base, period)

        def send_due(limit: int) -> None:
            """Every chunk due at or before ``limit`` (on the absolute schedule) goes now."""
            nonlocal idx, cycle, next_due
            if next_due > limit:
                return
            if fast is not None:
                next_due = fast.send_due(limit)
                return
            while next_due <= limit:
                send(order[idx], cycle + 1, next_due)
                idx += 1
                if idx == n:
                    idx = 0
                    cycle += 1
                next_due = base[idx] + cycle * period
            if gateway:
                link.flush()

        try:
            while True:
                now = time.monotonic_ns()
                if now >= next_report:
                    # A window holds the chunks due in it, even when a stall made them leave
                    # after its end: their lateness records the stall.
                    send_due(next_report - 1)
                    self._report(report_index)
                    report_index += 1
                    next_report += window_ns
                if now >= next_house:
                    next_house = now + _HOUSEKEEPING_NS
                    ledger.expire(now)
                    self._control()
                if now >= next_due:
                    # A gateway sends on its ticks only, not whenever a reply wakes it: one
                    # message per tick, however many replies come between.
                    send_due(now - (now - t0) % tick_ns if tick_ns else now)
                elif gateway and plan.pace == "max":
                    link.flush()
                wake = min(next_report, next_house)
                if next_due < wake:
                    wake = next_due if not tick_ns else t0 + -(-(next_due - t0) // tick_ns) * tick_ns
                link.poll((wake - time.monotonic_ns()) / 1e9)
        except Stop:
            pass
        self.stopping = True
        link.flush()
        # Drain: wait for every chunk in flight, up to the time-out.
        while ledger.in_flight():
            now = time.monotonic_ns()
            ledger.expire(now)
            if not ledger.in_flight():
                break
            deadline = ledger.next_deadline()
            link.poll(0.02 if deadline is None else min(0.02, (deadline - now) / 1e9))
        self._report(report_index)

    def close(self, timeout: float = 10.0) -> dict[str, Any]:
        """Close the streams (ringserve: CLOSE, then their final results) and the connections."""
        self.stopping = True
        closed, closed_wanted = self.link.close_streams(timeout)
        late = self.ledger.take_window()
        result = {"closed": closed, "close_wanted": closed_wanted,
                  "after_close": {"late": late["late"], "unexpected": late["unexpected"],
                                  "other_errors": late["other_errors"]}}
        self.shutdown()
        return result

    def shutdown(self) -> None:
        self.link.shutdown()
