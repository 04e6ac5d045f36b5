"""Step distillation (Neodragon, Pyramidal DMD): a guidance-free student for a few-step schedule.

Seed, "Pyramidal DMD Step-Distillation" (eq. 6-10). Three DiTs, all from the teacher's weights:

- the student D_theta, trained for a k-step schedule per stage (`steps`, default 1-1-1). At stage i
  its input z_sigma is the pyramidal flow-matching point of a data latent (eq. 6-7) at a local
  level r, global sigma = (1 - r) s_end + r s_start, and its clean-latent prediction is one Euler
  step of its velocity down to sigma = 0:  z_theta = z_sigma - sigma / (s_start - s_end) D_theta.
  The sampler's Euler step with the same velocity (local r -> r', global sigma -> sigma') lands on
  (1 - sigma') z_theta + sigma' eps_hat, the straight line through z_sigma and z_theta, so the
  prediction trained here is exactly what each sampler step uses (and at the last stage, where
  s_end = 0, a 1-step stage lands on z_theta itself).
- the fake score model D_phi, trained with the pyramidal flow-matching objective on the student's
  outputs: y_start, y_end and z_tau of eq. 8-10, tau_local ~ U(0, 1), target y_start - y_end.
- the real score: the frozen teacher with classifier-free guidance at the pipeline's own scales
  (Pyramid-Flow's 7 for the first frame, 5 for later ones) and the sampler's negative prompt.

The student's loss is the DMD loss, whose gradient is (D(z_tau) - D_phi(z_tau)) dz_theta/dtheta
weighted per sample by 1 / mean|D(z_tau) - (y_start - y_end)| (seed; Yin et al. 2024's
1 / mean|x - x_real| written in velocity units: the two are the same weight), plus 0.5 times the
Cauchy loss log(1 + ||z_theta - Down(z, 2^i)||_2^2) (squared L2 norm per sample, as in the seed).
Updates alternate: one student update per two fake-model updates (`student_every` = 3 steps; one
AdamW holds both, and the module that does not learn on a step gets no gradient, so AdamW skips it).

"Four fixed local noise levels": the student only ever runs at the sampler's local sigmas of its
target schedule, linspace(1, 1/1000, k) per stage (upstream `get_stage_sigmas`), so it is trained
at exactly those k levels; the seed's four are those of its 4-4-4 schedule (Fig. 5), while 1-1-1
trains at the single level r = 1 (the stage's start point). The upstream Neodragon code ships the
inference side only (`pyramid_scheduler.py`: the 1-1-1 student runs without CFG); no DMD training
code is published, so the hyperparameters below that the seed does not give are ours.

Beyond the seed (off by default): `ode_weight` adds DMD's paired regression (Yin et al. 2024 regress
the student onto the teacher's ODE output from the same noise). Here, at each student input, the
frozen guided teacher integrates on its own schedule's grid to the student's next level, and the
student's one Euler move is pulled onto that point with the same Cauchy form (`PyramidalDMD.ode_target`).
The seed's terms match distributions, not trajectories; this term makes the k-step student follow the
teacher's full-schedule trajectory from the same noise, which is what the latent-PSNR figure measures.
It costs the teacher's full-schedule calls (with CFG) per student update.

Also beyond the seed (off by default):
- `guidance_steps`: a guidance-distillation warm start (Meng et al. 2023, stage 1; GuidanceDistillation)
  before DMD. The student, called once, regresses the teacher's guided velocity at flow-matching points
  of the data. The seed's student starts from the teacher's weights, that is from its *unguided*
  velocity, and DMD alone must then learn the whole CFG correction.
- `clean: teacher`: the student's inputs and Cauchy targets are built from the teacher's own samples
  of the data's captions instead of the data (`teacher_samples`), so they come from the distribution
  the latent-PSNR figure compares with.
- `ema_decay`: the student's weights are an exponential moving average.
- `trajectory_steps`: a trajectory-distillation polish after DMD (Luhman & Luhman 2021, through the whole
  pyramid; TrajectoryDistillation). The student runs its own k-step sampler from the noise of a teacher
  sample (`teacher_samples`: full schedule, CFG, one generator per sample) and regresses that sample,
  backpropagating through every step, renoise and stage. The per-step terms pull each step onto the
  teacher's path by itself, from noised data; this one trains on the states the student meets when it
  samples and lets its k steps share out their errors, and it is what the latent-PSNR figure measures.
With `dmd_weight` 0 there is no fake model: every step is the student's (pure trajectory distillation).

Tiny teacher (CFG 5), latent PSNR vs its 20-20-20 schedule over 4 noise draws (worst in brackets):
- 1-1-1: warm start (2000 steps, batch 12, lr 1e-4) then 600 steps of DMD + Cauchy + ode (lr 5e-5):
  27.10 (26.60) against the undistilled 21.26 (20.36), prompt following 10/16; without the DMD and
  Cauchy terms (400 steps) 27.06 and 11/16. The seed's DMD alone: 24.3. This is the bundled student
  (recipes/tiny-student.yaml; `student_weights` loads it).
- 4-4-4: the warm start alone 29.0-30.0; then the ode term alone (lr 5e-5, 1200 student updates)
  30.60 (28.97), against the guided 4-4-4 sampler's 31.6 (28.7): a guidance-free student of the
  teacher's size keeps ~0.04 of the 0.24 guided-velocity MSE that the unguided teacher has (train and
  held-out clips alike: not overfitting), and the teacher's 4-step guided ODE leaves little
  discretization error to remove.
  Trajectory distillation from the warm start (lr 5e-5, batch 12; mean over 4 draws after 200, 300,
  ... steps): on 512 samples of the data's 206 captions 31.00, 31.10, 31.56, 30.28, 31.37 (600); on
  1024 distinct captions 29.80 (200), 30.89 (400), 31.27 (600), 30.78 (800): the recipe, ~31.3; a
  log-MSE loss (the figure's mean of dB) 30.75 ... 31.57 (500), 31.10 (600); with the guidance loss
  beside it (weight 1) 30.65 (500); after 300 steps of DMD + ode 30.76; weight averages of one run's
  checkpoints 31.25-31.45. The training samples reach 38-39 dB while the probe stays at ~31.3 and
  jumps +-0.6 between checkpoints 100 steps apart: no single run has beaten the guided 4-4-4 sampler
  (31.63) on the mean of the probe. The weight average of 9 checkpoints of three of these runs (same
  warm start) does, 31.67, but not in the worst draw (28.48 vs 28.71); it mixes runs on other data and
  losses, picked on the probe. The soup a recipe can make, 3 runs of the recipe's trajectory stage that
  differ in data order only (seeds 0, 1, 2: 31.27, 30.85, 31.12 alone), does not: the mean of their final
  weights 31.24 (28.59), of their checkpoints at 400, 500 and 600 steps 31.17 (28.32). A cosine decay of
  the trajectory lr to 0 over the 600 steps: 30.99 (27.38). The bank's captions were the training
  data's, which never hold the 6 held-out (colour, shape) pairs, while the probe's second prompt is one
  (a yellow square); with `trajectory_prompts: prompt_space` (1024 scenes over all pairs; only the
  teacher's samples of them, no clip) the same recipe gives 31.73 (30.69) > 31.63 (28.71): the bundled
  4-4-4 student (recipes/tiny-student-4-4-4.yaml). On a larger probe (32 draws, paired;
  bench/bench_student_fidelity.py) it holds: 31.02 (27.42) vs 30.21 (24.66), +0.81 dB +- 0.50 (s.e.),
  19/32 draws won; the 1-1-1 student there: +4.92 dB +- 0.32, 32/32.

A run writes `student.safetensors` (with the teacher's weight fingerprint, the steps and the config);
`student_weights` loads such a file instead of training, refusing another teacher's or other steps'.

The result: the student DiT, the Schedule with the new steps and guidance scales 1.0, and the fact
`guidance_free`, so `cfg_folding` afterwards drops the unconditional branch. `plan()` applies the
schedule only. Metrics: latent PSNR of the student at the new schedule and of the undistilled
teacher at the same steps (the seed's "Undistilled" row), both against the teacher's full
schedule (same prompts, seeds and noise), DiT calls per video before and after, the loss curves.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ndopt.errors import PassError
from ndopt.eval.metrics import psnr
from ndopt.frontends.pyramid_flow.sampler import VAE_SPATIAL, folded_time
from ndopt.frontends.pyramid_flow.schedule import stage_local_sigmas
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.schedule import Schedule, Stage
from ndopt.passmanager import Lossy, Pass, PassConfig, PassContext, PassResult, register
from ndopt.train.data import Batch, Example
from ndopt.train.objectives import (
    TRAIN_STEPS,
    LossOutput,
    StepInfo,
    TrainModules,
    dit_kwargs,
    encode_prompts,
    latent_pyramid,
    pyramid_flow_inputs,
    resize,
    stage_grid,
)
from passes.block_importance import ANALYSIS_KEY, pass_index
from passes.block_pruning import DataConfig
from passes.cfg_folding import GUIDANCE_FREE

log = logging.getLogger("ndopt")

STUDENT_EVERY = 3      # seed: one update of theta per two updates of phi
CAUCHY_WEIGHT = 0.5    # seed: the supervised Cauchy (teacher) loss, weight 0.5


# ---- the seed's quantities ----------------------------------------------------------------------
def student_levels(k: int) -> list[float]:
    """The k fixed local noise levels of a k-step stage: the sampler's local sigmas (upstream)."""
    return stage_local_sigmas(k)[:-1]


