"""What `ringserve tune` writes besides the tuned file: every measurement as JSON, the plot."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

from bench.tune.model import Measurement, diagnose
from bench.tune.search import TuneResult

EXPLORED_COLOR, FINAL_COLOR, RECOMMENDED_COLOR = "#285ac8", "#28963c", "#d22828"


def result_json(result: TuneResult, meta: dict[str, Any]) -> dict[str, Any]:
    def one(m: Measurement) -> dict[str, Any]:
        data = dataclasses.asdict(m)
        data["knobs"] = dataclasses.asdict(m.knobs)
        data["label"] = m.knobs.label()
        if m.diag is not None:
            data["limit"] = diagnose(m, result.cores)[0]
        return data

    return {
        "meta": meta,
        "plan": dataclasses.asdict(result.plan),
        "recommended": dataclasses.asdict(result.recommended),
        "note": result.note,
        "stopped_by": result.stopped_by,
        "default": dataclasses.asdict(result.default),
        "worst": dataclasses.asdict(result.worst),
        "measurements": [one(m) for m in result.measurements],
        "final": [{"knobs": dataclasses.asdict(k), "label": k.label(), "capacity_mean": result.final_score(k)[0],
                   "saturation_fps_mean": result.final_score(k)[1],
                   "capacity_per_round": [m.capacity_streams for m in result.final[k]]}
                  for k in result.finalists()],
        "final_order": [k.label() for k in result.final_order],
    }


def plot_capacity(result: TuneResult, path: str, *, budget_ms: float) -> None:
    """Capacity against worker count: every exploration measurement (the workers sweep joined
    by a line), the same-run final re-measures as rings, the recommendation in red."""
    from bench.report import require_matplotlib

    require_matplotlib("tune")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    points = [m for m in result.measurements if m.error is None]
    max_w = max([result.cores + 1, *(m.knobs.workers for m in points)])
    max_cap = max([1, *(m.capacity_streams for m in points)])
    fig, ax = plt.subplots(figsize=(7.6, 5.0), layout="constrained")
    # Only the sweep shares every other knob, so only there is a line between worker counts meaningful.
    default_rest = replace(result.default, workers=0)
    sweep = sorted((m for m in points if m.phase == "workers" and replace(m.knobs, workers=0) == default_rest),
                   key=lambda m: m.knobs.workers)
    ax.plot([m.knobs.workers for m in sweep], [m.capacity_streams for m in sweep], "-", color=EXPLORED_COLOR, lw=2)
    for m in points:
        color = (RECOMMENDED_COLOR if m.knobs == result.recommended
                 else FINAL_COLOR if m.phase == "final" else EXPLORED_COLOR)
        if m.phase == "final":  # beside its exploration marker, not on top of it
            ax.plot([m.knobs.workers + 0.12], [m.capacity_streams], "o", ms=9, mfc="none", mec=color, mew=1.5,
                    zorder=4)
        else:
            ax.plot([m.knobs.workers], [m.capacity_streams], "s", ms=7, color=color,
                    zorder=5 if color == RECOMMENDED_COLOR else 3)
    ax.legend(handles=[Line2D([], [], color=EXPLORED_COLOR, marker="s", lw=2,
                              label="explored (line: the workers sweep, other settings default)"),
                       Line2D([], [], color=FINAL_COLOR, marker="o", mfc="none", ls="none", label="final re-measure"),
                       Line2D([], [], color=RECOMMENDED_COLOR, marker="s", ls="none", label="recommended")],
              loc="best", fontsize=8)
    ax.set_xlim(0.5, max_w + 0.5)
    ax.set_xticks(range(1, max_w + 1))
    ax.set_ylim(0, 1.1 * max_cap)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_xlabel("workers")
    ax.set_ylabel("capacity (streams)")
    ax.set_title(f"ringserve tune: capacity at p99 <= {budget_ms:g} ms, {result.cores} cores")
    fig.savefig(path, dpi=100)
    plt.close(fig)
