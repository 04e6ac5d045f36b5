"""Other video decoders for Pyramid-Flow's latents, from diffusers' VAEs (built from configs, no download).

The seed's decoder table compares the native decoder with "WAN modified" (74M), "Cosmos CV
[8x8x8]" (63M) and "LTX Video modified" (237M). Each must decode Pyramid-Flow's raw latents:
16 channels, 8x spatial, 8x temporal with the first frame alone (t latent frames -> 1 + 8(t - 1)
video frames). What "modified" takes, per model (checked by building them):

- `wan` (`AutoencoderKLWan`): already 16 channels, 8x spatial, causal, but 4x temporal; with a
  temporal up-sampler in all three up stages (`temperal_downsample=[True] * 3`) it is 8x: 73.5M.
- `ltx` (`AutoencoderKLLTXVideo`): 128 channels and 32x spatial (a 4x4 patchify around 8x8x8
  up-sampling blocks); with 16 latent channels and no patchify (`patch_size=1`) it is 8x8x8: 237.1M.
- `cosmos` (`AutoencoderKLCosmos`): its default config is CV8x8x8 with 16 channels: 62.7M as is.

Only the decoder side is kept (the encoder and `quant_conv` are dropped). Each wrapper calls the
model's own `decode` (post_quant_conv, frame-causal caching for WAN, clamping where the model has it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

KINDS = ("wan", "ltx", "cosmos")

# kind -> (diffusers class name, real-size config, tiny-preset config). Real: the "modified" models
# of the module docstring; tiny: the same topology, narrow (for the tiny preset and tests).
_CONFIGS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "wan": ("AutoencoderKLWan",
            {"z_dim": 16, "temperal_downsample": [True, True, True]},
            {"z_dim": 16, "temperal_downsample": [True, True, True], "base_dim": 8, "dim_mult": [1, 2, 2, 2],
             "num_res_blocks": 1}),
    "ltx": ("AutoencoderKLLTXVideo",
            {"latent_channels": 16, "patch_size": 1},
            {"latent_channels": 16, "patch_size": 1, "block_out_channels": (8, 16, 16, 16),
             "decoder_block_out_channels": (8, 16, 16, 16), "layers_per_block": (1, 1, 1, 1, 1),
             "decoder_layers_per_block": (1, 1, 1, 1, 1)}),
    "cosmos": ("AutoencoderKLCosmos",
               {"latent_channels": 16},
               {"latent_channels": 16, "encoder_block_out_channels": (8, 16, 16, 16),
                "decode_block_out_channels": (16, 16, 16, 16), "num_layers": 1}),
}


def decoder_config(kind: str, scale: str, latent_channels: int = 16) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, constructor kwargs) of a decoder kind at `real` or `tiny` scale."""
    if kind not in _CONFIGS:
        raise ValueError(f"unknown diffusers decoder {kind!r}; one of {', '.join(KINDS)}")
    cls, real, tiny = _CONFIGS[kind]
    cfg = dict(real if scale == "real" else tiny)
    cfg["z_dim" if kind == "wan" else "latent_channels"] = latent_channels
    return cls, cfg


def _mark_stateful(module: nn.Module) -> None:
    """WAN's decoder blocks update a shared frame cache (`feat_cache`, `feat_idx`) in place, so they are
    not pure functions of their arguments: ndopt.ir.cost's block memo (which replays repeated
    ModuleList members from their first run) must not replay them. It leaves alone any block with
    an instance-level `forward`, which this gives them (the same bound method: nothing changes)."""
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList):
            for block in sub:
                block.forward = type(block).forward.__get__(block)


class _Skip(nn.Module):
    """Stands for an empty (None) ModuleList slot: diffusers' Cosmos blocks skip None attentions."""

    def forward(self, x: Tensor, *_: object) -> Tensor:
        return x


def _fill_empty_slots(module: nn.Module) -> None:
    """Cosmos keeps `None` in its attention ModuleLists; code that walks ModuleLists expecting modules
    (ndopt.ir.cost's block memo calls vars() on each) fails on them. A pass-through module computes the
    same (the None check becomes a call that returns its input)."""
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList):
            for i, block in enumerate(sub):
                if block is None:
                    sub[i] = _Skip()


class DiffusersVideoDecoder(nn.Module):
    """The `vae_decoder` component around a diffusers VAE's decoder: raw latents -> video in [-1, 1]."""

    def __init__(self, kind: str, scale: str = "real", latent_channels: int = 16) -> None:
        super().__init__()
        import diffusers  # heavy import: only when a diffusers decoder is asked for

        cls_name, cfg = decoder_config(kind, scale, latent_channels)
        self.kind, self.scale, self.latent_channels = kind, scale, latent_channels
        with torch.device("cpu"):  # diffusers imports lazily: under a meta context its module-level
            cls = getattr(diffusers, cls_name)  # constants (Cosmos' wavelets) would be meta for good
        self.vae = cls(**cfg)
        for name in ("encoder", "quant_conv"):  # decoding needs neither; they must not count or export
            if getattr(self.vae, name, None) is not None:
                setattr(self.vae, name, None)
        if kind == "wan":
            _mark_stateful(self.vae.decoder)
        _fill_empty_slots(self.vae)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.vae.config)

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z, return_dict=False)[0]
