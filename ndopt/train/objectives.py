"""Training objectives: pyramidal flow matching (seed eq. 6-7), teacher-student distillation, VAE.

An objective is a callable `objective(modules, batch, info) -> LossOutput`. `modules` gives the
(possibly DDP/FSDP-wrapped) callables by name and `modules.raw(name)` the plain nn.Module (for
hooks); `info` says which step, micro-step and process this is. Randomness comes from the batch's
per-sample seeds, so a sample's noise, timestep and caption dropout are the same whether the global
batch runs in one process or is split over several (DDP) or over micro-batches.

`pyramid_flow_inputs` builds the DiT's training inputs exactly as upstream Pyramid-Flow does
(`add_pyramid_noise_with_temporal_pyramid`): per stage i, start and end points

    z_start^i = (1 - s_start^i) Up(Down(z, 2^{i+1}), 2) + s_start^i eps     (seed eq. 6)
    z_end^i   = (1 - s_end^i)   Down(z, 2^i)             + s_end^i eps        (seed eq. 7)

an interpolation at a local ratio r ~ U(0, 1) on upstream's 1000-point grid, the velocity target
z_start - z_end, and the autoregressive history (older latent frames, lower resolution the older
they are, corrupted with noise of level U(0, 1/3)). The flow-matching loss regresses the target;
distillation regresses a teacher's output (and optionally features) on the same inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ndopt.errors import NdoptError
from ndopt.ir.schedule import Schedule, Stage
from ndopt.model import sampler_math
from ndopt.train.data import Batch

TRAIN_STEPS = 1000  # upstream: 1000 training points per stage


@dataclass(frozen=True)
class StepInfo:
    """Where the engine is: optimizer step, micro-step, this process and the world size."""

    step: int
    micro: int = 0
    rank: int = 0
    world: int = 1
    seed: int = 0


@dataclass
class LossOutput:
    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class TrainModules(Protocol):
    def __getitem__(self, name: str) -> Callable[..., Any]: ...

    def __contains__(self, name: str) -> bool: ...

    def raw(self, name: str) -> nn.Module: ...


class Objective(Protocol):
    """What the engine minimises. `uses` names the modules it calls (trainable or frozen)."""

    uses: tuple[str, ...]

    def __call__(self, modules: TrainModules, batch: Batch, info: StepInfo) -> LossOutput: ...


def _step_seed(info: StepInfo, salt: str) -> int:
    h = hashlib.blake2b(f"{info.seed}:{info.step}:{info.micro}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ---- text conditioning -------------------------------------------------------------------------
class PromptEncoder(nn.Module):
    """prompts -> (embeds, mask, pooled) through an SD3 text encoder, with T5/CLIP ids cut to `text_len`.

    The DiT's joint attention keeps real and padded text tokens apart, T5's mask hides padding and
    CLIP pools at the first eos, so cutting trailing padding changes nothing for prompts that fit,
    and a short `text_len` makes training on short captions several times cheaper."""

    def __init__(self, text_encoder: nn.Module, text_len: int | None = None) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_len = text_len

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        te = self.text_encoder
        device = next(te.parameters()).device
        tokens = te.tokenize(list(prompts))
        if self.text_len is not None:
            longest = int(tokens["t5_mask"].sum(1).max())
            if longest > self.text_len:
                raise NdoptError(f"a caption has {longest} tokens, more than text_len={self.text_len}: "
                                 "raise text_len in the training config")
            tokens = {k: v[:, : self.text_len] for k, v in tokens.items()}
        return te.encode_tokens(**{k: v.to(device) for k, v in tokens.items()})


def drop_captions(batch: Batch, prob: float, empty: str = "") -> list[str]:
    """Classifier-free guidance training: each caption becomes `empty` with probability `prob`."""
    if prob <= 0:
        return list(batch.captions)
    out = []
    for cap, seed in zip(batch.captions, batch.seeds.tolist()):
        g = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)  # a stream apart from the noise draws
        out.append(empty if float(torch.rand(1, generator=g)) < prob else cap)
    return out


# ---- pyramidal flow matching -------------------------------------------------------------------
def resize(x: Tensor, h: int, w: int, mode: str) -> Tensor:
    """[B, C, T, H, W] -> [B, C, T, h, w] per frame (nearest, or bilinear without corner alignment)."""
    b, c, t = x.shape[:3]
    y = x.transpose(1, 2).reshape(b * t, c, *x.shape[-2:])
    y = F.interpolate(y, size=(h, w), mode=mode) if mode == "nearest" else \
        F.interpolate(y, size=(h, w), mode=mode, align_corners=False)
    return y.reshape(b, t, c, h, w).transpose(1, 2)


def latent_pyramid(x: Tensor, n_stages: int) -> list[Tensor]:
    """Upstream `get_pyramid_latent`: bilinear halvings, lowest resolution first."""
    out = [x]
    for _ in range(n_stages - 1):
        x = resize(x, x.shape[-2] // 2, x.shape[-1] // 2, "bilinear")
        out.append(x)
    return out[::-1]


def stage_grid(stage: Stage, index: Tensor) -> tuple[Tensor, Tensor]:
    """(local ratio, DiT timestep) at upstream's grid index in [0, 1000) of a stage."""
    ratio = 1.0 - index.double() / TRAIN_STEPS
    # Stage.timestep_end is the grid's last point t_max + (t_min - t_max) * 999/1000
    t_min = stage.timestep_start + (stage.timestep_end - stage.timestep_start) * TRAIN_STEPS / (TRAIN_STEPS - 1)
    t = stage.timestep_start + (t_min - stage.timestep_start) * index.double() / TRAIN_STEPS
    return ratio.float(), t.float()


