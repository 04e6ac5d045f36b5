"""Benchmark: the bundle runtime (onnxruntime) vs the torch pipeline, seconds per video, tiny preset.

Lowers the tiny pipeline (after dead_component_elimination, cfg_folding, schedule_folding) for
snapdragon-8-elite, then times `targets.runtime.generate` and `sampler.sample` + `decode` on the
same prompt and seed (both draw numpy noise), and prints their agreement and the time ratio.

    .venv/bin/python bench/bench_bundle_runtime.py [--threads 1] [--repeats 3] [--steps 20 20 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ndopt.frontends import load_model
from ndopt.passmanager import PassContext
from ndopt.target import get_target
from passes.cfg_folding import CfgFolding
from passes.dead_component_elimination import DeadComponentElimination
from passes.schedule_folding import ScheduleFolding
from targets import runtime

PROMPT = "a red circle moving right"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, nargs=3, default=(20, 20, 20), help="steps per stage, first frame")
    ap.add_argument("--video-steps", type=int, nargs=3, default=(10, 10, 10), help="steps per stage, later frames")
    ap.add_argument("--unfolded", action="store_true", help="keep two CFG calls per step (no folding passes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("QAIHUB_CLIENT_INI", "/nonexistent/ndopt-bench/client.ini")  # offline lowering

    with tempfile.TemporaryDirectory(prefix="ndopt-bench-") as d:
        ctx = PassContext(Path(d) / "ctx")
        p = load_model("pyramid-flow-tiny")
        p = p.replace(schedule=p.schedule.with_steps(tuple(args.steps), tuple(args.video_steps)))
        p = DeadComponentElimination().run(p, ctx).pipeline
        if not args.unfolded:
            p = ScheduleFolding().run(CfgFolding().run(p, ctx).pipeline, ctx).pipeline
        t0 = time.perf_counter()
        get_target("snapdragon-8-elite").lower(p, Path(d) / "bundle", ctx)
        print(f"lowering: {time.perf_counter() - t0:.1f} s ({p.schedule.guidance.mode}, "
              f"{p.schedule.dit_calls_per_video} DiT calls per video)")

        rt, pt = [], []
        for i in range(args.repeats + 1):  # the first of each warms up (sessions, kernels); not timed
            t0 = time.perf_counter()
            res = runtime.generate(Path(d) / "bundle", PROMPT, seed=i, threads=args.threads)
            t1 = time.perf_counter()
            with torch.no_grad():
                lat = p.sampler.sample(p, [PROMPT], generator=np.random.default_rng(i))
                video = p.sampler.decode(p, lat)
            t2 = time.perf_counter()
            if i:
                rt.append(t1 - t0)
                pt.append(t2 - t1)
            rel = float(np.linalg.norm(res.latents - lat.numpy()) / np.linalg.norm(lat.numpy()))
            mse = float(np.mean((res.video.astype(np.float64) - video.numpy()) ** 2))
            psnr = 10 * np.log10(4.0 / mse) if mse else float("inf")
            print(f"seed {i}: latents rel. error {rel:.2e}, frames PSNR {psnr:.1f} dB")
    r, t = statistics.median(rt), statistics.median(pt)
    print(f"bundle runtime ({res.provider}): {r:6.2f} s per video (median of {args.repeats})")
    print(f"torch pipeline:                 {t:6.2f} s per video (median of {args.repeats})")
    print(f"runtime / torch: {r / t:5.2f}x   threads: {args.threads}")


if __name__ == "__main__":
    main()
