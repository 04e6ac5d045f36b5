"""The pyramidal flow-matching sampler: autoregressive over latent frames, coarse-to-fine per frame.

Follows upstream `PyramidDiTForVideoGeneration.generate`: the first latent frame, then one frame
per unit with the temporal-pyramid history (the nearest frame at the current stage's resolution,
older frames at lower ones); within a unit, S stages from 1/2^(S-1) to full scale, with nearest
upsampling plus block-noise renoise at each stage boundary, and Euler steps of the local sigmas.
The Schedule in the IR drives everything, so passes that change the schedule change the sampler;
`call_plan` enumerates the same calls statically (what costs and lowering see).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ndopt.errors import NdoptError
from ndopt.frontends.pyramid_flow.dit import DiTLayout
from ndopt.frontends.pyramid_flow.schedule import renoise_coefficients, stage_local_sigmas, stage_timesteps
from ndopt.ir.component import Component
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.schedule import Schedule
from ndopt.ir.spec import CallSignature, TensorSpec
from ndopt.model import sampler_math

VAE_SPATIAL = 8
VAE_TEMPORAL = 8


def frame_count(latent_frames: int) -> int:
    """Video frames of `latent_frames` causal-VAE latent frames: the first alone, then 8 per latent frame."""
    return 1 + VAE_TEMPORAL * (latent_frames - 1)

Progress = Callable[[str], None]


def history_clips(unit: int, stage: int, n_stages: int, frame_per_unit: int = 1) -> list[tuple[int, int, int]]:
    """The history fed at (unit, stage), oldest first, as (first frame, frames, stage resolution).

    Upstream: the last unit at the current stage's resolution, each older unit one stage lower,
    and once stage 0 is reached every remaining older frame at stage 0 in one clip."""
    if unit == 0:
        return []
    out = [((unit - 1) * frame_per_unit, frame_per_unit, stage)]
    cur_stage, ptx = stage, 1
    while ptx < unit:
        cur_stage = max(cur_stage - 1, 0)
        if cur_stage == 0:
            break
        ptx += 1
        out.append(((unit - ptx) * frame_per_unit, frame_per_unit, cur_stage))
    if cur_stage == 0 and ptx < unit:
        out.append((0, (unit - ptx) * frame_per_unit, 0))
    return list(reversed(out))


def stage_hw(schedule: Schedule, stage: int) -> tuple[int, int]:
    """Latent height and width at a stage (stage S-1 = full resolution)."""
    down = 2 ** (len(schedule.stages) - 1 - stage)
    return schedule.height // VAE_SPATIAL // down, schedule.width // VAE_SPATIAL // down


def resolution_multiple(patch_size: int, n_stages: int) -> int:
    """Height and width are multiples of this: every stage's latent grid a whole number of patches."""
    return VAE_SPATIAL * patch_size * 2 ** (n_stages - 1)


def check_resolution(schedule: Schedule, patch_size: int) -> None:
    """Every stage's latent grid must be a positive multiple of the DiT's patch size."""
    need = resolution_multiple(patch_size, len(schedule.stages))
    if schedule.height % need or schedule.width % need:
        raise NdoptError(f"resolution {schedule.height}x{schedule.width}: with {len(schedule.stages)} pyramid "
                         f"stages, 8x VAE and patch {patch_size}, height and width must be multiples of {need}")


def dit_layout(schedule: Schedule, unit: int, stage: int, batch: int, text_len: int, patch_size: int) -> DiTLayout:
    fpu = schedule.temporal.frame_per_unit
    clips = []
    for _, frames, s in history_clips(unit, stage, len(schedule.stages), fpu):
        clips.append((frames, *stage_hw(schedule, s)))
    clips.append((1 if unit == 0 else fpu, *stage_hw(schedule, stage)))
    return DiTLayout(batch=batch, text_len=text_len, clips=tuple(clips), patch_size=patch_size)


Generators = torch.Generator | np.random.Generator | Sequence[torch.Generator | np.random.Generator]


def randn(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """Standard normal noise of `shape` from one generator, or from one generator per row (dim 0).

    A `numpy.random.Generator` draws `standard_normal(shape, float32)`: the stream the bundle runtime
    (`targets.runtime`) draws too, so ndopt and the bundle sample identical noise (torch's CPU RNG
    has no numpy equivalent). Per-row generators make a sample's noise independent of the batch it
    is drawn in (a distillation bank replays the teacher's noise for the same captions in other
    batches); with the same generator for every row the draw equals the one-generator draw."""
    if isinstance(generator, np.random.Generator):
        return torch.from_numpy(generator.standard_normal(shape, dtype=np.float32))
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator)
    if len(generator) != shape[0]:
        raise NdoptError(f"{len(generator)} generators for a batch of {shape[0]}: give one per sample")
    return torch.cat([randn((1, *shape[1:]), g) for g in generator])


