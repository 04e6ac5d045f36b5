"""Is the lowered graph the component? `onnx.checker` (full, with strict shape inference) and an
onnxruntime run against the torch component on the same seeded inputs.

A graph passes when every float output satisfies |ort - torch| <= atol + rtol * |torch|
(1e-4 each by default, in float32) and integer outputs are equal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ndopt.errors import LoweringError
from ndopt.ir.component import Component
from targets.lowering import GraphPlan, call_kwargs, needs_file, on_disk

ATOL = 1e-4
RTOL = 1e-4


@dataclass(frozen=True)
class OutputMatch:
    name: str
    max_abs_err: float
    max_rel_err: float
    ok: bool


@dataclass(frozen=True)
class NumericsReport:
    graph: str
    outputs: tuple[OutputMatch, ...] = field(default_factory=tuple)
    atol: float = ATOL
    rtol: float = RTOL

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs_err for o in self.outputs), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "atol": self.atol, "rtol": self.rtol, "max_abs_err": self.max_abs_err,
                "outputs": {o.name: {"max_abs_err": o.max_abs_err, "max_rel_err": o.max_rel_err, "ok": o.ok}
                            for o in self.outputs}}


@contextlib.contextmanager
def loadable(model: onnx.ModelProto | Path) -> Iterator[str | onnx.ModelProto]:
    """What onnx.checker and onnxruntime take for `model`: a path as a string; a model within protobuf's
    2 GB limit as itself; a larger one (a real-width text encoder) from a file (`lowering.on_disk`):
    serialized whole it fails ("Failed to serialize proto")."""
    if isinstance(model, Path):
        yield str(model)
    elif not needs_file(model):
        yield model
    else:
        with on_disk(model) as path:
            yield str(path)


def check_model(model: onnx.ModelProto | Path, graph: str) -> None:
    """onnx.checker with full_check (a model past 2 GB is checked from a file: `loadable`)."""
    try:
        with loadable(model) as src:
            onnx.checker.check_model(src, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise LoweringError(f"graph {graph}: onnx.checker rejects it: {str(e).splitlines()[0]}; "
                            "this is a lowering bug: report it with the graph") from None


def torch_reference(component: Component, plan: GraphPlan, example: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = component.call(**call_kwargs(plan, example))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in outs]


def onnxruntime_outputs(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with loadable(model) as src:
        sess = ort.InferenceSession(src if isinstance(src, str) else src.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def compare(graph: str, names: list[str], ref: list[np.ndarray], got: list[np.ndarray],
            atol: float = ATOL, rtol: float = RTOL) -> NumericsReport:
    matches = []
    for name, r, g in zip(names, ref, got):
        if r.shape != g.shape:
            matches.append(OutputMatch(name, float("inf"), float("inf"), False))
            continue
        if np.issubdtype(r.dtype, np.floating):
            d = np.abs(g.astype(np.float64) - r.astype(np.float64))
            ok = bool(np.all(d <= atol + rtol * np.abs(r)))
            rel = float(np.max(d / np.maximum(np.abs(r), 1e-12))) if d.size else 0.0
            matches.append(OutputMatch(name, float(d.max()) if d.size else 0.0, rel, ok))
        else:
            same = bool(np.array_equal(r.astype(np.int64), g.astype(np.int64)))
            matches.append(OutputMatch(name, 0.0 if same else float("inf"), 0.0 if same else float("inf"), same))
    return NumericsReport(graph, tuple(matches), atol, rtol)


def check_numerics(model: onnx.ModelProto | Path, component: Component, plan: GraphPlan,
                   example: dict[str, torch.Tensor], atol: float = ATOL, rtol: float = RTOL) -> NumericsReport:
    """onnxruntime (float32, CPU) vs the torch component on `example` (flat graph inputs)."""
    ref = torch_reference(component, plan, example)
    feeds = {io.name: example[io.name].numpy().astype(_np(io.dtype)) for io in plan.inputs}
    try:
        got = onnxruntime_outputs(model, feeds)
    except Exception as e:
        raise LoweringError(f"graph {plan.name}: onnxruntime cannot run it: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}; the graph is not executable as lowered") from None
    return compare(plan.name, [p.name for p in component.outputs], ref, got, atol, rtol)


def _np(dtype: str) -> Any:
    return {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64,
            "bool": np.bool_}[dtype]
