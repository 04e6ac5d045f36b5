"""Step distillation (Neodragon, Pyramidal DMD): a guidance-free student for a few-step schedule.

Seed, "Pyramidal DMD Step-Distillation" (eq. 6-10): a student DiT, initialised from the teacher's
weights, learns a k-step schedule per stage (`steps`, default 1-1-1, what Neodragon ships) by
distribution matching: the frozen teacher with classifier-free guidance is the real score, a fake
score model trained on the student's outputs the other, plus the seed's Cauchy loss on the data
(`ndopt.train.step_objectives`). The student then needs no guidance: one DiT call per step, k per
stage. Beyond the seed, off by default: DMD's paired ODE regression (`ode_weight`), a guidance-
distillation warm start (`guidance_steps`), the teacher's own samples as data (`clean: teacher`), an
EMA of the student (`ema_decay`) and a trajectory-distillation polish through the whole sampler
(`trajectory_steps`). Upstream Neodragon ships the inference side only (its 1-1-1 student runs without
CFG), so the hyperparameters the seed does not give are ours; measured figures, and the recipes of
the bundled students: bench/STEP_DISTILLATION.md.

A run writes `student.safetensors` in the frontend's student format (the teacher's weight
fingerprint, the steps, the config); `student_weights` loads such a file, or a student the frontend
bundles by name, instead of training, refusing another teacher's or other steps'.

The result: the student DiT, the Schedule with the new steps and guidance scales 1.0, and the fact
`guidance_free`, so `cfg_folding` afterwards drops the unconditional branch. `plan()` applies the
schedule only. Metrics: latent PSNR of the student at the new schedule and of the undistilled
teacher at the same steps (the seed's "Undistilled" row), both against the teacher's full schedule
(same prompts, seeds and noise), DiT calls per video before and after, the loss curves.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator

from ndopt.errors import PassError
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.schedule import Schedule
from ndopt.model import interface_for, sampler_math
from ndopt.passmanager import Lossy, Pass, PassConfig, PassContext, PassResult, register
from ndopt.train.data import DataConfig
from ndopt.train.step_objectives import (
    CAUCHY_WEIGHT,
    STUDENT_EVERY,
    GuidanceDistillation,
    PyramidalDMD,
    TrajectoryDistillation,
    teacher_samples,
)
from passes.block_importance import ANALYSIS_KEY
from passes.cfg_folding import GUIDANCE_FREE

log = logging.getLogger("ndopt")


# ---- the pass -----------------------------------------------------------------------------------
class DMDTraining(PassConfig):
    """The DMD run (ndopt.train). The seed publishes none of these; DMD2's (Yin et al. 2024) two
    time-scale rule (fake model updated more often) is the seed's alternation."""

    steps: int = Field(3000, ge=0, description="optimizer steps, student and fake model together (1 in "
                                               "`student_every` is the student's)")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    fake_lr_multiplier: float = Field(1.0, gt=0, description="the fake score model's learning rate, times `lr`")
    # one third per pyramid stage (upstream's sample_ratios [1, 1, 1])
    batch_size: int = Field(12, ge=1, description="latents per step, split over the pyramid stages")
    warmup_steps: int = Field(0, description="linear learning-rate warm-up steps")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="learning rate after the warm-up")
    grad_clip: float | None = Field(1.0, description="gradient norm clip (null: none)")
    student_every: int = Field(STUDENT_EVERY, ge=2, description="one student update every this many steps, the "
                                                                "fake model's the others (seed: 1 in 3)")
    cauchy_weight: float = Field(CAUCHY_WEIGHT, ge=0, description="weight of the supervised Cauchy loss on the "
                                                                  "data's latents (seed: 0.5)")
    dmd_weight: float = Field(1.0, ge=0, description="weight of the seed's distribution-matching term (0: no "
                                                     "fake model)")
    ode_weight: float = Field(0.0, ge=0, description="weight of DMD's paired regression onto the teacher's ODE "
                                                     "from the same noise (beyond the seed)")
    checkpoint_every: int = Field(100, description="steps between resumable checkpoints")
    # beyond the seed: a guidance-distillation warm start (GuidanceDistillation) before DMD, its steps and lr
    guidance_steps: int = Field(0, ge=0, description="steps of a guidance-distillation warm start before DMD "
                                                     "(0: none)")
    guidance_lr: float = Field(1e-4, gt=0, description="learning rate of that warm start")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="the student's weights as an exponential moving "
                                                          "average with this decay (0: off)")
    # beyond the seed: a trajectory-distillation polish (TrajectoryDistillation) after DMD, on teacher samples
    trajectory_steps: int = Field(0, ge=0, description="steps of a trajectory-distillation polish on teacher "
                                                       "samples after DMD (0: none)")
    trajectory_lr: float = Field(2e-5, gt=0, description="learning rate of that polish")
    # teacher samples to distil on (None: the data's clip count), of the data's first n captions: beyond
    # `data.clips`, procedural data draws new scenes (more distinct captions), a folder repeats its own
    trajectory_clips: int | None = Field(None, ge=1, description="teacher samples the polish distils on, of the "
                                                                 "data's first n captions (null: `data.clips`)")
    trajectory_latent_frames: int | None = Field(None, ge=1, description="their latent frames (null: the "
                                                                         "data's)")
    # their captions: the training data's distribution, or (procedural data) every (colour, shape) pair of
    # its vocabulary, the ones its training clips hold out included: the student copies the teacher on its
    # whole prompt space, and only the teacher's samples of those prompts are seen, no clip of them
    trajectory_prompts: Literal["data", "prompt_space"] = Field(
        "data", description="their captions: the data's, or (procedural data) every (colour, shape) pair of "
                            "its vocabulary, held-out pairs included")


