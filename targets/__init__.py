"""Snapdragon targets as data: one YAML file per chip, validated with pydantic.

A new chip is a new YAML file in this folder and nothing else. Lowering (ONNX, legality,
estimator, AI Hub) builds on these records.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ndopt.errors import TargetError


class TargetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    ai_hub_devices: list[str] = Field(min_length=1)
    hexagon_arch: Literal["v68", "v69", "v73", "v75", "v79", "v81"]
    aimet_config: str
    precisions: list[Literal["fp16", "w8a16", "w8a8", "w4a16", "w4a8"]]
    npu_int8_tops: float = Field(gt=0)
    npu_effective_tmacs_w8a16: float = Field(gt=0)
    dram_bandwidth_gbs: float = Field(gt=0)
    memory_budget_gb: float = Field(gt=0)
    max_rank: int = 5
    forbidden_ops: list[str] = Field(default_factory=list)
    forbidden_dtypes: list[str] = Field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()


@cache
def registry() -> dict[str, TargetSpec]:
    """Entry point of the `ndopt.targets` group: every `targets/*.yaml`."""
    out: dict[str, TargetSpec] = {}
    for f in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".yaml"):
            continue
        try:
            spec = TargetSpec(**yaml.safe_load(f.read_text()))
        except (yaml.YAMLError, ValidationError, TypeError) as e:
            raise TargetError(f"targets/{f.name}: invalid target file: {e}") from None
        out[spec.name] = spec
    return out
