"""Decoder swap (Neodragon, "Asymmetric Decoder Distillation"): a small decoder for the native latents.

The native causal VAE decoder (226M) becomes, by config, `tiny` (a TAEHV-style decoder, ~9.9M, what
Neodragon ships) or one of the seed's comparison decoders built from diffusers' VAEs, modified for
Pyramid-Flow's latents (`wan`, `ltx`, `cosmos`); the model interface builds them (`build_decoder`;
Pyramid-Flow's `tiny_decoder.py` and `decoders.py`). Asymmetric: the native encoder, and with it the
latent space the DiT was trained on, stays; only the decoder changes. The new decoder learns to
decode the native encoder's latents of videos back to those videos (pixel L1 + MSE, as the seed's
"PSNR (Orig. Enc.)" column measures); optionally it also matches the native decoder's output
(`native_weight`), and, with `generated: N`, it also learns the native decoder's decodes of N
latents the pipeline samples itself (`GeneratedBank`: guided DiT latents can lie far outside the
encoder's range; the tiny teacher's at CFG 5 have 2.6x the encoder's std, 6x at CFG 10). No perceptual term: LPIPS needs
downloaded VGG/AlexNet weights, which ndopt does not fetch, and no installed package ships one without them.

Training needs the `vae_encoder`: run this pass before `dead_component_elimination`, or keep the
encoder there. Plan mode swaps the structure only. A decoder whose latent channels do not match
the DiT's latents is rejected before any training, by the verifier, naming the edge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ndopt.errors import PassError
from ndopt.eval.metrics import psnr
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.spec import Port, TensorSpec
from ndopt.ir.verify import verify_structure
from ndopt.model import ModelInterface, interface_for, sampler_math
from ndopt.passmanager import Lossy, Pass, PassConfig, PassContext, PassResult, register

log = logging.getLogger("ndopt")


def native_scale(decoder: nn.Module) -> str:
    """`real` for a full-width native decoder (or an unknown one), `tiny` for the tiny preset's."""
    cfg = getattr(decoder, "config", None)
    widths = getattr(cfg, "decoder_block_out_channels", None)
    return "tiny" if widths is not None and max(widths) < 128 else "real"


