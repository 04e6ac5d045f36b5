"""Tensor specs, ports and call signatures: the typed vocabulary of the pipeline IR.

A `TensorSpec` is a shape template (ints, or symbol names bound per call signature) and a dtype.
Edges between components carry specs; a `CallSignature` is one static way the sampler calls a
component (concrete shapes, static keyword arguments, and how many times per video).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Dim = int | str

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's shape template and dtype; string dims are symbols bound by a call signature."""

    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; one of {sorted(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def is_concrete(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def bind(self, env: Mapping[str, int]) -> TensorSpec:
        """Substitute symbols; unknown symbols stay symbolic."""
        return TensorSpec(tuple(env.get(d, d) if isinstance(d, str) else d for d in self.shape), self.dtype)

    def accepts(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> bool:
        """Whether a concrete tensor shape (and dtype) fits this template (symbols match anything)."""
        if len(shape) != len(self.shape):
            return False
        if dtype is not None and dtype != self.torch_dtype:
            return False
        return all(isinstance(d, str) or d == s for d, s in zip(self.shape, shape))

    def numel(self) -> int:
        if not self.is_concrete:
            raise ValueError(f"spec {self} is not concrete")
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def nbytes(self) -> int:
        return self.numel() * torch.empty((), dtype=self.torch_dtype).element_size()

    def make(self, device: torch.device | str = "meta", generator: torch.Generator | None = None) -> torch.Tensor:
        """A tensor of this (concrete) spec: random floats, ones for masks, zeros for ids."""
        shape = tuple(int(d) for d in self.shape)
        if self.torch_dtype.is_floating_point:
            if str(device) == "meta":
                return torch.empty(shape, dtype=self.torch_dtype, device="meta")
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, self.torch_dtype)
        if self.torch_dtype == torch.bool:
            return torch.ones(shape, dtype=torch.bool, device=device)
        return torch.ones(shape, dtype=self.torch_dtype, device=device)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class Port:
    """A named input or output of a component; `optional` inputs may have no producer."""

    name: str
    spec: TensorSpec
    optional: bool = False


ArgSpec = TensorSpec | tuple[TensorSpec, ...]


@dataclass(frozen=True)
class CallSignature:
    """One static call of a component: concrete input specs, static kwargs, and calls per video.

    `args` maps the component's input ports to concrete specs (a tuple of specs is passed as a list
    of tensors, e.g. the DiT's history clips); `static` holds non-tensor keyword arguments (the
    DiT's layout); `env` binds the symbols of the component's port templates.
    """

    component: str
    key: str
    args: tuple[tuple[str, ArgSpec], ...]
    count: int
    env: tuple[tuple[str, int], ...] = ()
    static: tuple[tuple[str, Any], ...] = field(default=(), compare=False)
    info: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    @property
    def env_dict(self) -> dict[str, int]:
        return dict(self.env)

    @property
    def static_dict(self) -> dict[str, Any]:
        return dict(self.static)

    @property
    def info_dict(self) -> dict[str, Any]:
        return dict(self.info)

    def make_inputs(self, device: torch.device | str = "meta",
                    generator: torch.Generator | None = None) -> dict[str, Any]:
        """Keyword inputs for the component's entry point (tensors of the specs, plus static kwargs)."""
        out: dict[str, Any] = {}
        for name, spec in self.args:
            if isinstance(spec, tuple):
                out[name] = [s.make(device, generator) for s in spec]
            else:
                out[name] = spec.make(device, generator)
        out.update(self.static_dict)
        return out

    def input_bytes(self) -> int:
        total = 0
        for _, spec in self.args:
            for s in spec if isinstance(spec, tuple) else (spec,):
                total += s.nbytes()
        return total
