"""Neodragon's hybrid pipeline: an image model makes the first frame, the DiT the rest, SR upscales.

`attach(pipeline)` adds to a Pyramid-Flow pipeline the image model's three components (role
`image_model`: its text encoders, its UNet and its decoder), the super-resolution network (role
`super_resolution`) and the `HybridSampler`, and sets `first_frame: image-model`:

    prompt -> image_text_encoder -> image_unet (LCM, 4 steps) -> image_decoder -> frame at 2x size
           -> downsample to the DiT's size -> vae_encoder -> first latent frame (upstream i2v)
    prompt -> text_encoder -> dit (units 1..) -> vae_decoder (chunked, causal cache) -> SR per frame

The real-size model gets SSD-1B with an LCM scheduler and QuickSRNet Small on the meta device; the
tiny preset gets the image model and QuickSRNet trained by ndopt on the procedural frames.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ndopt.errors import NdoptError
from ndopt.frontends import HYBRID
from ndopt.frontends.pyramid_flow.sampler import (
    VAE_SPATIAL,
    Generators,
    Progress,
    PyramidFlowSampler,
    frame_count,
)
from ndopt.frontends.pyramid_flow.vae import normalize_latents
from ndopt.ir.component import Component
from ndopt.ir.pipeline import SINK, Pipeline
from ndopt.ir.spec import CallSignature, Port, TensorSpec

MODE = HYBRID  # Schedule.first_frame of a hybrid pipeline
SUFFIX = "-hybrid"  # a hybrid pipeline's name: its base's, then this
SR_SCALE = 2
DECODE_WINDOW = 1  # latent frames per decoder chunk after the first (the causal cache carries the rest)
IMAGE_COMPONENTS = ("image_text_encoder", "image_unet", "image_decoder")


class FirstFrameDecoder(nn.Module):
    """The image model's decoder as a one-frame video [B, 3, 1, H, W], the VAE encoder's input type."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, latents: Tensor) -> Tensor:
        return self.decoder(latents).unsqueeze(2)


class PerFrameSR(nn.Module):
    """A 2D super-resolution network applied to every frame of a video [B, 3, F, H, W]."""

    def __init__(self, net: nn.Module, scale: int = SR_SCALE) -> None:
        super().__init__()
        self.net = net
        self.scale = scale

    def forward(self, frames: Tensor) -> Tensor:
        b, c, f, h, w = frames.shape
        up = self.net(frames.transpose(1, 2).reshape(b * f, c, h, w))
        return up.reshape(b, f, c, h * self.scale, w * self.scale).transpose(1, 2)


