"""Benchmark: the NPU latency estimator against Qualcomm AI Hub measurements, and what it says of
Pyramid-Flow and a Neodragon-like pipeline (prints figures and ratios).

    .venv/bin/python bench/bench_estimator.py [--extract] [--fit] [--skip-pipelines]

Calibration: the models of targets/calibration.tsv as `ndopt estimate` sees them (their ONNX exports,
costed by targets/onnx_costs.py; the per-node records are targets/calibration_features.json, which
--extract rewrites by exporting every model). Errors are |estimated / measured - 1|: median and
worst per target and precision, for the shipped efficiencies (in sample) and leave-one-family-out
(each family's models estimated by a fit on the other families only: what a model of a new kind
can expect). --fit prints the efficiencies and calibration records to paste into targets/*.yaml.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from targets.calibration import Sample, cross_validate, errors, fit_target, load_features, predict, read_tsv
from targets.spec import specs

ONNX_CACHE = Path.home() / ".cache" / "ndopt" / "calibration-onnx"
FEATURES = Path(__file__).resolve().parents[1] / "targets" / "calibration_features.json"
NEODRAGON = {"latency_s": 6.7, "peak_memory_gb": 3.5}  # the paper: 49 frames 640x1024 on an 8 Elite phone


def target_of(device: str) -> str:
    for name, spec in specs().items():
        if device in spec.ai_hub_devices:
            return name
    raise SystemExit(f"no target lists AI Hub device {device!r}")


def extract(onnx_dir: Path) -> None:
    """Export every calibration model to ONNX (skeletons: graph and shapes) and write the features:
    each model as `ndopt estimate` reads its file, or, where the export or the file's shapes fail,
    as the torch front end costs it (`ndopt plan`'s path; the file records which)."""
    import onnx
    import torch

    from targets.calibration import export_graph, graph_cost, save_features
    from targets.onnx_costs import onnx_graph_cost, static_graph

    torch.set_num_threads(1)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    costs, sources = {}, {}
    for b in sorted({m.builder for m in read_tsv()}):
        f = onnx_dir / (b.replace(":", "__") + ".onnx")
        t0 = time.perf_counter()
        try:
            if not f.exists():
                export_graph(b, f)
            # what `ndopt estimate` does with a file: shapes made static (symbolic inference, onnxsim)
            costs[b], sources[b] = onnx_graph_cost(static_graph(onnx.load(str(f), load_external_data=False), str(f))), "onnx"
        except Exception as e:  # any export or shape failure: the torch front end instead
            print(f"  {b}: ONNX path failed ({type(e).__name__}: {str(e)[:120]}); torch front end")
            costs[b], sources[b] = graph_cost(b), "torch"
        print(f"  {b:44s} {sources[b]:5s} {len(costs[b].ops):5d} priced nodes, {costs[b].macs / 1e9:8.2f} GMACs "
              f"[{time.perf_counter() - t0:.1f} s]", flush=True)
    out = FEATURES
    n_onnx = sum(v == "onnx" for v in sources.values())
    save_features(costs, out, f"per-node records of the calibration models ({n_onnx} of {len(costs)} from their "
                  "ONNX exports, the rest from the torch front end; bench/bench_estimator.py --extract)", sources)
    print(f"wrote {out}: {n_onnx} of {len(costs)} graphs from ONNX")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extract", action="store_true", help="export the models and rewrite the features file")
    ap.add_argument("--onnx-dir", type=Path, default=ONNX_CACHE, help="where --extract keeps the ONNX exports")
    ap.add_argument("--fit", action="store_true", help="refit the efficiencies and print the YAML to paste")
    ap.add_argument("--skip-pipelines", action="store_true", help="only the calibration errors")
    args = ap.parse_args()
    if args.extract:
        extract(args.onnx_dir)
    cal = read_tsv()
    costs = load_features()
    sources = json.loads(FEATURES.read_text()).get("sources", {})
    print(f"{len({m.model for m in cal})} models ({len({m.builder for m in cal})} graphs, "
          f"{sum(v == 'onnx' for v in sources.values())} costed from their ONNX exports), "
          f"{len({m.family for m in cal})} families, {len(cal)} measurements")
    table, fitted = [], {}
    for tname in sorted({target_of(m.device) for m in cal}):
        spec = specs()[tname]
        rows = [m for m in cal if target_of(m.device) == tname]
        samples = [Sample(costs[m.builder], m.precision, m.latency_ms, m.family) for m in rows]
        t0 = time.perf_counter()
        effs = fit_target(samples, spec) if args.fit else {p: spec.efficiency[p] for p in {m.precision for m in rows}}
        fitted.update({(tname, p): e for p, e in effs.items()} if args.fit else {})
        lofo = cross_validate(samples, spec, {k: v for k, v in spec.efficiency.items() if v.calibrated})
        for prec in sorted(effs):
            ii = [i for i, m in enumerate(rows) if m.precision == prec]
            meas = np.array([rows[i].latency_ms for i in ii])
            pred = predict([costs[rows[i].builder] for i in ii], spec, prec, effs[prec])
            e, cv = errors(pred, meas), errors(lofo[ii], meas)
            table.append((tname, prec, len(ii), len({rows[i].family for i in ii}), e, cv))
            print(f"\n{tname} {prec}: {e['n']} measurements; in sample median {e['median']:.1%}, worst "
                  f"{e['worst']:.1%}; leave-one-family-out median {cv['median']:.1%}, worst {cv['worst']:.1%} "
                  f"[{time.perf_counter() - t0:.1f} s]")
            for i, p in sorted(zip(ii, pred), key=lambda r: rows[r[0]].family):
                m = rows[i]
                print(f"  {m.family:16s} {m.model:28s} measured {m.latency_ms:9.3f} ms  estimated {p:9.3f}  "
                      f"held out {lofo[i]:9.3f} ({lofo[i] / m.latency_ms - 1:+.0%})")
    print("\nleave-one-family-out cross-validation, |estimate / measured - 1| (ONNX exports, as `ndopt estimate`):")
    print(f"  {'target':20s} {'precision':9s} {'n':>4s} {'families':>8s} {'median':>7s} {'worst':>7s}   in sample")
    for tname, prec, n, nf, e, cv in table:
        print(f"  {tname:20s} {prec:9s} {n:4d} {nf:8d} {cv['median']:7.1%} {cv['worst']:7.1%}   "
              f"{e['median']:.1%} / {e['worst']:.1%}")
    print("\n| target | precision | n | median | worst |\n|---|---|---|---|---|")  # the README's table
    for tname, prec, n, _, _, cv in table:
        print(f"| {tname} | {prec} | {n} | {cv['median']:.0%} | {cv['worst']:.0%} |")
    if args.fit:
        print("\n# fitted efficiencies and their cross-validated errors (paste into targets/<name>.yaml)")
        for (tname, prec), eff in fitted.items():
            vals = ", ".join(f"{k}: {getattr(eff, k):.4g}" for k in ("conv", "dwconv", "matmul", "attention", "weights",
                                                                    "activations", "norm", "node_us", "graph_us"))
            cv = next(r[5] for r in table if r[0] == tname and r[1] == prec)
            print(f"{tname}:  {prec}: {{{vals}}}   error {prec}: {{median: {cv['median']:.3f}, worst: "
                  f"{cv['worst']:.3f}, n: {cv['n']}}}")
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
