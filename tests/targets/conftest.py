"""Shared fixtures: `ndopt run` of a tiny recipe for each Snapdragon target (lowered once per session)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ndopt.cli import main

TARGETS = ("snapdragon-8-elite", "snapdragon-x-elite")


def recipe_text(target: str) -> str:
    return (f"name: lower-{target}\nmodel: pyramid-flow-tiny\npasses:\n  - dead_component_elimination\n"
            f"target: {target}\nprobe: {{enabled: false}}\nseed: 0\n")


@pytest.fixture(scope="session")
def offline():
    """No AI Hub credentials, whatever the machine has: QAIHUB_CLIENT_INI names a missing file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QAIHUB_CLIENT_INI", "/nonexistent/ndopt-tests/client.ini")
        yield


@pytest.fixture(scope="session")
def lowered_runs(tmp_path_factory, offline) -> dict[str, dict]:
    """`ndopt run` of a recipe per target; {target: {"out", "report", "manifest", "bundle", "output"}}."""
    root = tmp_path_factory.mktemp("lowered")
    runs = {}
    for target in TARGETS:
        recipe = root / f"{target}.yaml"
        recipe.write_text(recipe_text(target))
        out = root / target
        res = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out)])
        assert res.exit_code == 0, res.output
        bundle = out / "bundles" / target
        runs[target] = {"out": out, "bundle": bundle, "output": res.output,
                        "report": json.loads((out / "report.json").read_text()),
                        "manifest": json.loads((bundle / "manifest.json").read_text())}
    return runs


def bundle_files(bundle: Path) -> list[Path]:
    return sorted(bundle.glob("*.onnx"))


QUANT_RECIPE = """name: quantize-x-elite
model: pyramid-flow-tiny
passes:
  - step_distillation: {steps: [1, 1, 1], student_weights: pyramid-flow-tiny-student-1-1-1, evaluate: false}
  - dead_component_elimination
  - cfg_folding
  - schedule_folding
  - aimet_quantization:
      components: [dit, vae_decoder]
      evaluate: false
      export: none
      calibration: {prompts: [a red circle moving left on a dark background, a blue square moving up on a light background]}
target: snapdragon-x-elite
video: {latent_frames: 1}  # one frame: three DiT layouts to lower and quantize-export, not six
probe: {enabled: false}
seed: 0
"""


@pytest.fixture(scope="session")
def quantized_run(tmp_path_factory, offline) -> dict:
    """`ndopt.run` of a cheap quantizing recipe for the X Elite: the shipped 1-1-1 student, folded, its DiT
    and VAE decoder at W8A16 (two calibration prompts, no evaluation); the text encoder stays float.
    One lowering shared by every test that needs a quantized run (they live in test_quantized.py, so
    one xdist worker builds it once)."""
    import torch

    import ndopt

    root = tmp_path_factory.mktemp("quantized")
    recipe = root / "quantize-x-elite.yaml"
    recipe.write_text(QUANT_RECIPE)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on shared cores
    try:
        report = ndopt.run(recipe, out=root / "run")
    finally:
        torch.set_num_threads(n)
    bundle = root / "run" / "bundles" / "snapdragon-x-elite"
    return {"report": report, "bundle": bundle, "model": Path(report["model"]["path"]),
            "manifest": json.loads((bundle / "manifest.json").read_text())}
