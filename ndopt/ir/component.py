"""A pipeline component: a role, an nn.Module, its ports, and how to call it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ndopt.ir.spec import Port
from ndopt.precision import weight_bytes

# The paper's nouns (STYLE.md rule 3): recipes, passes and reports use these roles.
ROLES = (
    "text_encoder",
    "context_adapter",
    "dit",
    "vae_encoder",
    "vae_decoder",
    "super_resolution",
    "image_model",  # the hybrid pipeline's first-frame image model (its text encoders, UNet and decoder)
)
# Every role can be quantized (aimet_quantization's `components`); by default the pass takes these,
# and the VAE encoder only where the call plan calls it (the hybrid pipeline's first frame).
QUANTIZED_WHEN_CALLED = ("vae_encoder",)
QUANTIZED_BY_DEFAULT = tuple(r for r in ROLES if r not in QUANTIZED_WHEN_CALLED)


@dataclass(frozen=True)
class Component:
    """A named, typed stage of the pipeline.

    `entry` names the module method the sampler (and lowering) calls with the input ports as
    keyword arguments; its outputs are a tensor or a tuple of tensors in `outputs` order.
    `attrs` carries the frontend's config (for checkpoints and summaries) and pass bookkeeping
    such as a recorded precision.
    """

    name: str
    role: str
    module: nn.Module
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    entry: str = "forward"
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"component {self.name!r}: unknown role {self.role!r}; one of {ROLES}")

    def call(self, **inputs: Any) -> Any:
        if self.entry == "forward":  # through __call__, so hooks (counters, AIMET, profilers) see it
            return self.module(**inputs)
        return getattr(self.module, self.entry)(**inputs)

    def port(self, name: str, *, output: bool = False) -> Port:
        for p in self.outputs if output else self.inputs:
            if p.name == name:
                return p
        kind = "output" if output else "input"
        raise KeyError(f"component {self.name!r} has no {kind} port {name!r}")

    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def weight_bytes(self) -> int:
        """Bytes of the module's parameters at their dtypes (buffers are not weights here)."""
        return weight_bytes(self.module, buffers=False)

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def with_module(self, module: nn.Module, **attrs: Any) -> Component:
        return replace(self, module=module, attrs={**self.attrs, **attrs})

    def with_attrs(self, **attrs: Any) -> Component:
        return replace(self, attrs={**self.attrs, **attrs})
