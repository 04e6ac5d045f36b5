"""A run's optimized pipeline on disk (`RUN/model/`), and back: `save_pipeline`, `load_saved`.

What a pipeline is lives in `pipeline.json` (components with their ports and attrs, the graph, the
Schedule, the sampler settings, facts, analyses, the provenance of every applied pass, the base
model and the summary); the weights in `model.safetensors` (or shards and an index, written by
huggingface_hub). Modules are not pickled: `load_saved` rebuilds the base model and *replays*
the provenance with each pass's plan form (its structural effect only), loads the weights
strictly, lets passes with a `restore` hook rebuild what they wrap (AIMET sims), and checks the
rebuilt pipeline's summary equals the saved one. The model frontend that built the pipeline
(`Pipeline.frontend`, recorded as `frontend`; absent in older files: pyramid-flow) rebuilds the base
and writes the upstream DiT layout (`upstream/`) where the DiT still has upstream's structure.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from ndopt.errors import CheckpointError, NdoptError
from ndopt.io import atomic_dir, atomic_write_json
from ndopt.ir.component import Component
from ndopt.ir.pipeline import AppliedPass, Pipeline
from ndopt.ir.spec import Port
from ndopt.model import DEFAULT_FRONTEND, HYBRID, frontend, hybrid_pipeline, interface_for
from ndopt.saved_codec import Refused, Unencodable, class_path, decode, encode
from ndopt.saved_weights import (
    RESERVED,
    WEIGHTS,
    component_weights,
    inside,
    load_weights,
    quiet_hub,
    read_weights,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "WEIGHTS", "is_saved_pipeline", "load_saved", "save_pipeline"]

log = logging.getLogger("ndopt")

FORMAT = "ndopt.saved_pipeline"
FORMAT_VERSION = 1
MANIFEST = "pipeline.json"
UNSAVED = "__unsaved__"


def is_saved_pipeline(path: str | Path) -> bool:
    """Whether `path` is a directory written by `save_pipeline` (it holds `pipeline.json`)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