def grid_index(ratio: Tensor) -> Tensor:
    """Upstream's 1000-point stage grid index of a local ratio (1 -> 0, 1/1000 -> 999)."""
    return ((1.0 - ratio.double()) * TRAIN_STEPS).round().long().clamp(0, TRAIN_STEPS - 1)


def global_sigma(stage: Stage, ratio: Tensor) -> Tensor:
    """sigma = (1 - r) s_end + r s_start (seed)."""
    return (1 - ratio) * stage.sigma_end + ratio * stage.sigma_start


def is_student_step(step: int, every: int = STUDENT_EVERY) -> bool:
    """Steps 0, 1 train the fake model, step 2 the student, and so on."""
    return step % every == every - 1


def stage_endpoints(z_theta: Tensor, eps: Tensor, stage: Stage, first_stage: bool) -> tuple[Tensor, Tensor]:
    """(y_start, y_end) of a student prediction: seed eq. 8 and 9."""
    if first_stage:  # s_start = 1: pure noise (and the lowest stage may not halve)
        y_start = eps
    else:
        h, w = z_theta.shape[-2:]
        up_down = resize(resize(z_theta, h // 2, w // 2, "bilinear"), h, w, "nearest")
        y_start = (1 - stage.sigma_start) * up_down + stage.sigma_start * eps
    y_end = (1 - stage.sigma_end) * z_theta + stage.sigma_end * eps
    return y_start, y_end


def sample_weight(real: Tensor, flow: Tensor) -> Tensor:
    """The sample-specific weight 1 / mean |D(z_tau) - (y_start - y_end)| (seed; Yin et al. 2024)."""
    return 1.0 / (real - flow).abs().flatten(1).mean(1).clamp(min=1e-6).view(-1, *[1] * (real.dim() - 1))


def cauchy_loss(z_theta: Tensor, clean: Tensor) -> Tensor:
    """Per sample log(1 + ||z_theta - Down(z, 2^i)||_2^2) (seed)."""
    return torch.log1p((z_theta - clean).pow(2).flatten(1).sum(1))


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) ^ 0x2545F4914F6CDD1D) & ((1 << 63) - 1))


