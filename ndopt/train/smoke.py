"""Run some passes of a recipe with training overrides, alone or under torchrun: a smoke check of
how a pass trains (FSDP over gloo processes, bf16 autocast) without a whole `ndopt run`.

    torchrun --nproc_per_node 2 -m ndopt.train.smoke smoke-real-width --model pyramid-flow-sd3-smoke \\
        --passes block_importance,block_pruning --train strategy=fsdp --out runs/fsdp
    python -m ndopt.train.smoke smoke-real-width --passes block_importance,block_pruning --train precision=bf16 ...

The named passes run in the recipe's order with the recipe's configs, through the PassManager (so
they are verified as in a run), and every Trainer they build takes the `--train` fields over its own
(`ndopt.train.engine.overrides`). Under torchrun every process runs the passes and joins the process
group first (gloo on a CPU), so the engine's collectives and this module's checks share it. The
result, `OUT/smoke.json` (written by the first process), holds each process's fingerprint of every
component's weights (the processes must agree), the training losses the passes logged (finite), and
with `--baseline` each component's largest weight change against the same passes trained 0 steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ndopt.errors import NdoptError
from ndopt.io import atomic_write_json
from ndopt.ir.pipeline import Pipeline
from ndopt.recipe import Recipe, load_recipe
from ndopt.train import engine
from ndopt.train.data import module_fingerprint

log = logging.getLogger("ndopt")
RESULT = "smoke.json"


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings as TrainConfig fields (the value read as JSON where it parses: 1, 1e-4, null)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise NdoptError(f"--train {item!r}: give KEY=VALUE, e.g. strategy=fsdp or precision=bf16")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _largest_change(a: torch.nn.Module, b: torch.nn.Module) -> float | None:
    """max |a - b| over the float tensors both state dicts hold with one shape (None: nothing in common)."""
    sa, sb = a.state_dict(), b.state_dict()
    diffs = [float((sa[k].float() - sb[k].float()).abs().max()) for k in sa
             if k in sb and sa[k].is_floating_point() and sa[k].shape == sb[k].shape and sa[k].numel()]
    return max(diffs) if diffs else None


def training_losses(run_dir: Path) -> dict[str, list[float]]:
    """The loss curve of every Trainer under `run_dir` (its `metrics.json`), by its directory."""
    out = {}
    for path in sorted(Path(run_dir).rglob("metrics.json")):
        history = json.loads(path.read_text()).get("history", [])
        out[str(path.parent.relative_to(run_dir))] = [float(h["loss"]) for h in history if "loss" in h]
    return out


def run_passes(recipe: str | Path | Recipe, names: Sequence[str], out: Path, *, model: str | None = None,
               train: Mapping[str, Any] | None = None, pipeline: Pipeline | None = None) -> Pipeline:
    """The recipe's passes named in `names` (in the recipe's order, its configs), on its model (or on
    `pipeline`), with the `train` overrides on every Trainer; returns the pipeline they produce."""
    from ndopt.model import load_model
    from ndopt.passmanager import PassContext, PassManager

    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe).with_overrides(model=model)
    have = [p.name for p in r.passes]
    unknown = [n for n in names if n not in have]
    if unknown or not names:
        raise NdoptError(f"{r.source}: passes {unknown or '(none)'} are not in the recipe; it has {have}")
    passes = [p for p, spec in zip(r.instantiate(), r.passes) if spec.name in names]
    if pipeline is None:
        pipeline = load_model(r.spec.model, seed=r.spec.seed)
    ctx = PassContext(run_dir=out, seed=r.spec.seed, device=pipeline.device)
    with engine.overrides(**dict(train or {})):
        final, _ = PassManager(passes).run(pipeline, ctx)
    return final


def smoke(recipe: str | Path, names: Sequence[str], out: Path, *, model: str | None = None,
          train: Mapping[str, Any] | None = None, baseline: bool = False) -> dict[str, Any] | None:
    """`run_passes` on every process, then the checks of the module doc; the result on the first process
    (written to OUT/smoke.json), None on the others."""
    import torch.distributed as dist

    from ndopt.model import load_model
    from ndopt.train import distributed as D

    out = Path(out)
    env = D.init_from_env(torch.device("cpu"))  # before the passes: the engine reuses, never ends, the group
    r = load_recipe(recipe).with_overrides(model=model)
    base = load_model(r.spec.model, seed=r.spec.seed)
    t0 = time.perf_counter()
    final = run_passes(r, names, out, train=train, pipeline=base)
    seconds = time.perf_counter() - t0
    # the components the passes made or changed (passes share the ones they leave alone)
    changed = {n: c for n, c in final.components.items()
               if n not in base.components or c.module is not base.components[n].module}
    prints = {name: module_fingerprint(c.module) for name, c in changed.items()}
    every = [prints] * env.world
    if env.active:
        every = [None] * env.world
        dist.all_gather_object(every, prints)
    result: dict[str, Any] | None = None
    if env.is_main:
        losses = training_losses(out)
        result = {"passes": list(names), "train": dict(train or {}), "world": env.world, "seconds": seconds,
                  "fingerprints": every, "ranks_agree": all(p == every[0] for p in every),
                  "losses": losses, "losses_finite": bool(losses) and all(
                      math.isfinite(v) for curve in losses.values() for v in curve)}
        if baseline:  # the same passes, trained 0 steps: what the training changed
            untrained = run_passes(r, names, out / "baseline", pipeline=base,
                                   train={**dict(train or {}), "steps": 0, "strategy": "none"})
            result["largest_change"] = {n: _largest_change(c.module, untrained[n].module)
                                        for n, c in changed.items() if n in untrained.components}
        atomic_write_json(out / RESULT, result)
    D.barrier(env)
    if env.initialized_here:
        dist.destroy_process_group()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from ndopt.progress import setup_logging

    ap = argparse.ArgumentParser(prog="python -m ndopt.train.smoke", description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", help="a recipe path or shipped name")
    ap.add_argument("--passes", required=True, help="comma-separated pass names of the recipe to run")
    ap.add_argument("--model", default=None, help="the model instead of the recipe's")
    ap.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                    help="a TrainConfig field for every Trainer (strategy=fsdp, precision=bf16, steps=2, ...)")
    ap.add_argument("--out", required=True, type=Path, help="the run directory (shared by the processes)")
    ap.add_argument("--baseline", action="store_true", help="also run the passes 0 training steps and compare")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    args = ap.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NDOPT_THREADS", str(args.threads))  # the PassManager's per-pipeline choice too
    try:
        result = smoke(args.recipe, [n.strip() for n in args.passes.split(",") if n.strip()], args.out,
                       model=args.model, train=parse_overrides(args.train), baseline=args.baseline)
    except NdoptError as e:
        log.error("%s", e)
        return 2
    if result is not None:
        ok = result["ranks_agree"] and result["losses_finite"]
        log.info("smoke: %s (%d process%s, %.1f s): ranks agree %s, losses finite %s",
                 ",".join(result["passes"]), result["world"], "es" if result["world"] > 1 else "",
                 result["seconds"], result["ranks_agree"], result["losses_finite"])
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
