"""Benchmark: tiny DiT forward time, pruned vs unpruned, next to the plan's predicted FLOPs ratio.

    .venv/bin/python bench/bench_block_pruning.py [--keep 18 16] [--repeats 20]

Each call signature of the tiny schedule's DiT calls is timed (median of `repeats`, after a warm-up)
and weighted by its count per video, so the measured ratio is a per-video DiT time ratio. `keep`
counts blocks of the 24-block reference (scaled to the tiny DiT's depth, as the pass does). The
same pruning is planned on pyramid-flow-sd3-768p for the real model's predicted ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ndopt.frontends import load_model
from ndopt.ir.cost import CostModel
from ndopt.passmanager import PassContext, PassManager
from passes.block_importance import BlockImportance
from passes.block_pruning import BlockPruning


def dit_flops(pipeline, costs: CostModel) -> int:  # type: ignore[no-untyped-def]
    return sum(costs.signature_cost(pipeline[s.component], s).flops * s.count for s in pipeline.call_plan()
               if pipeline[s.component].role == "dit")


def dit_seconds(pipeline, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """DiT seconds per video: each distinct call signature timed on random inputs of its shapes."""
    total = 0.0
    for s in pipeline.call_plan():
        comp = pipeline[s.component]
        if comp.role != "dit":
            continue
        inputs = s.make_inputs("cpu", torch.Generator().manual_seed(0))
        with torch.no_grad():
            comp.call(**inputs)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                comp.call(**inputs)
                times.append(time.perf_counter() - t0)
        total += statistics.median(times) * s.count
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=int, nargs="+", default=[18, 16])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    costs = CostModel()
    tiny = load_model("pyramid-flow-tiny")
    tiny = tiny.replace(schedule=tiny.schedule.with_frames(2))
    real = load_model("pyramid-flow-sd3-768p", meta=True)
    base_t, base_f, real_f = dit_seconds(tiny, args.repeats), dit_flops(tiny, costs), dit_flops(real, costs)
    n = len(tiny["dit"].module.transformer_blocks)
    print(f"tiny DiT ({n} blocks), 2 latent frames at 64x64: {base_t * 1e3:.1f} ms of DiT per video, "
          f"{base_f / 1e9:.2f} GFLOPs; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as d:
        for keep in args.keep:
            ctx = PassContext(run_dir=Path(d) / f"keep{keep}")
            pruned, _ = PassManager([BlockImportance(), BlockPruning({"keep": keep, "evaluate": False})]).run(tiny, ctx)
            plan_ctx = PassContext(run_dir=Path(d) / f"plan{keep}", plan=True, device=torch.device("meta"))
            rp, _ = PassManager([BlockImportance(), BlockPruning({"keep": keep})]).run(real, plan_ctx)
            t, f = dit_seconds(pruned, args.repeats), dit_flops(pruned, costs)
            k = len(pruned["dit"].module.transformer_blocks)
            print(f"keep {keep} of 24 ({k} of {n} tiny blocks): measured {base_t / t:.2f}x faster, predicted "
                  f"(FLOPs) {base_f / f:.2f}x; sd3-768p plan: {real_f / dit_flops(rp, costs):.3f}x "
                  f"(seed: {55.99 / {18: 41.94, 16: 37.25}.get(keep, float('nan')):.3f}x)")


if __name__ == "__main__":
    main()
