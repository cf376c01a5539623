"""SIGTERM as Ctrl-C for the bench's command lines."""

from __future__ import annotations

import signal
from types import FrameType


def unwind_on_sigterm() -> None:
    """From now on SIGTERM raises KeyboardInterrupt in the main thread, which unwinds through
    every ``finally``: every daemon and process the bench started is stopped."""

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
