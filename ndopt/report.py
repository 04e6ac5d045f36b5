"""Run reports: report.json, report.md and PNG plots of params, FLOPs and fidelity per pass.

Everything is written atomically after every pass, so a failed pass leaves the previous report.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ndopt.estimate_plots import plot_estimates
from ndopt.io import atomic_path, atomic_write_json, atomic_write_text, jsonable


def _num(x: float | str | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):  # a report read back from JSON: inf/nan are strings there
        return x
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3f}{unit}"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def write_report(run_dir: Path, report: dict[str, Any], plots: bool = True) -> dict[str, Path]:
    """report.json and report.md, atomically; with `plots`, the PNGs first (the markdown links the
    plots it made). A run writes the text after every pass and draws the plots once, at its end."""
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md"}
    if plots:
        paths.update(plot_report(run_dir, report))
    atomic_write_json(paths["json"], jsonable(report))
    atomic_write_text(paths["md"], render_markdown(report))
    return paths


def write_plan_report(run_dir: Path, plan: dict[str, Any]) -> dict[str, Path]:
    """`ndopt plan`'s report: plan.json, report.md, cost.png (per pass) and estimates.png (per target)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = [{"name": "baseline", "cost": {"params_total": plan["params_total"],
                                          "flops_per_video": plan["flops_per_video"]}}]
    steps += [{"name": s["name"], "cost": s} for s in plan.get("passes", [])]
    paths = {"json": run_dir / "plan.json", "md": run_dir / "report.md"}
    paths.update(plot_report(run_dir, {"steps": steps}))
    paths.update(_plot_estimates(run_dir, plan.get("estimates")))
    atomic_write_json(paths["json"], jsonable({k: v for k, v in plan.items() if k != "final_summary"}))
    atomic_write_text(paths["md"], render_plan_markdown(plan, [n for n in paths if n not in ("json", "md")]))
    return paths


def _lowering_estimates(report: dict[str, Any]) -> dict[str, Any]:
    """{target: estimate} of a run's lowered bundles."""
    return {t: low["estimate"] for t, low in (report.get("lowering") or {}).items()
            if isinstance(low, dict) and isinstance(low.get("estimate"), dict)}


def _plot_estimates(run_dir: Path, estimates: dict[str, Any] | None) -> dict[str, Path]:
    return plot_estimates(run_dir, estimates) if estimates else {}