@dataclass
class StageInputs:
    """One DiT call of a training step: the rows of the batch it holds, its inputs and target."""

    stage: int
    unit: int
    rows: list[int]
    sample: list[Tensor]          # history clips (oldest first), then the noisy current clip
    timestep: Tensor              # [n] DiT timesteps
    ratio: Tensor                 # [n] local ratios r
    target: Tensor                # z_start - z_end of the current clip


def pyramid_flow_inputs(latents: Tensor, batch: Batch, schedule: Schedule, info: StepInfo, *,
                        corrupt_ratio: float = 1 / 3, units: int | None = None,
                        stage_of: Callable[[int], int] | None = None,
                        video_prob: float | None = None) -> list[StageInputs]:
    """The DiT inputs of one step (see the module docstring); one StageInputs per (stage) group.

    Sample k goes to stage `indices[k] % S` (upstream's sample_ratios [1, 1, 1] columns). For videos
    the autoregressive unit trained is drawn per (step, stage), the same in every process: uniformly
    (upstream), or a later unit with probability `video_prob` (weights the frames that carry motion)."""
    n_stages = len(schedule.stages)
    b, _, t_lat, h, w = latents.shape
    need = 2 ** (n_stages - 1)
    if h % need or w % need:
        raise NdoptError(f"latents {h}x{w}: {n_stages} pyramid stages need multiples of {need}")
    fpu = schedule.temporal.frame_per_unit
    n_units = 1 + (t_lat - 1) // fpu if units is None else units
    history_clips = sampler_math().history_clips  # the pyramidal family's temporal history (upstream's)
    pyramid = latent_pyramid(latents, n_stages)
    stage_of = stage_of or (lambda idx: idx % n_stages)
    gens = batch.generators()
    out = []
    for s, stage in enumerate(schedule.stages):
        rows = [k for k in range(b) if stage_of(int(batch.indices[k])) == s]
        if not rows:
            continue
        g = torch.Generator().manual_seed(_step_seed(info, f"unit{s}"))
        if n_units <= 1:
            unit = 0
        elif video_prob is None:
            unit = int(torch.randint(n_units, (1,), generator=g))
        else:
            later = float(torch.rand((), generator=g)) < video_prob
            unit = 1 + int(torch.randint(n_units - 1, (1,), generator=g)) if later else 0
        lo = 0 if unit == 0 else 1 + (unit - 1) * fpu
        hi = 1 if unit == 0 else 1 + unit * fpu
        clean = pyramid[s][rows, :, lo:hi]
        full = latents[rows, :, lo:hi]
        noise = torch.stack([torch.randn(full.shape[1:], generator=gens[k]) for k in rows]).to(full)
        noise_pyr = [noise]
        for _ in range(n_stages - 1):  # upstream: bilinear halvings of the full-res noise, x2 (unit variance)
            noise_pyr.append(resize(noise_pyr[-1], noise_pyr[-1].shape[-2] // 2, noise_pyr[-1].shape[-1] // 2,
                                    "bilinear") * 2)
        eps = noise_pyr[::-1][s]
        if s == 0:
            start = eps
        else:  # seed eq. 6: the previous stage's clean latent, nearest-upsampled
            prev = pyramid[s - 1][rows, :, lo:hi]
            start = stage.sigma_start * eps + (1 - stage.sigma_start) * resize(prev, *clean.shape[-2:], "nearest")
        end = clean if s == n_stages - 1 else stage.sigma_end * eps + (1 - stage.sigma_end) * clean  # eq. 7
        u = torch.stack([torch.rand((), generator=gens[k]) for k in rows])
        index = (u * TRAIN_STEPS).long().clamp(0, TRAIN_STEPS - 1)
        ratio, timestep = stage_grid(stage, index)
        r = ratio.to(clean).view(-1, 1, 1, 1, 1)
        noisy = r * start + (1 - r) * end
        history: list[Tensor] = []
        if unit > 0:
            sig = torch.stack([torch.rand((), generator=gens[k]) for k in rows]).to(clean) * corrupt_ratio
            sig = sig.view(-1, 1, 1, 1, 1)
            for f0, nf, st in history_clips(unit, s, n_stages, fpu):
                clip = pyramid[st][rows, :, f0:f0 + nf]
                cn = torch.stack([torch.randn(clip.shape[1:], generator=gens[k]) for k in rows]).to(clip)
                history.append(sig * cn + (1 - sig) * clip)
        out.append(StageInputs(s, unit, rows, [*history, noisy], timestep.to(latents.device),
                               ratio.to(latents.device), start - end))
    return out