# ---- the objective ------------------------------------------------------------------------------
@dataclass
class PyramidalDMD:
    """The alternating student / fake-model objective (see the module docstring).

    `schedule` is the teacher's (stages, guidance scales); `steps` / `video_steps` the student's
    target steps per stage. On a student step the fake and real scores run under no_grad; on a
    fake step the student's sample does."""

    schedule: Schedule
    steps: tuple[int, ...]
    video_steps: tuple[int, ...]
    negative_prompt: str = ""
    prompt_suffix: str = ""
    cauchy_weight: float = CAUCHY_WEIGHT
    student_every: int = STUDENT_EVERY
    dmd_weight: float = 1.0
    ode_weight: float = 0.0
    corrupt_ratio: float = 1 / 3  # upstream: history noise level ~ U(0, 1/3)
    uses: tuple[str, ...] = ("student", "fake", "teacher", "text_encoder")

    def __call__(self, modules: TrainModules, batch: Batch, info: StepInfo) -> LossOutput:
        if batch.latents is None:
            raise PassError("step_distillation needs latents: wrap the dataset in a LatentCache")
        student_turn = is_student_step(info.step, self.student_every)
        captions = [c + self.prompt_suffix for c in batch.captions]
        cond = encode_prompts(modules, captions, trainable=False)
        uncond = encode_prompts(modules, [self.negative_prompt] * len(captions), trainable=False) \
            if student_turn else None
        pyramid = latent_pyramid(batch.latents, len(self.schedule.stages))
        fpu = self.schedule.temporal.frame_per_unit
        losses, metrics = [], {}
        for inp in pyramid_flow_inputs(batch.latents, batch, self.schedule, info, corrupt_ratio=self.corrupt_ratio):
            s, stage, rows = inp.stage, self.schedule.stages[inp.stage], inp.rows
            gens = [_seeded(batch.seeds[k]) for k in rows]
            dev = inp.target.device

            def call(name: str, sample: Tensor, t: Tensor, c: tuple[Tensor, ...], inp=inp, rows=rows,
                     dev=dev) -> Tensor:
                return modules[name](sample=[*inp.sample[:-1], sample], encoder_hidden_states=c[0][rows],
                                     encoder_attention_mask=c[1][rows], pooled_projections=c[2][rows],
                                     timestep_ratio=t.to(dev, c[0].dtype)).float()

            # the student's input at one of its fixed levels: z(r) = end + r (start - end)
            levels = student_levels(self.steps[s] if inp.unit == 0 else self.video_steps[s])
            pick = [int(torch.randint(len(levels), (1,), generator=g)) for g in gens]
            r = torch.tensor([levels[i] for i in pick], dtype=torch.float32)
            r_t, t_student = stage_grid(stage, grid_index(r))
            shape = (-1, *[1] * (inp.target.dim() - 1))
            r_in = inp.ratio.view(shape).to(inp.target)
            z_sigma = inp.sample[-1] + (r_t.to(dev).view(shape) - r_in) * inp.target
            sigma = global_sigma(stage, r_t).to(dev).view(shape)
            with torch.set_grad_enabled(student_turn):
                v = call("student", z_sigma, t_student, cond)
                z_theta = z_sigma.float() - sigma / (stage.sigma_start - stage.sigma_end) * v
            # the student's sample, renoised within the stage (eq. 8-10)
            eps = torch.stack([torch.randn(z_theta.shape[1:], generator=g) for g in gens]).to(z_theta)
            y_start, y_end = stage_endpoints(z_theta.detach(), eps, stage, s == 0)
            u = torch.stack([torch.rand((), generator=g) for g in gens])
            tau, t_tau = stage_grid(stage, (u * TRAIN_STEPS).long().clamp(0, TRAIN_STEPS - 1))
            tau = tau.to(dev).view(shape)
            z_tau = (1 - tau) * y_end + tau * y_start
            flow = y_start - y_end
            if not student_turn:  # fake model: pyramidal flow matching on the student's samples
                err = (call("fake", z_tau, t_tau, cond) - flow).pow(2).flatten(1).mean(1)
                losses.append(err)
                metrics[f"loss_fake_stage{s}"] = float(err.detach().mean())
                continue
            if self.dmd_weight:
                with torch.no_grad():
                    fake = call("fake", z_tau, t_tau, cond)
                    real = self._real_score(call, z_tau, t_tau, cond, uncond, inp.unit)
                    grad = (real - fake) * sample_weight(real, flow)
                dmd = 0.5 * (z_theta - (z_theta - grad).detach()).pow(2).flatten(1).mean(1)
            else:  # no distribution matching: no fake or real score to compute
                dmd = z_theta.new_zeros(z_theta.shape[0])
            lo, hi = (0, 1) if inp.unit == 0 else (1 + (inp.unit - 1) * fpu, 1 + inp.unit * fpu)
            cauchy = cauchy_loss(z_theta, pyramid[s][rows, :, lo:hi].float())
            loss = self.dmd_weight * dmd + self.cauchy_weight * cauchy
            if self.ode_weight:  # DMD's paired regression on the teacher's guided ODE (see ode_target)
                nxt = torch.tensor([[*levels, 0.0][i + 1] for i in pick], dtype=torch.float32)  # the sampler's
                with torch.no_grad():
                    target = self.ode_target(call, z_sigma, r_t, nxt, stage, cond, uncond, inp.unit,
                                             stage.steps if inp.unit == 0 else stage.video_steps)
                ode = cauchy_loss(z_theta, target)
                loss = loss + self.ode_weight * ode
                metrics[f"loss_ode_stage{s}"] = float(ode.detach().mean())
            losses.append(loss)
            metrics[f"loss_dmd_stage{s}"] = float(dmd.detach().mean())
            metrics[f"loss_cauchy_stage{s}"] = float(cauchy.detach().mean())
        loss = torch.cat(losses).mean()
        key = "loss_student" if student_turn else "loss_fake"
        return LossOutput(loss, {"loss": float(loss.detach()), key: float(loss.detach()), **metrics})

    def ode_target(self, call: Any, z: Tensor, ratio: Tensor, next_ratio: Tensor, stage: Stage, cond: tuple,
                   uncond: tuple, unit: int, teacher_steps: int) -> Tensor:
        """The clean latent z*_theta whose one-step Euler move lands where the teacher's guided ODE does.

        Per row, the frozen teacher (with CFG, at the sampler's scale) integrates z from the row's local
        level r to the student's next level r' with Euler steps on its own schedule's grid
        (`teacher_steps` per stage: the sampler's local sigmas inside (r', r), plus r and r' themselves;
        a 1-step student at r = 1 therefore gets exactly the teacher's full stage solve). The student
        velocity that lands on the same point is v* = (z - z_teacher(r')) / (r - r'), and
        z*_theta = z - sigma / (s_start - s_end) v*, the quantity the student predicts; the loss is the
        seed's Cauchy form (MSE measured worse at 4-4-4, 500 steps, 4 draws: 27.0 dB, worst draw 24.4,
        vs 27.4 and 26.2)."""
        shape = (-1, *[1] * (z.dim() - 1))
        grid = stage_local_sigmas(teacher_steps)
        paths = []
        for r0, r1 in zip(ratio.tolist(), next_ratio.tolist()):
            paths.append([r0, *[g for g in grid if r1 < g < r0], r1])
        n = max(len(q) for q in paths)
        paths = torch.tensor([q + [q[-1]] * (n - len(q)) for q in paths], dtype=torch.float64)  # pad: dt = 0
        moved = torch.zeros_like(z, dtype=torch.float32)  # x - z, summed apart from z (no cancellation)
        for m in range(n - 1):
            r0, r1 = paths[:, m], paths[:, m + 1]
            _, t = stage_grid(stage, (1 - r0) * TRAIN_STEPS)
            v = self._real_score(call, (z.float() + moved).to(z.dtype), t, cond, uncond, unit)
            moved = moved + (r1 - r0).to(moved).view(shape) * v
        v_star = -moved / (ratio - next_ratio).to(moved).view(shape)
        sigma = global_sigma(stage, ratio).to(moved).view(shape)
        return z.float() - sigma / (stage.sigma_start - stage.sigma_end) * v_star

    def _real_score(self, call: Any, z: Tensor, t: Tensor, cond: tuple, uncond: tuple, unit: int) -> Tensor:
        return guided_velocity(self.schedule, unit, lambda c: call("teacher", z, t, c), cond, uncond)


