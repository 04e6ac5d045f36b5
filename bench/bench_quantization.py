"""Benchmark: AIMET quantization of the tiny pipeline (time per component, fidelity, ONNX vs sim) and the
plan of the real model's weight bytes per precision.

    .venv/bin/python bench/bench_quantization.py [--prompts 8] [--steps 6] [--precisions w8a16,w4a16]

Calibration samples the tiny preset (2 latent frames = 9 video frames at 64x64, CFG) with `--steps`
per pyramid stage for the first frame and half as many for the second; fidelity is measured on
the probe's two default prompts with the same schedule. Not part of the test run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ndopt.frontends import load_model
from ndopt.frontends.pyramid_flow.dit import PyramidMMDiT
from ndopt.passmanager import PassContext
from passes.aimet_quantization import CALIBRATION_PROMPTS, AimetQuantization

GB = 1e9


def quantize(precision: str, prompts: int, steps: int, out: Path) -> None:
    pipe = load_model("pyramid-flow-tiny")
    video_steps = max(1, steps // 2)
    cfg = {"precision": precision, "export": "first",
           "calibration": {"prompts": list(CALIBRATION_PROMPTS[:prompts]), "steps": [steps] * 3,
                           "video_steps": [video_steps] * 3}}
    t0 = time.perf_counter()
    res = AimetQuantization(cfg).run(pipe, PassContext(run_dir=out / precision))
    total = time.perf_counter() - t0
    m = res.metrics
    print(f"\n== {precision} (htp_v79), calibration: {prompts} prompts x {steps}-{steps}-{steps} / "
          f"{video_steps}-{video_steps}-{video_steps} steps, {pipe.schedule.latent_frames} latent frames, CFG; "
          f"{m['calibration']['calls']} calls recorded in {m['calibration']['seconds']:.1f} s")
    print(f"{'component':14s} {'prepare':>8s} {'sim':>7s} {'calib':>7s} {'export':>7s}  quantized ops / "
          "float matmul+softmax left / ONNX vs sim (max abs, rel. to range)")
    for name, c in m["components"].items():
        s = c["seconds"]
        export = next(iter(c["export"].values()), {})
        ops = sum(c["quantized_ops"].values())
        left = sum(c["unquantized_ops"]["matmul_softmax"].values())
        print(f"{name:14s} {s['prepare']:7.1f}s {s['sim']:6.1f}s {s['calibrate']:6.1f}s "
              f"{export.get('seconds', 0):6.1f}s  {ops:4d} / {left:3d} / "
              f"{export.get('onnx_max_abs_err', float('nan')):.2e} ({export.get('onnx_rel_err', float('nan')):.1e})")
        if c["unquantized_ops"]["matmul_softmax"]:
            print(f"{'':14s} float matmul/softmax: {c['unquantized_ops']['matmul_softmax']} in "
                  f"{[k for k, v in c['unquantized_ops']['by_module'].items() if set(v) & set(c['unquantized_ops']['matmul_softmax'])][:4]}")
    f = m["fidelity"]
    print(f"fidelity vs float (probe prompts): latent PSNR {f['latent_psnr']:.2f} dB, decoded PSNR "
          f"{f['pixel_psnr']:.2f} dB; pass total {total:.1f} s on {torch.get_num_threads()} thread(s)")
    from ndopt.train.teacher_eval import teacher_prompt_following

    pf, pf_float = teacher_prompt_following(res.pipeline), teacher_prompt_following(pipe)
    print(f"prompt following (tiny teacher's held-out test, 16 prompts): {pf.rate:.3f} quantized vs "
          f"{pf_float.rate:.3f} float")


def plan() -> None:
    pipe = load_model("pyramid-flow-sd3-768p", meta=True)
    print("\n== plan: pyramid-flow-sd3-768p weight bytes (meta device, no sim)")
    for blocks in (24, 18):
        dit = pipe["dit"]
        with torch.device("meta"):
            m = PyramidMMDiT(replace(dit.module.config, num_layers=blocks))
        p = pipe.replace(dit=dit.with_module(m, config=m.config))
        res = AimetQuantization({}).plan(p, PassContext(run_dir=Path(tempfile.mkdtemp()), plan=True))
        for name, b in res.metrics["weight_bytes"].items():
            if name == "dit" or blocks == 24:
                print(f"{name:14s} {'(' + str(blocks) + ' blocks)' if name == 'dit' else '':12s} params "
                      f"{p[name].params() / 1e9:6.3f} B  fp32 {b['float32'] / GB:7.3f} GB  W8 {b['w8'] / GB:6.3f} GB  "
                      f"W4 (LPBQ) {b['w4'] / GB:6.3f} GB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--precisions", default="w8a16,w4a16")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (tiny tensors: 1 is fastest)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plan()
    with tempfile.TemporaryDirectory() as d:
        for precision in args.precisions.split(","):
            quantize(precision, args.prompts, args.steps, Path(d))


if __name__ == "__main__":
    main()
