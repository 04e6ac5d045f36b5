"""The miniFLUX sampler: the SD3 variant's pyramidal sampler, with miniFLUX's latent scaling.

`PyramidFlowSampler` drives the DiT unchanged (same DiT call, same schedule, same renoise); its call
plan lists the text component's own ports (here t5_ids, t5_mask, clip_l_ids: no CLIP-G) and its
`decode` takes the latent constants from the pipeline's frontend (`ndopt.model.sampler_math`). What
differs upstream lives here: `PyramidDiTForVideoGeneration` normalises the first latent frame with
miniFLUX's own constants (`vae_shift_factor = -0.04`, `vae_scale_factor = 1 / 1.8726`; later frames
as the SD3 variant), which the miniFLUX interface's `SamplerMath` carries. The subclass only names
both block kinds in the pipeline summary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ndopt.frontends.pyramid_flow import vae as vae_mod
from ndopt.frontends.pyramid_flow.sampler import PyramidFlowSampler
from ndopt.ir.component import Component

# upstream PyramidDiTForVideoGeneration.__init__, model_name == "pyramid_flux"
IMAGE_SHIFT = -0.04
IMAGE_SCALE = 1 / 1.8726


def normalize_latents(z: Tensor) -> Tensor:
    """Raw VAE latents [B, C, T, h, w] -> miniFLUX's latent space (upstream `get_vae_latent`)."""
    first = (z[:, :, :1] - IMAGE_SHIFT) * IMAGE_SCALE
    rest = (z[:, :, 1:] - vae_mod.VIDEO_SHIFT) * vae_mod.VIDEO_SCALE
    return torch.cat([first, rest], dim=2)


def denormalize_latents(z: Tensor) -> Tensor:
    """The inverse of `normalize_latents` (upstream `decode_latent`)."""
    first = z[:, :, :1] / IMAGE_SCALE + IMAGE_SHIFT
    rest = z[:, :, 1:] / vae_mod.VIDEO_SCALE + vae_mod.VIDEO_SHIFT
    return torch.cat([first, rest], dim=2)


@dataclass(frozen=True)
class MiniFluxSampler(PyramidFlowSampler):
    """PyramidFlowSampler for a miniFLUX pipeline (same fields: prompt suffix, negative prompt)."""

    def describe(self, component: Component) -> str:
        m = component.module
        if component.role == "dit" and hasattr(m, "single_transformer_blocks"):
            return (f"blocks={len(m.transformer_blocks)}+{len(m.single_transformer_blocks)} "
                    f"attention={getattr(m, 'attention_impl', 'sdpa')}")
        return super().describe(component)
