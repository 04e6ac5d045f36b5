"""What the CLI calls: `run` a recipe, `plan` a recipe or model, `generate` a video.

`run` loads the model, applies the recipe's passes through the PassManager with verification and
the fidelity probe, costs the pipeline after every pass, and writes the report atomically after
each pass. `plan` does the same on the meta device with each pass's structural effect only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ndopt import threads
from ndopt import validate as V
from ndopt.errors import NdoptError
from ndopt.eval.probe import FidelityInstrument, FidelityProbe, ProbeSettings
from ndopt.ir.cost import CostModel, PipelineCost
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.verify import verify
from ndopt.model import HYBRID, hybrid_pipeline, load_model, video_frames
from ndopt.passmanager import PassContext, PassManager, PassRecord, target_info
from ndopt.recipe import Recipe, load_recipe
from ndopt.report import write_plan_report, write_report

log = logging.getLogger("ndopt")


def cost_row(cost: PipelineCost, pipeline: Pipeline) -> dict[str, Any]:
    return {
        "params_total": cost.params,
        "params": {c.name: c.params for c in cost.components},
        "flops_per_video": cost.flops_per_video,
        "dit_flops_per_video": sum(c.flops_per_video for c in cost.components if c.role == "dit"),
        "dit_calls_per_video": cost.calls_per_video("dit"),
        "calls_per_video": {c.name: c.calls_per_video for c in cost.components},
        "schedule": {"steps": [s.steps for s in pipeline.schedule.stages],
                     "video_steps": [s.video_steps for s in pipeline.schedule.stages],
                     "guidance": pipeline.schedule.guidance.mode},
    }


def _ratios(first: dict[str, Any], last: dict[str, Any]) -> dict[str, float]:
    def r(a: float, b: float) -> float | None:
        return round(a / b, 4) if b else None

    return {"params": r(first["params_total"], last["params_total"]),
            "flops_per_video": r(first["flops_per_video"], last["flops_per_video"]),
            "dit_flops_per_video": r(first["dit_flops_per_video"], last["dit_flops_per_video"]),
            "dit_calls_per_video": r(first["dit_calls_per_video"], last["dit_calls_per_video"])}


def _load_recipe_model(r: Recipe, override: str | None, **kwargs: Any) -> Pipeline:
    """The recipe's model; a failure names the recipe's `model` line unless it came from --model."""
    try:
        pipeline = load_model(r.spec.model, seed=r.spec.seed, **kwargs)
    except NdoptError as e:
        if override:
            raise
        raise r.error("model", str(e)) from None
    if r.spec.first_frame == HYBRID:
        pipeline = hybrid_pipeline(pipeline, seed=r.spec.seed)
    return _at_recipe_size(pipeline, r)


def _at_recipe_size(pipeline: Pipeline, r: Recipe) -> Pipeline:
    """The pipeline at the recipe's `video` size (frames, height, width), checked against the model's limits."""
    v = r.spec.video
    if v is None:
        return pipeline
    s = pipeline.schedule
    try:
        latent = (V.video_frames_to_latent(v.frames, pipeline, "video.frames") if v.frames is not None
                  else v.latent_frames)
        V.check_size(pipeline, latent_frames=latent, height=v.height, width=v.width,
                     frames_option="video.latent_frames")
    except NdoptError as e:
        raise r.error("video", str(e)) from None
    return pipeline.replace(schedule=s.with_frames(s.latent_frames if latent is None else latent, v.height, v.width))


def _recipe(ref: str | Path | Recipe) -> Recipe:
    return ref if isinstance(ref, Recipe) else load_recipe(ref)


class _PassProgress:
    """Instrument: advances a progress bar as passes finish."""

    def __init__(self, advance: Any) -> None:
        self.advance = advance

    def before(self, index, p, pipeline, ctx) -> None:
        pass

    def after(self, index, p, before, result, ctx, record) -> None:
        self.advance(p.name)


def run(recipe: str | Path | Recipe, *, model: str | None = None, target: str | None = None,
        out: str | Path | None = None, progress: Any = None) -> dict[str, Any]:
    """Run a recipe end to end on real weights; returns the report (also written to the run dir).

    `progress(label)` is called as each pass finishes (the CLI passes a rich progress bar's).
    SIGINT and SIGTERM stop it at the next safe point with the report saying `interrupted`."""
    from ndopt.interrupt import handle_signals

    with handle_signals():
        return _run(recipe, model=model, target=target, out=out, progress=progress)


def _run(recipe: str | Path | Recipe, *, model: str | None, target: str | None, out: str | Path | None,
         progress: Any) -> dict[str, Any]:
    r = _recipe(recipe).with_overrides(model=model, target=target)
    run_dir = Path(out) if out else Path(r.spec.output) / r.name
    V.check_writable_dir(run_dir, "--out" if out else f"{r.source}: output/name")
    passes = r.instantiate()
    preflight(r)
    pipeline = _load_recipe_model(r, model)
    costs = CostModel()  # shared by the verifier and the cost rows: each shape run happens once
    verify(pipeline, costs=costs)
    ctx = PassContext(run_dir=run_dir, seed=r.spec.seed, device=pipeline.device, target=target_info(r.targets))
    report: dict[str, Any] = {
        "recipe": {"name": r.name, "source": r.source, "model": r.spec.model,
                   "passes": [{p.name: p.config} for p in r.passes]},
        "targets": r.targets, "run_dir": str(run_dir), "status": "running", "initial_summary": pipeline.summary(), "steps": [],
    }
    base = cost_row(costs.pipeline_cost(pipeline), pipeline)
    report["baseline"] = base
    instruments: list[Any] = [_PassProgress(progress)] if progress else []
    if r.spec.probe.enabled:
        p = r.spec.probe
        probe = FidelityProbe(ProbeSettings(tuple(p.prompts), p.seed, p.latent_frames, p.height, p.width))
        instruments.append(FidelityInstrument(probe, r.spec.fidelity.policy, dict(r.spec.fidelity.budgets),
                                              dict(r.spec.fidelity.frame_budgets)))

    def on_pass_done(pipe: Pipeline, rec: PassRecord) -> None:
        row = {"index": rec.index, "name": rec.name, "config": rec.config, **rec.record,
               "cost": cost_row(costs.pipeline_cost(pipe), pipe)}
        row["ratios"] = _ratios(base, row["cost"])  # vs the unoptimized pipeline (x fewer)
        report["steps"].append(row)
        report["final_summary"] = pipe.summary()
        write_report(run_dir, report, plots=False)  # plots are drawn once, when the run ends

    manager = PassManager(passes, instruments, costs=costs)
    stage = "passes"
    try:
        final, _ = manager.run(pipeline, ctx, on_pass_done=on_pass_done)
        del pipeline  # the unoptimized components (T5-XXL, the teacher DiT) are not needed past here
        stage = "saving the model"
        report["final_summary"] = final.summary()
        report["model"] = save_model(final, run_dir, r, report)
        last = report["steps"][-1]["cost"] if report["steps"] else base
        report["ratios"] = _ratios(base, last)
        _frames(run_dir, report, instruments)
        stage = "lowering"
        report["lowering"] = lower_targets(final, r.targets, run_dir, ctx)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        report["status"] = "interrupted" if interrupted else "failed"
        where = _where(stage, ctx, passes)
        if interrupted:
            report["interrupted"] = {"signal": getattr(e, "signal_name", "SIGINT"), "during": where}
        else:
            report["error"] = f"{type(e).__name__}: {e}"
            report["failed_during"] = where
        if interrupted or report["steps"] or run_dir.exists():  # (the directory was checked writable)
            write_report(run_dir, report)
        if interrupted and not hasattr(e, "during"):
            e.during = where  # type: ignore[attr-defined]  # the CLI's one line says where it stopped
        raise
    report["status"] = "ok"
    paths = write_report(run_dir, report)
    report["paths"] = {k: str(v) for k, v in paths.items()}
    return report


def preflight(r: Recipe) -> None:
    """Check a recipe against its model's structure before any weight loads: the probe's sizes and
    memory, and every pass's plan form on the meta-device model (blocks to keep, steps per stage, ...),
    so an out-of-range value costs a second, not a model load and the passes before it."""
    import tempfile

    skeleton = _meta_model(r.spec.model, r.spec.seed)
    if skeleton is None:  # a saved pipeline or a checkpoint directory: checked after loading
        return
    if r.spec.first_frame == HYBRID:
        skeleton = hybrid_pipeline(skeleton, seed=r.spec.seed)
    skeleton = _at_recipe_size(skeleton, r)
    p = r.spec.probe
    if p.enabled:
        try:
            V.check_size(skeleton, latent_frames=p.latent_frames, height=p.height, width=p.width,
                         frames_option="probe.latent_frames")
        except NdoptError as e:
            raise r.error("probe", str(e)) from None
        probed = skeleton.replace(schedule=skeleton.schedule.with_frames(p.latent_frames, p.height, p.width))
        V.check_memory(probed, f"{r.source}: probe", batch=len(p.prompts))
    with tempfile.TemporaryDirectory(prefix="ndopt-preflight-") as tmp:
        ctx = PassContext(run_dir=Path(tmp), plan=True, device=torch.device("meta"), target=target_info(r.targets))
        manager = PassManager(r.instantiate(), verify_calls=False)
        manager.instruments = [i for i in manager.instruments if type(i).__name__ == "Timing"]
        quiet, level = logging.getLogger("ndopt"), logging.getLogger("ndopt").level
        quiet.setLevel(max(level, logging.WARNING))  # the dry run's pass lines would read as the run's
        try:
            manager.run(skeleton, ctx)
        except NdoptError as e:
            i = ctx.pass_index
            line = r.passes[i - 1].line if 0 < i <= len(r.passes) else 1
            raise type(e)(f"{r.source}:{line}: {e} (checked on the model's structure, before loading weights)"
                          ) from None
        finally:
            quiet.setLevel(level)


def _where(stage: str, ctx: PassContext, passes: list[Any]) -> str:
    """Where a run stopped: `pass 5/9 (block_pruning)`, `saving the model` or `lowering`."""
    if stage != "passes":
        return stage
    i = ctx.pass_index
    return f"pass {i}/{len(passes)} ({passes[i - 1].name})" if 0 < i <= len(passes) else "setup"


def _frames(run_dir: Path, report: dict[str, Any], instruments: list[Any]) -> None:
    """frames.png: the probe's videos of the unoptimized and the final pipeline, same prompts and seed
    (the probe already sampled both: nothing is sampled again)."""
    from ndopt.report import plot_frames

    probe = next((i for i in instruments if isinstance(i, FidelityInstrument)), None)
    if probe is None or probe.reference is None or probe.latest is None:
        return
    ref, out = probe.reference.video, probe.latest.video
    if ref.shape != out.shape:
        log.warning("frames.png skipped: the optimized video's shape %s differs from the original's %s",
                    tuple(out.shape), tuple(ref.shape))
        return
    prompts = list(probe.probe.settings.prompts)
    path = plot_frames(run_dir, prompts, ref.numpy(), out.numpy())
    report["frames"] = {"path": str(path), "prompts": prompts, "seed": probe.probe.settings.seed,
                        "frames": int(ref.shape[2])}


def save_model(final: Pipeline, run_dir: Path, r: Recipe, report: dict[str, Any]) -> dict[str, Any]:
    """RUN/model: the optimized pipeline, reloadable with `ndopt.load_model(RUN/model)` (ndopt.saved)."""
    from ndopt.saved import directory_bytes, save_pipeline

    fidelity = {f"{s['index']}_{s['name']}": s["fidelity"] for s in report["steps"] if "fidelity" in s}
    try:
        path = save_pipeline(final, run_dir / "model", recipe={**report["recipe"], "targets": r.targets},
                             fidelity=fidelity, base=r.spec.model, seed=r.spec.seed)
    except Exception as e:  # the passes' work stays usable: the report says why there is no RUN/model
        # (not only NdoptError: a full disk or a module safetensors cannot take must not fail the run)
        msg = str(e) if isinstance(e, NdoptError) else f"{type(e).__name__}: {e}"
        log.error("the optimized pipeline was not saved: %s", msg)
        return {"path": None, "error": msg}
    return {"path": str(path), "bytes": directory_bytes(path)}


def lower_targets(pipeline: Pipeline, names: list[str], run_dir: Path, ctx: PassContext) -> dict[str, Any]:
    """Lower the final pipeline for each target that offers lowering; say plainly when one does not."""
    from ndopt.target import get_target

    out: dict[str, Any] = {}
    for ref in names:
        t = get_target(ref)  # a name, or a target file (chip.yaml): the bundle is named after the target
        if hasattr(t, "lower"):
            out[t.name] = t.lower(pipeline, run_dir / "bundles" / t.name, ctx)
        else:
            out[t.name] = {"status": "skipped", "reason": f"target {t.name!r} offers no lowering"}
            log.info("target %s offers no lowering; skipped", t.name)
    return out


def target_estimates(pipeline: Pipeline, names: list[str]) -> dict[str, Any]:
    from ndopt.target import get_target

    found = [get_target(n) for n in names]  # names or target files; estimates are keyed by target name
    return {t.name: t.estimate(pipeline) for t in found if hasattr(t, "estimate")}


def plan(recipe: str | Path | Recipe | None = None, *, model: str | None = None,
         target: str | None = None, latent_frames: int | None = None, height: int | None = None,
         width: int | None = None, first_frame: str | None = None, report_dir: str | Path | None = None,
         frames: int | None = None) -> dict[str, Any]:
    """A recipe's structural effect on the meta-device model: params, FLOPs, calls per video.

    `height`/`width` change the video size the DiT generates (Neodragon runs its DiT at 320x512);
    `first_frame="image-model"` is Neodragon's hybrid mode (an image model makes the first frame, a 2x
    super-resolution network upscales every frame: the frontend's `hybrid`), "external" the
    DiT's side of it alone (the first frame comes from outside the pipeline).
    With a recipe, a report (`plan.json`, `report.md`, cost and estimate plots) is written to
    `report_dir` (default `<recipe output>/<name>-plan`)."""
    if recipe is None and model is None:
        raise ValueError("plan needs a recipe or a model")
    if frames is not None and latent_frames is not None:
        raise NdoptError("plan: give frames (video frames) or latent_frames, not both")
    r = _recipe(recipe).with_overrides(model=model, target=target) if recipe is not None else None
    if target is not None and r is None:
        from ndopt.target import get_target

        get_target(target)
    if report_dir is not None:
        V.check_writable_dir(report_dir, "--out")
    model_ref = r.spec.model if r else model
    pipeline = _load_recipe_model(r, model, meta=True) if r else load_model(model_ref, meta=True)
    sch = pipeline.schedule
    if frames is not None:
        latent_frames = V.video_frames_to_latent(frames, pipeline)
    V.check_size(pipeline, latent_frames=latent_frames, height=height, width=width,
                 frames_option="--frames" if frames is not None else "latent_frames",
                 max_latent_frames=V.MAX_PLAN_LATENT_FRAMES)
    if latent_frames is not None or height is not None or width is not None:
        sch = sch.with_frames(latent_frames or sch.latent_frames, height, width)
    if first_frame and first_frame != HYBRID:
        sch = replace(sch, first_frame=first_frame)
    if sch != pipeline.schedule:
        pipeline = pipeline.replace(schedule=sch)
    if first_frame == HYBRID and pipeline.schedule.first_frame != HYBRID:
        pipeline = hybrid_pipeline(pipeline)
    costs = CostModel()
    verify(pipeline, costs=costs)
    base = costs.pipeline_cost(pipeline)
    out: dict[str, Any] = {"model": model_ref, "pipeline": pipeline.name, "device": "meta",
                           "latent_frames": pipeline.schedule.latent_frames,
                           "resolution": [pipeline.schedule.height, pipeline.schedule.width],
                           **base.to_json(), "dit_calls_per_video": base.calls_per_video("dit")}
    if r is None:
        if target:
            out["estimates"] = target_estimates(pipeline, [target])
        return out
    out["recipe"] = r.name
    out["targets"] = r.targets
    steps = []
    first = cost_row(base, pipeline)
    run_dir = Path(report_dir) if report_dir else Path(r.spec.output) / f"{r.name}-plan"
    ctx = PassContext(run_dir=run_dir, plan=True, device=torch.device("meta"), target=target_info(r.targets))
    manager = PassManager(r.instantiate(), costs=costs)
    manager.instruments = [i for i in manager.instruments if type(i).__name__ != "SummaryArtifacts"]

    def on_pass_done(pipe: Pipeline, rec: PassRecord) -> None:
        row = cost_row(costs.pipeline_cost(pipe), pipe)
        steps.append({"index": rec.index, "name": rec.name, "config": rec.config,
                      "modified": rec.record["modified"], "metrics": rec.record["metrics"],
                      **row, "ratios": _ratios(first, row)})  # vs the unoptimized pipeline (x fewer)

    final, _ = manager.run(pipeline, ctx, on_pass_done=on_pass_done)
    out["passes"] = steps
    last = steps[-1] if steps else first
    out["final"] = {k: last[k] for k in ("params_total", "params", "flops_per_video", "dit_calls_per_video",
                                         "calls_per_video")}
    out["ratios"] = _ratios(first, last)
    out["final_summary"] = final.summary()
    out["estimates"] = target_estimates(final, r.targets)
    out["paths"] = {k: str(v) for k, v in write_plan_report(run_dir, out).items()}
    return out


def parse_steps(steps: str | tuple[int, ...] | None, n_stages: int) -> tuple[int, ...] | None:
    """`--steps 4,4,4` (one count per pyramid stage) or `--steps 4` (the same count for every stage)."""
    if steps is None or isinstance(steps, tuple):
        return steps
    import re

    text = str(steps).strip()
    if not re.fullmatch(r"\d+([,-]\d+)*", text):
        raise NdoptError(f"--steps {steps!r}: give step counts as integers, e.g. 4,4,4 or 4")
    counts = tuple(int(x) for x in re.split(r"[,-]", text))
    if len(counts) == 1:
        counts *= n_stages
    if len(counts) != n_stages or any(k < 1 for k in counts):
        raise NdoptError(f"--steps {steps!r}: the schedule has {n_stages} pyramid stages; give {n_stages} positive "
                         "counts (e.g. " + ",".join(["4"] * n_stages) + ") or one for all")
    if max(counts) > V.MAX_STEPS:
        raise NdoptError(f"--steps {steps!r}: at most {V.MAX_STEPS} steps per stage (Pyramid-Flow samples 20)")
    return counts


def with_steps(pipeline: Pipeline, steps: tuple[int, ...]) -> Pipeline:
    """The pipeline with `steps` per stage (first and later frames), refused where the steps are fixed."""
    sch = pipeline.schedule
    if tuple(s.steps for s in sch.stages) == steps and tuple(s.video_steps for s in sch.stages) == steps:
        return pipeline
    if sch.folded or "schedule_folding" in pipeline.analyses:
        raise NdoptError(f"--steps: pipeline {pipeline.name!r} has a folded schedule (schedule_folding precomputed "
                         "its timestep table for its own steps); generate with its steps, or fold again")
    if "guidance_free" in pipeline.facts:
        have = "-".join(str(s.steps) for s in sch.stages)
        raise NdoptError(f"--steps: pipeline {pipeline.name!r} is a step-distilled student: its steps are fixed at "
                         f"{have} (it was distilled for them); drop --steps")
    return pipeline.replace(schedule=sch.with_steps(steps))


def _sized(pipeline: Pipeline, frames: Any, height: Any, width: Any, steps: Any) -> Pipeline:
    """The pipeline with the video's frames, size and steps, each checked against the model's limits."""
    latent = V.video_frames_to_latent(frames, pipeline)
    V.check_size(pipeline, latent_frames=latent, height=height, width=width)
    pipeline = pipeline.replace(schedule=pipeline.schedule.with_frames(latent, height, width))
    counts = parse_steps(steps, len(pipeline.schedule.stages))
    return with_steps(pipeline, counts) if counts is not None else pipeline


def _meta_model(model: str, seed: int = 0) -> Pipeline | None:
    """The model's structure on the meta device (no weights: a second), or None where only loading the
    weights builds it (saved pipelines and checkpoint directories are checked after loading)."""
    try:
        return load_model(model, seed=seed, meta=True)
    except NdoptError:
        return None


def generation_pipeline(model: str, *, frames: int = 9, height: int | None = None, width: int | None = None,
                        steps: str | tuple[int, ...] | None = None, seed: int = 0, meta: bool = False,
                        first_frame: str = "generate") -> Pipeline:
    """The model (preset, student, saved RUN/model or checkpoint) with the video's frames, size and steps,
    in Neodragon's hybrid mode with `first_frame="image-model"` (sizes are then the DiT's).

    Every value is checked before the weights load (on the meta-device model where there is one), and
    the video's memory against this machine before anything is sampled."""
    if first_frame not in ("generate", HYBRID):
        raise NdoptError(f"--first-frame {first_frame!r}: generate or {HYBRID}")

    def mode(p: Pipeline) -> Pipeline:
        return hybrid_pipeline(p, seed=seed) if first_frame == HYBRID else p

    skeleton = _meta_model(model, seed)
    if skeleton is not None:
        skeleton = mode(_sized(skeleton, frames, height, width, steps))
        if meta:
            return skeleton
        V.check_memory(skeleton, "generate")
    pipeline = mode(_sized(load_model(model, seed=seed, meta=meta), frames, height, width, steps))
    if not meta and skeleton is None:
        V.check_memory(pipeline, "generate")
    return pipeline


