"""Calibrating the estimator on Qualcomm AI Hub's published measurements.

`targets/calibration.tsv` lists models with their measured latencies per AI Hub device and
precision (from the `perf.yaml` files of the `qai-hub-models` package; the `source` column says
which file and runtime). Each model is rebuilt from its public architecture
(`targets.calibration_models`), exported to ONNX as `ndopt estimate` reads it, and costed node by
node by `onnx_costs.onnx_graph_cost`; the per-node records are kept in
`targets/calibration_features.json` (`bench/bench_estimator.py --extract` rewrites it), so a fit or
a cross-validation needs no model. `fit` finds the efficiencies of a target and precision that
minimize the squared log error; `cross_validate` holds out one family (or one model) at a time.
The fitted values live in the target files (`efficiency:`, `calibration:`); the estimator itself
never sees a model name.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ndopt.errors import TargetError
from targets.calibration_models import BUILDERS, FAMILIES, Built
from targets.estimator import KINDS, GraphCost, OpArrays, OpCost, graphs_seconds
from targets.spec import Efficiency, TargetSpec
from targets.torch_costs import module_graph_cost

COLUMNS = ("model", "builder", "device", "precision", "latency_ms", "source")
FEATURES = "calibration_features.json"


@dataclass(frozen=True)
class Measurement:
    model: str
    builder: str
    device: str
    precision: str
    latency_ms: float
    source: str

    @property
    def family(self) -> str:
        return FAMILIES.get(self.builder, self.model)


def read_tsv(text: str | None = None, source: str = "targets/calibration.tsv") -> list[Measurement]:
    """The calibration table (comment lines start with #)."""
    if text is None:
        text = (resources.files("targets") / "calibration.tsv").read_text()
    rows = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    reader = csv.DictReader(rows, delimiter="\t")
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise TargetError(f"{source}: header must be {' '.join(COLUMNS)} (tab-separated), got {reader.fieldnames}")
    out = []
    for i, r in enumerate(reader, start=2):
        try:
            out.append(Measurement(r["model"], r["builder"], r["device"], r["precision"], float(r["latency_ms"]),
                                   r["source"]))
        except (TypeError, ValueError) as e:
            raise TargetError(f"{source}: data row {i}: {e}; latency_ms must be a number") from None
    return out


# ---- the calibration models' graphs -----------------------------------------------------------------
def graph_cost(builder: str) -> GraphCost:
    """Build a calibration model on meta and cost it with the torch front end (fake tensors when the
    model needs values)."""
    module, args, kwargs = _build(builder, "meta")
    try:
        return module_graph_cost(module, *args, **kwargs)
    except (RuntimeError, NotImplementedError):  # a model reads tensor values (.item()): fake tensors
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            return module_graph_cost(module, *args, **kwargs)


def _build(builder: str, device: str) -> Built:
    if builder not in BUILDERS:
        raise TargetError(f"calibration builder {builder!r} is unknown; known: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[builder](device)


def export_graph(builder: str, path: Path, strip: bool = True) -> Path:
    """Export a calibration model (random weights, cpu) to ONNX as a person would for `ndopt estimate`
    (the TorchScript exporter, opset 17, constant folding), then (`strip`) keep only the graph and
    the small constants: the estimator reads shapes, and the file stays small (a skeleton, which
    onnx.checker refuses: `strip=False` keeps the weights, for a file a person would have)."""
    import tempfile

    import onnx
    import torch

    module, args, kwargs = _build(builder, "cpu")
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, torch.no_grad():
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX export
        try:
            f = Path(tmp) / "m.onnx"
            torch.onnx.export(module, args, str(f), kwargs=kwargs or None, opset_version=17, dynamo=False,
                              do_constant_folding=True, external_data=True)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        model = onnx.load(str(f), load_external_data=not strip)
        if strip:
            strip_weights(model)
        onnx.save(model, str(path))
    return path


def strip_weights(model: Any, keep_bytes: int = 4096) -> Any:
    """Drop the data of initializers larger than `keep_bytes` (shapes stay: all the estimator reads)."""
    import onnx

    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or len(init.raw_data) > keep_bytes:
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            init.ClearField("raw_data")
    return model


def cost_to_json(cost: GraphCost) -> dict[str, Any]:
    """A GraphCost as JSON, identical nodes merged: [kind, macs, tile_macs, act, weights, other, count]."""
    counts: dict[tuple, int] = {}
    for o in cost.ops:
        key = (o.kind, o.macs, o.tile_macs, o.act_elems, o.weight_elems, o.other_bytes)
        counts[key] = counts.get(key, 0) + 1
    return {"weight_elems": cost.weight_elems, "other_weight_bytes": cost.other_weight_bytes,
            "peak_act_elems": cost.peak_act_elems, "peak_other_bytes": cost.peak_other_bytes,
            "ops": [[*k, n] for k, n in counts.items()]}


def cost_from_json(d: dict[str, Any]) -> GraphCost:
    ops: list[OpCost] = []
    for kind, macs, tile, act, w, other, n in d["ops"]:
        if kind not in KINDS:
            raise TargetError(f"features: unknown node class {kind!r}; rerun bench/bench_estimator.py --extract")
        ops += [OpCost(kind, macs, act, w, other, tile)] * n
    return GraphCost(tuple(ops), d["weight_elems"], d["other_weight_bytes"], d["peak_act_elems"], d["peak_other_bytes"])


def load_features(path: Path | None = None) -> dict[str, GraphCost]:
    """builder -> the GraphCost of its ONNX export (`targets/calibration_features.json`)."""
    text = Path(path).read_text() if path else (resources.files("targets") / FEATURES).read_text()
    return {k: cost_from_json(v) for k, v in json.loads(text)["graphs"].items()}


def save_features(costs: dict[str, GraphCost], path: Path, note: str, sources: dict[str, str] | None = None) -> None:
    """Write the features file; `sources`: which front end costed each graph ("onnx" or "torch")."""
    data: dict[str, Any] = {"note": note}
    if sources:
        data["sources"] = dict(sorted(sources.items()))
    data["graphs"] = {k: cost_to_json(v) for k, v in sorted(costs.items())}
    Path(path).write_text(json.dumps(data, separators=(",", ":")) + "\n")


# ---- the fit --------------------------------------------------------------------------------------------
PARAMS = ("conv", "dwconv", "matmul", "attention", "weights", "activations", "norm", "node_us", "graph_us")
# Rates may pass 1: the nominal peaks of a quantized precision (`mac_rate`) and the DRAM figure are
# the data sheet's, and AI Hub's w8a16 runs beat them where their weights or MACs are narrower.
BOUNDS = {"conv": (0.02, 2.0), "dwconv": (0.002, 2.0), "matmul": (0.02, 2.0), "attention": (0.005, 2.0),
          "weights": (0.05, 2.0), "activations": (0.05, 20.0), "norm": (1.0, 20.0), "node_us": (0.0, 40.0),
          "graph_us": (0.0, 2000.0)}
STARTS = ([0.3, 0.1, 0.3, 0.1, 0.5, 2.0, 2.0, 5.0, 50.0], [0.5, 0.3, 0.5, 0.2, 0.8, 5.0, 1.5, 2.0, 200.0],
          [0.15, 0.05, 0.15, 0.05, 0.3, 1.0, 4.0, 10.0, 10.0])


def _efficiency(x: Sequence[float]) -> Efficiency:
    return Efficiency(**dict(zip(PARAMS, (float(v) for v in x))))


def predict(costs: Sequence[GraphCost] | OpArrays, spec: TargetSpec, precision: str, eff: Efficiency) -> np.ndarray:
    """Estimated milliseconds of each graph."""
    ops = costs if isinstance(costs, OpArrays) else OpArrays.of(costs)
    return 1e3 * graphs_seconds(ops, spec, precision, eff)


def fit(costs: Sequence[GraphCost], measured_ms: Sequence[float], spec: TargetSpec, precision: str,
        start: Efficiency | None = None, free: Sequence[str] = PARAMS) -> Efficiency:
    """The efficiencies minimizing sum (log predicted - log measured)^2 over the graphs (bounded,
    a few starts: max() is not smooth; scipy's least_squares, a dev-time dependency: the fitted
    values ship in the target files). Only the `free` parameters move; the others keep `start`'s
    values. A weak pull towards `start` keeps parameters the graphs barely exercise (no depthwise
    conv, few normalisations) from drifting to a bound."""
    from scipy.optimize import least_squares

    if len(costs) != len(measured_ms) or not costs:
        raise TargetError("fit needs one measured latency per costed model, and at least one model")
    meas = np.log(np.asarray(measured_ms, dtype=float))
    ops = OpArrays.of(costs)
    idx = [PARAMS.index(p) for p in free]
    lo = np.array([BOUNDS[p][0] for p in PARAMS])
    hi = np.array([BOUNDS[p][1] for p in PARAMS])
    base = np.array([getattr(start, p) if p != "dwconv" else start.dwconv_eff for p in PARAMS]) if start \
        else np.array(STARTS[0])
    base = np.clip(base, lo + 1e-6, hi - 1e-6)
    prior = np.log(base[idx])
    pulled = np.array([p not in ("node_us", "graph_us") for p in free], dtype=float) * 0.05

    def full(x: np.ndarray) -> np.ndarray:
        out = base.copy()
        out[idx] = x
        return out

    def residuals(x: np.ndarray) -> np.ndarray:
        pred = np.log(predict(ops, spec, precision, _efficiency(full(x))))
        return np.concatenate([pred - meas, pulled * (np.log(np.maximum(x, 1e-9)) - prior)])

    best = None
    for x0 in [base, *(np.array(g) for g in STARTS)] if len(free) == len(PARAMS) else [base]:
        r = least_squares(residuals, np.clip(x0[idx], lo[idx] + 1e-6, hi[idx] - 1e-6), bounds=(lo[idx], hi[idx]),
                          x_scale="jac", diff_step=1e-3)
        if best is None or r.cost < best.cost:
            best = r
    return _efficiency([float(f"{v:.4g}") for v in full(best.x)])


# With few measurements at a quantized precision, only the rates move from the float fit (the
# normalisations' too: quantized kernels requantize every pass); the per-node and per-graph costs
# are the graph's, not the precision's.
QUANTIZED_FREE = ("conv", "dwconv", "matmul", "attention", "weights", "activations", "norm")


@dataclass(frozen=True)
class Sample:
    """One measurement of one graph: what a target's fit reads."""

    cost: GraphCost
    precision: str
    latency_ms: float
    group: str  # what cross-validation holds out together (a family, or the model itself)


def fit_target(samples: Sequence[Sample], spec: TargetSpec,
               start: dict[str, Efficiency] | None = None) -> dict[str, Efficiency]:
    """Efficiencies per precision measured: the float precision (fp16) on its own, every other
    precision from it with only `QUANTIZED_FREE` moving (all parameters when fp16 is not measured)."""
    start = start or {}
    precs = sorted({s.precision for s in samples}, key=lambda p: (p != "fp16", p))
    out: dict[str, Efficiency] = {}
    for p in precs:
        mine = [s for s in samples if s.precision == p]
        base = out.get("fp16")
        if base is not None:
            out[p] = fit([s.cost for s in mine], [s.latency_ms for s in mine], spec, p, base, QUANTIZED_FREE)
        else:
            out[p] = fit([s.cost for s in mine], [s.latency_ms for s in mine], spec, p, start.get(p))
    return out


def cross_validate(samples: Sequence[Sample], spec: TargetSpec,
                   start: dict[str, Efficiency] | None = None) -> np.ndarray:
    """Held-out estimates: each group's measurements estimated by `fit_target` on the other groups."""
    samples = list(samples)
    pred = np.zeros(len(samples))
    groups = sorted({s.group for s in samples})
    if len(groups) < 2:
        raise TargetError("cross-validation needs at least two groups of measurements (models or families)")
    for g in groups:
        train = [s for s in samples if s.group != g]
        effs = fit_target(train, spec, start)
        for i, s in enumerate(samples):
            if s.group == g:
                eff = effs.get(s.precision) or _efficiency(STARTS[0])
                pred[i] = predict([s.cost], spec, s.precision, eff)[0]
    return pred


def errors(pred: Sequence[float], meas: Sequence[float]) -> dict[str, float]:
    """Median and worst |predicted / measured - 1|, and the geometric mean of predicted / measured."""
    rel = np.abs(np.asarray(pred) / np.asarray(meas) - 1)
    return {"median": float(np.median(rel)), "worst": float(rel.max()), "n": len(rel),
            "geomean_ratio": float(math.exp(np.mean(np.log(np.asarray(pred) / np.asarray(meas)))))}
