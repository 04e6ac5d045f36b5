"""Lowering the tiny miniFLUX pipeline: the exact-pass-optimized pipeline (dead components, CFG and the
schedule folded) to both Snapdragon targets, and its W8A16 quantization to the X Elite. Every graph
passes onnx.checker, the target's legality rules and onnxruntime-vs-torch numerics; the bundle's
program tokenizes miniFLUX's inputs (T5 and CLIP-L, no CLIP-G) and denormalizes with miniFLUX's
first-frame constants, so the bundle runtime gives the torch sampler's latents.

One lowering per target (module fixtures); the second target reuses the first one's graphs from the
in-process lowering cache. One latent frame at 2-2-2 steps keeps the bundle to five graphs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import TARGETS, bundle_files

from ndopt.frontends.miniflux.sampler import IMAGE_SCALE, IMAGE_SHIFT
from ndopt.frontends.pyramid_flow import vae as vae_mod
from ndopt.model import load_model
from ndopt.passmanager import PassContext, PassManager, target_info
from ndopt.target import get_target
from passes.aimet_quantization import AimetQuantization
from passes.cfg_folding import CfgFolding
from passes.dead_component_elimination import DeadComponentElimination
from passes.schedule_folding import ScheduleFolding
from targets import runtime
from targets.bundle import graph_calls
from targets.legality import check
from targets.lowering import plan_graphs
from targets.numerics import ATOL
from targets.spec import specs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPT = "a red circle moving left on a blue background"
QUANTIZED_TARGET = "snapdragon-x-elite"


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    p = load_model("pyramid-flow-miniflux-tiny")
    p = p.replace(schedule=p.schedule.with_steps((2, 2, 2), (1, 1, 1)).with_frames(1))
    final, _ = PassManager([DeadComponentElimination(), CfgFolding(), ScheduleFolding()]).run(
        p, PassContext(run_dir=tmp_path_factory.mktemp("exact")))
    return final


@pytest.fixture(scope="module")
def bundles(exact, tmp_path_factory, offline):
    """{target: (lower()'s summary, bundle dir)} of the exact-optimized pipeline."""
    root = tmp_path_factory.mktemp("mf-bundles")
    return {t: (get_target(t).lower(exact, root / t), root / t) for t in TARGETS}


@pytest.fixture(scope="module")
def quantized(exact, tmp_path_factory, offline):
    """The exact pipeline with its DiT at W8A16 for the X Elite (its AIMET config), lowered there."""
    root = tmp_path_factory.mktemp("mf-quantized")
    cfg = {"precision": "w8a16", "components": ["dit"], "evaluate": False, "export": "none",
           "calibration": {"prompts": [PROMPT]}}
    q, _ = PassManager([AimetQuantization(cfg)]).run(
        exact, PassContext(run_dir=root / "run", target=target_info([QUANTIZED_TARGET])))
    get_target(QUANTIZED_TARGET).lower(q, root / "bundle")
    return q, root / "bundle"


def _manifest(bundle):
    import json

    return json.loads((bundle / "manifest.json").read_text())


def _checked(bundle, target, pipeline):
    """Every graph of a bundle: onnx.checker, legality, numerics; the program calls each as the plan does."""
    man = _manifest(bundle)
    expected = {p.name: p.calls_per_video for p in plan_graphs(pipeline)}
    assert set(man["graphs"]) == set(expected) and graph_calls(man["program"]) == expected
    rules = specs()[target].legality
    for f in bundle_files(bundle):
        onnx.checker.check_model(str(f), full_check=True)
        report = check(onnx.load(str(f)), rules, f.stem)
        assert report.ok, [str(v) for v in report.errors]
    for name, g in man["graphs"].items():
        assert g["legality"]["ok"] and g["numerics"]["ok"] and g["numerics"]["max_abs_err"] <= ATOL, name
    return man


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_exact_pipeline_lowers_to_both_targets(bundles, exact, target):
    summary, bundle = bundles[target]
    assert summary["status"] == "ok"
    man = _checked(bundle, target, exact)
    assert {g.split("__")[0] for g in man["graphs"]} == {"text_encoder", "dit", "vae_decoder"}
    assert man["estimate"]["latency_ms"] > 0
    text = next(op for op in man["program"] if op["op"] == "tokenize")
    assert [(e["tokenizer"], e["ids"], e["mask"]) for e in text["encoders"]] == [
        ("tokenizer_2/tokenizer.json", "t5_ids", "t5_mask"), ("tokenizer/tokenizer.json", "clip_l_ids", None)]
    norm = next(op for op in man["program"] if op["op"] == "denormalize")
    assert norm["image"] == {"scale": IMAGE_SCALE, "shift": IMAGE_SHIFT}  # miniFLUX's first frame, not SD3's
    assert norm["video"] == {"scale": vae_mod.VIDEO_SCALE, "shift": vae_mod.VIDEO_SHIFT}


@pytest.mark.slow
def test_the_bundle_gives_the_torch_samplers_latents(bundles, exact):
    res = runtime.generate(bundles[TARGETS[0]][1], PROMPT, seed=3, threads=1)
    with torch.no_grad():
        lat = exact.sampler.sample(exact, [PROMPT], generator=np.random.default_rng(3))
        video = exact.sampler.decode(exact, lat)
    assert res.latents.shape == tuple(lat.shape) and res.video.shape == tuple(video.shape)
    assert np.linalg.norm(res.latents - lat.numpy()) / np.linalg.norm(lat.numpy()) <= 1e-4
    assert np.abs(res.video - video.numpy()).max() <= 1e-3


@pytest.mark.nightly  # ~45 s on one core: the suite keeps the SD3 QDQ lowering tests; `pytest -m nightly`
def test_quantized_pipeline_lowers_with_qdq_graphs(quantized):
    q, bundle = quantized
    man = _checked(bundle, QUANTIZED_TARGET, q)
    dits = {n: g for n, g in man["graphs"].items() if g["component"] == "dit"}
    assert len(dits) == 3  # one latent frame: a graph per pyramid stage
    for g in dits.values():  # the QDQ graph (AIMET's encodings) against the quantized sim
        assert g["precision"] == "w8a16" and g["qdq_legality"]["ok"] and g["qdq_numerics"]["ok"]
        assert g["encodings_count"]["param"] > 0 and g["encodings_count"]["activation"] > 0
    assert man["graphs"]["text_encoder__prompt"]["precision"] == "fp16"  # left in float
