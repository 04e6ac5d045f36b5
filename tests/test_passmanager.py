"""The PassManager: plugins through entry points, requirements, instruments, fidelity contracts."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from ndopt.errors import FidelityError, PassError
from ndopt.eval.probe import FidelityInstrument, FidelityProbe, ProbeSettings
from ndopt.passmanager import (
    Exact,
    Lossy,
    Pass,
    PassConfig,
    PassContext,
    PassManager,
    PassResult,
    available_passes,
    check_requirements,
)
from passes.dead_component_elimination import DeadComponentElimination

PROBE = ProbeSettings(prompts=("a red circle moving left",), latent_frames=1, height=64, width=64)


def test_plugin_from_another_distribution_is_listed(plugin_site):
    env = {**os.environ, "PYTHONPATH": str(plugin_site)}
    out = subprocess.run([sys.executable, "-m", "ndopt.cli", "passes"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "demo_mark" in out and "ndopt_plugin_demo" in out and "dead_component_elimination" in out


def test_plugin_pass_runs_in_a_recipe(with_plugin, tmp_path):
    from ndopt.runner import run

    recipe = tmp_path / "plugin.yaml"
    recipe.write_text("name: plugin\nmodel: pyramid-flow-tiny\npasses:\n  - demo_mark: {label: hi}\n"
                      "  - demo_needs_mark\nprobe:\n  enabled: false\n")
    report = run(recipe, out=tmp_path / "run")
    assert [s["name"] for s in report["steps"]] == ["demo_mark", "demo_needs_mark"]
    assert report["steps"][1]["metrics"] == {"saw": "hi"}
    assert "demo_mark" in available_passes()


def test_requirements_are_checked_before_anything_runs(with_plugin):
    needs = available_passes()["demo_needs_mark"]()
    with pytest.raises(PassError, match="requires 'demo_marked'.*provided by 'demo_mark'"):
        check_requirements([DeadComponentElimination(), needs])
    check_requirements([available_passes()["demo_mark"](), needs])


class _Perturb(Pass):
    """Test pass: scales the DiT's output projection (lossy)."""

    name = "test_perturb"
    fidelity = Lossy(metric="latent_psnr", budget_db=30.0)

    class Config(PassConfig):
        scale: float = 1.5

    def run(self, pipeline, ctx):
        import copy

        dit = copy.deepcopy(pipeline["dit"].module)
        with torch.no_grad():
            dit.proj_out.weight.mul_(self.config.scale)
        return PassResult(pipeline.replace(dit=pipeline["dit"].with_module(dit)), modified=True)


class _FakeExact(_Perturb):
    """Test pass that claims to be exact but is not."""

    name = "test_fake_exact"
    fidelity = Exact(tolerance=1e-5)


