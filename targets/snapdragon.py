"""`SnapdragonTarget`: what `ndopt run`, `ndopt plan` and `ndopt estimate` call (ndopt.target.Target).

- `lower(pipeline, out_dir, ctx)`: every component at every distinct call signature to ONNX,
  onnxsim, legalized and checked (legality, onnx.checker, onnxruntime vs torch), written with
  `manifest.json` into `out_dir` atomically, estimated, and, with AI Hub credentials, compiled and
  profiled on the target's device.
- `estimate(pipeline)`: latency and peak memory per component and per video from the pipeline's
  cost analysis (meta pipelines too: `ndopt plan`).
- `estimate_onnx(path, precision)`: one ONNX graph (`ndopt estimate`).

Beside it: `targets.lowered` (lowered graphs and their in-process cache), `targets.bundle_files`
(the files written into the bundle and their sha256 records), `targets.hub_jobs` (the bundle staged
for AI Hub).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ndopt import threads
from ndopt.errors import LoweringError
from ndopt.io import atomic_dir, atomic_write_json
from ndopt.ir.component import Component
from ndopt.ir.pipeline import Pipeline
from ndopt.precision import PRECISION_BITS
from ndopt.progress import progress
from targets import aihub, bundle, hub_jobs
from targets.bundle_files import copy_encodings, graph_io, sha256_file, weights_record, write_constants
from targets.estimator import Estimate, estimate_graph, memory_plan
from targets.legality import legalize
from targets.lowered import CACHE, LoweredGraph
from targets.lowering import (
    EXTERNAL_DATA_BYTES,
    GraphPlan,
    example_inputs,
    export_graph,
    npu_friendly,
    plan_graphs,
    release_memory,
    simplify,
    weight_bytes,
)
from targets.numerics import NumericsReport, check_model, check_numerics
from targets.onnx_costs import load_static_graph, onnx_graph_cost
from targets.quantized import AIMET_LOG, QuantizedGraph, aimet_log, is_quantized, lower_quantized
from targets.shared_weights import SharedWeights, SharedWeightsWriter
from targets.spec import TargetSpec, specs, uncalibrated_warning
from targets.torch_costs import torch_graph_cost

log = logging.getLogger("ndopt")
FLOAT_PRECISION = "fp16"  # an unquantized component on the NPU: its float path


class SnapdragonTarget:
    """A Snapdragon NPU target built from its data file (`targets/<name>.yaml`)."""

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.description = spec.description

    def to_json(self) -> dict[str, Any]:
        return self.spec.to_json()

    def __repr__(self) -> str:
        return f"SnapdragonTarget({self.name!r})"

    # ---- estimates ---------------------------------------------------------------------------
    def estimate_onnx(self, path: Path, precision: str,
                      input_shapes: Mapping[str, Sequence[int]] | Iterable[str] | None = None) -> dict[str, Any]:
        """{"latency_ms", "peak_memory_mb"} of one ONNX graph at a precision; "note" too when no node
        of the graph computes (the figures are then its memory only).

        `input_shapes` ({name: dims}, or `NAME=1x3x224x224` strings) fix inputs with unknown dims.
        Refuses (GraphInputError, a TargetError) a file that is not an ONNX graph and a graph whose
        dims stay unknown: the estimator would price them as zero (`onnx_costs.load_static_graph`)."""
        self.spec.check_precision(precision)
        model = load_static_graph(Path(path), input_shapes)
        cost = onnx_graph_cost(model)
        est = estimate_graph(cost, self.spec, precision)
        out: dict[str, Any] = {"latency_ms": round(est.latency_ms, 4), "peak_memory_mb": round(est.peak_memory_mb, 3)}
        if not self.spec.efficiency[precision].calibrated:  # placeholders: the estimate says so
            out.update(calibrated=False, warning=uncalibrated_warning(self.spec, precision))
        if not cost.ops:
            n, ops = len(model.graph.node), ", ".join(sorted({node.op_type for node in model.graph.node}))
            what = f"its {n} node(s) ({ops}) are layout or metadata, free on the NPU" if n else "it has no nodes"
            out["note"] = f"{path} has no compute: {what}; latency 0, peak memory counts its inputs, outputs and weights"
        return out

    @property
    def float_precision(self) -> str:
        """What an unquantized component runs at on the NPU: its float path (fp16)."""
        return FLOAT_PRECISION if FLOAT_PRECISION in self.spec.precisions else self.spec.default_precision

    def _precision_of(self, component: Component, default: str | None = None) -> str:
        """The precision a component really has: its `precision` attr (the quantization pass), else
        `default` (a what-if from the caller), else float."""
        p = component.attrs.get("precision")
        return p if isinstance(p, str) and p in self.spec.precisions else (default or self.float_precision)

    def estimate(self, pipeline: Pipeline, precision: str | None = None) -> dict[str, Any]:
        """Latency and peak memory per component and per video (works on meta pipelines).

        A component that records its own `precision` attr (the quantization pass) is priced at it;
        the rest at `precision` when given (a what-if), else as float (fp16, the NPU's float path).
        `precision` in the result is the one precision every component has, or "mixed" (then
        `precisions` says which component has which)."""
        from ndopt.ir.cost import CostModel

        if precision is not None:
            self.spec.check_precision(precision)
        costs = CostModel(disk=False)  # fresh: every signature runs once under the recording mode
        seen: dict[Any, tuple[Estimate, float]] = {}
        comps: dict[str, dict[str, Any]] = {}
        sigs = []
        for sig in pipeline.call_plan():
            comp = pipeline[sig.component]
            prec = self._precision_of(comp, precision)
            ident = (sig.component, sig.args, repr(sig.static))
            if ident not in seen:
                with npu_friendly(comp.module):
                    cost = torch_graph_cost(comp, sig, costs)
                seen[ident] = (estimate_graph(cost, self.spec, prec), cost.flops)
            est, flops = seen[ident]
            row = comps.setdefault(sig.component, {
                "role": comp.role, "precision": prec, "calls_per_video": 0, "latency_ms": 0.0,
                "flops_per_video": 0.0, "weights_mb": est.weights_mb, "peak_activations_mb": 0.0})
            row["calls_per_video"] += sig.count
            row["latency_ms"] += sig.count * est.latency_ms
            row["flops_per_video"] += sig.count * flops
            row["peak_activations_mb"] = max(row["peak_activations_mb"], est.activations_mb)
            sigs.append({"component": sig.component, "key": sig.key, "count": sig.count,
                         "latency_ms": round(est.latency_ms, 4), "peak_memory_mb": round(est.peak_memory_mb, 3)})
        total = sum(r["latency_ms"] for r in comps.values())
        precisions = {n: r["precision"] for n, r in comps.items()}
        plan = memory_plan(_phases(pipeline, comps),
                           {n: r["weights_mb"] * 2**20 for n, r in comps.items()},
                           {n: r["peak_activations_mb"] * 2**20 for n, r in comps.items()},
                           _state_bytes(pipeline, precisions.values()), self.spec.memory_budget_gb * 2**30,
                           policy=_memory_policy(pipeline))
        for r in comps.values():
            r["share"] = round(r["latency_ms"] / total, 4) if total else 0.0
            for k in ("latency_ms", "flops_per_video", "weights_mb", "peak_activations_mb"):
                r[k] = round(r[k], 4)
        return {"target": self.name, "precision": precision_label(precisions.values()), "precisions": precisions,
                "calibrated": all(self.spec.efficiency[p].calibrated for p in precisions.values()),
                "latency_ms": round(total, 3), "latency_s": round(total / 1000, 4),
                "peak_memory_mb": plan["peak_mb"], "components": comps, "memory_plan": plan, "signatures": sigs}

    # ---- lowering -------------------------------------------------------------------------------
    def lower(self, pipeline: Pipeline, out_dir: Path, ctx: Any = None) -> dict[str, Any]:
        """Export, check and write the bundle (see the module docstring); returns the run's summary."""
        if pipeline.is_meta:
            raise LoweringError(f"target {self.name}: pipeline {pipeline.name!r} is on the meta device (no weights); "
                                "lowering exports real graphs: run it on a loaded model, or use `ndopt plan` for "
                                "estimates")
        self.check_encodings(pipeline)
        t0 = time.perf_counter()
        plans = plan_graphs(pipeline)
        release_memory(sum(weight_bytes(c.module) for c in pipeline.components.values()))  # what the passes freed
        by_component: dict[str, list[GraphPlan]] = {}
        for plan in plans:
            by_component.setdefault(plan.component, []).append(plan)
        precisions = {n: self._precision_of(pipeline[n]) for n in by_component}
        precision = precision_label(precisions.values())

        out_dir = Path(out_dir)
        lowered: list[LoweredGraph] = []
        graphs: dict[str, dict[str, Any]] = {}
        estimates: dict[str, dict[str, Any]] = {}
        weights: dict[str, dict[str, Any]] = {}
        shared: dict[str, SharedWeights] = {}
        quantized: dict[str, QuantizedGraph] = {}
        with atomic_dir(out_dir) as tmp:
            # a component at a time, a graph at a time: each float graph is written into the component's one
            # weights file as soon as it is lowered, then (quantized components) each graph's QDQ and encodings
            # graphs; a graph the lowering cache does not keep leaves memory once written (its tensors point
            # into the file). At real widths a component's graphs held together passed the machine's memory.
            with progress(f"lowering for {self.name}", total=len(plans)) as advance, \
                    aimet_log(tmp / AIMET_LOG, out_dir / AIMET_LOG):  # one count line per bundle, not per graph
                for name, cplans in by_component.items():
                    comp = pipeline[name]
                    nbytes = weight_bytes(comp.module)
                    with SharedWeightsWriter(name, tmp) as writer:
                        mine = []
                        for plan in cplans:
                            lg = self._lower_graph(comp, plan)
                            mine.append(lg)
                            if lg.ok:  # the float graphs: what the estimator prices
                                writer.add(f"{plan.name}.onnx", lg.model, priced=True, restore=lg.cached)
                            release_memory(nbytes)
                            advance(plan.name)
                        if is_quantized(comp) and all(lg.ok for lg in mine):
                            save = functools.partial(writer.add, priced=False, restore=False)
                            with threads.for_module(comp.module):
                                for plan in cplans:
                                    quantized[plan.name] = lower_quantized(comp, plan, example_inputs(plan), tmp,
                                                                           self.spec.legality, save)
                    lowered += mine
                    shared[name] = writer.info
                    weights[name] = weights_record(writer.info, tmp, precisions[name])
                    release_memory(nbytes)
            _raise_on_failures(self.name, lowered)
            for lg in lowered:
                comp = pipeline[lg.plan.component]
                prec = precisions[comp.name]
                est = estimate_graph(onnx_graph_cost(lg.model), self.spec, prec)
                estimates[lg.plan.name] = est.to_json()
                file = f"{lg.plan.name}.onnx"
                graphs[lg.plan.name] = {
                    "file": file, "external_data": shared[comp.name].file,
                    "sha256": sha256_file(tmp / file), "component": lg.plan.component, "role": lg.plan.role,
                    "call_signatures": list(lg.plan.keys), "calls_per_video": lg.plan.calls_per_video,
                    "inputs": [io.to_json() for io in graph_io(lg.model.graph.input)],
                    "outputs": [io.to_json() for io in graph_io(lg.model.graph.output)],
                    "precision": prec, "encodings": copy_encodings(comp, tmp, lg.plan),
                    "simplify": lg.simplify, "legality": lg.legality.to_json(), "numerics": lg.numerics.to_json(),
                    "estimate": estimates[lg.plan.name]}
                q = quantized.get(lg.plan.name)
                if q is not None:
                    graphs[lg.plan.name].update(q.to_json(), encodings=q.encodings, qdq_sha256=sha256_file(tmp / q.qdq))
            prog = bundle.program(pipeline, plans)
            consts = write_constants(bundle.constants(pipeline), tmp)  # with their sha256, for the runtime
            calls = bundle.graph_calls(prog)
            expected = {p.name: p.calls_per_video for p in plans}
            if calls != expected:
                raise LoweringError(f"target {self.name}: the manifest program calls graphs {calls} times, the call "
                                    f"plan says {expected}; the program generator and the sampler disagree (a bug)")
            video = self._video_estimate(pipeline, lowered, estimates, precisions, shared)
            man = bundle.manifest(target=self._target_json(precision), pipeline=pipeline, graphs=graphs, prog=prog,
                                  memory=video.pop("memory_plan"), estimate=video, constants=consts)
            man["weights"] = weights  # per component: the shared external-data file, its bytes and graphs
            man["assets"] = bundle.write_assets(pipeline, tmp)  # tokenizer files the program's tokenize op reads
            bundle.validate_manifest(man)
            atomic_write_json(tmp / "manifest.json", man)
        hub = hub_jobs.profile_on_hub(self.spec, out_dir, lowered, graphs)
        if hub.get("status") == "ok":
            man["estimate"]["graphs"] = aihub.merge_measured(estimates, hub)
            man["aihub"] = hub
            atomic_write_json(out_dir / "manifest.json", man)
        seconds = round(time.perf_counter() - t0, 2)
        log.info("%s: %d graphs lowered and checked in %.1f s -> %s", self.name, len(lowered), seconds, out_dir)
        return {"status": "ok", "bundle": str(out_dir), "manifest": str(out_dir / "manifest.json"),
                "precision": precision, "seconds": seconds, "graphs": {
                    g: {"legal": r["legality"]["ok"], "rewrites": r["legality"]["rewrites"],
                        "warnings": {k: v["count"] for k, v in r["legality"]["warnings"].items()},
                        "numerics_max_abs_err": r["numerics"]["max_abs_err"], "numerics_ok": r["numerics"]["ok"],
                        "calls_per_video": r["calls_per_video"], "latency_ms": r["estimate"]["latency_ms"],
                        "precision": r["precision"]} | (
                        {"qdq_rel_err": r["qdq_numerics"]["rel_err"]} if "qdq_numerics" in r else {})
                    for g, r in graphs.items()},
                "estimate": {k: man["estimate"][k] for k in ("precision", "calibrated", "latency_ms", "latency_s",
                                                              "peak_memory_mb", "components")},
                "aihub": {k: v for k, v in hub.items() if k != "graphs"} | (
                    {"graphs": hub["graphs"]} if hub.get("graphs") else {})}

    def check_encodings(self, pipeline: Pipeline) -> None:
        """Refuse quantized components whose encodings were made for another HTP version: the HTP
        config decides which ops get encodings and at which widths, so another chip's would not match."""
        for c in pipeline.components.values():
            have = c.attrs.get("aimet_config")
            if have and have != self.spec.aimet_config:
                src = c.attrs.get("aimet_config_source")
                raise LoweringError(
                    f"target {self.name}: component {c.name!r} was quantized with {have}"
                    f"{f' (from {src})' if src else ''} but this target runs {self.spec.aimet_config} "
                    f"(targets/{self.name}.yaml, aimet_config); rerun aimet_quantization for {self.name}: "
                    "leave `hexagon` unset so the pass takes the target's config")

    def _lower_graph(self, component: Component, plan: GraphPlan) -> LoweredGraph:
        key = CACHE.key(component, plan, self.spec)
        hit = CACHE.get(key)
        if hit is not None:
            log.debug("%s: %s reused from this process's lowering cache", self.name, plan.name)
            return LoweredGraph(plan, hit.model, hit.legality, hit.numerics, hit.simplify, 0.0, cached=True)
        t0 = time.perf_counter()
        example = example_inputs(plan)
        reference = getattr(component.module, "reference", None)
        if reference is not None and hasattr(component.module, "sim"):
            # an AIMET sim (the quantization pass): the graph is the float model, its quantizer
            # encodings travel beside it (QNN's float graph + encodings flow); numerics vs that float model
            component = component.with_module(reference)
        nbytes = weight_bytes(component.module)
        with threads.for_module(component.module):
            model = export_graph(component, plan, example, self.spec.opset)
            release_memory(nbytes)  # the exporter's transient copies of the weights
            model, simplified = simplify(model, plan.name)
            release_memory(nbytes)
            model, report = legalize(model, self.spec.legality, plan.name)
            release_memory(nbytes)
            if report.ok:
                check_model(model, plan.name)
                numerics = check_numerics(model, component, plan, example)
                release_memory(nbytes)  # the onnxruntime session's copy of the weights
            else:
                numerics = NumericsReport(plan.name)
        lg = LoweredGraph(plan, model, report, numerics, simplified, round(time.perf_counter() - t0, 3),
                          cached=key is not None)
        CACHE.put(key, lg)
        return lg

    def _video_estimate(self, pipeline: Pipeline, lowered: list[LoweredGraph], estimates: dict[str, dict[str, Any]],
                        precisions: dict[str, str], shared: dict[str, SharedWeights]) -> dict[str, Any]:
        comps: dict[str, dict[str, Any]] = {}
        for lg in lowered:
            e = estimates[lg.plan.name]
            row = comps.setdefault(lg.plan.component, {"precision": precisions[lg.plan.component], "latency_ms": 0.0,
                                                       "weights_mb": 0.0, "activations_mb": 0.0})
            row["latency_ms"] += lg.plan.calls_per_video * e["latency_ms"]
            row["weights_mb"] = max(row["weights_mb"], e["weights_mb"])  # the largest graph's own weights ...
            row["activations_mb"] = max(row["activations_mb"], e["activations_mb"])
        for n, row in comps.items():  # ... or the component's shared file, at its precision: what the runtime loads
            sw = shared.get(n)
            if sw is not None:
                wbits = PRECISION_BITS[row["precision"]][0]
                row["weights_mb"] = max(row["weights_mb"],
                                        (sw.unique_float_elems * wbits / 8 + sw.unique_other_bytes) / 2**20)
        total = sum(r["latency_ms"] for r in comps.values())
        plan = memory_plan(_phases(pipeline, comps),
                           {n: r["weights_mb"] * 2**20 for n, r in comps.items()},
                           {n: r["activations_mb"] * 2**20 for n, r in comps.items()},
                           _state_bytes(pipeline, precisions.values()), self.spec.memory_budget_gb * 2**30,
                           policy=_memory_policy(pipeline))
        plan["weight_sharing"] = ("weights counted once per component: its graphs share one external-data file "
                                  "(<component>.weights.bin) and, on the device, one linked QNN context")
        return {"precision": precision_label(precisions.values()), "precisions": dict(precisions),
                "calibrated": all(self.spec.efficiency[p].calibrated for p in precisions.values()),
                "latency_ms": round(total, 3), "latency_s": round(total / 1000, 4), "peak_memory_mb": plan["peak_mb"],
                "components": {n: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                               for n, r in comps.items()},
                "graphs": estimates, "memory_plan": plan}

    def _target_json(self, precision: str) -> dict[str, Any]:
        s = self.spec
        out = {"name": s.name, "hexagon_arch": s.hexagon_arch, "ai_hub_devices": s.ai_hub_devices,
               "aimet_config": s.aimet_config, "precision": precision, "default_precision": s.default_precision,
               "opset": s.opset, "aihub_options": s.aihub_options}
        shipped = specs().get(s.name)
        if s.path and (shipped is None or shipped.path != s.path):  # a target file: `generate --bundle` reads it
            out["file"] = s.path
        return out

    # ---- running a bundle ----------------------------------------------------------------------
    def run_bundle(self, bundle: Path, prompt: str, *, seed: int = 0, provider: str | None = None,
                   progress: Any = None) -> Any:
        """Run a bundle this target lowered with the reference runtime (`targets.runtime.generate`:
        onnxruntime, QNN's HTP when installed); `ndopt generate --bundle` finds it through the registry."""
        from targets.runtime import generate

        return generate(Path(bundle), prompt, seed=seed, provider=provider, progress=progress)


def _raise_on_failures(target: str, lowered: list[LoweredGraph]) -> None:
    bad_legal = [(lg.plan.name, v) for lg in lowered for v in lg.legality.errors]
    if bad_legal:
        shown = "; ".join(f"graph {g}: {v}" for g, v in bad_legal[:3])
        more = f" (and {len(bad_legal) - 3} more)" if len(bad_legal) > 3 else ""
        raise LoweringError(f"target {target}: {len(bad_legal)} legality violation(s) no rewrite could fix: {shown}{more}")
    bad_num = [lg.numerics for lg in lowered if not lg.numerics.ok]
    if bad_num:
        n = bad_num[0]
        raise LoweringError(f"target {target}: graph {n.graph} differs from the torch component in onnxruntime "
                            f"(max abs err {n.max_abs_err:.3g} > atol {n.atol} + rtol {n.rtol}*|ref|); "
                            "a legalization rewrite or the export changed the math: run with --debug and "
                            "compare the graph before and after `targets.legality.legalize`")


def precision_label(precisions: Iterable[str]) -> str:
    """One precision when every component has it, else "mixed"."""
    found = set(precisions)
    return found.pop() if len(found) == 1 else ("mixed" if found else FLOAT_PRECISION)


def _phases(pipeline: Pipeline, names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """One phase per component, in the order the call plan first calls them (the order they run)."""
    names, order = set(names), []
    for sig in pipeline.call_plan():
        if sig.component in names and sig.component not in order:
            order.append(sig.component)
    return [(n, [n]) for n in order]


def _memory_policy(pipeline: Pipeline) -> str:
    """The sampler's residency policy (the hybrid pipeline runs its phases sequentially), else auto."""
    return str(getattr(pipeline.sampler, "memory_policy", "auto"))


def _state_bytes(pipeline: Pipeline, precisions: Iterable[str]) -> float:
    """What lives across phases: the latents of the whole video (noise and generated frames), the
    text encoders' outputs at the widest activation width of the components' precisions, and the
    finished frames (8-bit RGB) of a pipeline that upscales frame by frame."""
    abits = max((PRECISION_BITS[p][1] for p in precisions), default=16)
    total, frames = 0, 0
    for sig in pipeline.call_plan():
        comp = pipeline[sig.component]
        env = sig.env_dict
        if comp.role == "vae_decoder":
            total += 2 * sum(s.numel() for _, s in sig.args if not isinstance(s, tuple))  # noise + generated
        elif comp.role in ("text_encoder", "image_model") and comp.name != "image_unet" and sig.key == "prompt":
            for p in comp.outputs:
                total += sig.count * p.spec.bind(env).numel() if p.spec.bind(env).is_concrete else 0
        elif comp.role == "super_resolution":
            for p in comp.outputs:
                frames += sig.count * p.spec.bind(env).numel() if p.spec.bind(env).is_concrete else 0
    return total * abits / 8 + frames


__all__ = ["EXTERNAL_DATA_BYTES", "SnapdragonTarget"]
