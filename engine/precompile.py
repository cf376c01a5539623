"""Compile every numba loop into its cache ahead of time, for images whose code is read-only
at run time: ``python -m engine.precompile`` (docs/operations.md, Containers). The daemon and
its workers do the same at start, from the cache when it is there."""

from __future__ import annotations

from engine import frame_queue, frame_sets
from engine.models.silero import CONTEXT_SAMPLES, FRAME_SAMPLES, SileroVad


def main() -> None:
    frame_sets.warm_up()
    frame_queue.warm_up({rate: 1_000_000_000 * n // rate for rate, n in FRAME_SAMPLES.items()},
                        {rate: n + CONTEXT_SAMPLES[rate] for rate, n in FRAME_SAMPLES.items()},
                        SileroVad.state_floats)


if __name__ == "__main__":
    main()