def test_lossy_pass_over_budget_stops_or_warns(tiny, tmp_path, caplog):
    probe = FidelityProbe(PROBE)
    with pytest.raises(FidelityError, match="test_perturb.*below its budget 30.00 dB"):
        PassManager([_Perturb({"scale": 3.0})], [FidelityInstrument(probe, "stop")]).run(tiny, PassContext(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ndopt"):
        _, recs = PassManager([_Perturb({"scale": 3.0})], [FidelityInstrument(probe, "warn")]).run(
            tiny, PassContext(tmp_path))
    assert "below its budget" in caplog.text
    fid = recs[0].record["fidelity"]
    assert fid["contract"] == "lossy" and fid["vs_previous"]["latent_psnr"] < 30.0


def test_small_lossy_change_is_within_budget_and_reported(tiny, tmp_path):
    _, recs = PassManager([_Perturb({"scale": 1.001})], [FidelityInstrument(FidelityProbe(PROBE))]).run(
        tiny, PassContext(tmp_path))
    fid = recs[0].record["fidelity"]
    assert 30.0 < fid["vs_previous"]["latent_psnr"] < float("inf")
    assert fid["vs_original"] == fid["vs_previous"]
    # the video-level figures beside the clip's: one latent frame of one video frame here
    orig = fid["vs_original"]
    assert len(orig["pixel_psnr_frames"]) == 1 and orig["pixel_psnr_worst_frame"] == orig["pixel_psnr_first_frame"]
    assert fid["motion"]["wanted"] == ["left"] and len(fid["motion_original"]["found"]) == 1


def test_exact_pass_that_changes_numbers_fails(tiny, tmp_path):
    with pytest.raises(FidelityError, match="exact pass 'test_fake_exact'"):
        PassManager([_FakeExact()], [FidelityInstrument(FidelityProbe(PROBE))]).run(tiny, PassContext(tmp_path))


def test_debug_diff_instrument(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NDOPT_DEBUG", "1")
    with caplog.at_level(logging.INFO, logger="ndopt"):
        PassManager([DeadComponentElimination()]).run(tiny, PassContext(tmp_path))
    assert "-  vae_encoder [vae_encoder]" in caplog.text and "+provenance:" in caplog.text


def test_pass_that_lies_about_modifying_is_caught(tiny, tmp_path):
    class Liar(DeadComponentElimination):
        name = "test_liar"

        def run(self, pipeline, ctx):
            return PassResult(pipeline, modified=True)

    with pytest.raises(PassError, match="returned its input"):
        PassManager([Liar()]).run(tiny, PassContext(tmp_path))


def test_timing_and_provenance_recorded(tiny, tmp_path):
    final, recs = PassManager([DeadComponentElimination(), DeadComponentElimination()]).run(tiny, PassContext(tmp_path))
    assert [p.modified for p in final.provenance] == [True, False]
    assert all(r.record["seconds"] >= 0 for r in recs)


class _InPlace(_Perturb):
    """Test pass: returns a new pipeline whose DiT is the same object, its weight scaled in place
    (`modified` with the same components: the probe must notice the in-place change)."""

    name = "test_in_place"

    def run(self, pipeline, ctx):
        with torch.no_grad():
            pipeline["dit"].module.proj_out.weight.mul_(self.config.scale)
        return PassResult(pipeline.replace(), modified=True)


def test_probe_reuses_an_unchanged_sampled_pipeline_and_resamples_a_changed_one(tiny, tmp_path, monkeypatch):
    """After dead-component elimination the sampled components are the same objects: the probe's
    previous outputs stand (bit-identical to sampling again), and it samples nothing. A pass that
    changes a weight in place on the same module objects is sampled again."""
    import copy

    from ndopt.runner import with_steps

    tiny = with_steps(tiny, (2, 2, 2))  # few steps: the test counts samplings, not quality
    probe = FidelityProbe(PROBE)
    sampled = []
    real = probe.outputs
    monkeypatch.setattr(probe, "outputs", lambda pipe, progress=None: sampled.append(1) or real(pipe, progress))
    inst = FidelityInstrument(probe)
    final, recs = PassManager([DeadComponentElimination()], [inst]).run(tiny, PassContext(tmp_path))
    assert len(sampled) == 1 and inst.reused == 1  # the reference only
    fid = recs[0].record["fidelity"]
    assert "reused" in fid and fid["vs_previous"]["latent_rel_err"] == 0.0
    assert torch.equal(real(final).latents, inst.latest.latents)  # what sampling again would give

    mine = tiny.replace(dit=tiny["dit"].with_module(copy.deepcopy(tiny["dit"].module)))
    inst = FidelityInstrument(FidelityProbe(PROBE), "warn")
    _, recs = PassManager([_InPlace({"scale": 1.01})], [inst]).run(mine, PassContext(tmp_path))
    assert inst.reused == 0 and recs[0].record["fidelity"]["vs_previous"]["latent_rel_err"] > 0


def test_fingerprint_sees_in_place_and_structural_changes(tiny):
    import copy

    from ndopt.ir.fingerprint import module_identity

    dit = copy.deepcopy(tiny["dit"].module)
    fp = module_identity(dit)
    assert module_identity(dit) == fp
    with torch.no_grad():
        dit.proj_out.weight.add_(0.0)  # an in-place write, even of the same values
    assert module_identity(dit) != fp
    fp = module_identity(dit)
    dit.transformer_blocks = dit.transformer_blocks[:-1]
    assert module_identity(dit) != fp
    fp = module_identity(dit)
    dit.some_flag = True
    assert module_identity(dit) != fp


def test_frame_budget_catches_a_pass_that_breaks_one_frame(caplog):
    """A clip whose first latent frame is exact and whose last is off passes a clip-level budget but not
    a worst-frame one; a recipe's frame_budgets override the pass's."""
    from ndopt.eval.probe import ProbeOutput

    class _Breaks(_Perturb):
        name = "test_breaks"
        fidelity = Lossy(metric="latent_psnr", budget_db=20.0, frame_budget_db=18.0)

    g = torch.Generator().manual_seed(0)
    ref = ProbeOutput(torch.randn(1, 16, 4, 8, 8, generator=g), torch.rand(1, 3, 25, 16, 16, generator=g) * 2 - 1)
    lat = ref.latents.clone()
    lat[:, :, 3] += 1.6 * torch.randn(lat[:, :, 3].shape, generator=g)  # one frame ~ 15 dB, the clip ~ 21 dB
    out = ProbeOutput(lat, ref.video)
    probe = FidelityProbe(PROBE)
    step = probe.compare(out, ref)
    assert step["latent_psnr"] > 20.0 > 18.0 > step["latent_psnr_worst_frame"], step
    p = _Breaks()
    with pytest.raises(FidelityError, match=r"test_breaks.*latent_psnr_worst_frame .* below its budget 18\.00 dB"):
        FidelityInstrument(probe, "stop").compare_checked(out, ref, p, "lossy")
    assert FidelityInstrument(probe).contract(p) == {"metric": "latent_psnr", "budget_db": 20.0,
                                                     "frame_metric": "latent_psnr_worst_frame", "frame_budget_db": 18.0}
    loose = FidelityInstrument(probe, "stop", frame_budgets={"test_breaks": 10.0})
    assert loose.compare_checked(out, ref, p, "lossy")["latent_psnr_worst_frame"] < 18.0
    with caplog.at_level(logging.WARNING, logger="ndopt"):
        FidelityInstrument(probe, "warn").compare_checked(out, ref, p, "lossy")
    assert "latent_psnr_worst_frame" in caplog.text

    class _ClipOnly(_Perturb):  # the same pass without a frame budget: only the clip's figure is held
        name = "test_clip_only"
        fidelity = Lossy(metric="latent_psnr", budget_db=20.0)

    assert "frame_budget_db" not in FidelityInstrument(probe).contract(_ClipOnly())
    FidelityInstrument(probe, "stop").compare_checked(out, ref, _ClipOnly(), "lossy")


def test_report_cell_shows_both_budgets():
    from ndopt.report import _budget

    fid = {"metric": "latent_psnr", "budget_db": 20.0, "frame_metric": "latent_psnr_worst_frame",
           "frame_budget_db": 18.0, "vs_previous": {"latent_psnr": 21.0, "latent_psnr_worst_frame": 15.0}}
    assert _budget(fid) == ">= 20 dB ok, worst frame >= 18 dB **below**"
    assert _budget({k: v for k, v in fid.items() if "frame" not in k} | {"vs_previous": {"latent_psnr": 19.0}}) \
        == ">= 20 dB **below**"