def dit_kwargs(inputs: StageInputs, cond: tuple[Tensor, Tensor, Tensor]) -> dict[str, Any]:
    emb, mask, pooled = cond
    rows = inputs.rows
    return {"sample": inputs.sample, "encoder_hidden_states": emb[rows], "encoder_attention_mask": mask[rows],
            "pooled_projections": pooled[rows], "timestep_ratio": inputs.timestep.to(emb.dtype)}


def encode_prompts(modules: TrainModules, captions: list[str], trainable: bool) -> tuple[Tensor, Tensor, Tensor]:
    if trainable:
        return modules["text_encoder"](captions)
    with torch.no_grad():
        return tuple(x.detach() for x in modules["text_encoder"](captions))


@dataclass
class PyramidalFlowMatching:
    """L_pyr-FM = sum over stages of the stage's flow-matching loss (seed, Pyramidal DMD section).

    Upstream `calculate_loss`: per-sample mean squared error of the velocity, averaged over all
    samples of all stages. Needs `latents` in the batch (normalised, as the DiT sees them)."""

    schedule: Schedule
    uncond_prob: float = 0.1       # upstream cfg_rate: captions dropped for classifier-free guidance
    corrupt_ratio: float = 1 / 3   # upstream: history noise level ~ U(0, 1/3)
    train_text_encoder: bool = False
    dit: str = "dit"
    uses: tuple[str, ...] = ("dit", "text_encoder")
    video_prob: float | None = None  # None: units drawn uniformly (upstream); else P(a later unit)

    def __call__(self, modules: TrainModules, batch: Batch, info: StepInfo) -> LossOutput:
        if batch.latents is None:
            raise NdoptError("pyramidal flow matching needs latents: wrap the dataset in a LatentCache")
        cond = encode_prompts(modules, drop_captions(batch, self.uncond_prob), self.train_text_encoder)
        per_sample, metrics = [], {}
        for inp in pyramid_flow_inputs(batch.latents, batch, self.schedule, info, corrupt_ratio=self.corrupt_ratio,
                                       video_prob=self.video_prob):
            pred = modules[self.dit](**dit_kwargs(inp, cond))
            err = (pred.float() - inp.target.float()).pow(2).flatten(1).mean(1)
            per_sample.append(err)
            metrics[f"loss_stage{inp.stage}"] = float(err.detach().mean())
        loss = torch.cat(per_sample).mean()
        return LossOutput(loss, {"loss": float(loss.detach()), **metrics})


# ---- teacher-student distillation --------------------------------------------------------------
def last_tensor(out: Any) -> Tensor:
    """The feature of a module output: the tensor itself, or a tuple's last tensor (an MMDiT block's
    image stream)."""
    if isinstance(out, Tensor):
        return out
    tensors = [x for x in out if isinstance(x, Tensor)]
    if not tensors:
        raise NdoptError("feature matching: the hooked module returned no tensor")
    return tensors[-1]