@dataclass(frozen=True)
class HybridSampler(PyramidFlowSampler):
    """The Pyramid-Flow sampler with its first frame from the pipeline's image model and its frames
    upscaled by the super-resolution component; the schedule's size is the DiT's, the video's is
    `sr_scale` times it."""

    image: Any = None  # the image model's ImageModelConfig (ndopt.frontends.neodragon.image_model)
    image_preset: str = ""
    sr_scale: int = SR_SCALE
    memory_policy: str = "sequential"  # each phase loads its weights and frees the previous phase's

    def _settings(self) -> Any:
        if self.image is None:
            raise NdoptError("hybrid sampler without an image-model config: build it with ndopt's hybrid.attach")
        return self.image

    # ---- static view ----------------------------------------------------------------------
    def call_plan(self, pipeline: Pipeline) -> list[CallSignature]:
        sch, cfg = pipeline.schedule, self._settings()
        oh, ow = sch.height * self.sr_scale, sch.width * self.sr_scale
        lh, lw = cfg.latent_size(oh, ow)
        lc, text_len = int(cfg.unet["in_channels"]), int(cfg.clip_max_length)
        plan: list[CallSignature] = []
        te = pipeline.components.get("image_text_encoder")
        if te is not None:
            ids = TensorSpec((1, text_len), "int64")
            plan.append(CallSignature(te.name, "prompt", (("clip_l_ids", ids), ("clip_g_ids", ids)), 1,
                                      env=(("B", 1), ("L", text_len))))
        unet = pipeline.components.get("image_unet")
        if unet is not None:
            args = (("sample", TensorSpec((1, lc, lh, lw))), ("timestep", TensorSpec((1,))),
                    ("encoder_hidden_states", TensorSpec((1, text_len, context_dim(cfg)))),
                    ("text_embeds", TensorSpec((1, pooled_dim(cfg)))), ("time_ids", TensorSpec((1, 6))))
            plan.append(CallSignature(unet.name, "lcm", args, len(cfg.timesteps),
                                      env=(("B", 1), ("h", lh), ("w", lw))))
        dec = pipeline.components.get("image_decoder")
        if dec is not None:
            plan.append(CallSignature(dec.name, "image", (("latents", TensorSpec((1, lc, lh, lw))),),
                                      1, env=(("B", 1), ("h", lh), ("w", lw), ("F", 1), ("H", oh), ("W", ow))))
        enc = pipeline.components.get("vae_encoder")
        if enc is not None:
            plan.append(CallSignature(enc.name, "first_frame", (("video", TensorSpec((1, 3, 1, sch.height, sch.width))),),
                                      1, env=(("B", 1), ("F", 1), ("H", sch.height), ("W", sch.width),
                                              ("t", 1), ("h", sch.height // VAE_SPATIAL),
                                              ("w", sch.width // VAE_SPATIAL))))
        plan.extend(super().call_plan(pipeline))
        for sr in pipeline.by_role("super_resolution"):
            plan.append(CallSignature(sr.name, "frame", (("frames", TensorSpec((1, 3, 1, sch.height, sch.width))),),
                                      frame_count(sch.latent_frames), env=(("B", 1), ("F", 1), ("H", sch.height), ("W", sch.width),
                                                   ("H2", oh), ("W2", ow))))
        return plan

    def describe(self, component: Component) -> str:
        if component.role == "image_model" and component.name == "image_unet":
            return f"preset={self.image_preset} steps={len(self._settings().timesteps)}"
        return super().describe(component)

    # ---- running --------------------------------------------------------------------------
    def first_frame(self, pipeline: Pipeline, prompts: list[str], *, generator: Generators) -> Tensor:
        """The image model's frames [B, 3, H, W] in [-1, 1] at the video's (upscaled) size: LCM
        multistep sampling at the preset's timesteps, no guidance (image_model.generate_image), through
        the pipeline's components (so a quantized component samples as quantized)."""
        from ndopt.frontends.neodragon.image_model import ImageModel, generate_image

        sch, cfg = pipeline.schedule, self._settings()
        te, unet, dec = (pipeline[n] for n in IMAGE_COMPONENTS)
        model = ImageModel(te.module, unet.module, _Frame(dec), cfg, cfg.make_scheduler())
        size = {"height": sch.height * self.sr_scale, "width": sch.width * self.sr_scale}
        if isinstance(generator, (torch.Generator, np.random.Generator)):
            return generate_image(model, list(prompts), generator=generator, **size).float()
        if len(generator) != len(prompts):  # one generator per prompt: each row's frame from its own
            raise NdoptError(f"{len(generator)} generators for {len(prompts)} prompts: give one per prompt")
        return torch.cat([generate_image(model, [p], generator=g, **size).float()
                          for p, g in zip(prompts, generator, strict=True)])

    def sample(self, pipeline: Pipeline, prompts: list[str], *, generator: Generators,
               progress: Progress | None = None, first_latent: Tensor | None = None) -> Tensor:
        if first_latent is None:
            image = self.first_frame(pipeline, prompts, generator=generator)
            first_latent = self.encode_first_frame(pipeline, image)
            if progress is not None:
                progress("first frame (image model)")
        return super().sample(pipeline, prompts, generator=generator, progress=progress, first_latent=first_latent)

    def encode_first_frame(self, pipeline: Pipeline, image: Tensor) -> Tensor:
        """An image at the video's size -> the DiT's first latent frame: area-downsampled to the DiT's
        size, VAE-encoded (posterior mean) and normalized with the image factors (upstream i2v)."""
        sch = pipeline.schedule
        enc = pipeline["vae_encoder"]
        small = F.interpolate(image.float(), size=(sch.height, sch.width), mode="area")
        dtype = next(enc.module.parameters()).dtype
        z = enc.call(video=small.unsqueeze(2).to(enc.device, dtype))
        return normalize_latents(z.float())

    def decode(self, pipeline: Pipeline, latents: Tensor) -> Tensor:
        video = super().decode(pipeline, latents)
        sr = pipeline.by_role("super_resolution")
        if not sr:
            return video
        comp = sr[0]
        dtype = next(comp.module.parameters()).dtype
        frames = [comp.call(frames=video[:, :, f:f + 1].to(comp.device, dtype)).float() for f in range(video.shape[2])]
        return torch.cat(frames, dim=2).clamp(-1, 1)


class _Frame:
    """The image_decoder component as generate_image's decoder (latents -> [B, 3, H, W])."""

    def __init__(self, component: Component) -> None:
        self.component = component

    def __call__(self, latents: Tensor) -> Tensor:
        return self.component.call(latents=latents).squeeze(2)


def context_dim(cfg: Any) -> int:
    """Width of the image model's text states: CLIP-L's and CLIP-G's hidden sizes (SDXL concatenates them)."""
    return int(cfg.clip_l["hidden_size"]) + int(cfg.clip_g["hidden_size"])


def pooled_dim(cfg: Any) -> int:
    return int(cfg.clip_g["projection_dim"])


# ---- building --------------------------------------------------------------------------------
def _is_tiny(pipeline: Pipeline) -> bool:
    """A tiny pipeline (the trained presets' scale) gets the tiny image model and SR, else the real ones."""
    dit = pipeline.by_role("dit")
    return bool(dit) and dit[0].params() < 100_000_000


def attach(pipeline: Pipeline, *, image_model: str | None = None, super_resolution: str | None = None,
           seed: int = 0, decode_window: int | None = DECODE_WINDOW) -> Pipeline:
    """The pipeline in Neodragon's hybrid mode: image-model first frame, DiT, chunked decode, 2x SR.

    `image_model` / `super_resolution` name presets (default: the trained tiny ones for a tiny
    pipeline, SSD-1B + LCM and QuickSRNet Small for a real-size one); real-size presets are built
    on the meta device (plans), as the pipeline's own components are."""
    from diffusers.utils import logging as diffusers_logging

    from ndopt.frontends.neodragon import image_model as im
    from ndopt.frontends.neodragon import quicksrnet as qs

    # diffusers warns per attention call when a quantization sim passes its kwargs through (AIMET)
    diffusers_logging.set_verbosity_error()

    if pipeline.schedule.first_frame == MODE:
        return pipeline
    if "vae_encoder" not in pipeline.components:
        raise NdoptError(f"pipeline {pipeline.name!r} has no vae_encoder (dead_component_elimination removed it): "
                         "hybrid mode encodes the image model's frame with it; attach the image model first")
    tiny = _is_tiny(pipeline)
    meta = pipeline.is_meta
    device = "meta" if meta else pipeline.device
    image_model = image_model or ("image-model-tiny" if tiny else "ssd-1b-lcm")
    super_resolution = super_resolution or ("quicksrnet-small-tiny" if tiny else "quicksrnet-small")
    model = im.build_image_model(image_model, device=device, seed=seed)
    if super_resolution == qs.TINY_SR and not meta:
        net = qs.load_tiny_sr(device)
    else:  # the shipped tiny net's architecture is the small preset's
        config = qs.PRESETS.get("quicksrnet-small" if super_resolution == qs.TINY_SR else super_resolution)
        if config is None:
            raise NdoptError(f"unknown super-resolution preset {super_resolution!r}; one of "
                             f"{[*qs.PRESETS, qs.TINY_SR]}")
        with torch.device(device):
            net = qs.QuickSRNet(config)
    for m in (model.text_encoder, model.unet, model.decoder, net):
        m.eval().requires_grad_(False)
    return with_components(pipeline, model.text_encoder, model.unet, FirstFrameDecoder(model.decoder),
                           PerFrameSR(net, net.config.scale), model.config, image_preset=image_model,
                           sr_preset=super_resolution, decode_window=decode_window)


def with_components(pipeline: Pipeline, text: nn.Module, unet: nn.Module, decoder: nn.Module, sr: nn.Module,
                    config: Any, *, image_preset: str, sr_preset: str, decode_window: int | None) -> Pipeline:
    """Wire the hybrid components into the graph and swap in the hybrid sampler."""
    text_len = int(config.clip_max_length)
    ids = TensorSpec(("B", text_len), "int64")
    emb = TensorSpec(("B", text_len, context_dim(config)))
    pooled = TensorSpec(("B", pooled_dim(config)))
    lat = TensorSpec(("B", int(config.unet["in_channels"]), "h", "w"))
    frame = TensorSpec(("B", 3, "F", "H", "W"))
    up = TensorSpec(("B", 3, "F", "H2", "W2"))
    scale = int(getattr(sr, "scale", SR_SCALE))
    comps = {
        "image_text_encoder": Component(
            "image_text_encoder", "image_model", text, (Port("clip_l_ids", ids), Port("clip_g_ids", ids)),
            (Port("prompt_embeds", emb), Port("pooled_prompt_embeds", pooled)), entry="encode_tokens",
            attrs={"preset": image_preset, "config": config, "part": "text_encoders"}),
        "image_unet": Component(
            "image_unet", "image_model", unet,
            (Port("sample", lat, optional=True), Port("timestep", TensorSpec(("B",)), optional=True),
             Port("encoder_hidden_states", emb), Port("text_embeds", pooled),
             Port("time_ids", TensorSpec(("B", 6)), optional=True)),
            (Port("latents", lat),), attrs={"preset": image_preset, "config": config, "part": "unet"}),
        "image_decoder": Component(
            "image_decoder", "image_model", decoder, (Port("latents", lat),), (Port("video", frame),),
            attrs={"preset": image_preset, "config": config, "part": "vae_decoder"}),
        "super_resolution": Component(
            "super_resolution", "super_resolution", sr, (Port("frames", frame),), (Port("video", up),),
            attrs={"preset": sr_preset, "scale": scale}),
    }
    g = pipeline.graph.copy()
    for name, c in comps.items():
        g.add_node(name, kind="component", role=c.role)
    g.add_edge("prompt", "image_text_encoder", ports=(("clip_l_ids", "clip_l_ids"), ("clip_g_ids", "clip_g_ids")))
    g.add_edge("image_text_encoder", "image_unet", ports=(("prompt_embeds", "encoder_hidden_states"),
                                                          ("pooled_prompt_embeds", "text_embeds")))
    g.add_edge("image_unet", "image_decoder", ports=(("latents", "latents"),))
    if g.has_edge("image", "vae_encoder"):
        g.remove_edge("image", "vae_encoder")
    g.add_edge("image_decoder", "vae_encoder", ports=(("video", "video"),))
    dec_names = [c.name for c in pipeline.by_role("vae_decoder")]
    for d in dec_names:
        if g.has_edge(d, SINK):
            g.remove_edge(d, SINK)
        g.add_edge(d, "super_resolution", ports=(("video", "frames"),))
    g.add_edge("super_resolution", SINK, ports=(("video", "video"),))
    swapped = {}
    if decode_window is not None:
        for d in pipeline.by_role("vae_decoder"):
            if hasattr(d.module, "window_size"):
                mod = copy.copy(d.module)  # shares the parameters; the original keeps its own window
                mod.window_size = decode_window
                swapped[d.name] = d.with_module(mod, decode_window=decode_window)
    sch = replace(pipeline.schedule, first_frame=MODE)
    base = pipeline.sampler
    sampler = HybridSampler(prompt_suffix=base.prompt_suffix, negative_prompt=base.negative_prompt,
                            image=config, image_preset=image_preset, sr_scale=scale)
    sink = (Port("video", up),)
    out = pipeline.replace(schedule=sch, graph=g, **comps, **swapped)
    return replace(out, sampler=sampler, sink=sink, name=pipeline.name + SUFFIX)
