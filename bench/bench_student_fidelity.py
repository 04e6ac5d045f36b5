"""Benchmark: the bundled step-distilled students against the undistilled teacher, on a larger probe.

The issue's bar (tests/passes/test_step_distillation.py) is judged on the probe's 2 prompts under 4
noise draws. This reruns that comparison (`passes.step_distillation.evaluate_draws`, the pass's own
evaluation) over many draws, paired: for each draw the student (its own steps, no CFG) and the
undistilled teacher (the same steps, with CFG) are compared with the teacher's full 20-20-20 schedule
on the same prompts and noise. It prints, per student, the mean and worst-draw latent PSNR of both,
the draws the student wins, and the mean paired gain with its standard error, so a fraction-of-a-dB
margin can be told from noise.

    .venv/bin/python bench/bench_student_fidelity.py [--draws 32] [--steps 1-1-1 4-4-4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from ndopt.eval.probe import ProbeSettings
from ndopt.frontends import load_model
from ndopt.frontends.pyramid_flow.presets import bundled_weights
from ndopt.passmanager import PassContext
from ndopt.progress import progress
from passes.step_distillation import StepDistillation, evaluate_draws


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=32)
    ap.add_argument("--steps", nargs="+", default=["1-1-1", "4-4-4"])
    args = ap.parse_args()
    if args.draws < 2:
        ap.error("--draws must be at least 2 (a standard error needs two)")
    teacher = load_model("pyramid-flow-tiny")
    for steps in args.steps:
        path = bundled_weights(f"pyramid-flow-tiny-student-{steps}")
        if path is None:
            print(f"{steps}: no bundled student (weights/pyramid-flow-tiny-student-{steps}.safetensors)")
            continue
        with tempfile.TemporaryDirectory() as d:  # the pass loads and checks the student; no training
            student = StepDistillation({"steps": [int(s) for s in steps.split("-")], "student_weights": path,
                                        "evaluate": False}).run(teacher, PassContext(run_dir=Path(d))).pipeline
        with torch.no_grad(), progress(f"{steps}: reference, student, undistilled", args.draws) as advance:
            runs = evaluate_draws(teacher, student, 1, None, args.draws, advance)
        s_db, u_db = runs["student"], runs["undistilled"]
        gain = [s - u for s, u in zip(s_db, u_db)]
        se = statistics.stdev(gain) / len(gain) ** 0.5
        wins = sum(g > 0 for g in gain)
        print(f"{steps}: student {statistics.mean(s_db):6.2f} dB (worst {min(s_db):6.2f})  |  undistilled "
              f"{statistics.mean(u_db):6.2f} dB (worst {min(u_db):6.2f})  |  paired gain "
              f"{statistics.mean(gain):+5.2f} +- {se:4.2f} dB (s.e.), won {wins}/{len(gain)} draws  "
              f"[{args.draws} draws x {len(ProbeSettings().prompts)} prompts]")


if __name__ == "__main__":
    main()
