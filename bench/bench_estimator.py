"""Benchmark: the NPU latency estimator against Qualcomm AI Hub measurements, and what it says of
Pyramid-Flow and a Neodragon-like pipeline (prints figures and ratios).

    .venv/bin/python bench/bench_estimator.py [--fit] [--skip-pipelines]

Calibration: the models of targets/calibration.tsv, costed on the meta device, priced with the
efficiencies shipped in targets/*.yaml (and, with --fit, refitted here: it prints the YAML to paste).
Held out: three AI Hub models the fit never saw (HELD_OUT below, same source). Errors are
|estimated / measured - 1|: median and worst, per target and precision.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from targets import Efficiency, specs
from targets.calibration import errors, fit, graph_cost, predict, read_tsv

# (model, builder, AI Hub device, precision, measured ms, source): qai-hub-models 0.65.0 perf.yaml files.
HELD_OUT = [
    ("sd21_unet", "diffusers:sd21_unet", "Samsung Galaxy S25", "w8a16", 93.162,
     "models/stable_diffusion_v2_1/perf.yaml w8a16/unet/qnn_context_binary"),
    ("sd21_unet", "diffusers:sd21_unet", "Snapdragon X Elite CRD", "w8a16", 163.457,
     "models/stable_diffusion_v2_1/perf.yaml w8a16/unet/qnn_context_binary"),
    ("swin_tiny", "torchvision:swin_t", "Samsung Galaxy S25", "w8a16", 4.76, "models/swin_tiny/perf.yaml w8a16/qnn_dlc"),
    ("swin_tiny", "torchvision:swin_t", "Snapdragon X Elite CRD", "w8a16", 10.807,
     "models/swin_tiny/perf.yaml w8a16/qnn_dlc"),
    ("swin_tiny", "torchvision:swin_t", "Samsung Galaxy S25", "fp16", 4.399, "models/swin_tiny/perf.yaml float/qnn_dlc"),
    ("swin_tiny", "torchvision:swin_t", "Snapdragon X Elite CRD", "fp16", 9.636,
     "models/swin_tiny/perf.yaml float/qnn_dlc"),
    ("whisper_medium_encoder", "transformers:whisper_medium_encoder", "Samsung Galaxy S25", "w8a16", 97.394,
     "models/whisper_medium_quantized/perf.yaml w8a16/encoder/qnn_context_binary"),
    ("whisper_medium_encoder", "transformers:whisper_medium_encoder", "Snapdragon X Elite CRD", "w8a16", 169.383,
     "models/whisper_medium_quantized/perf.yaml w8a16/encoder/qnn_context_binary"),
    ("whisper_medium_encoder", "transformers:whisper_medium_encoder", "Samsung Galaxy S25", "fp16", 173.075,
     "models/whisper_medium/perf.yaml float/encoder/qnn_context_binary"),
    ("whisper_medium_encoder", "transformers:whisper_medium_encoder", "Snapdragon X Elite CRD", "fp16", 332.026,
     "models/whisper_medium/perf.yaml float/encoder/qnn_context_binary"),
]
NEODRAGON = {"latency_s": 6.7, "peak_memory_gb": 3.5}  # the paper: 49 frames 640x1024 on an 8 Elite phone


def target_of(device: str) -> str:
    for name, spec in specs().items():
        if device in spec.ai_hub_devices:
            return name
    raise SystemExit(f"no target lists AI Hub device {device!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fit", action="store_true", help="refit the efficiencies and print the YAML to paste")
    ap.add_argument("--skip-pipelines", action="store_true", help="only the calibration and held-out errors")
    args = ap.parse_args()
    cal = read_tsv()
    t0 = time.perf_counter()
    costs = {b: graph_cost(b) for b in sorted({m.builder for m in cal} | {h[1] for h in HELD_OUT})}
    print(f"costed {len(costs)} models on the meta device in {time.perf_counter() - t0:.1f} s")
    groups = sorted({(target_of(m.device), m.precision) for m in cal})
    fitted: dict[tuple[str, str], Efficiency] = {}
    for tname, prec in groups:
        spec = specs()[tname]
        rows = [m for m in cal if target_of(m.device) == tname and m.precision == prec]
        eff = spec.efficiency[prec]
        if args.fit:
            eff = fit([costs[m.builder] for m in rows], [m.latency_ms for m in rows], spec, prec, start=eff)
            fitted[(tname, prec)] = eff
        pred = predict([costs[m.builder] for m in rows], spec, prec, eff)
        e = errors(pred, [m.latency_ms for m in rows])
        print(f"\n{tname} {prec}: calibration ({e['n']} models) median error {e['median']:.1%}, worst "
              f"{e['worst']:.1%} (estimate/measured geomean {e['geomean_ratio']:.2f})")
        for m, p in zip(rows, pred):
            print(f"  {m.model:26s} measured {m.latency_ms:9.3f} ms  estimated {p:9.3f} ms  ratio {p / m.latency_ms:5.2f}")
        held = [h for h in HELD_OUT if target_of(h[2]) == tname and h[3] == prec]
        if held:
            hp = predict([costs[h[1]] for h in held], spec, prec, eff)
            he = errors(hp, [h[4] for h in held])
            print(f"  held out ({he['n']}): median error {he['median']:.1%}, worst {he['worst']:.1%}")
            for h, p in zip(held, hp):
                print(f"  {h[0]:26s} measured {h[4]:9.3f} ms  estimated {p:9.3f} ms  ratio {p / h[4]:5.2f}  [held out]")
    if args.fit:
        print("\n# fitted efficiencies (paste into targets/<name>.yaml under efficiency:)")
        for (tname, prec), eff in fitted.items():
            vals = ", ".join(f"{k}: {getattr(eff, k):.4g}" for k in ("conv", "matmul", "attention", "weights", "activations", "node_us"))
            print(f"{tname}:  {prec}: {{{vals}}}")
    if not args.skip_pipelines:
        pipelines()


def pipelines() -> None:
    from ndopt.frontends import load_model
    from targets import registry

    print("\nPyramid-Flow estimates (w8a16, before any Neodragon pass):")
    for model, frames in (("pyramid-flow-tiny", None), ("pyramid-flow-sd3-384p", None), ("pyramid-flow-sd3-768p", None)):
        pipe = load_model(model, meta=True)
        if frames:
            pipe = pipe.replace(schedule=replace(pipe.schedule, latent_frames=frames))
        for name, target in registry().items():
            t0 = time.perf_counter()
            est = target.estimate(pipe)
            comps = ", ".join(f"{c} {r['latency_ms'] / 1000:.2f} s" for c, r in est["components"].items())
            print(f"  {model:24s} {name:20s} {est['latency_s']:9.2f} s/video, peak {est['peak_memory_mb'] / 1024:6.2f} GB "
                  f"({est['memory_plan']['policy']}); {comps}  [{time.perf_counter() - t0:.1f} s to estimate]")
    print(f"\nNeodragon (paper): {NEODRAGON['latency_s']} s and {NEODRAGON['peak_memory_gb']} GB on the 8 Elite")
    neo = neodragon_like()
    for name, target in registry().items():
        est = target.estimate(neo)
        comps = ", ".join(f"{c} {r['latency_ms'] / 1000:.2f} s" for c, r in est["components"].items())
        print(f"  Neodragon-like 320x512 18 blocks 1-1-1 no CFG, {name:20s} {est['latency_s']:6.2f} s/video "
              f"(x{est['latency_s'] / NEODRAGON['latency_s']:.2f} of the paper's), peak "
              f"{est['peak_memory_mb'] / 1024:.2f} GB (x{est['peak_memory_mb'] / 1024 / NEODRAGON['peak_memory_gb']:.2f}); "
              f"{comps}")
        mp = est["memory_plan"]
        print(f"    memory plan ({mp['policy']}): weights {mp['weights_mb']} MB, largest activations "
              f"{mp['activations_mb']} MB; without the decoder (Neodragon's is a 10M TAEHV): "
              f"{(est['latency_ms'] - est['components']['vae_decoder']['latency_ms']) / 1000:.2f} s, weights "
              f"{(sum(mp['weights_mb'].values()) - mp['weights_mb']['vae_decoder']) / 1024:.2f} GB")


def neodragon_like():  # type: ignore[no-untyped-def]
    """The real-size 768p preset with Neodragon's structural choices applied by hand (the passes that
    do this are other issues): a DT5-sized T5 encoder (768 wide, 12 layers; the context adapter
    that maps it to the DiT's 4096 is not modelled), 18 DiT blocks, the DiT at 320x512 (its 2x
    super-resolution and the first frame's image model are outside this pipeline), 1-1-1 steps,
    no CFG, 49 frames. The VAE decoder stays Pyramid-Flow's causal VAE (Neodragon: a 10M TAEHV)."""
    import copy

    import torch
    from torch import nn

    from ndopt.frontends import load_model
    from ndopt.frontends.pyramid_flow import text as text_mod

    pipe = load_model("pyramid-flow-sd3-768p", meta=True)
    m = pipe["dit"].module
    blocks = list(m.transformer_blocks)
    pruned = copy.copy(m)
    pruned._modules = dict(m._modules)
    pruned.transformer_blocks = nn.ModuleList(blocks[:17] + blocks[-1:])  # the last block is context_pre_only
    real = text_mod.real_config()
    dt5 = replace(real, t5={**real.t5, "d_model": 768, "d_kv": 64, "d_ff": 2048, "num_layers": 12, "num_heads": 12})
    with torch.device("meta"):
        text = text_mod.SD3TextEncoder(dt5, None).eval()
    sch = pipe.schedule.with_steps((1, 1, 1), (1, 1, 1)).with_guidance("none")
    sch = replace(sch, height=320, width=512, first_frame="external")
    te = pipe["text_encoder"]
    return pipe.replace(schedule=sch, dit=pipe["dit"].with_module(pruned),
                        text_encoder=te.with_module(text, config=dt5))


if __name__ == "__main__":
    main()
