"""Frame accounting of one load process: every chunk in flight from its send to its reply,
error or time-out, counted into the current reporting window (in frames, not messages).

Once a point has drained, ``sent = answered + refused + timed_out``; ``answered`` includes
``shed`` frames; a reply after the time-out is counted ``late`` and not answered (see
bench/loadgen.py for the definitions)."""

from __future__ import annotations

from array import array
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

MAX_TIMED_OUT_KEYS = 1_000_000


class WindowCounters:
    """Counters of one reporting window (frames unless named otherwise)."""

    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.shed = 0
        self.refused: Counter[str] = Counter()
        self.timed_out = 0
        self.late = 0
        self.unexpected = 0  # replies matching nothing this process sent
        self.other_errors: Counter[str] = Counter()  # ERRORs not about a pending chunk
        self.lat = array("f")  # ms, one per answered chunk
        self.lateness = array("f")  # ms behind the absolute schedule, one per sent chunk (realtime)

    def export(self, in_flight: int) -> dict[str, Any]:
        return {"sent": self.sent, "answered": self.answered, "shed": self.shed, "refused": dict(self.refused),
                "timed_out": self.timed_out, "late": self.late, "unexpected": self.unexpected,
                "other_errors": dict(self.other_errors), "in_flight": in_flight,
                "lat": self.lat.tobytes(), "lateness": self.lateness.tobytes()}


class Ledger:
    """Chunks in flight by key (stream id << 32 | chunk_seq) and the current window's counters.
    ``released(sid)`` is called for a chunk given up on here (it timed out); a caller that
    settles a chunk (``answer`` or ``refuse`` returned True) calls it itself."""

    def __init__(self, chunk_frames: int, timeout_ms: float, released: Callable[[int], None]) -> None:
        self.chunk_frames = chunk_frames
        self.timeout_ns = int(timeout_ms * 1e6)
        self.released = released
        self.pending: dict[int, int] = {}  # (sid << 32 | chunk_seq) -> send time (ns)
        self.deadlines: deque[tuple[int, int]] = deque()  # (deadline ns, key), in send order
        self.timed_out_keys: set[int] = set()
        self.window = WindowCounters()

    def sent(self, key: int, now: int, due: int) -> None:
        """A chunk left at ``now``; ``due``: its time on the absolute schedule (0 in max pace)."""
        self.pending[key] = now
        self.deadlines.append((now + self.timeout_ns, key))
        window = self.window
        window.sent += self.chunk_frames
        if due:
            window.lateness.append((now - due) * 1e-6)

    def answer(self, key: int, frames: int, now: int) -> bool:
        """A reply for ``frames`` frames arrived at ``now``: True if it answers a chunk in flight."""
        sent = self.pending.pop(key, None)
        if sent is None:
            if key in self.timed_out_keys:
                self.timed_out_keys.discard(key)
                self.window.late += frames
            else:
                self.window.unexpected += 1
            return False
        if now - sent > self.timeout_ns:  # came after its time-out, before the next scan noticed
            self.window.timed_out += frames
            self.window.late += frames
            self.released(key >> 32)
            return False
        self.window.answered += frames
        self.window.lat.append((now - sent) * 1e-6)
        return True

    def refuse(self, key: int, name: str) -> bool:
        """An ERROR reply ``name``: for a chunk in flight (its frames refused) or about nothing pending."""
        if self.pending.pop(key, None) is not None:
            self.window.refused[name] += self.chunk_frames
            return True
        self.window.other_errors[name] += 1
        return False

    def expire(self, now: int) -> None:
        """Every chunk whose time-out has passed is timed out (and released)."""
        deadlines, pending = self.deadlines, self.pending
        while deadlines and deadlines[0][0] <= now:
            _, key = deadlines.popleft()
            if pending.pop(key, None) is not None:
                self.window.timed_out += self.chunk_frames
                if len(self.timed_out_keys) < MAX_TIMED_OUT_KEYS:
                    self.timed_out_keys.add(key)
                self.released(key >> 32)

    def in_flight(self) -> int:
        """Chunks sent and not yet answered, refused or timed out."""
        return len(self.pending)

    def next_deadline(self) -> int | None:
        """When the oldest chunk in flight times out (monotonic ns), if any is."""
        return self.deadlines[0][0] if self.deadlines else None

    def take_window(self) -> dict[str, Any]:
        """The current window's report; counting goes on in a fresh window."""
        window, self.window = self.window, WindowCounters()
        return window.export(self.in_flight())
