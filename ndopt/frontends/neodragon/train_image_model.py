"""Train the tiny image model (the shipped weights of `image-model-tiny`) from scratch on procedural frames.

    python -m ndopt.frontends.neodragon.train_image_model --out runs/image-model-tiny [--install]
        [--vae-steps 1400] [--vae-full-steps 150] [--unet-steps 2400] [--scale 0.01]

The data are the first frames of `ProceduralVideos` clips at 128 x 128 with their captions. Three
phases, each resumable (rerun the same command and a finished phase is loaded, not retrained):

1. `vae0`, `vae1`: the whole AutoencoderKL reconstructs frames, first 64 x 64 windows around the
   shape (a quarter of the cost), then whole frames (L1 + MSE with shapes, hue and the frame's edge
   weighted up, plus SD's small KL, 1e-6); it is then reparametrised exactly so that latents x
   scaling_factor have zero mean and unit variance per channel (the UNet's input scale, as SDXL's
   VAE with 0.13025);
2. `latents`: a pool of frames is encoded once (posterior means) and cached;
3. `unet`: the UNet and both CLIP text encoders learn to predict the clean latents x0
   (prediction_type "sample") from x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, the scheduler's DDPM
   noising, at exactly the sampler's timesteps 999/749/499/249.

Why x0 at those four timesteps: Neodragon samples with LCMScheduler at 4 steps without guidance.
An LCM is distilled from a teacher; training from scratch there is none, but at these timesteps
LCM's boundary scalings are c_skip ~ 0 and c_out ~ 1 (timestep_scaling 10), so the consistency
function LCMScheduler evaluates is just the x0 estimate, and the sampler re-noises that estimate to
the next timestep with the same DDPM marginals as training. A model trained to predict x0 at
exactly those timesteps therefore sees only inputs of the kind it was trained on. Epsilon
prediction would not do: at t = 999 sqrt(a_t) = 0.068, and x0 = (x_t - 0.998 eps) / 0.068 blows
a tiny model's noise error up 15 times.

Afterwards the model is checked on held-out (colour, shape) captions (`shape_colour`) and its
weights written to `<out>/image-model-tiny.safetensors` (and with `--install` into the package).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch import Tensor

from ndopt.frontends.neodragon import image_model as im
from ndopt.io import atomic_path, atomic_write_json, package_weights
from ndopt.train.data import Example, ProceduralConfig, ProceduralVideos, module_fingerprint, sample_seed
from ndopt.train.engine import TrainConfig, Trainer
from ndopt.train.objectives import LossOutput, StepInfo, foreground_mask, pixel_loss
from ndopt.train.prompt_following import shape_colour

log = logging.getLogger("ndopt")

DATA = ProceduralConfig(height=128, width=128)
HELD_OUT_SEED = 1234  # evaluation captions: held-out (colour, shape) pairs, a stream apart from training


class FirstFrames:
    """Frame 0 of each procedural clip ([3, H, W] in [-1, 1]) with its caption; with `crop`, a crop x crop
    window around the shape (its foreground's centre, jittered by up to a quarter window; a function of
    (seed, index), as the clip). Uniformly placed windows miss the shape half the time, and with it the
    hue the tiny VAE is slowest to learn."""

    def __init__(self, config: ProceduralConfig = DATA, *, seed: int = 0, held_out: bool = False,
                 crop: int | None = None) -> None:
        self.clips = ProceduralVideos(config, seed=seed, held_out=held_out)
        self.seed, self.crop = seed, crop

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> Example:
        ex = self.clips[index]
        frame = ex.video[:, 0]
        if self.crop:
            g = torch.Generator().manual_seed(sample_seed(self.seed, index, "crop"))
            fg = foreground_mask(frame[None])[0, 0].nonzero().float()
            centre = fg.mean(0) if len(fg) else torch.tensor(frame.shape[-2:]) / 2
            jitter = (torch.rand(2, generator=g) - 0.5) * self.crop / 2
            top, left = (min(max(round(c + j - self.crop / 2), 0), n - self.crop)
                         for c, j, n in zip(centre.tolist(), jitter.tolist(), frame.shape[-2:]))
            frame = frame[:, top:top + self.crop, left:left + self.crop]
        return Example(ex.caption, video=frame)


class LatentPool:
    """Cached latents (already x scaling_factor) and captions."""

    def __init__(self, latents: Tensor, captions: list[str]) -> None:
        self.latents, self.captions = latents, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> Example:
        return Example(self.captions[index], latents=self.latents[index])


def _noise(batch: Any, shape: tuple[int, ...]) -> Tensor:
    """Per-sample N(0, 1) from the batch's seeds (the same draws however the batch is split)."""
    return torch.stack([torch.randn(shape, generator=g) for g in batch.generators()])