def generate(model: str, prompt: str, out: str | Path, *, frames: int = 9, height: int | None = None,
             width: int | None = None, seed: int = 0, fmt: str | None = None, steps: str | tuple[int, ...] | None = None,
             first_frame: str = "generate", progress: Any = None) -> Path:
    """Text to video: writes an .mp4 (or .gif, or a .png strip of the frames) atomically.

    The noise comes from `numpy.random.default_rng(seed)`, as in the bundle runtime
    (`generate_bundle`), so the same seed draws the same noise on both paths."""
    import numpy as np

    from ndopt.media import write_video

    V.check_text(prompt, "--prompt")
    fmt = V.check_output_file(out, "--out", fmt)
    pipeline = generation_pipeline(model, frames=frames, height=height, width=width, steps=steps, seed=seed,
                                   first_frame=first_frame)
    with torch.no_grad(), threads.for_pipeline(pipeline):
        latents = pipeline.sampler.sample(pipeline, [prompt], generator=np.random.default_rng(seed), progress=progress)
        video = pipeline.sampler.decode(pipeline, latents)
    return write_video(Path(out), video_frames(video), fmt=fmt)


def generate_bundle(bundle: str | Path, prompt: str, out: str | Path, *, seed: int = 0, provider: str | None = None,
                    fmt: str | None = None, progress: Any = None) -> tuple[Path, str]:
    """Text to video with a lowered bundle's runtime (onnxruntime; QNN on the device): (video path, provider).

    The runtime is the bundle's target's (`run_bundle`), found through the target registry from the
    manifest's `target.name` (the core imports no target, STYLE rule 1)."""
    from ndopt.media import write_video
    from ndopt.target import get_target

    V.check_text(prompt, "--prompt")
    fmt = V.check_output_file(out, "--out", fmt)
    bundle = Path(bundle)
    path = bundle / "manifest.json"
    if not path.is_file():
        raise NdoptError(f"--bundle {bundle}: no manifest.json; a bundle is RUN/bundles/<target>/ of `ndopt run`")
    try:
        record = json.loads(path.read_text()).get("target") or {}
        name, target_file = record.get("name"), record.get("file")
    except (ValueError, AttributeError) as e:
        raise NdoptError(f"{path}: not a bundle manifest ({e}); lower the pipeline again") from None
    if not name:
        raise NdoptError(f"{path}: no target.name, so no runtime to run it; lower the pipeline again with this ndopt")
    try:
        target = get_target(name)
    except NdoptError:
        if not target_file:
            raise
        target = get_target(target_file)  # lowered for a target file (--target chip.yaml)
    if not callable(getattr(target, "run_bundle", None)):
        raise NdoptError(f"--bundle {bundle}: target {name!r} offers no bundle runtime (no run_bundle)")
    result = target.run_bundle(bundle, prompt, seed=seed, provider=provider, progress=progress)
    if result.video is None:
        raise NdoptError(f"--bundle {bundle}: the bundle has no VAE decoder graph, so no video (latents only); "
                         "lower a pipeline that keeps its vae_decoder")
    path = write_video(Path(out), video_frames(torch.from_numpy(result.video)), fmt=fmt)
    return path, str(result.provider)