@register
class StepDistillation(Pass):
    """Pyramidal DMD: a guidance-free student DiT for a k-k-k schedule (seed: 1-1-1 shipped)."""

    name = "step_distillation"
    fidelity = Lossy(metric="latent_psnr", budget_db=10.0, frame_budget_db=8.0)  # a 1-step student vs the 20-step teacher
    provides = (GUIDANCE_FREE,)
    invalidates = (ANALYSIS_KEY,)  # importance scores describe the teacher's blocks

    class Config(PassConfig):
        # Neodragon's shipped 1-1-1 schedule (a step count per pyramid stage)
        steps: list[Annotated[int, Field(ge=1, le=1000)]] = Field(
            default_factory=lambda: [1, 1, 1], min_length=1,
            description="the student's sampling steps per pyramid stage, first frame")
        video_steps: list[Annotated[int, Field(ge=1, le=1000)]] | None = Field(
            None, description="its steps per pyramid stage for later frames (null: as steps)")
        train: DMDTraining = Field(default_factory=DMDTraining, description="the Pyramidal DMD training run")
        data: DataConfig = Field(default_factory=DataConfig, description="the training clips")
        # what the student's inputs and Cauchy targets are made of: the data's latents (seed), or the
        # teacher's own samples of the data's captions (its full schedule, with CFG; see teacher_samples)
        clean: Literal["data", "teacher"] = Field(
            "data", description="the student's inputs and Cauchy targets: the data's latents, or the teacher's "
                                "own samples of the data's captions")
        # a trained student (the `student.safetensors` a run of this pass writes, or a bundled one) instead
        # of training: its teacher fingerprint and steps must match this pipeline and these steps; a
        # bare name is a student the frontend bundles (`pyramid-flow-tiny-student-1-1-1`)
        student_weights: Path | None = Field(
            None, description="a trained student's weights (a file, or a bundled name such as "
                              "`pyramid-flow-tiny-student-1-1-1`) instead of training")
        evaluate: bool = Field(True, description="latent PSNR vs the teacher's full schedule, of the student and "
                                                 "of the undistilled DiT at its steps")
        evaluate_latent_frames: int = Field(2, ge=1, description="latent frames of that evaluation (the recipe "
                                                                 "probe's default)")
        evaluate_seeds: int = Field(1, ge=1, description="noise draws of the probe's prompts (the figure is their "
                                                         "mean)")
        reference_steps: list[int] | None = Field(None, description="the teacher schedule compared with (null: its "
                                                                    "own)")

        @field_validator("steps", "video_steps", "reference_steps")
        @classmethod
        def _positive(cls, v: list[int] | None) -> list[int] | None:
            if v is not None and (not v or any(k < 1 for k in v)):
                raise ValueError(f"{v}: give at least one step per pyramid stage")
            return v

    def target_schedule(self, pipeline: Pipeline) -> Schedule:
        """The teacher's schedule with the student's steps and guidance scales 1.0."""
        sch = pipeline.schedule
        steps = tuple(self.config.steps)
        video = tuple(self.config.video_steps) if self.config.video_steps is not None else steps
        if len(steps) != len(sch.stages) or len(video) != len(sch.stages):
            raise PassError(f"step_distillation: steps {list(steps)} / video_steps {list(video)}: the schedule has "
                            f"{len(sch.stages)} pyramid stages; give one step count per stage")
        return replace(sch.with_steps(steps, video), guidance=replace(sch.guidance, scale=1.0, video_scale=1.0))

    def _check(self, pipeline: Pipeline) -> None:
        if GUIDANCE_FREE in pipeline.facts:
            raise PassError("step_distillation: this DiT is already a guidance-free (step-distilled) student; "
                            "distil from the original teacher instead (one step_distillation per recipe)")
        if pipeline.schedule.folded or sampler_math(pipeline).folded_time(pipeline.by_role("dit")[0]):
            raise PassError("step_distillation: the schedule is already folded (schedule_folding ran before it); "
                            "put step_distillation before cfg_folding and schedule_folding")

    def _metrics(self, before: Schedule, after: Schedule) -> dict[str, Any]:
        def fmt(sch: Schedule) -> str:
            return (f"{'-'.join(str(s.steps) for s in sch.stages)}/"
                    f"{'-'.join(str(s.video_steps) for s in sch.stages)}")

        return {"steps": f"{fmt(before)} -> {fmt(after)}",
                "guidance_scale": f"{before.guidance.scale:g}/{before.guidance.video_scale:g} -> 1/1",
                "dit_calls_per_video": f"{before.dit_calls_per_video} -> {after.dit_calls_per_video}",
                "dit_calls_per_video_guidance_free": after.with_guidance("none").dit_calls_per_video}

    def plan(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        self._check(pipeline)
        after = self.target_schedule(pipeline)
        return PassResult(pipeline.replace(schedule=after), modified=True, metrics=self._metrics(pipeline.schedule,
                                                                                                 after))

    def run(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        if pipeline.is_meta or ctx.plan:
            return self.plan(pipeline, ctx)
        self._check(pipeline)
        model = interface_for(pipeline).require("load_student", "save_student", user=self.name)
        after = self.target_schedule(pipeline)
        comp = pipeline.by_role("dit")[0]
        d = ctx.pass_dir
        metrics = self._metrics(pipeline.schedule, after)
        if self.config.student_weights is not None:
            weights = model.weights_file(self.config.student_weights)
            student = model.load_student(weights, comp.module, after)
            metrics["student_weights"] = str(self.config.student_weights)
            artifacts: dict[str, Path] = {}
        else:
            student, results = distil_student(pipeline, after, self.config, d, ctx)
            result = results["dmd"]
            metrics["train_steps"] = result.steps
            metrics["resumed_from"] = result.resumed_from
            for key in ("loss_student", "loss_fake"):
                metrics[f"{key}_curve"] = [round(x, 6) for x in result.loss_curve(key)]
            if "trajectory" in results:
                metrics["trajectory_steps"] = results["trajectory"].steps
                metrics["trajectory_loss_curve"] = [round(x, 6) for x in results["trajectory"].loss_curve()]
            artifacts = {"loss_plot": d / "dmd" / "loss.png", "train_metrics": d / "dmd" / "metrics.json",
                         "student": model.save_student(d / "student.safetensors", student, comp.module, after,
                                                       self.config.model_dump(mode="json"))}
        out = pipeline.replace(schedule=after, **{comp.name: comp.with_module(student)})
        if self.config.evaluate:
            fid = evaluate(pipeline, out, self.config.evaluate_latent_frames, self.config.reference_steps,
                           self.config.evaluate_seeds)
            metrics["latent_psnr_vs_teacher"] = fid
            log.info("step_distillation: latent PSNR vs the teacher's full schedule: student %.2f dB, "
                     "undistilled teacher at the same steps %.2f dB", fid["student"], fid["undistilled"])
        return PassResult(out, modified=True, metrics=metrics, artifacts=artifacts)


def distil_student(pipeline: Pipeline, target: Schedule, cfg: StepDistillation.Config, pass_dir: Path,
                   ctx: PassContext) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Student and fake model from the teacher's weights, trained by Pyramidal DMD (resumable), with the
    optional warm start before it and trajectory polish after it; the runs' results by name."""
    from ndopt.train.engine import TrainConfig, Trainer
    from ndopt.train.finetune import text_len_for, training_captions, training_latents
    from ndopt.train.objectives import PromptEncoder

    teacher = pipeline.by_role("dit")[0].module
    smp = pipeline.sampler
    suffix, negative = getattr(smp, "prompt_suffix", ""), getattr(smp, "negative_prompt", "")
    spec = cfg.data.seeded(ctx.seed)
    data = training_latents(pipeline, spec, pass_dir / "cache")
    if cfg.clean == "teacher":
        data = teacher_samples(pipeline, data.captions, tuple(data.latents.shape[1:]), ctx.seed_for(704),
                               pass_dir / "cache")
    text_len = text_len_for(pipeline, [c + suffix for c in data.captions] + [negative])
    te = PromptEncoder(pipeline.by_role("text_encoder")[0].module, text_len)
    student, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
    t = cfg.train
    frozen = {"teacher": teacher, "text_encoder": te}
    common = {"batch_size": t.batch_size, "seed": ctx.seed, "warmup_steps": t.warmup_steps,
              "lr_schedule": t.lr_schedule, "grad_clip": t.grad_clip, "checkpoint_every": t.checkpoint_every,
              "ema_decay": t.ema_decay}
    if t.guidance_steps:
        Trainer(trainable={"student": student}, frozen=frozen,
                objective=GuidanceDistillation(pipeline.schedule, negative_prompt=negative, prompt_suffix=suffix),
                data=data, config=TrainConfig(steps=t.guidance_steps, lr=t.guidance_lr, **common,
                                              log_every=max(1, min(10, t.guidance_steps // 10))),
                run_dir=pass_dir / "guidance", device=ctx.device, name="guidance_distillation").fit()
    # without the DMD term there is no fake model to train: every step is the student's
    every = t.student_every if t.dmd_weight else 1
    trainable = {"student": student, "fake": fake} if t.dmd_weight else {"student": student}
    objective = PyramidalDMD(pipeline.schedule, tuple(s.steps for s in target.stages),
                             tuple(s.video_steps for s in target.stages), negative_prompt=negative,
                             prompt_suffix=suffix, cauchy_weight=t.cauchy_weight, student_every=every,
                             dmd_weight=t.dmd_weight, ode_weight=t.ode_weight,
                             uses=(*trainable, "teacher", "text_encoder"))
    config = TrainConfig(steps=t.steps, lr=t.lr, lr_multipliers={"fake": t.fake_lr_multiplier} if t.dmd_weight else {},
                         **common, log_every=max(1, min(10 * every, t.steps // 10)))
    results = {"dmd": Trainer(trainable=trainable, frozen=frozen, objective=objective, data=data, config=config,
                              run_dir=pass_dir / "dmd", device=ctx.device, name="pyramidal_dmd").fit()}
    if t.trajectory_steps:
        n = t.trajectory_clips or len(data)
        frames = t.trajectory_latent_frames or int(data.latents.shape[2])
        bank = teacher_samples(pipeline, training_captions(spec, n, held_out=t.trajectory_prompts == "prompt_space"),
                               (*data.latents.shape[1:2], frames, *data.latents.shape[3:]), ctx.seed_for(704),
                               pass_dir / "cache")
        spatial = sampler_math(pipeline).spatial_factor
        own = pipeline.replace(schedule=target.with_guidance("none").with_frames(
            frames, *(int(x) * spatial for x in data.latents.shape[3:])))
        polish = Trainer(trainable={"student": student}, frozen={},
                         objective=TrajectoryDistillation(own), data=bank,
                         config=TrainConfig(steps=t.trajectory_steps, lr=t.trajectory_lr, **common,
                                            log_every=max(1, min(10, t.trajectory_steps // 10))),
                         run_dir=pass_dir / "trajectory", device=ctx.device, name="trajectory_distillation").fit()
        results["trajectory"] = polish
    return student.eval().requires_grad_(False), results


def evaluate(teacher: Pipeline, student: Pipeline, latent_frames: int, reference_steps: list[int] | None,
             seeds: int = 1) -> dict[str, float]:
    """Latent PSNR vs the teacher's full schedule (same prompts, seeds, noise): the student, and the
    undistilled teacher sampled with the student's steps and its own CFG (the seed's "Undistilled").

    The probe's prompts with `seeds` noise draws (probe seeds 0..seeds-1); the figure is the mean of
    the per-draw PSNRs, and the spread (min) is reported beside it."""
    runs = evaluate_draws(teacher, student, latent_frames, reference_steps, seeds)
    out = {k: round(sum(v) / len(v), 3) for k, v in runs.items()}
    if seeds > 1:
        out.update({f"{k}_min": round(min(v), 3) for k, v in runs.items()})
    return out


def evaluate_draws(teacher: Pipeline, student: Pipeline, latent_frames: int, reference_steps: list[int] | None,
                   seeds: int, advance: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """`evaluate`'s per-draw figures: {"student": [...], "undistilled": [...]}, one latent PSNR per noise
    draw (probe seed), paired: draw i of both is compared with the same reference. `advance` is called
    after each draw (a progress bar's)."""
    from ndopt.eval.probe import FidelityProbe, ProbeSettings

    sch = teacher.schedule
    if reference_steps is not None:
        sch = sch.with_steps(tuple(reference_steps))
    few = student.schedule
    undistilled = teacher.replace(schedule=sch.with_steps(tuple(s.steps for s in few.stages),
                                                          tuple(s.video_steps for s in few.stages)))
    fast = student.replace(schedule=few.with_guidance("none"))  # scale 1: the same numbers, half the calls
    runs: dict[str, list[float]] = {"student": [], "undistilled": []}
    for seed in range(seeds):
        probe = FidelityProbe(ProbeSettings(latent_frames=latent_frames, seed=seed))
        ref = probe.outputs(teacher.replace(schedule=sch))
        runs["student"].append(probe.compare(probe.outputs(fast), ref)["latent_psnr"])
        runs["undistilled"].append(probe.compare(probe.outputs(undistilled), ref)["latent_psnr"])
        if advance is not None:
            advance()
    return runs
