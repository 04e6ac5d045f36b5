"""A lowered graph (`LoweredGraph`: the ONNX model of one call signature with its legality and
numerics reports) and the in-process cache of them that `SnapdragonTarget.lower` consults, so a
second target with the same rules, or a second load of the same model, lowers nothing again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import onnx
import torch

from ndopt.ir.component import Component
from ndopt.precision import weight_bytes
from targets.legality import LegalityReport
from targets.lowering import GraphPlan
from targets.numerics import NumericsReport
from targets.spec import TargetSpec


@dataclass(frozen=True)
class LoweredGraph:
    plan: GraphPlan
    model: onnx.ModelProto
    legality: LegalityReport
    numerics: NumericsReport
    simplify: str
    seconds: float
    cached: bool = False  # kept by CACHE: its model must keep its tensors (another target reuses it)

    @property
    def ok(self) -> bool:
        return self.legality.ok and self.numerics.ok


class LoweredCache:
    """Lowered graphs of small components, reused within a process: a second target whose rules
    agree, or a second load of the same model, lowers nothing again. The key is the content: the
    module tree (types, scalar attributes), every weight's bytes, the call signature, the opset and
    the legality rules. Components past `max_bytes` are never cached (hashing them costs seconds)."""

    def __init__(self, size: int = 64, max_bytes: int = 256 * 2**20) -> None:
        self.size, self.max_bytes = size, max_bytes
        self.items: OrderedDict[Any, LoweredGraph] = OrderedDict()

    def key(self, component: Component, plan: GraphPlan, spec: TargetSpec) -> Any:
        m = component.module
        if weight_bytes(m) > self.max_bytes:
            return None
        h = hashlib.sha256()
        for name, t in (*m.named_parameters(), *m.named_buffers()):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        tree = tuple((n, f"{type(s).__module__}.{type(s).__qualname__}",
                      tuple(sorted((k, v) for k, v in vars(s).items() if isinstance(v, (bool, int, float, str)))))
                     for n, s in m.named_modules())
        try:
            return hash((h.hexdigest(), tree, component.entry, plan.signature.args, repr(plan.signature.static),
                         spec.opset, spec.legality.model_dump_json())), h.hexdigest()
        except TypeError:  # an unhashable static argument: no caching
            return None

    def get(self, key: Any) -> LoweredGraph | None:
        if key is None or key not in self.items:
            return None
        self.items.move_to_end(key)
        return self.items[key]

    def put(self, key: Any, value: LoweredGraph) -> None:
        if key is None:
            return
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)


CACHE = LoweredCache()  # one per process

__all__ = ["CACHE", "LoweredCache", "LoweredGraph"]
