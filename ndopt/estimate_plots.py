"""Plots of target estimates in a plan or run report: latency per video and peak memory, per target,
split by component, and (for a sequential memory plan) what each phase keeps resident.

The estimates are the dicts a target's `estimate(pipeline)` (or `lower(...)["estimate"]`) returns
(ndopt.target), so the core draws them without importing any target; `ndopt/report.py` calls
`plot_estimates(run_dir, estimates)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ndopt.io import atomic_path

COLORS = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb")


def plot_estimates(run_dir: Path, estimates: dict[str, dict[str, Any]], name: str = "estimates") -> dict[str, Path]:
    """Write `<run_dir>/<name>.png` (atomically) from `{target: estimate}` as a target's `estimate`
    (or `lower(...)["estimate"]`) returns them; returns `{name: path}`, or {} when there is nothing to plot."""
    rows = {t: e for t, e in (estimates or {}).items() if isinstance(e, dict) and e.get("components")}
    if not rows:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(rows)
    comps: list[str] = []
    for e in rows.values():
        comps += [c for c in e["components"] if c not in comps]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 3.8))
    bottom_t = [0.0] * len(targets)
    bottom_m = [0.0] * len(targets)
    for i, c in enumerate(comps):
        lat = [rows[t]["components"].get(c, {}).get("latency_ms", 0.0) / 1000 for t in targets]
        mem = [rows[t]["components"].get(c, {}).get("weights_mb", 0.0) / 1024 for t in targets]
        color = COLORS[i % len(COLORS)]
        ax_t.bar(targets, lat, bottom=bottom_t, label=c, color=color)
        ax_m.bar(targets, mem, bottom=bottom_m, label=f"{c} weights", color=color)
        bottom_t = [b + v for b, v in zip(bottom_t, lat)]
        bottom_m = [b + v for b, v in zip(bottom_m, mem)]
    peaks = [rows[t].get("peak_memory_mb", 0.0) / 1024 for t in targets]
    ax_m.scatter(targets, peaks, marker="_", s=900, color="black", zorder=3, label="peak (memory plan)")
    for ax, total, unit in ((ax_t, bottom_t, "s"), (ax_m, peaks, "GB")):
        for x, v in enumerate(total):
            ax.annotate(f"{v:.2f} {unit}", (x, v), ha="center", va="bottom", fontsize=8)
    precision = {e.get("precision", "?") for e in rows.values()}
    ax_t.set_ylabel(f"estimated latency per video (s), {'/'.join(sorted(precision))}")
    ax_m.set_ylabel("memory (GB)")
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=8)
    fig.suptitle("NPU estimates per video")
    fig.tight_layout()
    path = Path(run_dir) / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return {name: path, **plot_memory_phases(run_dir, rows)}


def plot_memory_phases(run_dir: Path, estimates: dict[str, dict[str, Any]], name: str = "memory") -> dict[str, Path]:
    """`<run_dir>/<name>.png`: per target, each phase's resident memory (weights, activations, what
    lives across phases) against the budget, for sequential memory plans; {} when none is."""
    rows = {t: e["memory_plan"] for t, e in estimates.items()
            if (e.get("memory_plan") or {}).get("policy") == "sequential" and e["memory_plan"].get("phases")}
    if not rows:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 3.8), squeeze=False)
    for ax, (target, mp) in zip(axes[0], rows.items()):
        phases = [ph["phase"] for ph in mp["phases"]]
        w = [ph["weights_mb"] / 1024 for ph in mp["phases"]]
        a = [ph["activations_mb"] / 1024 for ph in mp["phases"]]
        st = [mp["state_mb"] / 1024] * len(phases)
        ax.bar(phases, w, color=COLORS[0], label="weights")
        ax.bar(phases, a, bottom=w, color=COLORS[1], label="activations")
        ax.bar(phases, st, bottom=[x + y for x, y in zip(w, a)], color=COLORS[6], label="across phases")
        ax.axhline(mp["budget_mb"] / 1024, color="black", linestyle="--", linewidth=1, label="budget")
        ax.axhline(mp["peak_mb"] / 1024, color=COLORS[2], linewidth=1, label=f"peak {mp['peak_mb'] / 1024:.2f} GB")
        ax.set_title(f"{target}: one phase resident at a time", fontsize=9)
        ax.set_ylabel("resident memory (GB)")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(run_dir) / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return {name: path}
