"""The CLI end to end: the README's run, plan JSON, generate, passes/targets listings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ndopt.cli import main


@pytest.mark.slow
def test_run_exact_recipe_writes_report(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", "exact", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["steps"][0]["name"] == "dead_component_elimination"
    step = report["steps"][0]
    assert step["fidelity"]["contract"] == "exact" and step["fidelity"]["vs_previous"]["latent_rel_err"] == 0.0
    assert step["cost"]["params"].keys() == {"text_encoder", "dit", "vae_decoder"}
    assert report["baseline"]["params"]["vae_encoder"] > 0
    for name in ("report.md", "cost.png", "fidelity.png", "frames.png",
                 "passes/01_dead_component_elimination/pipeline.txt"):
        assert (out / name).exists(), name
    assert (out / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "dead_component_elimination" in md
    # the probe's videos of the original and the optimized pipeline, side by side, and each pass's contract
    assert report["frames"]["frames"] == 9 and "![frames](frames.png)" in md
    assert "| exact 1e-05 |" in md and step["fidelity"]["tolerance"] == 0.0
    assert "## What each pass measured" in md and "- params_removed: " in md  # each pass's own metrics
    # the default recipe's target: the bundle is lowered and its estimate tabled and plotted
    assert report["lowering"]["snapdragon-8-elite"]["status"] == "ok"
    assert "## Target estimates" in md and (out / "estimates.png").is_file()


def test_plan_model_json_has_the_named_fields():
    res = CliRunner().invoke(main, ["plan", "--model", "pyramid-flow-tiny", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    for key in ("params", "flops_per_call_signature", "calls_per_video", "flops_per_video"):
        assert key in d
    sigs = d["flops_per_call_signature"]
    assert {s["component"] for s in sigs} == {"text_encoder", "dit", "vae_decoder"}
    assert d["flops_per_video"] == sum(s["flops"] * s["count"] for s in sigs)
    assert d["calls_per_video"]["dit"] == 180 and d["calls_per_video"]["vae_encoder"] == 0


def test_plan_recipe_with_size_and_hybrid_first_frame_writes_a_report(tmp_path):
    """Neodragon's setting: the DiT at 320x512, the first frame from an image model (hybrid mode)."""
    from ndopt.frontends import load_model

    out = tmp_path / "plan"
    args = ["plan", "recipes/default.yaml", "--target", "snapdragon-8-elite", "--json", "--out", str(out)]
    full = json.loads(CliRunner().invoke(main, args, catch_exceptions=False).stdout)
    res = CliRunner().invoke(main, [*args, "--height", "64", "--width", "128", "--first-frame", "external"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["resolution"] == [64, 128] and full["resolution"] == [64, 64]
    sch = load_model("pyramid-flow-tiny", meta=True).schedule
    first = 2 * sum(s.steps for s in sch.stages)  # CFG: two calls per step
    assert full["dit_calls_per_video"] - d["dit_calls_per_video"] == first
    assert d["flops_per_video"] != full["flops_per_video"]
    for name in ("plan.json", "report.md", "cost.png", "estimates.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "| schedule_folding |" in md and "snapdragon-8-elite" in md and "![estimates](estimates.png)" in md
    assert json.loads((out / "plan.json").read_text())["resolution"] == [64, 128]


def test_plan_real_768p_matches_the_reference_sizes():
    """REFERENCE.md / the seed: DiT 2.028B (24 blocks), VAE decoder 225.8M, encoder 109.6M, T5-XXL ~4.76B."""
    from ndopt.runner import plan

    d = plan(model="pyramid-flow-sd3-768p")
    p = d["params"]
    assert abs(p["dit"] / 2.028e9 - 1) < 0.005
    assert abs(p["vae_decoder"] / 225.8e6 - 1) < 0.01 and abs(p["vae_encoder"] / 109.6e6 - 1) < 0.01
    from ndopt.frontends import load_model

    real = load_model("pyramid-flow-sd3-768p", meta=True)
    t5 = sum(x.numel() for x in real["text_encoder"].module.text_encoder_3.parameters())
    assert abs(t5 / 4.76e9 - 1) < 0.01
    assert len(real["dit"].module.transformer_blocks) == 24
    # 49 frames = 7 latent frames: (60 + 6 * 30) steps, two DiT calls per step with CFG
    assert d["dit_calls_per_video"] == 480 and d["latent_frames"] == 7


def test_generate_writes_a_playable_video(tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "v.mp4"
    res = CliRunner().invoke(main, ["generate", "--prompt", "a red circle moving left", "--frames", "9",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    frames = iio.imread(out)
    assert frames.shape[0] == 9 and frames.shape[1:3] == (64, 64)
    png = tmp_path / "strip.png"
    res = CliRunner().invoke(main, ["generate", "--prompt", "a red circle", "--frames", "1", "--out", str(png)])
    assert res.exit_code == 0 and iio.imread(png).shape[:2] == (64, 64)


def test_bad_frames_and_unknown_model_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["generate", "--prompt", "x", "--frames", "8", "--out", str(tmp_path / "a.mp4")])
    assert res.exit_code == 2 and "1 + 8k" in res.output
    res = CliRunner().invoke(main, ["plan", "--model", "nope"])
    assert res.exit_code == 2 and res.output.startswith("ndopt: error: unknown model 'nope'")


def test_real_process_error_is_one_line_and_debug_shows_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: pyramid-flow-tiny\npasses: [nope]\n")
    p = subprocess.run([sys.executable, "-m", "ndopt.cli", "run", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert f"{bad}:3: passes[0]: unknown pass 'nope'" in p.stderr
    res = CliRunner().invoke(main, ["--debug", "run", str(bad)])  # (in process: a second interpreter costs ~8 s)
    assert type(res.exception).__name__ == "RecipeError"  # --debug lets it through, traceback and all


def test_listings():
    assert "dead_component_elimination" in CliRunner().invoke(main, ["passes"]).output
    out = CliRunner().invoke(main, ["targets"]).output
    assert "snapdragon-8-elite" in out and "snapdragon-x-elite" in out


@pytest.mark.parametrize("recipe", ["neodragon-8elite", "neodragon-xelite"])
def test_shipped_neodragon_recipes_compose_in_plan_mode(recipe, tmp_path):
    """Every pass of the paper's chain runs after the ones before it (structure only, meta device)."""
    from ndopt.runner import plan

    d = plan(recipe, report_dir=tmp_path)
    names = [p["name"] for p in d["passes"]]
    assert names[0] == "encoder_substitution" and names[-1] == "aimet_quantization"
    assert all(p["modified"] or p["name"] == "block_importance" for p in d["passes"])
    final = d["final"]
    assert "vae_encoder" not in final["params"] and final["dit_calls_per_video"] < d["dit_calls_per_video"] / 10
    assert d["estimates"][d["targets"][0]]["latency_s"] > 0