def guided_velocity(schedule: Schedule, unit: int, teacher: Any, cond: tuple, uncond: tuple) -> Tensor:
    """The teacher's guided velocity D_u + g (D_c - D_u) at the sampler's scale for this frame;
    `teacher(context)` is its velocity under one context (the unconditional call is skipped at g = 1)."""
    g = schedule.guidance
    scale = g.scale if unit == 0 else g.video_scale
    v_c = teacher(cond)
    if scale == 1.0:
        return v_c
    v_u = teacher(uncond)
    return v_u + scale * (v_c - v_u)


@dataclass
class GuidanceDistillation:
    """Guidance distillation (Meng et al. 2023, stage 1), the warm start `guidance_steps`: the student,
    called once with the prompt, regresses the frozen teacher's guided velocity D_u + g (D_c - D_u)
    (the sampler's scale for the frame, its negative prompt) at pyramidal flow-matching points of the
    batch's latents (MSE per sample). One call of the student then does what two of the teacher do."""

    schedule: Schedule
    negative_prompt: str = ""
    prompt_suffix: str = ""
    corrupt_ratio: float = 1 / 3
    uses: tuple[str, ...] = ("student", "teacher", "text_encoder")

    def __call__(self, modules: TrainModules, batch: Batch, info: StepInfo) -> LossOutput:
        if batch.latents is None:
            raise PassError("step_distillation needs latents: wrap the dataset in a LatentCache")
        cond = encode_prompts(modules, [c + self.prompt_suffix for c in batch.captions], trainable=False)
        uncond = encode_prompts(modules, [self.negative_prompt] * len(batch), trainable=False)
        errs, metrics = [], {}
        for inp in pyramid_flow_inputs(batch.latents, batch, self.schedule, info, corrupt_ratio=self.corrupt_ratio):
            with torch.no_grad():
                target = guided_velocity(self.schedule, inp.unit,
                                         lambda c, inp=inp: modules["teacher"](**dit_kwargs(inp, c)).float(), cond, uncond)
            err = (modules["student"](**dit_kwargs(inp, cond)).float() - target).pow(2).flatten(1).mean(1)
            errs.append(err)
            metrics[f"loss_stage{inp.stage}"] = float(err.detach().mean())
        loss = torch.cat(errs).mean()
        return LossOutput(loss, {"loss": float(loss.detach()), **metrics})