# ---- saving ----------------------------------------------------------------------------------
def _record(x: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    try:
        return encode(x, tensors, key)
    except Unencodable as e:
        log.debug("saved pipeline: %s is not saved (%s)", key, e)
        return {UNSAVED: type(x).__name__}


def ports_json(ports: tuple[Port, ...]) -> list[dict[str, Any]]:
    """Ports for people reading pipeline.json (the rebuilt ports come from the replay; the summary check
    compares them)."""
    return [{"name": p.name, "shape": list(p.spec.shape), "dtype": p.spec.dtype, "optional": p.optional}
            for p in ports]


def _component_record(c: Component, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    key = f"{RESERVED}attrs.{c.name}"
    return {"role": c.role, "module_class": class_path(type(c.module)), "entry": c.entry,
            "inputs": ports_json(c.inputs), "outputs": ports_json(c.outputs),
            "attrs": {k: _record(v, tensors, f"{key}.{k}") for k, v in c.attrs.items()},
            "params": c.params()}


def _pass_instance(applied: AppliedPass) -> Any:
    from ndopt.passmanager import get_pass

    cls = get_pass(applied.name)
    try:
        return cls(_set_fields(cls.Config, dict(applied.config)))
    except NdoptError:
        raise
    except Exception as e:  # pydantic: a config this version of the pass no longer accepts
        raise CheckpointError(f"pass {applied.name!r}: its saved config does not validate ({e}); load with the "
                              "ndopt version that wrote it") from None


def _set_fields(config_cls: Any, dumped: dict[str, Any]) -> dict[str, Any]:
    """A dumped config without the fields at their defaults: what the recipe set (a config can refuse
    two fields set together, e.g. block_pruning's keep and remove, though its dump holds both)."""
    out = {}
    for k, v in dumped.items():
        field = getattr(config_cls, "model_fields", {}).get(k)
        if field is None:
            out[k] = v
            continue
        default = field.get_default(call_default_factory=True)
        if hasattr(default, "model_dump"):
            default = default.model_dump()
        if _plain(default) != _plain(v):
            out[k] = v
    return out


def save_pipeline(pipeline: Pipeline, directory: str | Path, *, recipe: Mapping[str, Any] | None = None,
                  fidelity: Mapping[str, Any] | None = None, base: str | Path | None = None,
                  max_shard_size: int | str = "2GB", upstream: bool = True, seed: int = 0) -> Path:
    """Write `pipeline` to `directory` (replaced atomically): `pipeline.json`, the weights (sharded past
    `max_shard_size`), each pass's own state (`Pass.save_state`), and `upstream/` where it applies.
    `recipe` and `fidelity` are stored as given (JSON); `base` names the base model when the pipeline's
    name is not a preset."""
    from huggingface_hub import save_torch_state_dict

    from ndopt.io import jsonable

    iface = interface_for(pipeline)
    directory = Path(directory)
    t0 = time.perf_counter()
    hybrid = hybrid_reference(pipeline)
    if hybrid and base is None:  # hybrid mode names the pipeline after its base
        base = iface.hybrid_base(pipeline)
    base_ref = iface.base_reference(pipeline, base)
    if hybrid:
        base_ref = {**base_ref, "hybrid": hybrid}
    records: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "ndopt_version": _version(), "name": pipeline.name,
        "frontend": pipeline.frontend,
        "base": base_ref, "seed": seed,
        "components": {n: _component_record(c, records) for n, c in pipeline.components.items()},
        "graph": {"nodes": [[n, _record(dict(d), records, f"{RESERVED}graph.{n}")] for n, d in pipeline.graph.nodes(data=True)],
                  "edges": [[a, b, encode(d["ports"], records, RESERVED + "graph")]
                            for a, b, d in pipeline.graph.edges(data=True)]},
        "sources": {k: ports_json(v) for k, v in pipeline.sources.items()},
        "sink": ports_json(pipeline.sink),
        "inputs": list(pipeline.inputs),
        "schedule": encode(pipeline.schedule, records, RESERVED + "schedule"),
        "sampler": encode(pipeline.sampler, records, RESERVED + "sampler"),
        "facts": sorted(pipeline.facts),
        "analyses": {k: _record(v, records, f"{RESERVED}analyses.{k}") for k, v in pipeline.analyses.items()},
        "provenance": [{"name": p.name, "config": jsonable(_plain(p.config)), "modified": p.modified,
                        "metrics": jsonable(_plain(p.metrics))} for p in pipeline.provenance],
        "quantization": {n: {k: v for k, v in c.attrs.items() if k in ("precision", "aimet_config")}
                         for n, c in pipeline.components.items() if "precision" in c.attrs},
        "recipe": jsonable(_plain(recipe)) if recipe is not None else None,
        "fidelity": jsonable(_plain(fidelity)) if fidelity is not None else None,
        "summary": pipeline.summary(),
    }
    weights = component_weights(pipeline)
    clash = [k for k in pipeline.components if k.startswith(RESERVED.rstrip("."))]
    if clash:
        raise CheckpointError(f"component names {clash} use the reserved weight prefix {RESERVED!r}; rename them")
    weights.update(records)
    with atomic_dir(directory) as tmp:
        if base_ref["kind"] == "checkpoint":
            iface.copy_base_configs(Path(base_ref["source"]), tmp / base_ref["path"])
        with quiet_hub():
            save_torch_state_dict(weights, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        states = {}
        for applied in pipeline.provenance:
            p = _pass_instance(applied)
            if applied.modified and callable(getattr(p, "save_state", None)):
                sub = getattr(p, "state_subdir", applied.name)
                paths = p.save_state(pipeline, tmp / sub) or {}
                states[applied.name] = sub
                _record_paths(manifest["components"], sub, paths)
        manifest["pass_state"] = states
        for name, q in manifest["quantization"].items():
            for sub in states.values():
                if (tmp / sub / name).is_dir():
                    q["state"] = f"{sub}/{name}"
        if upstream:
            manifest["upstream"] = iface.write_upstream(pipeline, tmp / "upstream")
        files = sorted(p.name for p in tmp.glob("model*.safetensors"))
        for f in tmp.glob("model*"):
            f.chmod(0o644)  # huggingface_hub writes through private temp files (0600): others read a run
        manifest["weights"] = {"files": files, "tensors": len(weights),
                               "bytes": sum((tmp / f).stat().st_size for f in files)}
        atomic_write_json(tmp / MANIFEST, manifest)
    log.info("saved pipeline %s to %s (%.1f MB, %.2f s)", pipeline.name, directory,
             manifest["weights"]["bytes"] / 1e6, time.perf_counter() - t0)
    return directory


def _record_paths(components: dict[str, Any], sub: str, paths: Mapping[str, Mapping[str, str]]) -> None:
    """Attrs a pass's `save_state` points at its saved files (`{component: {attr: path under sub}}`, e.g.
    aimet_quantization's `quantizers`): stored relative to the saved directory, which may move;
    `load_saved` resolves them (`path_attrs` lists them)."""
    for comp, attrs in paths.items():
        rec = components[comp]
        for attr, rel in attrs.items():
            rec["attrs"][attr] = f"{sub}/{rel}"
            rec["path_attrs"] = sorted({*rec.get("path_attrs", ()), attr})


def _plain(x: Any) -> Any:
    """Pydantic models and paths inside configs/metrics as JSON-able values."""
    if hasattr(x, "model_dump"):
        return x.model_dump(mode="json")
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    try:
        json.dumps(x)
        return x
    except TypeError:
        return repr(x)


def _version() -> str:
    from ndopt import __version__

    return __version__


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---- loading ---------------------------------------------------------------------------------
def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST}; not a pipeline saved by ndopt (ndopt run writes RUN/model/)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the save was interrupted or the file edited") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('format_version')!r}; this ndopt reads version "
                              f"{FORMAT_VERSION}: load it with the ndopt that wrote it (ndopt {manifest.get('ndopt_version')})")
    return manifest