@dataclass
class AutoencoderKLReconstruction:
    """L1 + MSE of the decoded posterior sample (shape and hue weighted up, `pixel_loss`), the frame's
    outer pixels weighted up, + kl_weight x KL.

    The edge term: with zero padding the outermost pixels are the tiny decoder's hardest (unweighted
    it left a ring 0.2 off the background's brightness), and `shape_colour` takes the background's
    colour from exactly that ring."""

    kl_weight: float = 1e-6  # SD's autoencoder KL weight: a nearly plain autoencoder
    foreground_weight: float = 8.0  # the tiny teacher's VAE tuning (ndopt/train/tiny_teacher.yaml)
    chroma_weight: float = 3.0
    edge_weight: float = 8.0
    edge: int = 2  # pixels
    uses: tuple[str, ...] = ("vae",)

    def __call__(self, modules: Any, batch: Any, info: StepInfo) -> LossOutput:
        x = batch.videos
        post = modules["vae"].encode(x).latent_dist
        z = post.mean + post.std * _noise(batch, post.mean.shape[1:]).to(x)
        rec = modules["vae"].decode(z).sample
        rec_loss, mse = pixel_loss(rec, x, foreground_weight=self.foreground_weight, chroma_weight=self.chroma_weight)
        ring = torch.ones_like(x[:1, :1])
        ring[..., self.edge:-self.edge, self.edge:-self.edge] = 0
        err = rec.float() - x.float()
        edge_loss = (ring * (err.pow(2) + err.abs())).mean()
        kl = post.kl().mean()
        loss = rec_loss + self.edge_weight * edge_loss + self.kl_weight * kl
        return LossOutput(loss, {"loss": float(loss.detach()), "psnr": _psnr(mse.detach()), "kl": float(kl.detach()),
                                 "edge": float(edge_loss.detach())})


@dataclass
class X0AtSamplerTimesteps:
    """MSE of the UNet's x0 prediction at one of the sampler's timesteps per sample (module doc: why)."""

    model: im.ImageModel
    uses: tuple[str, ...] = ("unet", "text_encoder")

    def __call__(self, modules: Any, batch: Any, info: StepInfo) -> LossOutput:
        cfg, sched = self.model.config, self.model.scheduler
        x0 = batch.latents
        b = x0.shape[0]
        ts = torch.tensor(cfg.timesteps)
        pick = torch.stack([torch.randint(len(ts), (1,), generator=g) for g in batch.generators()]).flatten()
        t = ts[pick]
        eps = _noise(batch, x0.shape[1:]).to(x0)  # after `pick` in each sample's stream
        xt = sched.add_noise(x0, eps, t)
        ids = modules.raw("text_encoder").tokenize(batch.captions)
        embeds, pooled = modules["text_encoder"](**{k: v.to(x0.device) for k, v in ids.items()})
        pred = modules["unet"](xt, t.to(x0), embeds, pooled, im.time_ids(cfg.height, cfg.width, b).to(x0))
        per = (pred.float() - x0.float()).pow(2).mean(dim=(1, 2, 3))
        metrics = {"loss": float(per.mean().detach())}
        for k, tk in enumerate(cfg.timesteps):
            if (pick == k).any():
                metrics[f"loss_t{tk}"] = float(per[pick == k].mean().detach())
        return LossOutput(per.mean(), metrics)


def _psnr(mse: Tensor | float) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(float(mse), 1e-12))


