"""Calibrating a target from a person's own AI Hub profiles (`ndopt calibrate`).

A profiles directory holds, per model, the JSON that an AI Hub profile job returns
(`ProfileJob.download_profile()`: `execution_summary.estimated_inference_time`, in microseconds)
and the ONNX file it was made from, matched by file name (`resnet.json` and `resnet.onnx`; a JSON may
also name its graph with a top-level `"onnx"` key). An optional `"precision"` key says what the
profiled model ran at (default: the command's `--precision`). The fit is `calibration.fit_target`;
the error reported and written is leave-one-model-out cross-validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ndopt.errors import TargetError
from targets.calibration import Sample, cross_validate, errors, fit_target, predict
from targets.spec import TargetSpec


@dataclass(frozen=True)
class Profile:
    name: str
    onnx: Path
    precision: str
    latency_ms: float


def profile_latency_ms(data: dict[str, Any], source: str) -> float:
    """The measured latency of a profile job's result: `execution_summary.estimated_inference_time`
    (microseconds), or `inference_time_milliseconds` (qai-hub-models' perf.yaml entries)."""
    summary = data.get("execution_summary") if isinstance(data, dict) else None
    if isinstance(summary, dict) and isinstance(summary.get("estimated_inference_time"), (int, float)):
        return float(summary["estimated_inference_time"]) / 1e3
    if isinstance(data, dict) and isinstance(data.get("inference_time_milliseconds"), (int, float)):
        return float(data["inference_time_milliseconds"])
    raise TargetError(f"{source}: no execution_summary.estimated_inference_time (microseconds); pass the JSON an "
                      "AI Hub profile job returns (ProfileJob.download_profile())")


def read_profiles(directory: Path, precision: str) -> list[Profile]:
    """Every `*.json` in `directory` with its ONNX graph beside it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TargetError(f"--profiles {directory}: not a directory")
    out = []
    for f in sorted(directory.glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except ValueError as e:
            raise TargetError(f"{f}: not JSON ({e})") from None
        onnx_name = data.get("onnx") if isinstance(data, dict) else None
        graph = directory / (onnx_name or f.with_suffix(".onnx").name)
        if not graph.is_file():
            raise TargetError(f"{f}: no ONNX graph {graph.name} beside it; put the model each profile was made from "
                              "next to its JSON, with the same name")
        out.append(Profile(f.stem, graph, str(data.get("precision", precision)), profile_latency_ms(data, str(f))))
    if len(out) < 3:
        raise TargetError(f"--profiles {directory}: {len(out)} profile(s) with their ONNX graphs; a fit needs at least 3 "
                          "(more, of different kinds of model, for an estimate that holds on new ones)")
    return out


def calibrate(spec: TargetSpec, profiles: list[Profile]) -> tuple[TargetSpec, dict[str, dict[str, float]], list[dict]]:
    """(the spec with fitted efficiencies and calibration record, errors per precision, per-model rows)."""
    from targets.onnx_costs import load_static_graph, onnx_graph_cost

    for p in profiles:
        spec.check_precision(p.precision)
    samples = [Sample(onnx_graph_cost(load_static_graph(p.onnx)), p.precision, p.latency_ms, p.name) for p in profiles]
    effs = fit_target(samples, spec, {k: v for k, v in spec.efficiency.items() if v.calibrated})
    held = cross_validate(samples, spec, effs)
    errs: dict[str, dict[str, float]] = {}
    rows = []
    for prec in effs:
        idx = [i for i, s in enumerate(samples) if s.precision == prec]
        e = errors(held[idx], [samples[i].latency_ms for i in idx])
        errs[prec] = {"median": round(e["median"], 4), "worst": round(e["worst"], 4), "n": e["n"]}
        fitted = predict([samples[i].cost for i in idx], spec, prec, effs[prec])
        rows += [{"model": samples[i].group, "precision": prec, "measured_ms": samples[i].latency_ms,
                  "estimated_ms": round(float(f), 4), "held_out_ms": round(float(held[i]), 4)}
                 for i, f in zip(idx, fitted)]
    efficiency = dict(spec.efficiency)
    for prec, eff in effs.items():
        efficiency[prec] = eff.model_copy(update={"calibrated": True})
    for prec in spec.precisions:  # precisions not profiled: priced from the nearest fitted one
        if prec not in effs:
            src = effs.get("w8a16") or next(iter(effs.values()))
            efficiency[prec] = src.model_copy(update={"calibrated": False})
    data = spec.model_dump(exclude={"path"})
    data["efficiency"] = {k: v.model_dump(exclude_none=True) for k, v in efficiency.items()}
    data["calibration"] = {"calibrated": True, "source": f"ndopt calibrate: {len(profiles)} AI Hub profiles",
                           "error": errs}
    return TargetSpec(**data), errs, rows


def write_spec(spec: TargetSpec, path: Path) -> None:
    """The target file, as YAML (efficiencies one line per precision)."""
    data = spec.model_dump(exclude={"path"})
    data["efficiency"] = {k: {f: v for f, v in e.items() if v is not None and not (f == "calibrated" and v)}
                          for k, e in data["efficiency"].items()}
    Path(path).write_text(f"# {spec.name}: written by `ndopt calibrate`\n" + yaml.safe_dump(data, sort_keys=False,
                                                                                           width=120))


def median_error(errs: dict[str, dict[str, float]]) -> float:
    return float(np.median([e["median"] for e in errs.values()])) if errs else float("nan")