class _Through(torch.nn.Module):
    """The trainer's raw module (its config and parameters, for the sampler) called through the trainer's
    wrapper (so DDP / FSDP see the forward and synchronise the gradients)."""

    def __init__(self, raw: torch.nn.Module, wrapped: Any) -> None:
        super().__init__()
        self.raw = raw
        self.config = raw.config
        self._wrapped = (wrapped,)  # a tuple: not registered as a submodule a second time

    def forward(self, **inputs: Any) -> Any:
        return self._wrapped[0](**inputs)


@dataclass
class TrajectoryDistillation:
    """Trajectory distillation of the whole sampler (Luhman & Luhman 2021, adapted to the pyramid), the
    polish stage `trajectory_steps`: from the noise a teacher sample was drawn with (`teacher_samples`:
    the teacher's full schedule, CFG and negative prompt), the student runs the pyramidal sampler on its
    own k-step guidance-free schedule (every stage, renoise and Euler step, differentiated end to end),
    and its output latent regresses the teacher's sample (MSE per sample).

    This is the quantity the issue's figure measures (latent PSNR against the teacher's full schedule from
    the same noise), on the very inputs the student meets when it samples, and the k steps of a stage may
    share out the error of each other (the per-step terms pull every step onto the teacher's path alone).
    `pipeline` is the student's: its target schedule at the bank's frames and size."""

    pipeline: Pipeline
    uses: tuple[str, ...] = ("student",)

    def __call__(self, modules: TrainModules, batch: Batch, info: StepInfo) -> LossOutput:
        if batch.latents is None or batch.noise_seeds is None:
            raise PassError("trajectory distillation needs teacher samples with their noise seeds "
                            "(teacher_samples); this batch has none")
        comp = self.pipeline.by_role("dit")[0]
        pipe = self.pipeline.replace(**{comp.name: comp.with_module(_Through(modules.raw("student"),
                                                                             modules["student"]))})
        gens = [torch.Generator().manual_seed(int(s)) for s in batch.noise_seeds]
        z = pipe.sampler.sample(pipe, list(batch.captions), generator=gens).float()
        target = batch.latents.to(z.device).float()
        if z.shape != target.shape:
            raise PassError(f"trajectory distillation: the student samples {tuple(z.shape)}, the teacher's "
                            f"samples are {tuple(target.shape)}")
        err = (z - target).pow(2).flatten(1).mean(1)
        loss = err.mean()
        return LossOutput(loss, {"loss": float(loss.detach()), "latent_psnr": psnr(z, target)})


