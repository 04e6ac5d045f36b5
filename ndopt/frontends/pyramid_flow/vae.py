"""Pyramid-Flow's causal video VAE: config, model, latent normalisation, and its split into IR components.

A re-implementation of upstream `video_vae/modeling_causal_vae.py` (jy0205/Pyramid-Flow) with
upstream's parameter names, so the released `causal_video_vae` state dict loads with
`strict=True`. Video [B, 3, 1 + 8k, H, W] in [-1, 1] <-> raw latents [B, 16, 1 + k, H/8, W/8]: 8x
spatial, 8x temporal with the first frame encoded alone. The DiT works on normalised latents
(`normalize_latents`, constants from upstream's pipeline).

Left out on purpose: tiling, context parallelism, the training-time posterior sampling and losses.
`encode` returns the posterior mean (upstream's `latent_dist.mean`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ndopt.frontends.pyramid_flow.configs import ConfigError, VAEConfigFile, check
from ndopt.frontends.pyramid_flow.vae_layers import (
    _ACTIVATIONS,
    CausalConv3d,
    CausalDecoder,
    CausalEncoder,
    streaming,
)

# Latent normalisation of the SD3 variant (upstream pyramid_dit_for_video_gen_pipeline.py,
# model_name == "pyramid_mmdit"): the first latent frame is an image latent, the rest video latents.
IMAGE_SHIFT = 0.1490
IMAGE_SCALE = 1 / 1.8415
VIDEO_SHIFT = -0.2343
VIDEO_SCALE = 1 / 3.0986

_DOWN_BLOCK = "DownEncoderBlockCausal3D"
_UP_BLOCK = "UpDecoderBlockCausal3D"

# config.json keys that do not change the network (checked against upstream's __init__):
# interpolate must be False (upstream raises otherwise; checked in from_dict), encoder_double_z
# and add_post_quant_conv are ignored by upstream's __init__, dropout is inactive at inference,
# the rest is tiling, scaling or bookkeeping.
_IGNORED_KEYS = frozenset({
    "interpolate", "sample_size", "scaling_factor", "downsample_scale", "add_post_quant_conv",
    "encoder_type", "decoder_type", "encoder_double_z", "encoder_block_dropout", "decoder_block_dropout",
})


class VAEConfigError(ConfigError):
    """A VAE config is malformed, inconsistent, or selects what this port does not implement (a CheckpointError)."""


@dataclass(frozen=True)
class CausalVAEConfig:
    """The arguments of upstream `CausalVideoVAE.__init__` that shape the network.

    Field names are upstream's, except `latent_channels`, which stands for upstream's
    `encoder_out_channels` and `decoder_in_channels` (they must be equal for upstream's model to
    run). Defaults are the released checkpoint's `causal_video_vae/config.json` (= upstream's
    defaults with 16 latent channels instead of 4).
    """

    encoder_in_channels: int = 3
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    encoder_down_block_types: tuple[str, ...] = (_DOWN_BLOCK,) * 4
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    encoder_spatial_down_sample: tuple[bool, ...] = (True, True, True, False)
    encoder_temporal_down_sample: tuple[bool, ...] = (True, True, True, False)
    encoder_act_fn: str = "silu"
    encoder_norm_num_groups: int = 32
    decoder_out_channels: int = 3
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3)
    decoder_up_block_types: tuple[str, ...] = (_UP_BLOCK,) * 4
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_spatial_up_sample: tuple[bool, ...] = (True, True, True, False)
    decoder_temporal_up_sample: tuple[bool, ...] = (True, True, True, False)
    decoder_act_fn: str = "silu"
    decoder_norm_num_groups: int = 32
    latent_channels: int = 16

    def __post_init__(self) -> None:
        for side, blocks, kind in (("encoder", "down", _DOWN_BLOCK), ("decoder", "up", _UP_BLOCK)):
            n = len(getattr(self, f"{side}_block_out_channels"))
            for name in (f"{side}_layers_per_block", f"{side}_{blocks}_block_types",
                         f"{side}_spatial_{blocks}_sample", f"{side}_temporal_{blocks}_sample"):
                if len(getattr(self, name)) != n:
                    raise VAEConfigError(f"CausalVAEConfig.{name}: {len(getattr(self, name))} entries, "
                                     f"{side}_block_out_channels has {n}; give one per block")
            if any(t != kind for t in getattr(self, f"{side}_{blocks}_block_types")):
                raise VAEConfigError(f"CausalVAEConfig.{side}_{blocks}_block_types: only {kind!r} is "
                                 f"supported, got {getattr(self, f'{side}_{blocks}_block_types')}")
            act = getattr(self, f"{side}_act_fn")
            if act not in _ACTIVATIONS:
                raise VAEConfigError(f"CausalVAEConfig.{side}_act_fn: {act!r} is not one of {sorted(_ACTIVATIONS)}")
            groups = getattr(self, f"{side}_norm_num_groups")
            if any(c % groups for c in getattr(self, f"{side}_block_out_channels")):
                raise VAEConfigError(f"CausalVAEConfig.{side}_block_out_channels: every width must be a "
                                 f"multiple of {side}_norm_num_groups={groups}")
        down = (self.encoder_spatial_down_sample, self.encoder_temporal_down_sample)
        up = (self.decoder_spatial_up_sample, self.decoder_temporal_up_sample)
        if [sum(d) for d in down] != [sum(u) for u in up]:
            raise VAEConfigError("CausalVAEConfig: the decoder must upsample as often as the encoder downsamples "
                             f"(spatial {sum(down[0])} vs {sum(up[0])}, temporal {sum(down[1])} vs {sum(up[1])})")

    @property
    def spatial_factor(self) -> int:
        return 2 ** sum(self.encoder_spatial_down_sample)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.encoder_temporal_down_sample)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | Path = "CausalVAEConfig.from_dict") -> CausalVAEConfig:
        """Read an upstream `config.json` dict as upstream's `from_config` would; `source` names errors.

        A missing key takes upstream's `__init__` default (note: upstream's latent width default
        is 4; the released config sets 16). Keys that only train, tile or label are ignored; every
        other value is checked by type and range (`configs.VAEConfigFile`); unknown keys raise
        VAEConfigError (a CheckpointError and a ValueError).
        """
        if not isinstance(d, Mapping):
            raise VAEConfigError(f"{source}: a VAE config must be a JSON object, found {type(d).__name__}")
        names = {f.name for f in fields(cls)} - {"latent_channels"}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in names | _IGNORED_KEYS
                         | {"encoder_out_channels", "decoder_in_channels", "latent_channels"})
        if unknown:
            raise VAEConfigError(f"{source}: unknown keys {unknown}; they would change the "
                                 "network in ways this port does not implement")
        # lists as JSON has them (to_dict's tuples too); keys only ignored here are not checked
        typed = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()
                 if k in VAEConfigFile.model_fields}
        values = check(VAEConfigFile, typed, source, "VAE config", VAEConfigError)
        if values.get("interpolate", False):
            raise VAEConfigError(f"{source}: interpolate=True is not implemented upstream "
                                 "(its up-samplers raise); the released config sets false")
        latent = values.get("latent_channels")
        if latent is None:
            # upstream __init__ defaults for both are 4
            enc, dec = values.get("encoder_out_channels", 4), values.get("decoder_in_channels", 4)
            if enc != dec:
                raise VAEConfigError(f"{source}: encoder_out_channels={enc} != "
                                     f"decoder_in_channels={dec}; upstream's post_quant_conv needs them equal")
            latent = enc
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
        try:
            return cls(**kwargs, latent_channels=latent)
        except VAEConfigError as e:
            raise VAEConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The upstream `config.json` keys for this network (lists, as JSON has them)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        latent = out.pop("latent_channels")
        return {**out, "encoder_out_channels": latent, "decoder_in_channels": latent, "interpolate": False}


def tiny_config() -> CausalVAEConfig:
    """The test preset: upstream's topology (8x / 8x, 16 latent channels, mid attention), narrow and shallow."""
    return CausalVAEConfig(
        encoder_layers_per_block=(1, 1, 1, 1),
        encoder_block_out_channels=(8, 16, 16, 16),
        encoder_norm_num_groups=4,
        decoder_layers_per_block=(1, 1, 1, 1),
        decoder_block_out_channels=(8, 16, 16, 16),
        decoder_norm_num_groups=4,
    )


