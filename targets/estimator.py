"""Roofline latency and peak memory of a graph, a component and a video on a Snapdragon NPU.

Every node is priced as `max(tiled MACs / (peak * eff[class]), weight bytes / (bandwidth *
eff.weights) + activation bytes / (bandwidth * eff.activations) * slowdown) + node_us` (activations
past the on-chip memory, `SPILL_BYTES`, at the DRAM rate `eff.weights` instead), and every
graph pays `graph_us` once, with the target's nominal peak and DRAM bandwidth and efficiencies fitted
on AI Hub measurements (`targets/calibration.tsv`, `ndopt calibrate`). Classes: `conv`, `dwconv`
(depthwise / narrow grouped conv: vector units, not the matrix engine), `matmul` (a weight operand),
`attention` (two activations), `norm` (normalisations, softmax, reductions: several passes over
their input, priced at `eff.norm` times the vector roof) and `vector` (everything else: bandwidth
only). MACs are priced with the channel dims padded to the matrix engine's tile (`TILE`), so narrow
and odd channel counts cost what they occupy. Bytes are priced at the precision's widths (w8a16:
1-byte weights, 2-byte activations); integer tensors keep their width. Peak memory is weights (at the
precision) plus the largest set of simultaneously live activations.

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

from ndopt.precision import PRECISION_BITS
from targets.spec import Efficiency, TargetSpec

MAC_CLASSES = ("conv", "dwconv", "matmul", "attention")
KINDS = (*MAC_CLASSES, "norm", "vector")
TILE = 32  # channel granularity of the HMX matrix engine: narrower channel dims are padded to it
# Activation bytes (inputs + outputs) of one op past which they no longer stay in the NPU's on-chip
# memory (Hexagon's 8 MB VTCM holds one tile set of input and output): such an op moves them at DRAM
# rates (`eff.weights`), not the on-chip rate `eff.activations` (times `eff.norm` for multi-pass ops).
SPILL_BYTES = 16 * 2**20


def tiled(n: int) -> int:
    """A channel dim rounded up to the matrix engine's tile."""
    return -(-int(n) // TILE) * TILE if n > 0 else 0


@dataclass(frozen=True)
class OpCost:
    """One node: its class, MACs, float activation and weight elements moved, other bytes, and the
    MACs its tiles occupy (channel dims padded to `TILE`; 0: the same as `macs`)."""

    kind: str
    macs: int = 0
    act_elems: int = 0  # float activation elements read and written
    weight_elems: int = 0  # float weight elements read
    other_bytes: int = 0  # integer / bool tensors, at their own width
    tile_macs: int = 0


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

    def op_counts(self) -> dict[tuple[str, int, int, int, int], int]:
        """(kind, priced MACs, activation elements, weight elements, other bytes) -> how many ops."""
        out: dict[tuple[str, int, int, int, int], int] = {}
        for o in self.ops:
            key = (o.kind, o.tile_macs or o.macs, o.act_elems, o.weight_elems, o.other_bytes)
            out[key] = out.get(key, 0) + 1
        return out

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
@dataclass(frozen=True)
class OpArrays:
    """Ops of one or more graphs as columns (identical ops merged, with a count): what the roofline
    prices, vectorized so that a fit over many graphs stays fast. `graph` is each row's graph index."""

    kind: np.ndarray  # index into KINDS
    macs: np.ndarray
    act: np.ndarray
    weights: np.ndarray
    other: np.ndarray
    count: np.ndarray
    graph: np.ndarray
    n_graphs: int

    @classmethod
    def of(cls, costs: Sequence[GraphCost]) -> OpArrays:
        rows: list[tuple[int, float, float, float, float, int, int]] = []
        for g, cost in enumerate(costs):
            for (kind, macs, act, w, other), n in cost.op_counts().items():
                rows.append((KINDS.index(kind), macs, act, w, other, n, g))
        a = np.array(rows, dtype=float).reshape(-1, 7)
        return cls(a[:, 0].astype(int), a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5], a[:, 6].astype(int), len(costs))


