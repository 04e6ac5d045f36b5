"""Benchmark: tiny-preset video time, teacher full schedule vs the step-distilled 1-1-1 student.

The student pipeline is the teacher after `step_distillation` (structural effect: the student has
the teacher's architecture, so its weights do not change the time) and `cfg_folding` (guidance-free:
one DiT call per step). Prints the measured speed-up next to the cost model's predicted ratios of
DiT calls and FLOPs per video.

    .venv/bin/python bench/bench_step_distillation.py [--frames 9] [--repeats 3] [--steps 1 1 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ndopt.frontends import load_model
from ndopt.frontends.pyramid_flow.sampler import count_dit_calls
from ndopt.ir.cost import CostModel
from ndopt.ir.pipeline import Pipeline
from ndopt.passmanager import PassContext
from passes.cfg_folding import CfgFolding
from passes.step_distillation import StepDistillation


def video_seconds(p: Pipeline, repeats: int) -> tuple[float, int]:
    times, calls = [], 0
    for i in range(repeats + 1):  # the first run warms up the kernels; not timed
        g = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        with torch.no_grad():
            calls = count_dit_calls(p, lambda g=g: p.sampler.decode(p, p.sampler.sample(p, ["a red circle"],
                                                                                       generator=g)))
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 1, 1])
    args = ap.parse_args()
    teacher = load_model("pyramid-flow-tiny")
    teacher = teacher.replace(schedule=teacher.schedule.with_frames(1 + (args.frames - 1) // 8))
    with tempfile.TemporaryDirectory() as d:
        ctx = PassContext(run_dir=Path(d), plan=True)
        distilled = StepDistillation({"steps": args.steps}).plan(teacher, ctx).pipeline
        student = CfgFolding().run(distilled.replace(facts_add=StepDistillation.provides), ctx).pipeline
    cm = CostModel()
    rows = {}
    for name, p in (("teacher", teacher), ("student", student)):
        cost = cm.pipeline_cost(p)
        dit_flops = sum(c.flops_per_video for c in cost.components if c.role == "dit")
        sec, calls = video_seconds(p, args.repeats)
        rows[name] = (sec, calls, cost.flops_per_video, dit_flops)
        steps = "-".join(str(s.steps) for s in p.schedule.stages)
        vsteps = "-".join(str(s.video_steps) for s in p.schedule.stages)
        print(f"{name:8s} steps {steps}/{vsteps} guidance {p.schedule.guidance.mode:5s} {args.frames} frames 64x64: "
              f"{sec:6.3f} s per video (median of {args.repeats}), {calls} DiT calls, "
              f"{cost.flops_per_video / 1e9:8.3f} GFLOPs ({dit_flops / 1e9:8.3f} in the DiT)")
    (ts, tc, tf, td), (ss, sc, sf, sd) = rows["teacher"], rows["student"]
    print(f"measured speed-up: {ts / ss:6.2f}x  |  predicted: DiT calls {tc / sc:6.2f}x, "
          f"FLOPs per video {tf / sf:6.2f}x (DiT only {td / sd:6.2f}x)")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
