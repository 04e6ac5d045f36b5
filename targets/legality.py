"""Op legality for the Hexagon NPU: rewrite what can be rewritten, report the rest by node and rule.

Rules come from the target file's `legality` block (REFERENCE.md, Hexagon lowering constraints):
static shapes; no forbidden dtypes (int64, double) on runtime tensors; no forbidden ops (Einsum,
fused attention: SDPA must arrive decomposed into MatMul/Softmax); rank <= max_rank, with a
warning at warn_rank (rank 5 compiles but is slow).

`legalize` applies the rewrites of `targets.rewrites` that the rules call for (Einsum decomposed,
int64 lowered to int32, double narrowed, high-rank transposes reduced); `check` then names every remaining violation: node, op, rule, and what to do.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import TensorProto

from targets.onnx_costs import onnx_tensor_types
from targets.rewrites import (
    INT64_RESULT_OPS,
    PARAM_SLOTS,
    _refresh,
    decompose_einsum,
    lower_int64,
    narrow_double,
    reduce_transpose_rank,
)
from targets.spec import LegalityRules

log = logging.getLogger("ndopt")

DTYPE_NAMES = {TensorProto.INT64: "int64", TensorProto.DOUBLE: "double", TensorProto.INT32: "int32",
               TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BOOL: "bool",
               TensorProto.UINT64: "uint64", TensorProto.BFLOAT16: "bfloat16"}


@dataclass(frozen=True)
class Violation:
    rule: str  # static_shape | forbidden_dtype | forbidden_op | max_rank | warn_rank
    node: str  # node name (or the value name for graph inputs/outputs)
    op: str
    detail: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op}) breaks rule {self.rule}: {self.detail}"


@dataclass
class LegalityReport:
    graph: str
    violations: list[Violation] = field(default_factory=list)
    rewrites: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == "error"]

    @property
    def warnings(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        warn = Counter(v.rule for v in self.warnings)
        return {"ok": self.ok, "rewrites": dict(self.rewrites),
                "errors": [{"rule": v.rule, "node": v.node, "op": v.op, "detail": v.detail} for v in self.errors],
                "warnings": {rule: {"count": n, "nodes": [v.node for v in self.warnings if v.rule == rule][:5]}
                             for rule, n in sorted(warn.items())}}


# ---- the check -------------------------------------------------------------------------------------
def check(model: onnx.ModelProto, rules: LegalityRules, graph: str = "graph") -> LegalityReport:
    """Every violation of the rules, by node (graph inputs/outputs by value name)."""
    model = _refresh(model)
    types = onnx_tensor_types(model)
    g = model.graph
    report = LegalityReport(graph)
    consts = {i.name for i in g.initializer}
    forbidden_dtypes = {k for k, v in DTYPE_NAMES.items() if v in rules.forbidden_dtypes}
    producer: dict[str, onnx.NodeProto] = {o: n for n in g.node for o in n.output}
    param_inputs = {n.input[k] for n in g.node for k in PARAM_SLOTS.get(n.op_type, ()) if k < len(n.input)}
    readers: dict[str, list[str]] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n.op_type)

    def where(value: str) -> tuple[str, str]:
        p = producer.get(value)
        return (p.name or value, p.op_type) if p is not None else (value, "graph input")

    seen: set[str] = set()
    for name, (et, shape) in types.items():
        if name in consts or name in seen:
            continue
        seen.add(name)
        node, op = where(name)
        if rules.static_shapes and shape is None:
            report.violations.append(Violation("static_shape", node, op, f"tensor {name!r} has no static shape; "
                                               "export with fixed input shapes"))
            continue
        if et in forbidden_dtypes:
            benign = op in INT64_RESULT_OPS and readers.get(name) == ["Cast"]
            if not benign:
                why = " (a run-time shape parameter)" if name in param_inputs else ""
                report.violations.append(Violation(
                    "forbidden_dtype", node, op, f"tensor {name!r} is {DTYPE_NAMES[et]}{why}; the NPU has no "
                    f"{DTYPE_NAMES[et]}: cast in the model (indices to int32), or fix the shapes so the converter "
                    "folds it"))
        if shape is not None and len(shape) > rules.max_rank:
            report.violations.append(Violation(
                "max_rank", node, op, f"tensor {name!r} has rank {len(shape)} {list(shape)} > {rules.max_rank}; "
                "merge axes in the model (reshape to rank 4) or rewrite the op"))
        elif shape is not None and len(shape) >= rules.warn_rank:
            report.violations.append(Violation("warn_rank", node, op, f"tensor {name!r} has rank {len(shape)}; "
                                               "compiles but runs slower than rank 4", severity="warning"))
    for n in g.node:
        if n.op_type in rules.forbidden_ops:
            hint = "decompose attention into MatMul/Softmax (set_attention_impl('matmul'))" \
                if "Attention" in n.op_type else "rewrite it with MatMul/Transpose"
            report.violations.append(Violation("forbidden_op", n.name or n.output[0], n.op_type,
                                               f"{n.op_type} is not supported by the NPU compiler: {hint}"))
        if n.domain not in ("", "ai.onnx"):
            report.violations.append(Violation("forbidden_op", n.name or n.output[0], f"{n.domain}.{n.op_type}",
                                               "custom-domain op: the NPU compiler takes standard ONNX only"))
    return report


Rewrite = Callable[[onnx.ModelProto], int]


def legalize(model: onnx.ModelProto, rules: LegalityRules, graph: str = "graph") -> tuple[onnx.ModelProto,
                                                                                          LegalityReport]:
    """Apply the rewrites the rules call for, then check; returns the new model and the report."""
    model = _refresh(model)
    rewrites: dict[str, int] = {}
    steps: list[tuple[str, Rewrite]] = []
    if "Einsum" in rules.forbidden_ops:
        steps.append(("decompose_einsum", decompose_einsum))
    if "int64" in rules.forbidden_dtypes:
        steps.append(("lower_int64", lower_int64))
    if "double" in rules.forbidden_dtypes:
        steps.append(("narrow_double", narrow_double))
    steps.append(("reduce_transpose_rank", lambda m: reduce_transpose_rank(m, rules.warn_rank)))
    for name, fn in steps:
        n = fn(model)
        if n:
            rewrites[name] = n
            model = _refresh(model)
    report = check(model, rules, graph)
    report.rewrites = rewrites
    for v in report.errors:
        log.debug("%s: %s", graph, v)
    return model, report