@dataclass
class AsymmetricDecoderDistillation:
    """Decode the frozen native encoder's latents of a video back to the video (ndopt.train Objective)."""

    l1_weight: float = 1.0
    mse_weight: float = 1.0
    native_weight: float = 0.0  # also match the native decoder's output on the same latents
    foreground_weight: float = 0.0  # extra weight on the shapes (ndopt.train.objectives.pixel_loss)
    chroma_weight: float = 0.0  # extra weight on hue errors (pixel_loss)
    latent_noise: float = 0.0  # latents perturbed by this times their std: tolerance of generated latents
    uses: tuple[str, ...] = ("vae_encoder", "decoder")
    bank: GeneratedBank | None = None  # the pipeline's own latents with the native decoder's decodes
    generated_weight: float = 1.0

    def __call__(self, modules: Any, batch: Any, info: Any) -> Any:
        from ndopt.train.objectives import LossOutput, pixel_loss

        video = batch.videos.float()
        with torch.no_grad():
            z = modules["vae_encoder"](video)
            if self.latent_noise:
                eps = torch.stack([torch.randn(z.shape[1:], generator=g) for g in batch.generators()]).to(z)
                z = z + self.latent_noise * z.std(dim=(0, 2, 3, 4), keepdim=True) * eps
        logs: dict[str, float] = {}

        def loss_and_psnr(rec: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
            loss, mse = pixel_loss(rec, target, l1_weight=self.l1_weight, mse_weight=self.mse_weight,
                                   foreground_weight=self.foreground_weight, chroma_weight=self.chroma_weight)
            return loss, 10 * math.log10(4.0 / max(float(mse.detach()), 1e-12))

        rec = modules["decoder"](z).float()
        loss, logs["psnr"] = loss_and_psnr(rec, video)
        if self.native_weight:
            with torch.no_grad():
                native = modules["native"](z).float()
            loss = loss + self.native_weight * (rec - native).abs().mean()
        if self.bank is not None and self.generated_weight:
            # one bank entry per sample, drawn from the sample's own seed (resume- and DDP-stable)
            pick = torch.tensor([int(torch.randint(len(self.bank), (1,), generator=g)) for g in batch.generators()])
            zg, target = self.bank.latents[pick].to(z), self.bank.targets[pick].to(z)
            gloss, logs["generated_psnr"] = loss_and_psnr(modules["decoder"](zg).float(), target)
            loss = loss + self.generated_weight * gloss
        return LossOutput(loss, {"loss": float(loss.detach()), **logs})


@dataclass(frozen=True)
class GeneratedBank:
    """Latents the pipeline samples itself (denormalised, as the decoder sees them) and the native
    decoder's decodes of them: the distribution the decoder meets at inference. A DiT sampled with
    guidance writes latents wider than the encoder's (the tiny teacher: 2.6x its std at CFG 5, 6x at
    CFG 10), which a decoder that only learned the encoder's latents decodes washed out."""

    latents: torch.Tensor  # [N, C, T, h, w]
    targets: torch.Tensor  # [N, 3, F, H, W] in [-1, 1]

    def __len__(self) -> int:
        return int(self.latents.shape[0])


def generated_bank(pipeline: Pipeline, config: Any, ctx: PassContext, path: Any) -> tuple[GeneratedBank, GeneratedBank]:
    """Sample `config.generated` one-latent-frame clips of training captions (and `config.eval_videos`
    of held-out captions, for the figure) with the pipeline (its guidance, `config.generated_steps`),
    decode them with its (native) decoder; (train, eval) banks, cached at `path`."""
    from safetensors.torch import load_file, save_file

    from ndopt.io import atomic_path
    from ndopt.progress import progress
    from ndopt.train.data import ProceduralConfig, ProceduralVideos

    if path.exists():
        t = load_file(str(path))
        return GeneratedBank(t["latents"], t["targets"]), GeneratedBank(t["eval_latents"], t["eval_targets"])
    pc = ProceduralConfig(height=config.height, width=config.width)
    train = ProceduralVideos(pc, seed=ctx.seed_for(702))
    held = ProceduralVideos(pc, seed=ctx.seed_for(702), held_out=True)
    captions = [train.scene(i)[0].caption for i in range(config.generated)]
    captions += [held.scene(i)[0].caption for i in range(config.eval_videos)]
    sch = pipeline.schedule.with_frames(1, config.height, config.width)
    if config.generated_steps is not None:
        sch = sch.with_steps(tuple(config.generated_steps))
    pipe = pipeline.replace(schedule=sch)
    denormalize_latents = sampler_math(pipeline).denormalize_latents
    g = torch.Generator().manual_seed(ctx.seed_for(703))
    zs, targets = [], []
    with torch.no_grad(), progress("decoder_swap: sampling the pipeline's latents", len(captions)) as advance:
        for start in range(0, len(captions), 16):
            chunk = captions[start:start + 16]
            latents = pipe.sampler.sample(pipe, chunk, generator=g)
            zs.append(denormalize_latents(latents.float()).cpu())  # what the decoder is called with
            targets.append(pipe.sampler.decode(pipe, latents).float().cpu())
            for _ in chunk:
                advance()
    z, t = torch.cat(zs), torch.cat(targets)
    n = config.generated
    tensors = {"latents": z[:n], "targets": t[:n], "eval_latents": z[n:], "eval_targets": t[n:]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return GeneratedBank(z[:n], t[:n]), GeneratedBank(z[n:], t[n:])


@register
class DecoderSwap(Pass):
    """Swap the VAE decoder for a small one trained on the native encoder's latents."""

    name = "decoder_swap"
    # pixel PSNR of the probe's video against the native decoder's (same latents). Tiny preset with its
    # random-weight VAE: 18.4 dB after 300 steps (the native latents carry almost nothing to learn);
    # the seed, against the ground truth: TAEHV 27.71 dB, native 29.12 dB. Revisit with trained weights.
    fidelity = Lossy(metric="pixel_psnr", budget_db=15.0, frame_budget_db=13.0)

    class Config(PassConfig):
        decoder: Literal["tiny", "wan", "ltx", "cosmos"] = Field(  # seed: the modified TAEHV ships
            "tiny", description="the new decoder: `tiny` (TAEHV-style, what Neodragon ships) or a diffusers "
                                "VAE's decoder modified for these latents (`wan`, `ltx`, `cosmos`)")
        scale: Literal["auto", "real", "tiny"] = Field("auto", description="the new decoder's width: `real`, "
                                                       "`tiny` (the tiny preset's), or `auto` (like the native one)")
        latent_channels: int | None = Field(None, ge=1, description="latent channels it decodes (null: the native "
                                                                    "decoder's)")
        steps: int = Field(600, ge=0, description="training steps")
        batch_size: int = Field(4, ge=1, description="clips per step")
        lr: float = Field(2e-3, gt=0, description="peak learning rate (AdamW, cosine)")
        l1_weight: float = Field(1.0, ge=0, description="weight of the pixel L1 loss vs the video")
        mse_weight: float = Field(1.0, ge=0, description="weight of the pixel MSE loss vs the video")
        native_weight: float = Field(0.0, ge=0, description="weight of matching the native decoder's output "
                                                            "(L1) on the same latents")
        # the tiny teacher's VAE was trained with foreground 8, chroma 3, latent noise 0.05 (tiny_teacher.yaml)
        foreground_weight: float = Field(0.0, ge=0, description="extra loss weight on the shapes (pixels far "
                                                                "from the border colour)")
        chroma_weight: float = Field(0.0, ge=0, description="extra loss weight on hue errors")
        latent_noise: float = Field(0.0, ge=0, description="latents perturbed by this times their std "
                                                           "(tolerance of generated latents)")
        # Also distil on latents the pipeline samples itself (native decodes as targets), so the new
        # decoder meets the DiT's output distribution, not only the encoder's (GeneratedBank)
        generated: int = Field(0, ge=0, description="one-frame clips the pipeline samples to also distil on, "
                                                    "native decodes as targets (0: none)")
        generated_steps: list[int] | None = Field(None, description="their sampling steps per pyramid stage "
                                                                    "(null: the pipeline's)")
        generated_weight: float = Field(1.0, ge=0, description="weight of the loss on those samples")
        data: str | None = Field(None, description="a folder with captions.jsonl and its videos (null: "
                                                   "procedural videos)")
        frames: int = Field(9, ge=1, description="frames per training clip")
        height: int = Field(64, ge=8, description="clip height in pixels")
        width: int = Field(64, ge=8, description="clip width in pixels")
        eval_videos: int = Field(4, ge=1, description="held-out videos of the PSNR figures in the metrics")
        # a trained decoder (the `decoder.safetensors` a run of this pass writes, or a bundled one by name,
        # e.g. `pyramid-flow-tiny-decoder`) instead of training: its kind, scale, latent channels and native
        # VAE encoder must match this pipeline and this config
        weights: Path | None = Field(None, description="a trained decoder's weights (a file, or a bundled name "
                                                       "such as `pyramid-flow-tiny-decoder`) instead of training")

    def swapped(self, pipeline: Pipeline, ctx: PassContext) -> tuple[Pipeline, Any, Any]:
        decs = pipeline.by_role("vae_decoder")
        if len(decs) != 1:
            raise PassError(f"decoder_swap needs one vae_decoder; the pipeline has {len(decs)}")
        old = decs[0]
        model = interface_for(pipeline).require("build_decoder", user=self.name)
        channels = self.config.latent_channels or int(old.attrs.get("latent_channels", 16))
        scale = native_scale(old.module) if self.config.scale == "auto" else self.config.scale
        seed = ctx.seed_for(701)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(old.device):
                module = model.build_decoder(self.config.decoder, scale, channels)
        window = getattr(old.module, "window_size", None)  # decode in the chunks the pipeline decoded in
        if window is not None and hasattr(module, "window_size"):
            module.window_size = window
        z = old.port("z").spec
        ins = (Port("z", TensorSpec((z.shape[0], channels, *z.shape[2:]), z.dtype)),)
        new = replace(old.with_module(module, latent_channels=channels, decoder_kind=self.config.decoder,
                                      **{"summary.decoder": f"{self.config.decoder} ({scale})"}), inputs=ins)
        out = pipeline.replace(**{old.name: new})
        verify_structure(out)  # a latent-width mismatch fails here, naming the dit -> vae_decoder edge
        return out, old, new

    def _unchanged(self, pipeline: Pipeline) -> bool:
        decs = pipeline.by_role("vae_decoder")
        return len(decs) == 1 and decs[0].attrs.get("decoder_kind") == self.config.decoder and \
            self.config.latent_channels in (None, decs[0].attrs.get("latent_channels"))

    def plan(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        if self._unchanged(pipeline):
            return PassResult(pipeline, modified=False, metrics={"decoder": self.config.decoder})
        out, old, new = self.swapped(pipeline, ctx)
        return PassResult(out, modified=True, metrics=self._metrics(old, new))

    def _metrics(self, old: Any, new: Any) -> dict[str, Any]:
        return {"decoder": self.config.decoder, "params_before": old.params(), "params_after": new.params()}

    def run(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        if self._unchanged(pipeline):
            return PassResult(pipeline, modified=False, metrics={"decoder": self.config.decoder})
        out, old, new = self.swapped(pipeline, ctx)
        encoder = pipeline.components.get("vae_encoder")
        if encoder is None:
            raise PassError("decoder_swap trains the new decoder on the native VAE encoder's latents, but the "
                            "pipeline has no vae_encoder: put decoder_swap before dead_component_elimination "
                            "(or give dead_component_elimination keep: [vae_encoder])")
        key = hashlib.blake2b(json.dumps(self.config.model_dump(mode="json"), sort_keys=True).encode(),
                              digest_size=6)
        pass_dir = ctx.pass_dir
        work = pass_dir / f"train-{key.hexdigest()}"
        metrics = self._metrics(old, new)
        bank = held = None
        artifacts: dict[str, Path] = {}
        if self.config.weights is not None:
            model = interface_for(pipeline)
            load_decoder(model, model.weights_file(self.config.weights), new.module, encoder.module, self.config)
            metrics["weights"] = str(self.config.weights)
        else:
            untrained = decoder_fidelity(self.config, encoder.module, old.module, new.module, ctx)["decoded_psnr"]
            if self.config.generated and self.config.steps:
                bank, held = generated_bank(pipeline, self.config, ctx, work / "generated.safetensors")
            metrics.update(distill(self.config, encoder.module, old.module, new.module, ctx, work, bank))
            metrics["decoded_psnr_untrained"] = untrained
            artifacts = {"training": work,
                         "decoder": save_decoder(pass_dir / "decoder.safetensors", new.module, encoder.module,
                                                 self.config)}
        metrics.update(decoder_fidelity(self.config, encoder.module, old.module, new.module, ctx, held))
        log.info("decoder_swap (%s): decoded PSNR %.2f dB (native %.2f dB), vs native %.2f dB",
                 self.config.decoder, metrics["decoded_psnr"], metrics["native_decoded_psnr"],
                 metrics["psnr_vs_native"])
        return PassResult(out, modified=True, metrics=metrics, artifacts=artifacts)


DECODER_FORMAT = "ndopt.decoder_swap.decoder/1"


def _decoder_meta(encoder: nn.Module, config: Any) -> dict[str, str]:
    from ndopt.train.data import module_fingerprint

    return {"format": DECODER_FORMAT, "encoder": module_fingerprint(encoder), "decoder": config.decoder,
            "scale": str(config.scale), "latent_channels": str(config.latent_channels)}


def save_decoder(path: Path, decoder: nn.Module, encoder: nn.Module, config: Any) -> Path:
    """A trained decoder (safetensors, atomically) with what it decodes: the native encoder's weight
    fingerprint, the decoder kind, scale and latent channels (metadata), so `weights:` can refuse a mismatch."""
    from safetensors.torch import save_file

    from ndopt.io import atomic_path

    with atomic_path(Path(path)) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in decoder.state_dict().items()}, str(tmp),
                  metadata={**_decoder_meta(encoder, config),
                            "config": json.dumps(config.model_dump(mode="json"), sort_keys=True)})
    return Path(path)


def load_decoder(model: ModelInterface, path: Path, decoder: nn.Module, encoder: nn.Module, config: Any) -> None:
    """Load `save_decoder`'s file into `decoder` in place, refusing another encoder's or another kind's
    (`path`: a file, or a decoder the frontend bundles, e.g. `pyramid-flow-tiny-decoder`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise PassError(f"decoder_swap: weights {path}: no such file (a path, or a bundled decoder's name)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    want = _decoder_meta(encoder, config)
    if meta.get("format") != DECODER_FORMAT:
        raise PassError(f"decoder_swap: {path} is not a decoder written by decoder_swap "
                        f"(metadata format {meta.get('format')!r})")
    bad = [f"{k}: file {meta.get(k)!r}, this pipeline/config {v!r}" for k, v in want.items() if meta.get(k) != v]
    if bad:
        raise PassError(f"decoder_swap: {path} does not fit: {'; '.join(bad)}; train it again (omit weights)")
    model.load_into(decoder, load_file(str(path)), source=str(path))


def _videos(config: Any, seed: int, held_out: bool = False) -> Any:
    from ndopt.train.data import FolderVideos, ProceduralConfig, ProceduralVideos

    if config.data is not None:
        return FolderVideos(config.data, frames=config.frames, height=config.height, width=config.width)
    cfg = ProceduralConfig(frames=config.frames, height=config.height, width=config.width)
    return ProceduralVideos(cfg, seed=seed, held_out=held_out)


def distill(config: Any, encoder: nn.Module, native: nn.Module, decoder: nn.Module, ctx: PassContext,
            work: Any, bank: GeneratedBank | None = None) -> dict[str, Any]:
    """Train `decoder` in place (resumable under `work`); returns the final loss and steps."""
    from ndopt.train import TrainConfig, Trainer

    if config.steps == 0:
        return {"steps": 0}
    frozen = {"vae_encoder": encoder, **({"native": native} if config.native_weight else {})}
    objective = AsymmetricDecoderDistillation(config.l1_weight, config.mse_weight, config.native_weight,
                                              config.foreground_weight, config.chroma_weight, config.latent_noise,
                                              uses=tuple(["decoder", *frozen]), bank=bank,
                                              generated_weight=config.generated_weight)
    tc = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr, seed=ctx.seed,
                     lr_schedule="cosine", warmup_steps=min(20, config.steps // 10),
                     checkpoint_every=max(50, config.steps // 4), log_every=max(1, config.steps // 10))
    result = Trainer(trainable={"decoder": decoder}, frozen=frozen, objective=objective,
                     data=_videos(config, ctx.seed), config=tc, run_dir=work, device=ctx.device,
                     name="decoder_swap").fit()
    return {"steps": result.steps, "resumed_from": result.resumed_from,
            "loss": round(float(result.final.get("loss", float("nan"))), 6)}


@torch.no_grad()
def decoder_fidelity(config: Any, encoder: nn.Module, native: nn.Module, decoder: nn.Module,
                     ctx: PassContext, bank: GeneratedBank | None = None) -> dict[str, float]:
    """On held-out videos: PSNR of new and native decodes of the native encoder's latents vs the video
    (the seed's "PSNR (Orig. Enc.)"), and of the new decode vs the native one; with a bank, also the
    new decode of the pipeline's own latents of held-out captions vs their native decode."""
    data = _videos(config, ctx.seed + 1, held_out=config.data is None)
    device = next(decoder.parameters()).device
    video = torch.stack([data[i].video for i in range(min(config.eval_videos, len(data)))]).to(device)
    z = encoder(video)
    new, old = decoder(z).clamp(-1, 1), native(z).clamp(-1, 1)
    out = {"decoded_psnr": round(psnr(new, video, 2.0), 3), "native_decoded_psnr": round(psnr(old, video, 2.0), 3),
           "psnr_vs_native": round(psnr(new, old, 2.0), 3)}
    if bank is not None:
        gen = torch.cat([decoder(zg.to(device)) for zg in bank.latents.split(1)]).clamp(-1, 1)
        out["generated_psnr_vs_native"] = round(psnr(gen, bank.targets.to(device), 2.0), 3)
    return out
