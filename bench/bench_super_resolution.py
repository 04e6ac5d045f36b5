"""Benchmark: the shipped QuickSRNet-small 2x against bicubic on held-out frames, and the presets' size.

    .venv/bin/python bench/bench_super_resolution.py [--clips 32] [--seed 777]

Prints the mean per-frame PSNR (dB, [-1, 1] frames, peak-to-peak 2) of the shipped weights and of
bicubic upsampling against the 128x128 renders of held-out procedural clips (unseen (colour, shape)
pairs), their input being the renders area-downsampled to 64x64, with the paired per-frame gain
and its standard error; then each preset's parameters and MACs per frame at Neodragon's SR size,
320x512 -> 640x1024, both counted from the model on the meta device, beside the published counts
(MACs with ndopt's edge padding and without it, upstream's graph).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from ndopt.eval.metrics import pixel_psnr
from ndopt.frontends.neodragon.quicksrnet import (
    PRESETS,
    QuickSRNetConfig,
    bicubic_upsample,
    held_out_frames,
    load_tiny_sr,
    macs,
    num_parameters,
)

# qai-hub-models quicksrnet{small,medium,large}/info.yaml "Number of parameters" (counted at 4x)
PUBLISHED_4X = {"quicksrnet-small": "33.3K", "quicksrnet-medium": "61.0K", "quicksrnet-large": "436K"}
SR_INPUT = (320, 512)  # Neodragon's generated frames, upscaled 2x to 640x1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=32, help="held-out clips, 9 frames each")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    net = load_tiny_sr()
    lr, hr = held_out_frames(args.clips, seed=args.seed)
    with torch.no_grad():
        sr = torch.cat([net(lr[i : i + 64]) for i in range(0, len(lr), 64)])
    bic = bicubic_upsample(lr)
    p_sr = [pixel_psnr(sr[i : i + 1], hr[i : i + 1]) for i in range(len(hr))]
    p_bic = [pixel_psnr(bic[i : i + 1], hr[i : i + 1]) for i in range(len(hr))]
    gains = [a - b for a, b in zip(p_sr, p_bic)]
    se = statistics.stdev(gains) / len(gains) ** 0.5
    print(f"held-out ({len(hr)} frames of {args.clips} clips, seed {args.seed}), 64x64 -> 128x128:")
    print(f"  quicksrnet-small-tiny {statistics.mean(p_sr):.2f} dB   bicubic {statistics.mean(p_bic):.2f} dB   "
          f"gain {statistics.mean(gains):+.2f} +- {se:.2f} dB (SR better on {sum(g > 0 for g in gains)}/{len(gains)} frames)")

    h, w = SR_INPUT
    print(f"presets at 2x, {h}x{w} -> {2 * h}x{2 * w} (counted on the meta device):")
    for name, cfg in PRESETS.items():
        four = QuickSRNetConfig(cfg.num_channels, cfg.num_intermediate_layers, cfg.use_ito_connection, scale=4)
        upstream = dataclasses.replace(cfg, edge_padding=False)
        print(f"  {name:18s} {num_parameters(cfg):>8,d} params (4x: {num_parameters(four):,d}; published "
              f"{PUBLISHED_4X[name]})   {macs(cfg, h, w) / 1e9:6.2f} GMAC/frame "
              f"(upstream's zero-padded graph: {macs(upstream, h, w) / 1e9:.2f})")


if __name__ == "__main__":
    main()