@torch.no_grad()
def standardize_latents(vae: AutoencoderKL, frames: Tensor, scaling_factor: float) -> dict[str, list[float]]:
    """Reparametrise the VAE so that posterior means x scaling_factor have zero mean, unit std per channel.

    z' = s (z - m) folds into quant_conv (mean rows scaled and shifted, log-variance + 2 log s) and
    post_quant_conv (input columns / s, bias + W m): decode(encode(x)) is unchanged."""
    mean = vae.encode(frames).latent_dist.mean
    m = mean.mean(dim=(0, 2, 3))
    s = 1.0 / (scaling_factor * mean.std(dim=(0, 2, 3)))
    c = m.numel()
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] *= s[:, None, None, None]
    q.bias[:c] = s * (q.bias[:c] - m)
    q.bias[c:] += 2 * s.log()
    p.bias += p.weight[:, :, 0, 0] @ m
    p.weight /= s[None, :, None, None]
    return {"mean": m.tolist(), "std": (1 / (s * scaling_factor)).tolist()}


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, data: FirstFrames, size: int, scaling_factor: float, path: Path,
                batch: int = 64) -> LatentPool:
    """Posterior means x scaling_factor of data[0:size], cached at `path` (safetensors, written atomically)."""
    from safetensors.torch import load_file, save_file

    if path.is_file():
        sd = load_file(str(path))
        return LatentPool(sd["latents"], bytes(sd["captions"].tolist()).decode().split("\n"))
    chunks, captions = [], []
    for start in range(0, size, batch):
        items = [data[i] for i in range(start, min(size, start + batch))]
        frames = torch.stack([e.video for e in items])
        chunks.append(vae.encode(frames).latent_dist.mean * scaling_factor)
        captions += [e.caption for e in items]
    latents = torch.cat(chunks).contiguous()
    blob = torch.tensor(list("\n".join(captions).encode()), dtype=torch.uint8)
    with atomic_path(path) as tmp:
        save_file({"latents": latents, "captions": blob}, str(tmp))
    return LatentPool(latents, captions)


@torch.no_grad()
def held_out_psnr(vae: AutoencoderKL, n: int = 64, seed: int = HELD_OUT_SEED) -> float:
    frames = torch.stack([FirstFrames(seed=seed, held_out=True)[i].video for i in range(n)])
    rec = vae.decode(vae.encode(frames).latent_dist.mean).sample.clamp(-1, 1)
    return _psnr((rec - frames).pow(2).mean())


@torch.no_grad()
def evaluate(model: im.ImageModel, n: int = 32, seed: int = 0, batch: int = 16,
             strip: Path | None = None) -> dict[str, Any]:
    """Generate first frames for n held-out captions; the share whose shape has the caption's colour."""
    data = ProceduralVideos(DATA, seed=HELD_OUT_SEED, held_out=True)
    scenes = [data.scene(i)[0] for i in range(n)]
    rng = np.random.default_rng(seed)
    images = torch.cat([im.generate_image(model, [s.caption for s in scenes[k:k + batch]], generator=rng)
                        for k in range(0, n, batch)])
    found = [shape_colour(img, DATA.colours) for img in images]
    results = [{"caption": s.caption, "colour": s.colour, "found": f} for s, f in zip(scenes, found)]
    if strip is not None:
        save_strip(strip, images[:8])
    return {"rate": sum(r["colour"] == r["found"] for r in results) / n, "n": n, "samples": results}


