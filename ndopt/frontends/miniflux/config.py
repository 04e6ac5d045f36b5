"""The miniFLUX DiT's configuration: upstream's `config.json`, checked, as a frozen dataclass.

`FluxDiTConfig.from_dict` reads a `PyramidFluxTransformer` config as upstream's pipeline loads it: typed
and range-checked (`pyramid_flow.configs.check`, the SD3 variant's errors), with the arguments
upstream's `build_pyramid_dit` forces taking upstream's values; `to_config_json` writes it back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ndopt.frontends.pyramid_flow.configs import check
from ndopt.frontends.pyramid_flow.dit import DiTConfigError

__all__ = ["PACK", "UPSTREAM_OVERRIDES", "DiTConfigError", "FluxDiTConfig", "FluxDiTConfigFile"]

logger = logging.getLogger("ndopt")

PACK = 2  # upstream `self.patch_size = 2   # hard-code for now`: 2x2 latent pixels per token

# Upstream __init__ arguments that only matter for training or flash-attn.
_IGNORED_KEYS = frozenset({"use_flash_attn", "use_gradient_checkpointing", "gradient_checkpointing_ratio"})
# `patch_size` only sizes proj_out (patch_size**2 * in_channels); split_output unpacks 2x2 whatever it
# says, so upstream works with its default 1 only.
_REQUIRED_VALUES: dict[str, Any] = {"patch_size": 1}
# What upstream's build_pyramid_dit (model_name "pyramid_flux") passes to from_pretrained, overriding the file.
UPSTREAM_OVERRIDES: dict[str, Any] = {"use_temporal_causal": True, "interp_condition_pos": True,
                                      "axes_dims_rope": [16, 24, 24]}
# A key missing from config.json takes PyramidFluxTransformer.__init__'s default, as diffusers loads it.
_UPSTREAM_DEFAULTS: dict[str, Any] = {"in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                                      "attention_head_dim": 64, "num_attention_heads": 24,
                                      "joint_attention_dim": 4096, "pooled_projection_dim": 768}


def _count(at_least: int = 1) -> Any:
    return Annotated[int, Field(ge=at_least, le=2**20, description=f"an integer >= {at_least} and <= {2**20}")]


class FluxDiTConfigFile(BaseModel):
    """The PyramidFluxTransformer arguments that shape the network (strict JSON types, as configs.DiTConfigFile)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    in_channels: _count() = None
    num_layers: _count(0) = None
    num_single_layers: _count(0) = None
    attention_head_dim: _count() = None
    num_attention_heads: _count() = None
    joint_attention_dim: _count() = None
    pooled_projection_dim: _count() = None


