"""dead_component_elimination: structure, fired, numerics, idempotence, errors."""

from __future__ import annotations

import pytest
from golden import check_golden

from ndopt.errors import PassError
from ndopt.eval.probe import FidelityProbe, ProbeSettings
from ndopt.passmanager import PassContext, PassManager
from passes.dead_component_elimination import DeadComponentElimination


def _run(p, tmp_path, **cfg):
    return DeadComponentElimination(cfg).run(p, PassContext(run_dir=tmp_path))


def test_structure_golden(tiny, tmp_path):
    res = _run(tiny, tmp_path)
    check_golden("tiny_after_dce.txt", res.pipeline.summary())


def test_fired_removes_the_vae_encoder(tiny, tmp_path):
    res = _run(tiny, tmp_path)
    assert res.modified and res.metrics["removed"] == ["vae_encoder"]
    assert res.metrics["params_removed"] == tiny["vae_encoder"].params() > 0
    assert "vae_encoder" in tiny.components  # the input is untouched


def test_numerics_exactly_equal(tiny, tmp_path):
    probe = FidelityProbe(ProbeSettings(prompts=("a red circle moving left",), latent_frames=1, height=64, width=64))
    before = probe.outputs(tiny)
    after = probe.outputs(_run(tiny, tmp_path).pipeline)
    assert FidelityProbe.compare(after, before)["latent_rel_err"] == 0.0
    assert (after.video == before.video).all()


def test_idempotent(tiny, tmp_path):
    once = _run(tiny, tmp_path).pipeline
    twice = _run(once, tmp_path)
    assert not twice.modified and twice.pipeline is once and twice.metrics["removed"] == []


def test_keep_and_bad_config(tiny, tmp_path):
    with pytest.raises(PassError, match="unknown components \\['vae_enc'\\]"):
        _run(tiny, tmp_path, keep=["vae_enc"])
    with pytest.raises(Exception, match="kep"):
        DeadComponentElimination({"kep": []})


def test_in_pass_manager_with_provenance(tiny, tmp_path):
    final, records = PassManager([DeadComponentElimination()]).run(tiny, PassContext(run_dir=tmp_path))
    assert final.provenance[-1].name == "dead_component_elimination" and records[0].record["modified"]
    assert (tmp_path / "passes" / "01_dead_component_elimination" / "pipeline.txt").exists()