def _estimate_lines(estimates: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    for name, e in (estimates or {}).items():
        if not isinstance(e, dict) or "latency_s" not in e:
            continue
        lines += ["", f"### {name} ({e.get('precision', '-')}, calibrated: {e.get('calibrated', '-')})", "",
                  f"{e['latency_s']:.2f} s per video, peak memory {e['peak_memory_mb'] / 1024:.2f} GB", "",
                  "| component | calls/video | latency (s) | share | weights (MB) | peak activations (MB) |",
                  "|---|---|---|---|---|---|"]
        total = e.get("latency_ms") or sum(v["latency_ms"] for v in e.get("components", {}).values()) or 1.0
        for c, v in e.get("components", {}).items():
            share = v.get("share", v["latency_ms"] / total)
            act = v.get("peak_activations_mb", v.get("activations_mb", 0.0))
            lines.append(f"| {c} | {v.get('calls_per_video', '-')} | {v['latency_ms'] / 1000:.3f} | "
                         f"{share:.1%} | {v.get('weights_mb', 0):.1f} | {act:.1f} |")
        mp = e.get("memory_plan") or {}
        if mp.get("phases"):
            lines += ["", f"Memory plan: {mp['policy']} (everything resident: "
                          f"{mp.get('all_resident_mb', 0) / 1024:.2f} GB; across phases: {mp.get('state_mb', 0):.0f} MB)", "",
                      "| phase | weights (MB) | activations (MB) | resident (GB) |", "|---|---|---|---|"]
            lines += [f"| {ph['phase']} | {ph['weights_mb']:.1f} | {ph['activations_mb']:.1f} | "
                      f"{ph['resident_mb'] / 1024:.2f} |" for ph in mp["phases"]]
    return lines


def render_plan_markdown(plan: dict[str, Any], plots: list[str]) -> str:
    lines = [f"# ndopt plan `{plan.get('recipe', plan['model'])}`", "",
             f"- model: `{plan['model']}` on the meta device, {plan['latent_frames']} latent frames at "
             f"{plan['resolution'][0]}x{plan['resolution'][1]}", "",
             "| step | params | DiT calls/video | FLOPs/video | x fewer FLOPs |", "|---|---|---|---|---|",
             f"| baseline | {_num(plan['params_total'])} | {plan['dit_calls_per_video']} | "
             f"{_num(plan['flops_per_video'])} | 1 |"]
    for s in plan.get("passes", []):
        lines.append(f"| {s['name']} | {_num(s['params_total'])} | {s['dit_calls_per_video']} | "
                     f"{_num(s['flops_per_video'])} | {s.get('ratios', {}).get('flops_per_video', '-')} |")
    if plan.get("estimates"):
        lines += ["", "## Target estimates", *_estimate_lines(plan["estimates"])]
    if plan.get("final_summary"):
        lines += ["", "## Final pipeline", "", "```", plan["final_summary"].rstrip(), "```"]
    lines += [""] + [f"![{n}]({n}.png)" for n in plots]
    return "\n".join(lines) + "\n"


def _short(v: Any, limit: int = 160) -> str:
    if isinstance(v, float):
        return _num(v)
    text = json.dumps(jsonable(v), separators=(", ", ": ")) if not isinstance(v, str) else v
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pass_detail_lines(steps: list[dict[str, Any]], run_dir: str | None) -> list[str]:
    """What each pass measured (its metrics) and wrote (plots and files), linked relative to the report."""
    lines: list[str] = []
    for s in steps:
        metrics = {k: v for k, v in (s.get("metrics") or {}).items() if not (isinstance(v, list) and len(v) > 8)}
        arts = {k: v for k, v in (s.get("artifacts") or {}).items() if k != "summary"}
        if not metrics and not arts:
            continue
        lines += ["", f"### {s['index']}. {s['name']}", ""]
        lines += [f"- {k}: {_short(v)}" for k, v in metrics.items()]
        for k, v in arts.items():
            rel = os.path.relpath(v, run_dir) if run_dir else v
            lines.append(f"- {k}: ![{k}]({rel})" if str(v).endswith(".png") else f"- {k}: `{rel}`")
    return ["", "## What each pass measured", *lines] if lines else []


def _budget(fid: dict[str, Any]) -> str:
    """The pass's fidelity contract as a table cell: `>= 20 dB` (lossy; `, worst frame >= 18 dB` with a
    frame budget) or `exact 1e-05` (relative)."""
    if "budget_db" in fid:
        prev = fid.get("vs_previous", {})

        def held(value: Any, budget: float) -> str:
            return "" if value is None or isinstance(value, str) else (" ok" if value >= budget else " **below**")

        cell = f">= {fid['budget_db']:g} dB{held(prev.get(fid.get('metric', 'latent_psnr')), fid['budget_db'])}"
        if "frame_budget_db" in fid:
            cell += (f", worst frame >= {fid['frame_budget_db']:g} dB"
                     f"{held(prev.get(fid['frame_metric']), fid['frame_budget_db'])}")
        return cell
    if "tolerance" in fid:
        return f"exact {fid['tolerance']:g}"
    return "-"


def plot_frames(run_dir: Path, prompts: list[str], original: Any, optimized: Any) -> Path:
    """frames.png: per prompt, the unoptimized pipeline's frames above the optimized pipeline's.

    `original` / `optimized` are [B, 3, F, H, W] videos in [-1, 1] (the probe's outputs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def frames(v: Any, b: int) -> Any:
        x = np.asarray(v[b], dtype=np.float32).transpose(1, 2, 3, 0)  # F, H, W, 3
        return ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8)

    n_frames = int(original.shape[2])
    rows = 2 * len(prompts)
    fig, axes = plt.subplots(rows, n_frames, figsize=(1.1 * n_frames + 1.6, 1.15 * rows), squeeze=False)
    for b, prompt in enumerate(prompts):
        for r, (label, video) in enumerate((("original", original), ("optimized", optimized))):
            fs = frames(video, b)
            for f in range(n_frames):
                ax = axes[2 * b + r][f]
                ax.imshow(fs[f], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if f == 0:
                    ax.set_ylabel(label, fontsize=7)
                if r == 0 and f == 0:
                    ax.set_title(prompt, fontsize=7, loc="left")
    fig.tight_layout(pad=0.3)
    with atomic_path(run_dir / "frames.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return run_dir / "frames.png"


def _frames(orig: dict[str, Any]) -> str:
    """The first and the worst frame's pixel PSNR against the unoptimized pipeline (and which frame)."""
    if "pixel_psnr_worst_frame" not in orig:
        return "-"
    return (f"{_num(orig['pixel_psnr_first_frame'])} / {_num(orig['pixel_psnr_worst_frame'])} "
            f"(frame {orig['worst_frame']})")


def _motion(fid: dict[str, Any]) -> str:
    """Probe prompts whose motion follows the caption: unoptimized -> after the pass."""
    after, before = fid.get("motion"), fid.get("motion_original")
    if not after or not before:
        return "-"
    n = len(after["wanted"])
    return f"{round(before['rate'] * n)}/{n} -> {round(after['rate'] * n)}/{n}"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# ndopt run `{report['recipe']['name']}`", "",
             f"- model: `{report['recipe']['model']}`", f"- status: **{report['status']}**"]
    if report.get("error"):
        lines.append(f"- error: {report['error']}")
    if report.get("targets"):
        lines.append(f"- targets: {', '.join(report['targets'])}")
        for name, low in (report.get("lowering") or {}).items():
            lines.append(f"  - {name}: {low.get('status', '-')}" + (f" ({low['reason']})" if low.get("reason") else ""))
    if report.get("model"):
        lines.append(f"- optimized model: `{report['model']['path']}` (reload: `ndopt generate --model "
                     f"{report['model']['path']} --prompt ...` or `ndopt.load_model(...)`)")
    if report.get("frames"):
        lines += ["", "## Original vs optimized", "",
                  f"The probe's prompts and seed, {report['frames']['frames']} frames each: for every prompt the "
                  "unoptimized pipeline's video (upper row) and the optimized one's (lower row).", "",
                  "![frames](frames.png)"]
    lines += ["", "## Passes", "",
              "| # | pass | modified | params | DiT calls/video | FLOPs/video | latent PSNR (vs prev) | budget | "
              "pixel PSNR (vs orig) | first / worst frame | temporal PSNR | motion | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fewer(s: dict[str, Any], key: str) -> str:  # x fewer than the unoptimized pipeline
        r = s.get("ratios", {}).get(key)
        return f" ({r:.3g}x)" if r else ""

    for s in report["steps"]:
        fid = s.get("fidelity", {})
        prev = fid.get("vs_previous", {})
        orig = fid.get("vs_original", {})
        lines.append(f"| {s['index']} | {s['name']} | {s.get('modified', '-')} | {_num(s['cost']['params_total'])} | "
                     f"{s['cost']['dit_calls_per_video']}{fewer(s, 'dit_calls_per_video')} | "
                     f"{_num(s['cost']['flops_per_video'])}{fewer(s, 'flops_per_video')} | "
                     f"{_num(prev.get('latent_psnr'))} | {_budget(fid)} | {_num(orig.get('pixel_psnr'))} | "
                     f"{_frames(orig)} | {_num(orig.get('temporal_psnr'))} | {_motion(fid)} | "
                     f"{s.get('seconds', '-')} |")
    if report["steps"]:
        first, last = report.get("baseline") or report["steps"][0]["cost"], report["steps"][-1]["cost"]
        if last["flops_per_video"]:
            lines += ["", f"FLOPs per video: {_num(first['flops_per_video'])} -> {_num(last['flops_per_video'])} "
                      f"({first['flops_per_video'] / last['flops_per_video']:.2f}x fewer); DiT calls per video "
                      f"{first['dit_calls_per_video']} -> {last['dit_calls_per_video']}; params "
                      f"{_num(first['params_total'])} -> {_num(last['params_total'])}."]
    lines += _pass_detail_lines(report["steps"], report.get("run_dir"))
    est = _lowering_estimates(report)
    if est:
        lines += ["", "## Target estimates", *_estimate_lines(est)]
    lines += ["", "## Final pipeline", "", "```", report.get("final_summary", "").rstrip(), "```", ""]
    for name in report.get("plots", {}):
        lines.append(f"![{name}]({name}.png)")
    return "\n".join(lines) + "\n"


def plot_report(run_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    if not steps:
        return {}
    labels = [s["name"] for s in steps]
    out: dict[str, Path] = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].bar(labels, [s["cost"]["params_total"] / 1e6 for s in steps], color="#4477aa")
    axes[0].set_ylabel("params (M)")
    axes[1].bar(labels, [s["cost"]["flops_per_video"] / 1e9 for s in steps], color="#cc6677")
    axes[1].set_ylabel("FLOPs per video (G)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("cost after each pass")
    fig.tight_layout()
    with atomic_path(run_dir / "cost.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    out["cost"] = run_dir / "cost.png"

    fid = [(s["name"], s["fidelity"]) for s in steps if "vs_original" in s.get("fidelity", {})]
    if fid:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        vals = [min(f["vs_original"]["latent_psnr"], 100.0) for _, f in fid]
        pix = [min(f["vs_original"]["pixel_psnr"], 100.0) for _, f in fid]
        x = range(len(fid))
        ax.plot(x, vals, "o-", label="latent PSNR vs original")
        ax.plot(x, pix, "s-", label="pixel PSNR vs original")
        ax.set_xticks(list(x), [n for n, _ in fid], rotation=30)
        ax.set_ylabel("dB (capped at 100)")
        ax.legend()
        fig.tight_layout()
        with atomic_path(run_dir / "fidelity.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        out["fidelity"] = run_dir / "fidelity.png"
        out.update(_plot_fidelity_frames(run_dir, fid))
    out.update(_plot_estimates(run_dir, _lowering_estimates(report)))
    report["plots"] = {k: str(v) for k, v in out.items()}
    return out


def _plot_fidelity_frames(run_dir: Path, fid: list[tuple[str, dict[str, Any]]]) -> dict[str, Path]:
    """fidelity_frames.png: pixel and latent PSNR against the unoptimized pipeline on every frame, one
    line per pass that changed the probe's output (exact passes that left it bit-identical are off the chart)."""
    import matplotlib.pyplot as plt

    rows = [(n, f["vs_original"]) for n, f in fid if "pixel_psnr_frames" in f["vs_original"]
            and not all(math.isinf(v) for v in f["vs_original"]["pixel_psnr_frames"])]
    if not rows:
        return {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, orig in rows:
        axes[0].plot([min(v, 100.0) for v in orig["pixel_psnr_frames"]], "o-", label=name)
        axes[1].plot([min(v, 100.0) for v in orig["latent_psnr_frames"]], "s-", label=name)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_xlabel("video frame")
    axes[0].set_ylabel("pixel PSNR vs original (dB)")
    axes[1].set_xlabel("latent frame")
    axes[1].set_ylabel("latent PSNR vs original (dB)")
    axes[0].legend(fontsize=7)
    fig.suptitle("fidelity per frame after each pass (capped at 100 dB)")
    fig.tight_layout()
    with atomic_path(run_dir / "fidelity_frames.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return {"fidelity_frames": run_dir / "fidelity_frames.png"}