# ---- the pass -----------------------------------------------------------------------------------
class DMDTraining(PassConfig):
    """The DMD run (ndopt.train). The seed publishes none of these; DMD2's (Yin et al. 2024) two
    time-scale rule (fake model updated more often) is the seed's alternation."""

    steps: int = Field(3000, ge=0)  # optimizer steps, student and fake together (1 in 3 is the student's)
    lr: float = Field(1e-5, gt=0)
    fake_lr_multiplier: float = Field(1.0, gt=0)
    batch_size: int = Field(12, ge=1)  # one third per pyramid stage (upstream's sample_ratios [1, 1, 1])
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = 1.0
    student_every: int = Field(STUDENT_EVERY, ge=2)
    cauchy_weight: float = Field(CAUCHY_WEIGHT, ge=0)
    dmd_weight: float = Field(1.0, ge=0)  # the seed's distribution-matching term
    ode_weight: float = Field(0.0, ge=0)  # DMD (Yin et al. 2024)'s paired regression on the teacher's ODE
    checkpoint_every: int = 100
    # beyond the seed: a guidance-distillation warm start (GuidanceDistillation) before DMD, its steps and lr
    guidance_steps: int = Field(0, ge=0)
    guidance_lr: float = Field(1e-4, gt=0)
    ema_decay: float = Field(0.0, ge=0, lt=1)  # the student's weights: an exponential moving average (0: off)
    # beyond the seed: a trajectory-distillation polish (TrajectoryDistillation) after DMD, on teacher samples
    trajectory_steps: int = Field(0, ge=0)
    trajectory_lr: float = Field(2e-5, gt=0)
    # teacher samples to distil on (None: the data's clip count), of the data's first n captions: beyond
    # `data.clips`, procedural data draws new scenes (more distinct captions), a folder repeats its own
    trajectory_clips: int | None = Field(None, ge=1)
    trajectory_latent_frames: int | None = Field(None, ge=1)  # their latent frames; None: the data's
    # their captions: the training data's distribution, or (procedural data) every (colour, shape) pair of
    # its vocabulary, the ones its training clips hold out included: the student copies the teacher on its
    # whole prompt space, and only the teacher's samples of those prompts are seen, no clip of them
    trajectory_prompts: Literal["data", "prompt_space"] = "data"


