"""The soak's picture: RSS of every engine process over time (top), and the latency and the
engine's CPU of each window (bottom), so growth and drift show at a glance."""

from __future__ import annotations

from typing import Any

from bench.report import BUDGET_COLOR, require_matplotlib


def write_soak_plot(report: dict[str, Any], path: str) -> None:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    soak = report["soak"]
    budget = float(report.get("budget_ms", 32.0))
    fig, (ax_rss, ax_lat) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    samples = soak.get("samples", [])
    for name, info in soak.get("processes", {}).items():
        ts = [s["t"] / 60 for s in samples if name in s]
        rss = [s[name] for s in samples if name in s]
        ax_rss.plot(ts, rss, lw=1.5, label=f"{name} (pid {info['pid']}): {info['start_mib']:.0f} -> "
                    f"{info['end_mib']:.0f} MiB, slope {info['slope_mib_per_h']:+.2f} MiB/h")
    ax_rss.set_ylabel("RSS, MiB")
    ax_rss.set_ylim(bottom=0)
    point = soak.get("point", {})
    ax_rss.set_title(f"Soak: {soak['streams']} {point.get('shape', '')} streams for {soak['duration_s'] / 60:.0f} min "
                     f"({100 * soak.get('load_share', 0):.0f} % of {soak.get('capacity')}); "
                     f"growth {'FLAGGED' if soak.get('flagged') else 'not flagged'}", fontsize=11)
    ax_rss.grid(True, alpha=0.3)
    ax_rss.legend(fontsize=8, loc="lower right")
    windows = [w for w in point.get("windows", []) if not w.get("warmup") and w.get("p99_ms") is not None]
    if windows:
        span = soak["duration_s"] / 60 / max(1, len(windows))
        ts = [(i + 1) * span for i in range(len(windows))]
        ax_lat.plot(ts, [w["p99_ms"] for w in windows], "-", color="#1f77b4", lw=1.2, label="p99 per window")
        ax_lat.plot(ts, [w["p50_ms"] for w in windows], "--", color="#1f77b4", lw=1, label="p50 per window")
    ax_lat.axhline(budget, color=BUDGET_COLOR, lw=1.5, label=f"{budget:g} ms budget")
    ax_lat.set_ylabel("latency, ms")
    ax_lat.set_ylim(bottom=0)
    ax_lat.set_xlabel("minutes")
    ax_lat.grid(True, alpha=0.3)
    ax_lat.legend(fontsize=8, loc="upper left")
    machine = report.get("machine", {})
    fig.text(0.01, 0.005, f"{machine.get('cpus')} CPUs ({machine.get('cpu_model', '')}), onnxruntime "
             f"{machine.get('onnxruntime')}, source {machine.get('source')}; lost {point.get('lost', 0)} of "
             f"{point.get('sent', 0)} frames", fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