def normalize_latents(z: Tensor) -> Tensor:
    """Raw VAE latents [B, C, T, h, w] -> the DiT's latent space (upstream `get_vae_latent`)."""
    first = (z[:, :, :1] - IMAGE_SHIFT) * IMAGE_SCALE
    rest = (z[:, :, 1:] - VIDEO_SHIFT) * VIDEO_SCALE
    return torch.cat([first, rest], dim=2)


def denormalize_latents(z: Tensor) -> Tensor:
    """The inverse of `normalize_latents` (upstream `decode_latent`)."""
    first = z[:, :, :1] / IMAGE_SCALE + IMAGE_SHIFT
    rest = z[:, :, 1:] / VIDEO_SCALE + VIDEO_SHIFT
    return torch.cat([first, rest], dim=2)


def _check_video(video: Tensor, config: CausalVAEConfig) -> None:
    if torch.jit.is_tracing():  # shapes are fixed by the example input; keep the trace free of checks
        return
    if video.ndim != 5 or video.shape[1] != config.encoder_in_channels:
        raise ValueError(f"VAE encode: expected video [B, {config.encoder_in_channels}, T, H, W], "
                         f"got {tuple(video.shape)}")
    t, h, w = video.shape[2:]
    ft, fs = config.temporal_factor, config.spatial_factor
    if (t - 1) % ft or h % fs or w % fs:
        raise ValueError(f"VAE encode: frames must be 1 + {ft}k and H, W multiples of {fs}, got "
                         f"T={t}, H={h}, W={w}; crop or pad the clip")