def save_strip(path: Path, images: Tensor) -> Path:
    """Images in [-1, 1] side by side as one PNG (written atomically)."""
    from PIL import Image

    row = torch.cat(list(images), dim=-1)
    arr = ((row.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="png")
    return path


# the defaults train in ~21 minutes on one thread of a shared 2-core machine (each run's report.json has the times)
def train(out: Path, *, vae_steps: int = 1400, vae_full_steps: int = 150, unet_steps: int = 2400, pool: int = 4096,
          seed: int = 0, eval_prompts: int = 32,
          show_progress: bool | None = None) -> tuple[im.ImageModel, dict[str, Any]]:
    """Run the phases (each resumes from its checkpoints) and evaluate; returns the trained model."""
    out = Path(out)
    t0 = time.perf_counter()
    model = im.build_image_model(im.TINY, weights=False, seed=seed)
    cfg = model.config
    sf = cfg.vae["scaling_factor"]
    report: dict[str, Any] = {"phases": {}}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(cfg.vae)
    with torch.no_grad():  # posterior std 0.05 at first: a unit-variance posterior drowns a fresh encoder's means
        vae.quant_conv.bias[cfg.vae["latent_channels"]:] = 2 * math.log(0.05)
    # 64 x 64 crops first (a quarter of the cost; the same shape sizes as full frames), then whole frames
    for i, (steps, crop, lr) in enumerate(((vae_steps, 64, 1e-3), (vae_full_steps, None, 3e-4))):
        res = Trainer(trainable={"vae": vae}, objective=AutoencoderKLReconstruction(),
                      data=FirstFrames(seed=seed + 100 * i, crop=crop),
                      config=TrainConfig(steps=steps, batch_size=8, lr=lr, warmup_steps=min(50, steps // 4),
                                         lr_schedule="cosine", checkpoint_every=100, log_every=25, seed=seed + i),
                      run_dir=out / f"vae{i}", name=f"image-model/vae{i}", show_progress=show_progress).fit()
        report["phases"][f"vae{i}"] = {"final": res.final, "seconds": res.seconds}
    calib = torch.stack([FirstFrames(seed=seed + 99)[i].video for i in range(256)])
    with torch.no_grad():
        before = vae.decode(vae.encode(calib[:8]).latent_dist.mean).sample
        factors = standardize_latents(vae, calib, sf)
        after = vae.decode(vae.encode(calib[:8]).latent_dist.mean).sample
    report["vae"] = {"held_out_psnr_db": held_out_psnr(vae), "standardize": factors,
                     "reparametrisation_max_change": float((after - before).abs().max())}
    log.info("image-model: VAE held-out reconstruction %.2f dB", report["vae"]["held_out_psnr_db"])
    model.decoder.load_state_dict({k: v for k, v in vae.state_dict().items()
                                   if k.split(".", 1)[0] in ("post_quant_conv", "decoder")})

    t1 = time.perf_counter()
    latents = encode_pool(vae, FirstFrames(seed=seed + 1), pool, sf,
                          out / "cache" / f"latents-{pool}-{module_fingerprint(vae)}.safetensors")
    report["phases"]["latents"] = {"frames": len(latents), "seconds": time.perf_counter() - t1,
                                   "mean": float(latents.latents.mean()), "std": float(latents.latents.std())}

    res = Trainer(trainable={"unet": model.unet, "text_encoder": model.text_encoder},
                  objective=X0AtSamplerTimesteps(model), data=latents,
                  config=TrainConfig(steps=unet_steps, batch_size=16, lr=1e-3,
                                     warmup_steps=min(100, unet_steps // 4), lr_schedule="cosine",
                                     ema_decay=0.995, checkpoint_every=100, log_every=25, seed=seed),
                  run_dir=out / "unet", name="image-model/unet", show_progress=show_progress).fit()
    report["phases"]["unet"] = {"final": res.final, "seconds": res.seconds}
    for m in model.parts().values():
        m.eval().requires_grad_(False)

    t2 = time.perf_counter()
    report["prompt_following"] = evaluate(model, eval_prompts, strip=out / "held_out.png")
    report["eval_seconds"] = time.perf_counter() - t2
    report["seconds"] = time.perf_counter() - t0
    log.info("image-model: held-out prompt following %.0f%% of %d", 100 * report["prompt_following"]["rate"],
             eval_prompts)
    atomic_write_json(out / "report.json", report)
    return model, report


def save_weights(model: im.ImageModel, path: Path) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(im.state_dict(model), str(tmp))
    return path


def main(argv: list[str] | None = None) -> int:
    from ndopt.train.engine import add_script_options, start_script

    ap = argparse.ArgumentParser(prog="python -m ndopt.frontends.neodragon.train_image_model",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, cache, report)")
    ap.add_argument("--vae-steps", type=int, default=1400, help="VAE steps on 64 x 64 crops")
    ap.add_argument("--vae-full-steps", type=int, default=150, help="VAE steps on whole 128 x 128 frames")
    ap.add_argument("--unet-steps", type=int, default=2400)
    ap.add_argument("--pool", type=int, default=4096, help="training frames encoded for the UNet phase")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the steps and pool (smoke runs: 0.01)")
    ap.add_argument("--eval-prompts", type=int, default=32)
    add_script_options(ap, "also write the weights into the package")
    args = ap.parse_args(argv)
    start_script(args)

    def scaled(n: int) -> int:
        return max(1, round(n * args.scale))

    model, _ = train(args.out, vae_steps=scaled(args.vae_steps), vae_full_steps=scaled(args.vae_full_steps),
                     unet_steps=scaled(args.unet_steps), pool=max(16, scaled(args.pool)), eval_prompts=args.eval_prompts)
    weights = save_weights(model, args.out / f"{im.TINY}.safetensors")
    log.info("image-model: weights %s (%.1f MB)", weights, weights.stat().st_size / 1e6)
    if args.install:
        target = package_weights(im.__package__, f"{im.TINY}.safetensors")
        save_weights(model, target)
        log.info("image-model: installed as the tiny preset's weights: %s", target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