class FeatureTap:
    """Forward hooks that keep the outputs of named submodules during one call."""

    def __init__(self, module: nn.Module, names: Sequence[str], select: Callable[[Any], Tensor] = last_tensor) -> None:
        self.features: dict[str, list[Tensor]] = {n: [] for n in names}
        self._handles = []
        for n in names:
            try:
                sub = module.get_submodule(n)
            except AttributeError:
                raise NdoptError(f"feature matching: no submodule {n!r}") from None
            self._handles.append(sub.register_forward_hook(
                lambda _m, _i, out, n=n: self.features[n].append(select(out))))

    def take(self, name: str) -> Tensor:
        feats = self.features[name]
        if not feats:
            raise NdoptError(f"feature matching: {name!r} did not run in this call")
        return feats.pop(0)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class Distillation:
    """Teacher-student output (and feature) matching on inputs built from each batch.

    `inputs(modules, batch, info)` yields (kwargs, weight) pairs; the student (`student`, trainable)
    and the frozen `teacher` run on the same kwargs; the loss is
    output_weight * MSE(student, teacher) + feature_weight * mean MSE over `features` pairs
    (student submodule name, teacher submodule name). Encoder substitution, decoder distillation
    and the pruned-DiT stage 1 are this with different inputs."""

    student: str
    teacher: str
    inputs: Callable[[TrainModules, Batch, StepInfo], list[dict[str, Any]]]
    output_weight: float = 1.0
    feature_weight: float = 0.0
    features: tuple[tuple[str, str], ...] = ()
    output: Callable[[Any], Tensor] = last_tensor
    uses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.uses = (self.student, self.teacher)

    def __call__(self, modules: TrainModules, batch: Batch, info: StepInfo) -> LossOutput:
        s_tap = FeatureTap(modules.raw(self.student), [a for a, _ in self.features]) if self.features else None
        t_tap = FeatureTap(modules.raw(self.teacher), [b for _, b in self.features]) if self.features else None
        try:
            out_losses, feat_losses = [], []
            for kwargs in self.inputs(modules, batch, info):
                with torch.no_grad():
                    t_out = self.output(modules[self.teacher](**kwargs)).float()
                s_out = self.output(modules[self.student](**kwargs)).float()
                out_losses.append((s_out - t_out).pow(2).flatten(1).mean(1))
                for a, b in self.features:
                    fs, ft = s_tap.take(a).float(), t_tap.take(b).float().detach()
                    feat_losses.append((fs - ft).pow(2).flatten(1).mean(1))
        finally:
            for tap in (s_tap, t_tap):
                if tap is not None:
                    tap.close()
        out_loss = torch.cat(out_losses).mean()
        loss = self.output_weight * out_loss
        metrics = {"output_mse": float(out_loss.detach())}
        if feat_losses:
            feat = torch.stack([f.mean() for f in feat_losses]).mean()
            loss = loss + self.feature_weight * feat
            metrics["feature_mse"] = float(feat.detach())
        metrics["loss"] = float(loss.detach())
        return LossOutput(loss, metrics)


def pyramid_distillation_inputs(schedule: Schedule, *, uncond_prob: float = 0.1, dit: str = "dit"
                                ) -> Callable[[TrainModules, Batch, StepInfo], list[dict[str, Any]]]:
    """Distillation inputs for a DiT: the pyramidal flow-matching inputs of the batch's latents."""

    def inputs(modules: TrainModules, batch: Batch, info: StepInfo) -> list[dict[str, Any]]:
        cond = encode_prompts(modules, drop_captions(batch, uncond_prob), trainable=False)
        return [dit_kwargs(i, cond) for i in pyramid_flow_inputs(batch.latents, batch, schedule, info)]

    return inputs


# ---- the VAE -------------------------------------------------------------------------------------
@dataclass
class VAEReconstruction:
    """Autoencoding: reconstruct videos from slightly perturbed latents (L2 + L1 in pixels).

    The perturbation is `latent_noise` times the batch's latent standard deviation (scale-free, so
    it never hides tiny early latents from the decoder), which teaches the decoder to tolerate the
    small errors of generated latents. The latent scale is set after training by
    `standardize_latents` (an exact reparametrisation), not by a KL term."""

    latent_noise: float = 0.05
    l1_weight: float = 1.0
    foreground_weight: float = 0.0  # extra weight on pixels far from the frame's border colour
    chroma_weight: float = 0.0  # extra weight on the error's chroma (its RGB minus their mean): hue, not only brightness
    encoder: str = "vae_encoder"
    decoder: str = "vae_decoder"
    uses: tuple[str, ...] = ("vae_encoder", "vae_decoder")

    def __call__(self, modules: TrainModules, batch: Batch, info: StepInfo) -> LossOutput:
        if batch.videos is None:
            raise NdoptError("VAE training needs videos in the batch")
        video = batch.videos
        z = modules[self.encoder](video).float()
        eps = torch.stack([torch.randn(z.shape[1:], generator=g) for g in batch.generators()]).to(z)
        scale = z.detach().std(dim=(0, 2, 3, 4), keepdim=True)
        rec = modules[self.decoder](z + self.latent_noise * scale * eps)
        loss, mse = pixel_loss(rec, video, l1_weight=self.l1_weight, foreground_weight=self.foreground_weight,
                               chroma_weight=self.chroma_weight)
        return LossOutput(loss, {"loss": float(loss.detach()), "mse": float(mse.detach()),
                                 "latent_std": float(scale.mean())})