def _encode(encoder: nn.Module, quant_conv: nn.Module, video: Tensor, config: CausalVAEConfig) -> Tensor:
    _check_video(video, config)
    moments = quant_conv(encoder(video))
    return moments[:, : config.latent_channels]  # (mean, logvar) along channels: keep the mean


def _decode(post_quant_conv: nn.Module, decoder: nn.Module, z: Tensor, window_size: int | None) -> Tensor:
    """Decode a raw latent clip; with `window_size`, chunk by chunk as upstream's `chunk_decode`.

    Chunks are the first `window_size + 1` latent frames, then `window_size` at a time; the
    streaming convs carry their causal context across chunks, so the result equals the whole-clip
    decode (the pipeline decodes with window_size 1 or 2 to save memory).
    """
    if z.ndim != 5:
        raise ValueError(f"VAE decode: expected latents [B, C, T, h, w], got {tuple(z.shape)}")
    if window_size is None or z.shape[2] <= window_size + 1:
        return decoder(post_quant_conv(z))
    if window_size < 1:
        raise ValueError(f"VAE decode: window_size must be >= 1, got {window_size}")
    starts = [0, *range(window_size + 1, z.shape[2], window_size)]
    ends = [*starts[1:], z.shape[2]]
    with streaming(post_quant_conv, decoder):
        chunks = [decoder(post_quant_conv(z[:, :, a:b])) for a, b in zip(starts, ends, strict=True)]
    return torch.cat(chunks, dim=2)


def _init_weights(module: nn.Module) -> None:
    # upstream CausalVideoVAE._init_weights: truncated normal (std 0.02) for convs and linears,
    # identity affine for norms; keeps random-weight activations at upstream's scale
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class CausalVideoVAE(nn.Module):
    """The full VAE: `encoder`, `decoder`, `quant_conv`, `post_quant_conv`, named as upstream."""

    def __init__(self, config: CausalVAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.encoder = CausalEncoder(c.encoder_in_channels, c.latent_channels, c.encoder_block_out_channels,
                                     c.encoder_layers_per_block, c.encoder_spatial_down_sample,
                                     c.encoder_temporal_down_sample, c.encoder_norm_num_groups, c.encoder_act_fn)
        self.decoder = CausalDecoder(c.latent_channels, c.decoder_out_channels, c.decoder_block_out_channels,
                                     c.decoder_layers_per_block, c.decoder_spatial_up_sample,
                                     c.decoder_temporal_up_sample, c.decoder_norm_num_groups, c.decoder_act_fn)
        # 1x1x1 causal convs, as upstream (so their keys are quant_conv.conv.weight, ...)
        self.quant_conv = CausalConv3d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = CausalConv3d(c.latent_channels, c.latent_channels, 1)
        self.apply(_init_weights)

    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, 1 + 8k, H, W] in [-1, 1] -> raw latent mean [B, 16, 1 + k, H/8, W/8]."""
        return _encode(self.encoder, self.quant_conv, video, self.config)

    def decode(self, z: Tensor, window_size: int | None = None) -> Tensor:
        """Raw latents [B, 16, 1 + k, h, w] -> video [B, 3, 1 + 8k, 8h, 8w], frame-causally."""
        return _decode(self.post_quant_conv, self.decoder, z, window_size)

    def forward(self, video: Tensor) -> Tensor:
        """Reconstruct through the posterior mean (no sampling)."""
        return self.decode(self.encode(video))


class VAEEncoder(nn.Module):
    """The `vae_encoder` component: upstream's `encoder` + `quant_conv`, keeping the mean half.

    Its state-dict keys are the full VAE's (`encoder.…`, `quant_conv.…`).
    """

    def __init__(self, encoder: CausalEncoder, quant_conv: nn.Module, config: CausalVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.quant_conv = quant_conv

    def forward(self, video: Tensor) -> Tensor:
        return _encode(self.encoder, self.quant_conv, video, self.config)


class VAEDecoder(nn.Module):
    """The `vae_decoder` component: upstream's `post_quant_conv` + `decoder` on raw latents.

    Its state-dict keys are the full VAE's (`post_quant_conv.…`, `decoder.…`). `window_size`
    (latent frames per chunk, None = whole clip) gives the same output with less memory.
    """

    def __init__(self, post_quant_conv: nn.Module, decoder: CausalDecoder, config: CausalVAEConfig,
                 window_size: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.window_size = window_size
        self.post_quant_conv = post_quant_conv
        self.decoder = decoder

    def forward(self, z: Tensor) -> Tensor:
        return _decode(self.post_quant_conv, self.decoder, z, self.window_size)


def split_vae(vae: CausalVideoVAE) -> tuple[VAEEncoder, VAEDecoder]:
    """The VAE as two IR components sharing its modules (no copy)."""
    return (VAEEncoder(vae.encoder, vae.quant_conv, vae.config),
            VAEDecoder(vae.post_quant_conv, vae.decoder, vae.config))
