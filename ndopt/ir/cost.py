"""Cost analysis without weights: params, FLOPs and bytes per call signature, and per video.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` while each component runs for shapes
only (meta tensors, or fake tensors over real parameters), so the real 2B pipeline is costed on a
laptop. Bytes written by every op are counted too (the activation traffic a roofline needs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from ndopt.ir.component import Component
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.spec import CallSignature
from ndopt.ir.verify import shape_mode


class _BytesWritten(TorchDispatchMode):
    """Sums the bytes of every op's tensor outputs (activation traffic) and the largest one."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                self.total += n
                self.largest = max(self.largest, n)
        return out


@dataclass(frozen=True)
class SignatureCost:
    component: str
    key: str
    count: int
    flops: int
    activation_bytes: int
    largest_activation_bytes: int
    input_bytes: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComponentCost:
    name: str
    role: str
    params: int
    weight_bytes: int
    calls_per_video: int
    flops_per_video: int


@dataclass(frozen=True)
class PipelineCost:
    components: tuple[ComponentCost, ...]
    signatures: tuple[SignatureCost, ...]

    @property
    def params(self) -> int:
        return sum(c.params for c in self.components)

    @property
    def flops_per_video(self) -> int:
        return sum(c.flops_per_video for c in self.components)

    def calls_per_video(self, role: str | None = None) -> int:
        return sum(c.calls_per_video for c in self.components if role is None or c.role == role)

    def to_json(self) -> dict[str, Any]:
        return {
            "params_total": self.params,
            "params": {c.name: c.params for c in self.components},
            "weight_bytes": {c.name: c.weight_bytes for c in self.components},
            "calls_per_video": {c.name: c.calls_per_video for c in self.components},
            "flops_per_video": self.flops_per_video,
            "flops_per_video_by_component": {c.name: c.flops_per_video for c in self.components},
            "flops_per_call_signature": [asdict(s) for s in self.signatures],
        }


class CostModel:
    """Costs components at call signatures, caching by (module identity, signature)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, Any], tuple[int, int, int]] = {}
        self._alive: list[torch.nn.Module] = []  # keep cached modules alive so ids stay unique

    def signature_cost(self, component: Component, sig: CallSignature) -> SignatureCost:
        key = (id(component.module), component.entry, sig.args, tuple(sorted(map(str, sig.static_dict.items()))))
        if key not in self._cache:
            with shape_mode(component) as device:
                inputs = sig.make_inputs(device=device)
                counter = FlopCounterMode(display=False)
                written = _BytesWritten()
                # the math SDPA backend decomposes attention into matmuls + softmax on every device, so
                # attention FLOPs are counted the same on meta, CPU and CUDA (fused kernels vary in
                # whether the flop counter knows them)
                with sdpa_kernel(SDPBackend.MATH), counter, written:
                    component.call(**inputs)
            self._cache[key] = (counter.get_total_flops(), written.total, written.largest)
            self._alive.append(component.module)
        flops, act, largest = self._cache[key]
        return SignatureCost(sig.component, sig.key, sig.count, int(flops), int(act), int(largest),
                             sig.input_bytes(), sig.info_dict)

    def pipeline_cost(self, pipeline: Pipeline) -> PipelineCost:
        plan = pipeline.call_plan()
        sigs = tuple(self.signature_cost(pipeline[s.component], s) for s in plan)
        comps = []
        for name in pipeline.topo_order():
            c = pipeline[name]
            mine = [s for s in sigs if s.component == name]
            comps.append(ComponentCost(name, c.role, c.params(), c.weight_bytes(),
                                       sum(s.count for s in mine), sum(s.flops * s.count for s in mine)))
        return PipelineCost(tuple(comps), sigs)


def pipeline_cost(pipeline: Pipeline) -> PipelineCost:
    return CostModel().pipeline_cost(pipeline)