def pixel_loss(rec: Tensor, video: Tensor, *, l1_weight: float = 1.0, mse_weight: float = 1.0,
               foreground_weight: float = 0.0, chroma_weight: float = 0.0) -> tuple[Tensor, Tensor]:
    """(loss, mse) of a decoded video against the target: MSE + L1, plus optional extra weight on the
    foreground (pixels far from the frame's border colour) and on the error's chroma (its RGB minus
    their mean). Small objects lose to the background in a plain mean, and a small decoder learns
    brightness first and hue late: both weights make it learn the shape's colour."""
    err = rec.float() - video.float()
    mse, l1 = err.pow(2).mean(), err.abs().mean()
    loss = mse_weight * mse + l1_weight * l1
    fg = foreground_mask(video.float()) if foreground_weight else None
    if fg is not None:
        loss = loss + (foreground_weight * fg * (mse_weight * err.pow(2) + l1_weight * err.abs())).mean()
    if chroma_weight:
        chroma = err - err.mean(dim=1, keepdim=True)
        w = 1.0 + (foreground_weight * fg if fg is not None else 0.0)
        loss = loss + chroma_weight * (w * (mse_weight * chroma.pow(2) + l1_weight * chroma.abs())).mean()
    return loss, mse


@torch.no_grad()
def foreground_mask(video: Tensor, threshold: float = 0.15) -> Tensor:
    """[B, 1, F, H, W] 1 where a pixel's colour is `threshold` (RGB distance in [0, 1] units) from its
    frame's median border colour (video in [-1, 1])."""
    border = torch.cat([video[..., 0, :], video[..., -1, :], video[..., :, 0], video[..., :, -1]], dim=-1)
    bg = border.median(dim=-1).values[..., None, None]                     # [B, 3, F, 1, 1]
    return ((video - bg).norm(dim=1, keepdim=True) / 2 > threshold).float()


@torch.no_grad()
def standardize_latents(encoder: nn.Module, decoder: nn.Module, videos: Tensor, *, target_mean: float = 0.0,
                        target_std: float = 2.39) -> dict[str, float]:
    """Rescale the VAE's latent space per channel so the DiT sees unit-scale latents; exact.

    The encoder's last 1x1x1 conv (`quant_conv`, mean half) gets z' = a z + b per channel and the
    decoder's first (`post_quant_conv`) undoes it, so reconstructions do not change. The targets
    put the frontend's fixed normalisation (first frame (z - 0.149) / 1.84, later frames
    (z + 0.234) / 3.10) near zero mean and unit scale for both kinds of frame: mean ~0 and std
    sqrt(1.84 * 3.10) = 2.39."""
    z = encoder(videos).float()
    c = z.shape[1]
    mean = z.transpose(0, 1).reshape(c, -1).mean(1)
    std = z.transpose(0, 1).reshape(c, -1).std(1).clamp(min=1e-6)
    a = target_std / std
    b = target_mean - a * mean
    qc = encoder.quant_conv.conv
    qc.weight[:c] *= a.view(-1, 1, 1, 1, 1).to(qc.weight)
    qc.bias[:c] = qc.bias[:c] * a.to(qc.bias) + b.to(qc.bias)
    pc = decoder.post_quant_conv.conv
    # post(z) = W z + c0 with z = (z' - b) / a  ->  W' = W / a (per input channel), c0' = c0 - W' b
    w = pc.weight / a.view(1, -1, 1, 1, 1).to(pc.weight)
    pc.bias -= (w.flatten(1) @ b.to(w)).to(pc.bias)
    pc.weight.copy_(w)
    return {"mean_before": float(mean.mean()), "std_before": float(std.mean())}


def objective_modules(objective: Any) -> tuple[str, ...]:
    return tuple(getattr(objective, "uses", ()))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy (a teacher that later training cannot touch)."""
    import copy

    return copy.deepcopy(module).eval().requires_grad_(False)


__all__ = [
    "Distillation",
    "FeatureTap",
    "LossOutput",
    "Objective",
    "PromptEncoder",
    "PyramidalFlowMatching",
    "StageInputs",
    "StepInfo",
    "TrainModules",
    "VAEReconstruction",
    "dit_kwargs",
    "drop_captions",
    "encode_prompts",
    "frozen_copy",
    "latent_pyramid",
    "pyramid_distillation_inputs",
    "pyramid_flow_inputs",
    "stage_grid",
    "standardize_latents",
]
