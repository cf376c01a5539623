"""Compile every numba loop into its cache ahead of time, for images whose code is read-only
at run time: ``python -m engine.precompile`` (docs/operations.md, Containers). The daemon and
its workers do the same at start, from the cache when it is there."""

from __future__ import annotations

from engine import frame_queue, frame_sets, router_batch
from engine.models.base import ModelSpec
from engine.models.silero import default_model_path, load_model


def main() -> None:
    frame_sets.warm_up()
    router_batch.warm_up()
    frame_queue.warm_up(load_model(ModelSpec(default_model_path())))


if __name__ == "__main__":
    main()