def op_seconds(ops: OpArrays, spec: TargetSpec, precision: str, eff: Efficiency) -> np.ndarray:
    """Seconds of each row of `ops` (one op of its kind, not times its count)."""
    wbits, abits = PRECISION_BITS[precision]
    peak, bw = spec.peak_macs(precision), spec.dram_bandwidth_gbs * 1e9
    mac_eff = np.array([getattr(eff, k) if k != "dwconv" else eff.dwconv_eff for k in MAC_CLASSES] + [1.0, 1.0])
    slow = np.where(ops.kind == KINDS.index("norm"), eff.norm, 1.0)
    act = ops.act * (abits / 8) + ops.other
    # an op whose operands outgrow the on-chip memory streams them through DRAM, as weights are
    t_act = np.where(act > SPILL_BYTES, act / (bw * eff.weights), act / (bw * eff.activations) * slow)
    t_mem = ops.weights * (wbits / 8) / (bw * eff.weights) + t_act
    t_mac = ops.macs / (peak * mac_eff[ops.kind])
    return np.maximum(t_mac, t_mem) + eff.node_us * 1e-6


def graphs_seconds(ops: OpArrays, spec: TargetSpec, precision: str, eff: Efficiency) -> np.ndarray:
    """Seconds of each graph in `ops`."""
    t = op_seconds(ops, spec, precision, eff) * ops.count
    per_graph = np.bincount(ops.graph, weights=t, minlength=ops.n_graphs)
    has_ops = np.bincount(ops.graph, minlength=ops.n_graphs) > 0  # a graph with no compute costs nothing
    return per_graph + eff.graph_us * 1e-6 * has_ops


def graph_seconds_by_class(cost: GraphCost, spec: TargetSpec, precision: str,
                           eff: Efficiency | None = None) -> dict[str, float]:
    eff = eff or spec.efficiency[precision]
    out: dict[str, float] = {}
    if cost.ops:
        ops = OpArrays.of([cost])
        t = op_seconds(ops, spec, precision, eff) * ops.count
        for k, v in zip(ops.kind, t):
            out[KINDS[k]] = out.get(KINDS[k], 0.0) + float(v)
    if eff.graph_us and cost.ops:
        out["graph"] = eff.graph_us * 1e-6
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
                state: float, budget: float, policy: str = "auto") -> dict[str, Any]:
    """Peak bytes of a video under a residency policy. `phases` run in order; `weights` and
    `activations` are per component (activations: the largest of its graphs); `state` is what lives
    across phases (text embeddings, noise, generated latents, the finished frames).

    - "all_resident": every component's weights stay loaded for the whole video;
    - "sequential": each phase loads its components' weights and frees the previous phase's (text
      encoding before the DiT, the image model freed before the DiT, ...): the peak is the largest
      phase, at the price of reading each phase's weights from storage once per video;
    - "auto": all resident if that fits the budget, else sequential.
    """
    if policy not in ("auto", "all_resident", "sequential"):
        raise ValueError(f"memory policy {policy!r}: one of auto, all_resident, sequential")
    all_resident = sum(weights.values()) + max(activations.values(), default=0.0) + state
    rows = []
    for name, comps in phases:
        rows.append({"phase": name, "components": list(comps),
                     "weights_mb": sum(weights.get(c, 0.0) for c in comps) / 2**20,
                     "activations_mb": max((activations.get(c, 0.0) for c in comps), default=0.0) / 2**20})
    if policy == "all_resident" or (policy == "auto" and all_resident <= budget):
        policy, peak = "all_resident", all_resident
        for r in rows:
            r["resident_mb"] = sum(weights.values()) / 2**20 + r["activations_mb"] + state / 2**20
    else:
        policy = "sequential"
        for r in rows:
            r["resident_mb"] = r["weights_mb"] + r["activations_mb"] + state / 2**20
        peak = max((r["resident_mb"] for r in rows), default=0.0) * 2**20
    return {"policy": policy, "peak_mb": round(peak / 2**20, 3), "budget_mb": round(budget / 2**20, 1),
            "fits": peak <= budget, "state_mb": round(state / 2**20, 3),
            "all_resident_mb": round(all_resident / 2**20, 3),
            "weights_mb": {k: round(v / 2**20, 3) for k, v in weights.items()},
            "activations_mb": {k: round(v / 2**20, 3) for k, v in activations.items()},
            "phases": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows]}
