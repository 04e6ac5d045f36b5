"""Benchmark: decoder time per video, native vs tiny (TAEHV-style), on the tiny preset, next to the plan's ratio.

    .venv/bin/python bench/bench_decoder_swap.py

Prints the measured ratio (native / tiny decode time of one 9-frame 64x64 video) beside the FLOPs
ratio the cost model predicts, for the tiny preset and for pyramid-flow-sd3-768p (plan only).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ndopt.frontends import load_model
from ndopt.ir.cost import CostModel
from ndopt.passmanager import PassContext
from passes.decoder_swap import DecoderSwap


def decoder_flops(pipeline, costs: CostModel) -> int:
    dec = pipeline.by_role("vae_decoder")[0]
    return sum(costs.signature_cost(dec, s).flops * s.count for s in pipeline.call_plan() if s.component == dec.name)


def seconds(pipeline, repeats: int = 10) -> float:
    dec = pipeline.by_role("vae_decoder")[0]
    z = torch.randn(1, 16, pipeline.schedule.latent_frames, pipeline.schedule.height // 8, pipeline.schedule.width // 8)
    with torch.no_grad():
        dec.call(z=z)
        t0 = time.perf_counter()
        for _ in range(repeats):
            dec.call(z=z)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    costs = CostModel()
    with tempfile.TemporaryDirectory() as d:
        tiny = load_model("pyramid-flow-tiny")
        swapped = DecoderSwap({"steps": 0}).run(tiny, PassContext(Path(d))).pipeline
        real = load_model("pyramid-flow-sd3-768p", meta=True)
        real_swapped = DecoderSwap().plan(real, PassContext(Path(d), plan=True)).pipeline
    t_native, t_tiny = seconds(tiny), seconds(swapped)
    f_native, f_tiny = decoder_flops(tiny, costs), decoder_flops(swapped, costs)
    r_native, r_tiny = decoder_flops(real, costs), decoder_flops(real_swapped, costs)
    print(f"tiny preset: native {t_native * 1e3:.1f} ms, tiny {t_tiny * 1e3:.1f} ms per video: "
          f"measured {t_native / t_tiny:.2f}x, predicted (FLOPs) {f_native / f_tiny:.2f}x")
    print(f"sd3-768p, 49 frames (plan): native {r_native / 1e12:.1f} TFLOP, tiny {r_tiny / 1e12:.1f} TFLOP: "
          f"predicted {r_native / r_tiny:.1f}x")


if __name__ == "__main__":
    main()