@register
class StepDistillation(Pass):
    """Pyramidal DMD: a guidance-free student DiT for a k-k-k schedule (seed: 1-1-1 shipped)."""

    name = "step_distillation"
    fidelity = Lossy(metric="latent_psnr", budget_db=10.0)  # a 1-step student vs the 20-step teacher
    provides = (GUIDANCE_FREE,)
    invalidates = (ANALYSIS_KEY,)  # importance scores describe the teacher's blocks

    class Config(PassConfig):
        # Neodragon's shipped 1-1-1 schedule (a step count per pyramid stage)
        steps: list[Annotated[int, Field(ge=1, le=1000)]] = Field(default_factory=lambda: [1, 1, 1], min_length=1)
        video_steps: list[Annotated[int, Field(ge=1, le=1000)]] | None = None  # later frames; None: as steps
        train: DMDTraining = Field(default_factory=DMDTraining)
        data: DataConfig = Field(default_factory=DataConfig)
        # what the student's inputs and Cauchy targets are made of: the data's latents (seed), or the
        # teacher's own samples of the data's captions (its full schedule, with CFG; see teacher_samples)
        clean: Literal["data", "teacher"] = "data"
        # a trained student (the `student.safetensors` a run of this pass writes, or a bundled one) instead
        # of training: its teacher fingerprint and steps must match this pipeline and these steps; a
        # bare name is a student the frontend bundles (`pyramid-flow-tiny-student-1-1-1`)
        student_weights: Path | None = None
        evaluate: bool = True  # latent PSNR vs the teacher's full schedule, student and undistilled
        evaluate_latent_frames: int = Field(2, ge=1)  # the recipe probe's default
        evaluate_seeds: int = Field(1, ge=1)  # noise draws of the probe's prompts (the figure is their mean)
        reference_steps: list[int] | None = None  # the teacher's schedule to compare with; None: its own

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
        if pipeline.schedule.folded or folded_time(pipeline.by_role("dit")[0]):
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
        after = self.target_schedule(pipeline)
        comp = pipeline.by_role("dit")[0]
        d = ctx.pass_dir(pass_index(pipeline), self.name)
        metrics = self._metrics(pipeline.schedule, after)
        if self.config.student_weights is not None:
            weights = resolve_student_weights(self.config.student_weights)
            student = load_student(weights, comp.module, after)
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
                         "student": save_student(d / "student.safetensors", student, comp.module, after,
                                                 self.config)}
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
    from ndopt.train.finetune import DataSpec, text_len_for, training_captions, training_latents
    from ndopt.train.objectives import PromptEncoder

    teacher = pipeline.by_role("dit")[0].module
    smp = pipeline.sampler
    suffix, negative = getattr(smp, "prompt_suffix", ""), getattr(smp, "negative_prompt", "")
    spec = DataSpec(**cfg.data.model_dump(), seed=ctx.seed)
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
        own = pipeline.replace(schedule=target.with_guidance("none").with_frames(frames, *(int(x) * VAE_SPATIAL
                                                                       for x in data.latents.shape[3:])))
        polish = Trainer(trainable={"student": student}, frozen={},
                         objective=TrajectoryDistillation(own), data=bank,
                         config=TrainConfig(steps=t.trajectory_steps, lr=t.trajectory_lr, **common,
                                            log_every=max(1, min(10, t.trajectory_steps // 10))),
                         run_dir=pass_dir / "trajectory", device=ctx.device, name="trajectory_distillation").fit()
        results["trajectory"] = polish
    return student.eval().requires_grad_(False), results


def _steps_key(schedule: Schedule) -> str:
    return f"{'-'.join(str(s.steps) for s in schedule.stages)}/{'-'.join(str(s.video_steps) for s in schedule.stages)}"


def save_student(path: Path, student: torch.nn.Module, teacher: torch.nn.Module, target: Schedule,
                 config: PassConfig) -> Path:
    """Write a trained student DiT (safetensors, atomically) with what it was distilled from and for:
    the teacher DiT's weight fingerprint, the target steps and the pass config (metadata)."""
    import json

    from safetensors.torch import save_file

    from ndopt.io import atomic_path, jsonable
    from ndopt.train.data import module_fingerprint

    meta = {"format": "ndopt.step_distillation.student/1", "teacher": module_fingerprint(teacher),
            "steps": _steps_key(target), "config": json.dumps(jsonable(config.model_dump(mode="json")))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in student.state_dict().items()}, str(tmp),
                  metadata=meta)
    return path


def resolve_student_weights(ref: Path) -> Path:
    """A student file: a path, or the name of a student the frontend bundles (e.g.
    `pyramid-flow-tiny-student-1-1-1`), so a shipped recipe can reuse a shipped artifact."""
    from ndopt.frontends.pyramid_flow.presets import bundled_weights

    path = Path(ref)
    if path.is_file() or path.suffix or len(path.parts) > 1:
        return path
    bundled = bundled_weights(str(ref))
    return bundled if bundled is not None else path


def load_student(path: Path, teacher: torch.nn.Module, target: Schedule) -> torch.nn.Module:
    """A student written by `save_student`, for this teacher DiT and these steps (checked: a student
    distilled from other teacher weights, or for other steps, is refused; missing, unexpected or
    mis-shaped keys are listed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ndopt.frontends.pyramid_flow.checkpoint import load_into
    from ndopt.train.data import module_fingerprint

    path = Path(path)
    if not path.is_file():
        raise PassError(f"step_distillation: student_weights {path}: no such file")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "ndopt.step_distillation.student/1":
        raise PassError(f"step_distillation: {path} is not a student written by step_distillation "
                        f"(metadata format {meta.get('format')!r})")
    if meta["teacher"] != module_fingerprint(teacher):
        raise PassError(f"step_distillation: {path} was distilled from another teacher (DiT fingerprint "
                        f"{meta['teacher']}, this pipeline's {module_fingerprint(teacher)}); distil it again")
    if meta["steps"] != _steps_key(target):
        raise PassError(f"step_distillation: {path} is a student for steps {meta['steps']}, the config asks for "
                        f"{_steps_key(target)}")
    student = copy.deepcopy(teacher)
    load_into(student, load_file(str(path)), source=str(path))
    return student.eval().requires_grad_(False)


@dataclass
class SampledLatents:
    """Latents of a dataset's captions sampled by a pipeline, with each sample's noise seed: a drop-in
    for a LatentCache whose examples also say which noise they came from."""

    captions: list[str]
    latents: Tensor
    noise_seeds: Tensor  # int64 [N]: sample i is the pipeline's output for Generator().manual_seed(seed i)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> Example:
        return Example(self.captions[index], latents=self.latents[index], noise_seed=int(self.noise_seeds[index]))


def teacher_samples(pipeline: Pipeline, captions: list[str], shape: tuple[int, ...], seed: int, cache_dir: Path,
                    chunk: int = 16) -> SampledLatents:
    """The teacher's own samples of `captions` (latent `shape` [C, T, h, w] each) at its full schedule
    with its CFG and negative prompt, sample i from its own generator (`noise_seeds`, so its noise does
    not depend on the batch it was drawn in and a student can be run from the same noise), cached in
    `cache_dir`, keyed by the DiT's and text encoder's weights, the captions, shape, schedule and seed.

    Why (`clean: teacher`, beyond the seed): a student whose inputs are noised data and whose Cauchy
    target is the data is trained off the states it meets when it samples, and is pulled towards the
    data, not its teacher, while the latent-PSNR figure compares it with the teacher. On the tiny
    teacher the two are close (first-frame latent std 1.67 for its samples of 256 training captions,
    1.30 for the data) and the option measured no gain (4-4-4, DMD + ode, 500 steps: 27.3 dB vs 27.4;
    after the warm start, 29.0 vs 29.0-30.0); it is for teachers whose samples drift from their data.
    The trajectory stage (`trajectory_steps`) needs them with their noise (TrajectoryDistillation)."""
    from safetensors.torch import load_file, save_file

    from ndopt.io import atomic_path
    from ndopt.progress import progress
    from ndopt.train.data import module_fingerprint, sample_seed

    captions = list(captions)
    shape = tuple(int(x) for x in shape)
    sch = pipeline.schedule.with_frames(shape[1], shape[-2] * VAE_SPATIAL, shape[-1] * VAE_SPATIAL)
    dit, te = pipeline.by_role("dit")[0].module, pipeline.by_role("text_encoder")[0].module
    what = hashlib.blake2b(repr((captions, shape, seed, sch, getattr(pipeline.sampler, "negative_prompt", ""),
                                 getattr(pipeline.sampler, "prompt_suffix", ""))).encode(), digest_size=8).hexdigest()
    path = Path(cache_dir) / f"teacher-samples-{module_fingerprint(dit)}-{module_fingerprint(te)}-{what}.safetensors"
    if path.is_file():
        saved = load_file(str(path))
        log.info("step_distillation: read %d teacher samples from %s", len(saved["latents"]), path)
        return SampledLatents(captions, saved["latents"], saved["noise_seeds"])
    # the conditional and unconditional calls as one of batch 2B (cfg_folding: the same numbers, fewer calls)
    pipe = pipeline.replace(schedule=sch.with_guidance("cfg_batched") if sch.guidance.mode == "cfg" else sch)
    seeds = torch.tensor([sample_seed(seed, i, "teacher-sample") for i in range(len(captions))], dtype=torch.int64)
    out = []
    with torch.no_grad(), progress("step_distillation: sampling the teacher", len(captions)) as advance:
        for start in range(0, len(captions), chunk):
            part = captions[start:start + chunk]
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start:start + chunk]]
            out.append(pipe.sampler.sample(pipe, part, generator=gens).float().cpu())
            for _ in part:
                advance()
    latents = torch.cat(out)
    if latents.shape[1:] != shape:
        raise PassError(f"step_distillation: teacher samples have shape {tuple(latents.shape[1:])}, asked for {shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"latents": latents.contiguous(), "noise_seeds": seeds}, str(tmp))
    return SampledLatents(captions, latents, seeds)


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
