"""Roofline latency and peak memory of a graph, a component and a video on a Snapdragon NPU.

Every node is priced as `max(MACs / (peak * eff[class]), weight bytes / (bandwidth * eff.weights)
+ activation bytes / (bandwidth * eff.activations)) + node_us`, with the target's nominal peak and
DRAM bandwidth, and per-class efficiencies fitted on AI Hub measurements (`targets/calibration.tsv`).
Classes: `conv`, `matmul` (a weight operand), `attention` (two activations), `vector` (everything
else: bandwidth only). Bytes are priced at the precision's widths (w8a16: 1-byte weights, 2-byte
activations); integer tensors keep their width. Peak memory is weights (at the precision) plus the
largest set of simultaneously live activations.

The per-node records (`GraphCost`) come from two front ends that count the same nodes (a test
checks that they agree): `onnx_costs.onnx_graph_cost` for an ONNX graph (`ndopt estimate`, the
bundle's graphs) and `torch_costs.torch_graph_cost` for a component at a call signature run for
shapes only (`ndopt plan`, meta pipelines included). The estimator knows no model by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from targets import PRECISION_BITS, Efficiency, TargetSpec

MAC_CLASSES = ("conv", "matmul", "attention")


@dataclass(frozen=True)
class OpCost:
    """One node: its class, MACs, float activation and weight elements moved, other bytes."""

    kind: str
    macs: int = 0
    act_elems: int = 0  # float activation elements read and written
    weight_elems: int = 0  # float weight elements read
    other_bytes: int = 0  # integer / bool tensors, at their own width


@dataclass(frozen=True)
class GraphCost:
    """What the estimator needs of one graph (one call of a component at one signature)."""

    ops: tuple[OpCost, ...]
    weight_elems: int  # unique float weights held by the graph
    other_weight_bytes: int
    peak_act_elems: int  # largest live set of float activations
    peak_other_bytes: int
    flops: float = 0.0  # the cost model's FLOPs when known (torch front end)

    @property
    def macs(self) -> float:
        return float(sum(o.macs for o in self.ops))

    def macs_by_class(self) -> dict[str, float]:
        out = dict.fromkeys(MAC_CLASSES, 0.0)
        for o in self.ops:
            if o.kind in out:
                out[o.kind] += o.macs
        return out


@dataclass(frozen=True)
class Estimate:
    latency_ms: float
    peak_memory_mb: float
    weights_mb: float
    activations_mb: float
    compute_ms: dict[str, float] = field(default_factory=dict)  # time by node class

    def to_json(self) -> dict[str, Any]:
        return {"latency_ms": round(self.latency_ms, 4), "peak_memory_mb": round(self.peak_memory_mb, 3),
                "weights_mb": round(self.weights_mb, 3), "activations_mb": round(self.activations_mb, 3),
                "time_by_class_ms": {k: round(v, 4) for k, v in self.compute_ms.items()}}


# ---- the roofline ----------------------------------------------------------------------------
def op_seconds(op: OpCost, peak_macs: float, bandwidth: float, eff: Efficiency, wbits: int, abits: int) -> float:
    t_mem = (op.weight_elems * wbits / 8) / (bandwidth * eff.weights) + \
        (op.act_elems * abits / 8 + op.other_bytes) / (bandwidth * eff.activations)
    t_mac = op.macs / (peak_macs * getattr(eff, op.kind)) if op.macs else 0.0
    return max(t_mac, t_mem) + eff.node_us * 1e-6


def graph_seconds_by_class(cost: GraphCost, spec: TargetSpec, precision: str,
                           eff: Efficiency | None = None) -> dict[str, float]:
    eff = eff or spec.efficiency[precision]
    wbits, abits = PRECISION_BITS[precision]
    peak, bw = spec.peak_macs(precision), spec.dram_bandwidth_gbs * 1e9
    out: dict[str, float] = {}
    for op in cost.ops:
        out[op.kind] = out.get(op.kind, 0.0) + op_seconds(op, peak, bw, eff, wbits, abits)
    return out


def estimate_graph(cost: GraphCost, spec: TargetSpec, precision: str, eff: Efficiency | None = None) -> Estimate:
    spec.check_precision(precision)
    by_class = graph_seconds_by_class(cost, spec, precision, eff)
    wbits, abits = PRECISION_BITS[precision]
    weights = cost.weight_elems * wbits / 8 + cost.other_weight_bytes
    acts = cost.peak_act_elems * abits / 8 + cost.peak_other_bytes
    return Estimate(latency_ms=1e3 * sum(by_class.values()), peak_memory_mb=(weights + acts) / 2**20,
                    weights_mb=weights / 2**20, activations_mb=acts / 2**20,
                    compute_ms={k: 1e3 * v for k, v in sorted(by_class.items())})


def relative_errors(pred: Sequence[float], meas: Sequence[float]) -> np.ndarray:
    """|pred / meas - 1| elementwise."""
    return np.abs(np.asarray(pred, dtype=float) / np.asarray(meas, dtype=float) - 1)


# ---- a video ---------------------------------------------------------------------------------
def memory_plan(phases: Sequence[tuple[str, Sequence[str]]], weights: dict[str, float], activations: dict[str, float],
                state: float, budget: float) -> dict[str, Any]:
    """Peak bytes of a video: every component resident if that fits the budget, else one phase's
    components at a time (weights loaded per phase). `weights` and `activations` are per component
    (activations: the largest of its graphs); `state` is what lives across phases (text embeddings,
    noise, generated latents)."""
    all_resident = sum(weights.values()) + max(activations.values(), default=0.0) + state
    rows = []
    for name, comps in phases:
        rows.append({"phase": name, "components": list(comps),
                     "weights_mb": sum(weights.get(c, 0.0) for c in comps) / 2**20,
                     "activations_mb": max((activations.get(c, 0.0) for c in comps), default=0.0) / 2**20})
    if all_resident <= budget:
        policy, peak = "all_resident", all_resident
        for r in rows:
            r["resident_mb"] = sum(weights.values()) / 2**20 + r["activations_mb"] + state / 2**20
    else:
        policy = "load_per_phase"
        for r in rows:
            r["resident_mb"] = r["weights_mb"] + r["activations_mb"] + state / 2**20
        peak = max((r["resident_mb"] for r in rows), default=0.0) * 2**20
    return {"policy": policy, "peak_mb": round(peak / 2**20, 3), "budget_mb": round(budget / 2**20, 1),
            "fits": peak <= budget, "state_mb": round(state / 2**20, 3),
            "weights_mb": {k: round(v / 2**20, 3) for k, v in weights.items()},
            "activations_mb": {k: round(v / 2**20, 3) for k, v in activations.items()},
            "phases": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}