@dataclass(frozen=True)
class FluxDiTConfig:
    """Architecture of the miniFLUX DiT; defaults are the released checkpoint's (8 + 16 blocks, 30 x 64).

    `latent_channels` are the VAE latent channels of each clip (upstream's `in_channels` is the packed
    width, 4x this). `in_channels` and `patch_size` (properties) are what ndopt's sampler reads: the
    channels of a clip and the latent pixels per token side."""

    latent_channels: int = 16
    num_layers: int = 8
    num_single_layers: int = 16
    attention_head_dim: int = 64
    num_attention_heads: int = 30
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    axes_dims_rope: tuple[int, ...] = (16, 24, 24)
    use_temporal_causal: bool = True
    interp_condition_pos: bool = True  # upstream's flux code resamples history positions regardless

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        axes = self.axes_dims_rope
        if len(axes) != 3 or any(d < 2 or d % 2 for d in axes):
            raise DiTConfigError(f"FluxDiTConfig.axes_dims_rope={list(axes)}: need 3 positive even widths "
                                 "(time, height, width RoPE pairs)")
        if sum(axes) != self.attention_head_dim:
            raise DiTConfigError(f"FluxDiTConfig.axes_dims_rope={list(axes)} sums to {sum(axes)}, but the RoPE "
                                 f"rotates the whole head: it must sum to attention_head_dim={self.attention_head_dim}")
        for name in ("latent_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                     "pooled_projection_dim"):
            if getattr(self, name) < 1:
                raise DiTConfigError(f"FluxDiTConfig.{name}={getattr(self, name)} must be >= 1")
        if self.num_layers < 0 or self.num_single_layers < 0:
            raise DiTConfigError(f"FluxDiTConfig: block counts must be >= 0, got num_layers={self.num_layers}, "
                                 f"num_single_layers={self.num_single_layers}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def in_channels(self) -> int:
        """Channels of each latent clip in `sample` (the sampler's contract; upstream: in_channels // 4)."""
        return self.latent_channels

    @property
    def patch_size(self) -> int:
        """Latent pixels per token side (the 2x2 packing); DiTLayout.patch_size must equal it."""
        return PACK

    @property
    def packed_channels(self) -> int:
        """Channels of a packed token: upstream's config `in_channels`."""
        return PACK * PACK * self.latent_channels

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path = "DiT config") -> FluxDiTConfig:
        """Read an upstream `config.json` dict as upstream's pipeline does; `source` (the file) names errors.

        diffusers `_`-keys and training/flash-only keys are ignored; every other value is checked by type and
        range. The arguments upstream's `build_pyramid_dit` passes (`UPSTREAM_OVERRIDES`) win over the file,
        with a warning naming each one it disagrees with; a missing key takes upstream's __init__ default.
        """
        if not isinstance(d, dict):
            raise DiTConfigError(f"{source}: a DiT config must be a JSON object, found {type(d).__name__}")
        values: dict[str, Any] = {}
        overridden = []
        for key, value in d.items():
            if not isinstance(key, str) or key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in UPSTREAM_OVERRIDES:
                if value != UPSTREAM_OVERRIDES[key] or type(value) is not type(UPSTREAM_OVERRIDES[key]):
                    overridden.append(f"{key}={value!r} -> {UPSTREAM_OVERRIDES[key]!r}")
                continue
            if key in _REQUIRED_VALUES:
                if value != _REQUIRED_VALUES[key] or type(value) is not type(_REQUIRED_VALUES[key]):
                    raise DiTConfigError(
                        f"{source}: DiT config key {key!r}={value!r} selects a path upstream does not run; only "
                        f"{key}={_REQUIRED_VALUES[key]!r} (the released miniFLUX checkpoint's) is supported")
                continue
            if key not in FluxDiTConfigFile.model_fields:
                raise DiTConfigError(f"{source}: DiT config key {key!r} is not a PyramidFluxTransformer argument: "
                                     "check the file is the miniFLUX DiT's config.json")
            values[key] = value
        checked = {**_UPSTREAM_DEFAULTS, **check(FluxDiTConfigFile, values, source, "DiT config", DiTConfigError)}
        packed = checked.pop("in_channels")
        if packed % (PACK * PACK):
            raise DiTConfigError(f"{source}: invalid DiT config: in_channels = {packed}: expected a multiple of "
                                 f"{PACK * PACK} (2x2-packed latent channels)")
        try:
            config = cls(latent_channels=packed // (PACK * PACK), **checked, **UPSTREAM_OVERRIDES)
        except DiTConfigError as e:
            raise DiTConfigError(f"{source}: {e}") from None
        if overridden:
            logger.warning("%s: upstream's build_pyramid_dit overrides %d of the file's values for the miniFLUX DiT;"
                           " using upstream's: %s", source, len(overridden), ", ".join(overridden))
        return config

    def to_config_json(self) -> dict[str, Any]:
        """The upstream `config.json` of this DiT; refused when upstream's loader would build another model."""
        forced = {k: v for k, v in UPSTREAM_OVERRIDES.items() if getattr(self, k) != (tuple(v) if isinstance(v, list) else v)}
        if forced:
            have = ", ".join(f"{k}={getattr(self, k)!r}" for k in forced)
            raise DiTConfigError(f"cannot write this DiT in upstream's layout: {have}, but upstream's build_pyramid_dit "
                                 f"loads every miniFLUX DiT with {', '.join(f'{k}={v!r}' for k, v in forced.items())}")
        values = {k: getattr(self, k) for k in FluxDiTConfigFile.model_fields if k != "in_channels"}
        return {"_class_name": "PyramidFluxTransformer", **_REQUIRED_VALUES, "in_channels": self.packed_channels,
                **values, **UPSTREAM_OVERRIDES, "use_flash_attn": False, "use_gradient_checkpointing": False,
                "gradient_checkpointing_ratio": 0.6}