def _build_base(directory: Path, manifest: dict[str, Any], device: torch.device | str) -> Pipeline:
    """The base model: a preset built on `device`, or a checkpoint base built on the meta device (its
    weights come from the file, read onto `device` and assigned)."""
    base = manifest["base"]
    seed = int(manifest.get("seed", 0))
    iface = frontend(str(manifest.get("frontend", DEFAULT_FRONTEND)))
    if base["kind"] == "preset":
        pipeline = iface.load(base["name"], device=device, seed=seed)
        if pipeline is None:
            raise CheckpointError(f"{directory / MANIFEST}: base preset {base['name']!r} is not a preset of the "
                                  f"model frontend {iface.name!r}; load it with the ndopt that wrote it")
    elif base["kind"] == "checkpoint":
        pipeline = iface.build_from_configs(base_dir(directory, base), base.get("variants") or ["768p"])
    else:
        raise CheckpointError(f"{directory / MANIFEST}: unknown base kind {base['kind']!r}")
    hybrid = base.get("hybrid")
    if hybrid:  # Neodragon's hybrid mode: its image model and SR joined the base before the passes
        if not isinstance(hybrid, dict) or not {"image_model", "super_resolution"} <= set(hybrid):
            raise CheckpointError(f"{directory / MANIFEST}: base.hybrid must name image_model and "
                                  f"super_resolution, got {hybrid!r}")
        pipeline = hybrid_pipeline(pipeline, image_model=str(hybrid["image_model"]),
                                   super_resolution=str(hybrid["super_resolution"]), seed=seed,
                                   decode_window=hybrid.get("decode_window"))
    return pipeline


