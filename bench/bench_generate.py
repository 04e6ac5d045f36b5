"""Benchmark: tiny-preset text-to-video time and DiT calls per second (prints figures and ratios).

    .venv/bin/python bench/bench_generate.py [--frames 9] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ndopt.frontends import load_model
from ndopt.frontends.pyramid_flow.sampler import count_dit_calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    pipe = load_model("pyramid-flow-tiny")
    pipe = pipe.replace(schedule=pipe.schedule.with_frames(1 + (args.frames - 1) // 8))
    rows = {}
    for mode in ("cfg", "cfg_batched", "none"):
        p = pipe.replace(schedule=pipe.schedule.with_guidance(mode))
        times, calls = [], 0
        for i in range(args.repeats + 1):  # the first run warms up the kernels; not timed
            g = torch.Generator().manual_seed(i)
            t0 = time.perf_counter()
            with torch.no_grad():
                calls = count_dit_calls(p, lambda p=p, g=g: p.sampler.decode(p, p.sampler.sample(p, ["a red circle"], generator=g)))
            if i:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows[mode] = (med, calls)
        print(f"guidance={mode:12s} {args.frames} frames 64x64: {med:6.2f} s per video (median of {args.repeats}), "
              f"{calls} DiT calls, {calls / med:7.1f} DiT calls/s")
    base = rows["cfg"][0]
    for mode, (t, _) in rows.items():
        print(f"speed-up vs cfg: {mode:12s} {base / t:5.2f}x")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
