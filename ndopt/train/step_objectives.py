"""The step-distillation objectives (Neodragon, "Pyramidal DMD Step-Distillation", seed eq. 6-10)
and the teacher samples they may train on; `passes.step_distillation` runs them.

Three DiTs, all from the teacher's weights:

- the student D_theta, trained for a k-step schedule per stage. At stage i its input z_sigma is the
  pyramidal flow-matching point of a data latent (eq. 6-7) at a local level r, global
  sigma = (1 - r) s_end + r s_start, and its clean-latent prediction is one Euler step of its velocity
  down to sigma = 0:  z_theta = z_sigma - sigma / (s_start - s_end) D_theta. The sampler's Euler step
  with the same velocity (local r -> r', global sigma -> sigma') lands on (1 - sigma') z_theta +
  sigma' eps_hat, the straight line through z_sigma and z_theta, so the prediction trained here is
  exactly what each sampler step uses (at the last stage, where s_end = 0, a 1-step stage lands on
  z_theta itself).
- the fake score model D_phi, trained with the pyramidal flow-matching objective on the student's
  outputs: y_start, y_end and z_tau of eq. 8-10, tau_local ~ U(0, 1), target y_start - y_end.
- the real score: the frozen teacher with classifier-free guidance at the pipeline's own scales and
  the sampler's negative prompt.

The student's loss (`PyramidalDMD`) is the DMD loss, whose gradient is (D(z_tau) - D_phi(z_tau))
dz_theta/dtheta weighted per sample by 1 / mean|D(z_tau) - (y_start - y_end)| (seed; Yin et al. 2024's
1 / mean|x - x_real| in velocity units), plus 0.5 times the Cauchy loss
log(1 + ||z_theta - Down(z, 2^i)||_2^2). Updates alternate: one student update per two fake-model
updates (one AdamW holds both; the module that does not learn on a step gets no gradient). The student
only ever runs at the sampler's local sigmas of its target schedule, linspace(1, 1/1000, k) per stage
(upstream `get_stage_sigmas`), so it is trained at exactly those k levels (the seed's "four fixed
local noise levels" are those of its 4-4-4 schedule).

Beyond the seed: `ode_weight` adds DMD's paired regression (the student's one Euler move pulled onto
the frozen guided teacher's ODE solution from the same point: `PyramidalDMD.ode_target`);
`GuidanceDistillation` is a warm start (Meng et al. 2023, stage 1: the student, called once, regresses
the teacher's guided velocity); `TrajectoryDistillation` is a polish through the whole pyramid (Luhman
& Luhman 2021: the student runs its own k-step sampler from the noise of a teacher sample and regresses
it); `teacher_samples` are the teacher's own samples with their noise seeds, the data of the latter.
Measured figures: bench/STEP_DISTILLATION.md.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ndopt.errors import PassError
from ndopt.eval.metrics import psnr
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.schedule import Schedule, Stage
from ndopt.model import sampler_math
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

log = logging.getLogger("ndopt")

STUDENT_EVERY = 3      # seed: one update of theta per two updates of phi
CAUCHY_WEIGHT = 0.5    # seed: the supervised Cauchy (teacher) loss, weight 0.5


# ---- the seed's quantities ----------------------------------------------------------------------
def student_levels(k: int) -> list[float]:
    """The k fixed local noise levels of a k-step stage: the sampler's local sigmas (upstream)."""
    return sampler_math().stage_local_sigmas(k)[:-1]


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
    """The alternating student / fake-model objective (the module docstring).

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
        seed's Cauchy form (it measured better than MSE: bench/STEP_DISTILLATION.md)."""
        shape = (-1, *[1] * (z.dim() - 1))
        grid = sampler_math().stage_local_sigmas(teacher_steps)
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
    teacher the two are close and the option measured no gain (bench/STEP_DISTILLATION.md); it is for
    teachers whose samples drift from their data.
    The trajectory stage (`trajectory_steps`) needs them with their noise (TrajectoryDistillation)."""
    from safetensors.torch import load_file, save_file

    from ndopt.io import atomic_path
    from ndopt.progress import progress
    from ndopt.train.data import module_fingerprint, sample_seed

    captions = list(captions)
    shape = tuple(int(x) for x in shape)
    spatial = sampler_math(pipeline).spatial_factor
    sch = pipeline.schedule.with_frames(shape[1], shape[-2] * spatial, shape[-1] * spatial)
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