def base_dir(directory: Path, base: dict[str, Any]) -> Path:
    """A saved checkpoint base's copied configs (`base.path`, which must stay inside the saved directory)."""
    return inside(directory, base.get("path", "base"), f"{MANIFEST} base.path")


def hybrid_reference(pipeline: Pipeline) -> dict[str, Any] | None:
    """What rebuilds a hybrid pipeline's extra components around its base (None for other pipelines)."""
    if pipeline.schedule.first_frame != HYBRID or "super_resolution" not in pipeline.components:
        return None
    dec = pipeline.by_role("vae_decoder")
    return {"image_model": str(getattr(pipeline.sampler, "image_preset", "")),
            "super_resolution": str(pipeline["super_resolution"].attrs.get("preset", "")),
            "decode_window": dec[0].attrs.get("decode_window") if dec else None}


def load_saved(directory: str | Path, *, device: torch.device | str = "cpu", check_summary: bool = True) -> Pipeline:
    """The pipeline `save_pipeline` wrote, on `device`: base rebuilt, passes replayed in plan form, weights
    loaded strictly, pass-owned state restored, summary checked against the saved one. Every path the
    files name (base configs, shards, pass state, path attrs) must stay inside `directory`."""
    from ndopt.passmanager import PassContext

    directory = Path(directory)
    manifest = read_manifest(directory)
    pipeline = _build_base(directory, manifest, device)
    # a meta build takes the tensors as they are read (assign): read them where the pipeline should live
    weights = read_weights(directory, device if pipeline.is_meta else "cpu")
    passes = [(AppliedPass(p["name"], p["config"], p["modified"], p["metrics"]),
               _pass_instance(AppliedPass(p["name"], p["config"], p["modified"], p["metrics"])))
              for p in manifest["provenance"]]
    with tempfile.TemporaryDirectory(prefix="ndopt-replay-") as scratch:
        ctx = PassContext(run_dir=Path(scratch), plan=True, device=pipeline.device, seed=int(manifest.get("seed", 0)))
        _set_target(ctx, manifest)
        for i, (applied, p) in enumerate(passes, 1):
            ctx.enter_pass(i, applied.name)
            ctx.options["replay_metrics"] = dict(applied.metrics)  # what the run did (e.g. which blocks went)
            try:
                result = p.plan(pipeline, ctx)
            except NdoptError as e:
                raise CheckpointError(f"{directory}: replaying pass {i} {applied.name!r} failed: {e}") from None
            pipeline = result.pipeline.replace(facts_add=p.provides, facts_remove=p.invalidates)
        load_weights(pipeline, weights, str(directory))
        pipeline = _restore_records(pipeline, manifest, weights, directory)
        ctx.plan, ctx.device = False, pipeline.device
        for i, (applied, p) in enumerate(passes, 1):
            restore = getattr(p, "restore", None)
            if applied.modified and callable(restore):
                ctx.enter_pass(i, applied.name)
                sub = manifest.get("pass_state", {}).get(applied.name, getattr(p, "state_subdir", applied.name))
                pipeline = restore(pipeline, ctx, inside(directory, sub, f"{MANIFEST} pass_state.{applied.name}"))
    if check_summary:
        check_same_summary(pipeline.summary(), manifest["summary"], directory)
    return pipeline


def _set_target(ctx: Any, manifest: dict[str, Any]) -> None:
    """The run's target in the replay context (passes such as aimet_quantization read its data). Without
    the recipe's target (a pipeline saved by `save_pretrained`, or a target this install lacks): one
    standing for the AIMET config the quantized components recorded, so the replay builds what the run
    built, without a pass warning that it had to guess."""
    from ndopt.passmanager import TargetInfo, target_info

    if not hasattr(ctx, "target"):
        return
    targets = (manifest.get("recipe") or {}).get("targets") or []
    if targets:
        try:
            ctx.target = target_info(targets)
            return
        except (NdoptError, ImportError) as e:
            log.debug("saved pipeline: target %s unknown here (%s); replaying with the recorded configs", targets, e)
    configs = sorted({q["aimet_config"] for q in (manifest.get("quantization") or {}).values()
                      if q.get("aimet_config")})
    if len(configs) == 1:
        ctx.target = TargetInfo(f"{MANIFEST} quantization", aimet_config=configs[0])



