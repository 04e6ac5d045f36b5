"""A Snapdragon chip as data: the pydantic schema of a target file, and reading the files.

One YAML file per chip (`targets/*.yaml`, or any path given as `--target chip.yaml`) holds what the
lowering, legality checks, estimator and AI Hub jobs read: device names, Hexagon arch, AIMET config,
precisions, peak throughput, DRAM bandwidth, memory budget, op legality and the fitted efficiencies.
Errors name the file and the field. The plugin's entry point (`targets.registry`) builds one
`SnapdragonTarget` per record.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ndopt.errors import TargetError
from ndopt.precision import PrecisionName


class Efficiency(BaseModel):
    """Fraction of the nominal peak each op class reaches, and fixed costs per node and per graph.

    MAC classes: `conv` (Conv), `dwconv` (depthwise and narrow grouped Conv; unset: `conv`),
    `matmul` (a matmul with a weight operand: Linear, Gemm), `attention` (a matmul of two
    activations: q k^T, p v). The memory roof has two parts: `weights` scales the DRAM bandwidth for
    weight reads (streamed from DRAM every call), `activations` for activation traffic (it may exceed
    1: tiles stay in the NPU's on-chip memory between ops); `norm` multiplies the activation time of
    normalisations, softmax and reductions (several passes over their input). Fitted by
    `targets.calibration.fit` on `targets/calibration.tsv` (bench/bench_estimator.py) or on a
    user's own AI Hub profiles (`ndopt calibrate`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conv: float = Field(gt=0)
    matmul: float = Field(gt=0)
    attention: float = Field(gt=0)
    weights: float = Field(gt=0)
    activations: float = Field(gt=0)
    node_us: float = Field(ge=0)
    dwconv: float | None = Field(default=None, gt=0)
    norm: float = Field(default=1.0, gt=0)
    graph_us: float = Field(default=0.0, ge=0)
    calibrated: bool = True  # False: derived from another precision, or a chip not fitted to measurements

    @property
    def dwconv_eff(self) -> float:
        return self.dwconv if self.dwconv is not None else self.conv


class Calibration(BaseModel):
    """Where a target's efficiencies come from and how well they predict models the fit did not see:
    `error[precision]` is the leave-one-out cross-validated |estimate / measured - 1| (median, worst,
    number of measurements). A target file without this section is uncalibrated: its estimates say so."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibrated: bool = False
    source: str = ""
    error: dict[str, dict[str, float]] = Field(default_factory=dict)


class LegalityRules(BaseModel):
    """What the NPU compiler accepts (REFERENCE.md, Hexagon lowering constraints)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_rank: int = 5
    warn_rank: int = 5  # tensors of this rank or more compile but run slowly: warn
    forbidden_ops: list[str] = Field(default_factory=list)
    forbidden_dtypes: list[str] = Field(default_factory=list)
    static_shapes: bool = True


class TargetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    ai_hub_devices: list[str] = Field(min_length=1)
    hexagon_arch: Literal["v68", "v69", "v73", "v75", "v79", "v81"]
    aimet_config: str
    precisions: list[PrecisionName]
    default_precision: PrecisionName = "w8a16"
    npu_int8_tops: float = Field(gt=0)
    # MAC rate of each precision relative to int8 x int8 (HMX nominal); efficiencies absorb the rest
    mac_rate: dict[PrecisionName, float] = Field(default_factory=lambda: {
        "fp16": 0.5, "w8a16": 0.5, "w8a8": 1.0, "w4a16": 0.5, "w4a8": 1.0})
    dram_bandwidth_gbs: float = Field(gt=0)
    memory_budget_gb: float = Field(gt=0)
    legality: LegalityRules = Field(default_factory=LegalityRules)
    efficiency: dict[PrecisionName, Efficiency]
    opset: int = Field(default=17, ge=17)
    aihub_options: str = "--target_runtime qnn_context_binary"
    calibration: Calibration = Field(default_factory=Calibration)
    path: str | None = Field(default=None, exclude=True)  # the file it was read from

    @model_validator(mode="before")
    @classmethod
    def _uncalibrated_chip(cls, data: Any) -> Any:
        """An uncalibrated chip: every precision's efficiencies are placeholders (calibrated: false)."""
        if isinstance(data, dict) and not (data.get("calibration") or {}).get("calibrated", False):
            eff = data.get("efficiency")
            if isinstance(eff, dict):
                data = {**data, "efficiency": {p: ({**e, "calibrated": False} if isinstance(e, dict) else e)
                                               for p, e in eff.items()}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TargetSpec:
        if self.default_precision not in self.precisions:
            raise ValueError(f"default_precision {self.default_precision!r} is not in precisions {self.precisions}")
        missing = [p for p in self.precisions if p not in self.efficiency]
        if missing:
            raise ValueError(f"efficiency has no entry for precisions {missing}; every precision needs one")
        return self

    def peak_macs(self, precision: str) -> float:
        """Nominal MACs per second at a precision (int8 TOPS count 2 ops per MAC)."""
        return self.npu_int8_tops * 1e12 / 2 * self.mac_rate[precision]

    def check_precision(self, precision: str) -> str:
        if precision not in self.precisions:
            raise TargetError(f"target {self.name}: precision {precision!r} is not supported; "
                              f"choose one of {', '.join(self.precisions)} (targets/{self.name}.yaml)")
        return precision

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()


def uncalibrated_warning(spec: TargetSpec, precision: str) -> str:
    """What an estimate from placeholder efficiencies says about itself."""
    where = spec.path or f"targets/{spec.name}.yaml"
    if not spec.calibration.calibrated:
        return (f"target {spec.name} is uncalibrated ({where}): its efficiencies are placeholders, so this estimate "
                "may be far off; fit them from AI Hub profiles with `ndopt calibrate --target ... --profiles DIR`")
    return (f"target {spec.name}: precision {precision} has no measurements; its efficiencies are derived from "
            "another precision (calibrated: false)")


def load_spec(text: str, source: str, path: str | None = None) -> TargetSpec:
    """One target file's record; errors name the file and the field."""
    try:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise TargetError(f"{source}: a target file is a YAML mapping (name, description, ...)")
        return TargetSpec(**data, **({"path": path} if path else {}))
    except yaml.YAMLError as e:
        raise TargetError(f"{source}: invalid YAML: {e}") from None
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise TargetError(f"{source}: invalid target file: {errs}; fix the field(s) named") from None


@cache
def specs() -> dict[str, TargetSpec]:
    """Every `targets/*.yaml`, by name."""
    out: dict[str, TargetSpec] = {}
    for f in sorted(resources.files("targets").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".yaml"):
            spec = load_spec(f.read_text(), f"targets/{f.name}", path=str(f))
            out[spec.name] = spec
    return out


def spec_from_file(path: str | Path) -> TargetSpec:
    """A target file anywhere on disk (`--target path/to/chip.yaml`)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TargetError(f"--target {path}: cannot read the target file ({e.strerror or type(e).__name__})") from None
    return load_spec(text, str(p), path=str(p.resolve()))


__all__ = ["Calibration", "Efficiency", "LegalityRules", "TargetSpec", "load_spec", "spec_from_file", "specs",
           "uncalibrated_warning"]