def block_noise_cholesky(gamma: float) -> torch.Tensor:
    """The 4x4 Cholesky factor (float32) of the 2x2-block noise covariance (1 + gamma) I - gamma 11^T."""
    cov = torch.eye(4, dtype=torch.float64) * (1 + gamma) - torch.ones(4, 4, dtype=torch.float64) * gamma
    return torch.linalg.cholesky(cov).float()


def block_noise(shape: tuple[int, ...], gamma: float, generator: Generators) -> torch.Tensor:
    """Noise correlated within 2x2 blocks: covariance (1 + gamma) I - gamma 11^T (upstream).

    Draws `randn((b, c*t*(h/2)*(w/2), 4))` (so a numpy generator gives the runtime's stream) and
    maps each row of 4 through the Cholesky factor onto a 2x2 block."""
    b, c, t, h, w = shape
    chol = block_noise_cholesky(gamma)
    z = randn((b, c * t * (h // 2) * (w // 2), 4), generator).reshape(-1, 4) @ chol.T
    z = z.reshape(b, c, t, h // 2, w // 2, 2, 2).permute(0, 1, 2, 3, 5, 4, 6)
    return z.reshape(b, c, t, h, w)


def _resize(x: torch.Tensor, h: int, w: int, mode: str) -> torch.Tensor:
    b, c, t = x.shape[:3]
    y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, *x.shape[-2:])
    y = F.interpolate(y, size=(h, w), mode=mode) if mode == "nearest" else \
        F.interpolate(y, size=(h, w), mode=mode, align_corners=False)
    return y.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


FOLDED = "schedule_folding"  # the analyses key of a folded schedule


@dataclass(frozen=True)
class FoldedSchedule:
    """Constants of a fixed schedule: the timestep MLP's rows and which call uses which row."""

    stages: tuple  # the Schedule.stages it was folded for
    timesteps: tuple[float, ...]
    table: torch.Tensor  # [len(timesteps), D]
    rows: dict[tuple[str, int, int], int]  # ("first" | "video", stage, step) -> row

    def embedding(self, kind: str, stage: int, step: int) -> torch.Tensor:
        return self.table[self.rows[(kind, stage, step)]][None]


def folded_time(dit: Component) -> bool:
    return any(p.name == "timestep_embedding" for p in dit.inputs)


def folded_schedule(pipeline: Pipeline) -> FoldedSchedule:
    f = pipeline.analyses.get(FOLDED)
    if f is None:
        raise NdoptError("the DiT's timestep MLP is folded but the pipeline has no folded schedule")
    if f.stages != pipeline.schedule.stages:
        raise NdoptError("the schedule changed after schedule_folding: fold it again (run schedule_folding "
                         "after every pass that changes steps)")
    return f


ENCODED_CACHE = 4  # prompt encodings kept (see encode_prompts)
_encoded: dict[tuple, tuple] = {}


@dataclass(frozen=True)
class PyramidFlowSampler:
    """The sampler of a Pyramid-Flow pipeline (implements ndopt.ir.Sampler)."""

    prompt_suffix: str = ", hyper quality, Ultra HD, 8K"  # upstream generate() appends this
    negative_prompt: str = ("cartoon style, worst quality, low quality, blurry, absolute black, absolute white, "
                            "low res, extra limbs, extra digits, misplaced objects, mutated anatomy, "
                            "monochrome, horror")

    # ---- static view ----------------------------------------------------------------------
    def video_limits(self, pipeline: Pipeline) -> dict[str, int]:
        """The sizes this pipeline can generate (ndopt.validate checks options against them):
        frames are 1 + `temporal`k; height and width are multiples of `multiple` (every stage's latent
        grid a multiple of the patch) and at most `max_side` (the DiT's position table, upstream's crop)."""
        dit = pipeline.by_role("dit")
        cfg = dit[0].module.config if dit else None
        patch = int(getattr(cfg, "patch_size", 2))
        out = {"temporal": VAE_TEMPORAL, "multiple": resolution_multiple(patch, len(pipeline.schedule.stages))}
        if getattr(cfg, "pos_embed_max_size", None):
            out["max_side"] = int(cfg.pos_embed_max_size) * patch * VAE_SPATIAL
        return out

    def call_plan(self, pipeline: Pipeline) -> list[CallSignature]:
        sch = pipeline.schedule
        plan: list[CallSignature] = []
        te = pipeline.by_role("text_encoder")
        text_len = None
        if te:
            t = te[0]
            text_len = int(t.module.config.max_sequence_length)
            n_prompts = 1 if sch.guidance.mode == "none" else 2
            # the text component's own ports (SD3: T5 + CLIP-L/G ids; miniFLUX: no CLIP-G), bound per prompt
            args = tuple((p.name, p.spec.bind({"B": 1, "L": text_len})) for p in t.inputs)
            plan.append(CallSignature(t.name, "prompt", args, n_prompts, env=(("B", 1), ("L", text_len))))
        for d in pipeline.by_role("dit"):
            cfg = d.module.config
            check_resolution(sch, cfg.patch_size)
            ctx_dim = int(d.attrs.get("context_dim", cfg.joint_attention_dim))
            tl = text_len or int(d.attrs.get("text_len", 128))
            batch = sch.guidance.batch
            first_unit = 0 if sch.first_frame == "generate" else 1
            for unit in range(first_unit, sch.units):
                for s, stage in enumerate(sch.stages):
                    steps = stage.steps if unit == 0 else stage.video_steps
                    if steps == 0:
                        continue
                    lay = dit_layout(sch, unit, s, batch, tl, cfg.patch_size)
                    sample = tuple(TensorSpec((batch, cfg.in_channels, *c)) for c in lay.clips)
                    t, h, w = lay.clips[-1]
                    time_arg = (("timestep_embedding", TensorSpec((batch, cfg.inner_dim))) if folded_time(d)
                                else ("timestep_ratio", TensorSpec((batch,))))
                    args = (("sample", sample),
                            ("encoder_hidden_states", TensorSpec((batch, tl, ctx_dim))),
                            ("encoder_attention_mask", TensorSpec((batch, tl), "int64")),
                            ("pooled_projections", TensorSpec((batch, cfg.pooled_projection_dim))),
                            time_arg)
                    plan.append(CallSignature(
                        d.name, f"unit{unit}/stage{s}", args, steps * sch.guidance.calls_per_step,
                        env=(("B", batch), ("L", tl), ("t", t), ("h", h), ("w", w)), static=(("layout", lay),),
                        info=(("unit", unit), ("stage", s), ("tokens", lay.tokens + tl))))
        for dec in pipeline.by_role("vae_decoder"):
            h, w = stage_hw(sch, len(sch.stages) - 1)
            t = sch.latent_frames
            frames = frame_count(t)
            z = TensorSpec((1, int(dec.attrs.get("latent_channels", 16)), t, h, w))
            plan.append(CallSignature(dec.name, "video", (("z", z),), 1,
                                      env=(("B", 1), ("t", t), ("h", h), ("w", w), ("F", frames),
                                           ("H", h * VAE_SPATIAL), ("W", w * VAE_SPATIAL))))
        return plan

    def describe(self, component: Component) -> str:
        m = component.module
        if component.role == "dit" and hasattr(m, "transformer_blocks"):
            return f"blocks={len(m.transformer_blocks)} attention={getattr(m, 'attention_impl', 'sdpa')}"
        return ""

    # ---- running --------------------------------------------------------------------------
    def encode_prompts(self, pipeline: Pipeline, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """The prompts' (and, with guidance, the negative prompt's) encodings. Without autograd the
        result is cached per text encoder state (ndopt.ir.fingerprint): the fidelity probe samples
        the same prompts after every pass, and most passes leave the text encoder alone."""
        te = pipeline.by_role("text_encoder")[0]
        guided = pipeline.schedule.guidance.mode != "none"
        key = None
        if not torch.is_grad_enabled():
            from ndopt.ir.fingerprint import module_identity

            key = (te.name, module_identity(te.module), tuple(prompts), guided, self.prompt_suffix,
                   self.negative_prompt)
            hit = _encoded.get(key)
            if hit is not None and hit[0]() is te.module:  # a weak reference: a freed encoder's entry is dead
                return hit[1]
        texts = [p + self.prompt_suffix for p in prompts]
        emb, mask, pooled = te.module(texts)
        out = (emb, mask, pooled, None, None, None)
        if guided:
            out = (emb, mask, pooled, *te.module([self.negative_prompt] * len(prompts)))
        if key is not None:
            if len(_encoded) >= ENCODED_CACHE:
                _encoded.pop(next(iter(_encoded)))
            _encoded[key] = (weakref.ref(te.module), out)
        return out

    def sample(self, pipeline: Pipeline, prompts: list[str], *, generator: Generators,
               progress: Progress | None = None, first_latent: torch.Tensor | None = None) -> torch.Tensor:
        """Prompts -> normalized latents. In hybrid mode (`first_frame` not "generate") the first latent
        frame is given (`first_latent`, [B, C, 1, h, w] in the DiT's latent space: an image encoded by
        the VAE and normalized as upstream's `generate_i2v`) and unit k >= 1 draws the noise of frame
        k - 1, as upstream's image-to-video loop does."""
        sch = pipeline.schedule
        hybrid = sch.first_frame != "generate"
        if hybrid and first_latent is None:
            raise NdoptError("this pipeline's first frame comes from an image model (hybrid mode): generate "
                             "with `--first-frame image-model`, which adds ndopt's image model")
        if not hybrid and first_latent is not None:
            raise NdoptError("a first latent frame was given but the schedule generates its first frame")
        dit = pipeline.by_role("dit")[0]
        check_resolution(sch, dit.module.config.patch_size)
        device = dit.device
        dtype = next(dit.module.parameters()).dtype
        emb, mask, pooled, nemb, nmask, npooled = self.encode_prompts(pipeline, prompts)
        cond = (emb.to(device, dtype), mask.to(device), pooled.to(device, dtype))
        uncond = None if nemb is None else (nemb.to(device, dtype), nmask.to(device), npooled.to(device, dtype))
        bsz = len(prompts)
        c = dit.module.config.in_channels
        n_stages = len(sch.stages)
        h, w = stage_hw(sch, n_stages - 1)
        noise = randn((bsz, c, sch.latent_frames, h, w), generator)
        for s in range(n_stages - 1):  # upstream starts from bilinearly downsampled noise (x2 keeps unit variance)
            hh, ww = stage_hw(sch, n_stages - 2 - s)
            noise = _resize(noise, hh, ww, "bilinear") * 2
        noise = noise.to(device, dtype)

        generated: list[torch.Tensor] = []
        fpu = sch.temporal.frame_per_unit
        folded = folded_schedule(pipeline) if folded_time(dit) else None
        if hybrid:
            want = (bsz, c, 1, h, w)
            if tuple(first_latent.shape) != want:
                raise NdoptError(f"first latent frame is {list(first_latent.shape)}, the schedule needs {list(want)}")
            generated.append(first_latent.to(device, dtype))
        for unit in range(1 if hybrid else 0, sch.units):
            lo = (unit - 1) * fpu if hybrid else 0 if unit == 0 else 1 + (unit - 1) * fpu
            hi = lo + (fpu if unit else 1)
            latents = noise[:, :, lo:hi]
            history = self._history(torch.cat(generated, dim=2), unit, sch) if unit else [[] for _ in sch.stages]
            for s, stage in enumerate(sch.stages):
                steps = stage.steps if unit == 0 else stage.video_steps
                if s > 0:
                    hh, ww = stage_hw(sch, s)
                    latents = _resize(latents, hh, ww, "nearest")
                    alpha, beta = renoise_coefficients(stage, sch.gamma)
                    latents = alpha * latents + beta * block_noise(tuple(latents.shape), sch.gamma, generator).to(
                        device, dtype)
                sigmas = stage_local_sigmas(steps)
                for i, t in enumerate(stage_timesteps(stage, steps)):
                    temb = folded.embedding("first" if unit == 0 else "video", s, i) if folded else None
                    v = self._guided_velocity(dit, latents, history[s], t, cond, uncond,
                                              sch.guidance.scale if unit == 0 else sch.guidance.video_scale,
                                              sch.guidance.mode, temb)
                    latents = (latents.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(dtype)
                    if progress is not None:
                        progress(f"frame {unit + 1}/{sch.units} stage {s + 1}/{n_stages} step {i + 1}/{steps}")
            generated.append(latents)
        return torch.cat(generated, dim=2)

    @staticmethod
    def _history(clean: torch.Tensor, unit: int, sch: Schedule) -> list[list[torch.Tensor]]:
        n_stages = len(sch.stages)
        pyramid = [clean]
        x = clean
        for s in range(n_stages - 1):  # upstream get_pyramid_latent: bilinear, lowest resolution first
            hh, ww = stage_hw(sch, n_stages - 2 - s)
            x = _resize(x, hh, ww, "bilinear")
            pyramid.append(x)
        pyramid.reverse()
        out = []
        for s in range(n_stages):
            out.append([pyramid[st][:, :, f0:f0 + n] for f0, n, st in
                        history_clips(unit, s, n_stages, sch.temporal.frame_per_unit)])
        return out

    @staticmethod
    def _guided_velocity(dit: Component, latents: torch.Tensor, history: list[torch.Tensor], t: float,
                         cond: tuple[torch.Tensor, ...], uncond: tuple[torch.Tensor, ...] | None,
                         scale: float, mode: str, temb: torch.Tensor | None = None) -> torch.Tensor:
        def time(batch: int) -> dict[str, torch.Tensor]:
            if temb is not None:  # a folded schedule: the timestep MLP's precomputed row
                return {"timestep_embedding": temb.to(latents.device, latents.dtype).expand(batch, -1)}
            return {"timestep_ratio": torch.full((batch,), t, dtype=latents.dtype, device=latents.device)}

        b = latents.shape[0]
        if uncond is None or mode == "none":
            return dit.call(sample=[*history, latents], encoder_hidden_states=cond[0],
                            encoder_attention_mask=cond[1], pooled_projections=cond[2], **time(b))
        if mode == "cfg_batched":  # upstream's own form: one call of batch 2B
            x = [torch.cat([h, h]) for h in history] + [torch.cat([latents, latents])]
            v = dit.call(sample=x, encoder_hidden_states=torch.cat([uncond[0], cond[0]]),
                         encoder_attention_mask=torch.cat([uncond[1], cond[1]]),
                         pooled_projections=torch.cat([uncond[2], cond[2]]), **time(2 * b))
            v_u, v_c = v.chunk(2)
        else:
            v_u = dit.call(sample=[*history, latents], encoder_hidden_states=uncond[0],
                           encoder_attention_mask=uncond[1], pooled_projections=uncond[2], **time(b))
            v_c = dit.call(sample=[*history, latents], encoder_hidden_states=cond[0],
                           encoder_attention_mask=cond[1], pooled_projections=cond[2], **time(b))
        return v_u + scale * (v_c - v_u)

    def decode(self, pipeline: Pipeline, latents: torch.Tensor) -> torch.Tensor:
        dec = pipeline.by_role("vae_decoder")[0]
        # the frontend's latent constants (miniFLUX normalizes the first frame with its own)
        z = sampler_math(pipeline).denormalize_latents(latents.float()).to(dec.device)
        videos = [dec.call(z=z[i:i + 1]) for i in range(z.shape[0])]
        return torch.cat(videos).clamp(-1, 1)


def count_dit_calls(pipeline: Pipeline, run: Callable[[], object]) -> int:
    """Calls of the DiT's forward while `run` runs (a counting hook, for tests and benchmarks)."""
    dit = pipeline.by_role("dit")[0].module
    n = 0

    def hook(*_: object) -> None:
        nonlocal n
        n += 1

    h = dit.register_forward_pre_hook(hook)
    try:
        run()
    finally:
        h.remove()
    return n




def unroll(pipeline: Pipeline) -> list[dict]:
    """The explicit call list of one video: every DiT evaluation with its constants, in order.

    What lowering writes into the manifest: which DiT signature, the timestep (or the folded table
    row), the Euler step, the guidance scale, and the renoise coefficients entering a stage."""
    sch = pipeline.schedule
    dit = pipeline.by_role("dit")[0]
    folded = folded_schedule(pipeline) if folded_time(dit) else None
    calls = []
    first_unit = 0 if sch.first_frame == "generate" else 1
    for unit in range(first_unit, sch.units):
        kind = "first" if unit == 0 else "video"
        for s, stage in enumerate(sch.stages):
            steps = stage.steps if unit == 0 else stage.video_steps
            sigmas = stage_local_sigmas(steps)
            renoise = list(renoise_coefficients(stage, sch.gamma)) if s > 0 else None
            for i, t in enumerate(stage_timesteps(stage, steps)):
                calls.append({
                    "unit": unit, "stage": s, "step": i, "dit_signature": f"unit{unit}/stage{s}",
                    "timestep": t, "timestep_row": folded.rows[(kind, s, i)] if folded else None,
                    "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "dt": sigmas[i + 1] - sigmas[i],
                    "guidance": sch.guidance.mode,
                    "guidance_scale": sch.guidance.scale if unit == 0 else sch.guidance.video_scale,
                    "renoise": renoise if i == 0 else None,
                })
    return calls