def _saved_values(records: dict[str, Any], field: str, checked: Callable[[Any, str], Any]) -> dict[str, Any]:
    """The values a saved mapping (component attrs, analyses) restores; a value ndopt could not save, or
    cannot rebuild here, is left out, so the replay's own value stays (logged at debug). `checked` decodes
    one value, refusing crafted records."""
    out: dict[str, Any] = {}
    for k, v in records.items():
        if isinstance(v, dict) and UNSAVED in v:
            continue
        try:
            out[k] = checked(v, f"{field}.{k}")
        except (Unencodable, TypeError, AttributeError, ImportError) as e:
            log.debug("saved pipeline: %s.%s kept from the replay (%s)", field, k, e)
    return out

def _restore_records(pipeline: Pipeline, manifest: dict[str, Any], weights: Mapping[str, torch.Tensor],
                     directory: Path) -> Pipeline:
    """Schedule, sampler, graph, facts, analyses, provenance and component attrs from the file."""
    def tensor(key: str) -> torch.Tensor:
        if key not in weights:
            raise CheckpointError(f"{directory}: {MANIFEST} refers to tensor {key!r}, which the weights lack")
        return weights[key].to(pipeline.device) if not pipeline.is_meta else weights[key]

    def checked(value: Any, field: str) -> Any:
        try:
            return decode(value, tensor)
        except Refused as e:  # a tag encode never writes: the file was crafted or edited
            raise CheckpointError(f"{directory / MANIFEST}: {field}: {e}; the file was edited or not written "
                                  "by ndopt: not loaded") from None

    comps = {}
    for name, comp in pipeline.components.items():
        rec = manifest["components"].get(name)
        if rec is None:
            continue
        attrs = {**comp.attrs, **_saved_values(rec["attrs"], f"components.{name}.attrs", checked)}
        for k in rec.get("path_attrs", ()):
            attrs[k] = str(inside(directory, rec["attrs"][k], f"{MANIFEST} components.{name}.attrs.{k}"))
        comps[name] = comp.with_attrs(**attrs)
    analyses = {**pipeline.analyses, **_saved_values(manifest["analyses"], "analyses", checked)}
    g = nx.DiGraph()
    for n, data in manifest["graph"]["nodes"]:
        g.add_node(n, **checked(data, f"graph.nodes.{n}"))
    for a, b, ports in manifest["graph"]["edges"]:
        g.add_edge(a, b, ports=checked(ports, f"graph.edges.{a}->{b}"))
    from dataclasses import replace

    out = pipeline.replace(graph=g, schedule=checked(manifest["schedule"], "schedule"), analyses=analyses, **comps)
    provenance = tuple(AppliedPass(p["name"], p["config"], p["modified"], p["metrics"]) for p in manifest["provenance"])
    return replace(out, name=manifest["name"], sampler=checked(manifest["sampler"], "sampler"),
                   facts=frozenset(manifest["facts"]), provenance=provenance, inputs=tuple(manifest["inputs"]),
                   frontend=str(manifest.get("frontend", DEFAULT_FRONTEND)))


def check_same_summary(rebuilt: str, saved: str, directory: Path) -> None:
    if rebuilt == saved:
        return
    a, b = rebuilt.splitlines(), saved.splitlines()
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else "<end>"
        y = b[i] if i < len(b) else "<end>"
        if x != y:
            raise CheckpointError(f"{directory}: the rebuilt pipeline differs from the saved one at summary line "
                                  f"{i + 1}: rebuilt {x.strip()!r}, saved {y.strip()!r}; a pass's plan form no "
                                  "longer matches what its run produced (ndopt version change?)")
