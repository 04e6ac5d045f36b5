"""Benchmark: Neodragon's hybrid pipeline planned by ndopt on the real-size presets, against the paper.

    .venv/bin/python bench/bench_hybrid.py [--frames 49] [--height 320] [--width 512]

The chain: the neodragon-8elite / neodragon-xelite recipes on Pyramid-Flow SD3 384p with
`--first-frame image-model` (SSD-1B + LCM 4 steps makes the first frame at 640x1024, the DiT the
other 48 frames at 320x512, the tiny decoder decodes chunk by chunk, QuickSRNet Small upscales every
frame 2x), all on the meta device. It prints the parameters per component against the paper's
4.945B, the latency per component and end to end against 6.7 s, and the peak memory per phase
against 3.5 GB (8 Elite phone). Then it cross-checks the image model's UNet estimate against AI
Hub's published measurements of Stable Diffusion UNets (targets/calibration.tsv): the estimator's
figure for those UNets with the shipped constants (in sample) and fitted without the diffusion
family (held out), and the SSD-1B UNet's per-step estimate beside them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

NEODRAGON = {"params_b": 4.945, "latency_s": 6.7, "peak_memory_gb": 3.5}  # the paper, 8 Elite phone
RECIPES = {"snapdragon-8-elite": "recipes/neodragon-8elite.yaml", "snapdragon-x-elite": "recipes/neodragon-xelite.yaml"}


def plan_chain(recipe: str, frames: int, height: int, width: int) -> dict:
    from ndopt.runner import plan

    return plan(recipe, model="pyramid-flow-sd3-384p", frames=frames, height=height, width=width,
                first_frame="image-model", report_dir=f"/tmp/ndopt-bench-hybrid/{recipe.split('/')[-1][:-5]}")


def print_plan(target: str, result: dict) -> dict:
    est = result["estimates"][target]
    params = result["final"]["params"]
    total = sum(params.values())
    print(f"\n== {target} ({est['precision']}): {result['pipeline']}, {result['latent_frames']} latent frames, "
          f"DiT at {result['resolution'][0]}x{result['resolution'][1]}, video 2x that")
    print(f"params: {total / 1e9:.3f}B (Neodragon {NEODRAGON['params_b']}B, ratio {total / 1e9 / NEODRAGON['params_b']:.3f})")
    for name, p in params.items():
        print(f"  {name:20s} {p / 1e6:12.3f}M")
    print(f"{'component':20s} {'precision':9s} {'calls':>5s} {'latency ms':>11s} {'share':>6s} {'weights MB':>11s} "
          f"{'act. MB':>9s}")
    for name, r in est["components"].items():
        print(f"{name:20s} {r['precision']:9s} {r['calls_per_video']:5d} {r['latency_ms']:11.1f} {r['share']:6.1%} "
              f"{r['weights_mb']:11.1f} {r['peak_activations_mb']:9.1f}")
    print(f"end to end: {est['latency_s']:.2f} s (Neodragon {NEODRAGON['latency_s']} s on the 8 Elite, "
          f"ratio {est['latency_s'] / NEODRAGON['latency_s']:.2f})")
    mp = est["memory_plan"]
    print(f"memory plan: {mp['policy']}, peak {mp['peak_mb'] / 1024:.2f} GB (Neodragon {NEODRAGON['peak_memory_gb']} GB; "
          f"everything resident would be {mp['all_resident_mb'] / 1024:.2f} GB); state across phases "
          f"{mp['state_mb']:.0f} MB")
    for ph in mp["phases"]:
        print(f"  {ph['phase']:20s} weights {ph['weights_mb']:8.1f} MB  activations {ph['activations_mb']:7.1f} MB  "
              f"resident {ph['resident_mb'] / 1024:5.2f} GB")
    return est


def unet_cross_check(plans: dict[str, dict], video: tuple[int, int]) -> None:
    """SD UNets: AI Hub's measured latency vs the estimator, in sample and with the family held out."""
    from ndopt.frontends.neodragon.image_model import preset_config
    from targets.calibration import Sample, fit_target, load_features, predict, read_tsv
    from targets.calibration_models import FAMILIES
    from targets.spec import specs

    grid = preset_config("ssd-1b-lcm").latent_size(*video)
    cal = read_tsv()
    costs = load_features()
    print("\n== image model cross-check: Stable Diffusion UNets (AI Hub, qai-hub-models perf.yaml) vs the estimator")
    for tname, spec in specs().items():
        rows = [m for m in cal if m.device in spec.ai_hub_devices]
        unets = [m for m in rows if "unet" in m.model]
        if not unets:
            continue
        family = FAMILIES[unets[0].model] if unets[0].model in FAMILIES else unets[0].family
        held = fit_target([Sample(costs[m.builder], m.precision, m.latency_ms, m.family) for m in rows
                           if m.family != family], spec)
        for m in unets:
            inside = predict([costs[m.builder]], spec, m.precision, spec.efficiency[m.precision])[0]
            out = predict([costs[m.builder]], spec, m.precision, held[m.precision])[0] if m.precision in held else np.nan
            print(f"  {tname:20s} {m.model:12s} {m.precision:6s} measured {m.latency_ms:8.2f} ms  estimated "
                  f"{inside:8.2f} (x{inside / m.latency_ms:.2f})  family '{family}' held out {out:8.2f} "
                  f"(x{out / m.latency_ms:.2f})")
        est = plans.get(tname)
        if est is not None:
            u = est["components"]["image_unet"]
            per_step = u["latency_ms"] / u["calls_per_video"]
            sd15 = next((m for m in unets if m.model == "sd15_unet"), None)
            ratio = f", {per_step / sd15.latency_ms:.2f}x SD1.5's measured step" if sd15 else ""
            print(f"  {tname:20s} SSD-1B UNet at {grid[0]}x{grid[1]} latents ({u['precision']}): {per_step:.1f} ms "
                  f"per step, {u['calls_per_video']} steps{ratio} (the measured SD UNets run 64x64 latents)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=320)
    ap.add_argument("--width", type=int, default=512)
    args = ap.parse_args()
    estimates = {}
    for target, recipe in RECIPES.items():
        t0 = time.perf_counter()
        result = plan_chain(recipe, args.frames, args.height, args.width)
        estimates[target] = print_plan(target, result)
        print(f"[{time.perf_counter() - t0:.1f} s to plan]")
    unet_cross_check(estimates, (2 * args.height, 2 * args.width))


if __name__ == "__main__":
    main()
