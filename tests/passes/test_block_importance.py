"""block_importance: structure, fired (scores, plot), numerics (output untouched, planted identity block
scored least), idempotence, errors, plan mode."""

from __future__ import annotations

import copy

import pytest
import torch
from golden import check_golden
from pydantic import ValidationError

from ndopt.errors import PassError
from ndopt.eval.probe import FidelityProbe, ProbeSettings
from ndopt.passmanager import PassContext, PassManager
from passes.block_importance import (
    ANALYSIS_KEY,
    CRITERIA,
    BlockImportance,
    BlockImportanceScores,
    CosineImportance,
    register_criterion,
)

FAST = {"prompts": ["a red circle moving left on a blue background", "a white square on a dark background"],
        "steps": [2, 2, 2]}


def _run(p, tmp_path, **cfg):
    return BlockImportance({**FAST, **cfg}).run(p, PassContext(run_dir=tmp_path))


def plant_identity(pipeline, block: int, scale: float = 1e-3):
    """A copy of the pipeline whose DiT block `block` barely changes either stream (its gates ~ 0)."""
    comp = pipeline["dit"]
    dit = copy.deepcopy(comp.module)
    b = dit.transformer_blocks[block]
    norms = [b.norm1] + ([] if b.context_pre_only else [b.norm1_context])
    with torch.no_grad():
        for norm in norms:
            lin, d = norm.linear, norm.linear.in_features
            for chunk in (2, 5):  # gate_msa and gate_mlp of adaLN-zero
                lin.weight[chunk * d:(chunk + 1) * d] *= scale
                lin.bias[chunk * d:(chunk + 1) * d] *= scale
    return pipeline.replace(dit=comp.with_module(dit))


def test_structure_golden(tiny, tmp_path):
    final, _ = PassManager([BlockImportance(FAST)]).run(tiny, PassContext(run_dir=tmp_path))
    check_golden("tiny_after_block_importance.txt", final.summary())


def test_fired_scores_plot_and_record(tiny, tmp_path):
    res = _run(tiny, tmp_path)
    rec = res.pipeline.analyses[ANALYSIS_KEY]
    assert not res.modified and isinstance(rec, BlockImportanceScores)
    assert rec.n_blocks == 6 and len(rec.scores) == 6 and len(rec.stage_scores) == 3
    assert all(0 <= s <= 2 for s in rec.scores) and res.metrics["scores"] == [round(s, 6) for s in rec.scores]
    assert res.metrics["dit_calls"] == 2 * 3 * 2  # CFG: two calls per step, 2 steps x 3 stages
    assert sorted(res.metrics["order"]) == list(range(6))
    png = res.artifacts["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res.artifacts["scores"].is_file()
    assert ANALYSIS_KEY not in tiny.analyses  # the input is untouched


@pytest.mark.parametrize("criterion", ["cosine", "relative_l2"])
def test_planted_identity_block_scores_least(tiny, tmp_path, criterion):
    planted = plant_identity(tiny, 3)
    res = _run(planted, tmp_path, criterion=criterion)
    rec = res.pipeline.analyses[ANALYSIS_KEY]
    assert rec.order()[0] == 3
    others = [s for i, s in enumerate(rec.scores) if i != 3]
    assert rec.scores[3] < 0.1 * min(others)


def test_numerics_output_untouched(tiny, tmp_path):
    probe = FidelityProbe(ProbeSettings(prompts=("a red circle moving left",), latent_frames=1))
    before = probe.outputs(tiny)
    after = probe.outputs(_run(tiny, tmp_path).pipeline)
    assert FidelityProbe.compare(after, before)["latent_rel_err"] == 0.0


def test_idempotent(tiny, tmp_path):
    once = _run(tiny, tmp_path)
    twice = _run(once.pipeline, tmp_path)
    assert not twice.modified and twice.metrics["scores"] == once.metrics["scores"]


def test_custom_criterion_is_pluggable(tiny, tmp_path):
    @register_criterion
    class Negated(CosineImportance):
        name = "negated_cosine"

        def statistic(self, x_in, x_out):
            return -super().statistic(x_in, x_out)

    try:
        res = _run(tiny, tmp_path, criterion="negated_cosine")
        cos = _run(tiny, tmp_path)
        assert res.metrics["scores"] == pytest.approx([-s for s in cos.metrics["scores"]], abs=1e-6)
    finally:
        CRITERIA.pop("negated_cosine")


def test_errors(tiny, tmp_path):
    with pytest.raises(ValidationError, match="unknown criterion"):
        BlockImportance({"criterion": "taylor"})
    with pytest.raises(ValidationError, match="steps"):
        BlockImportance({"steps": [0, 1, 1]})
    with pytest.raises(PassError, match="the schedule has 3"):
        _run(tiny, tmp_path, steps=[2, 2])
    with pytest.raises(PassError, match="no MMDiT"):
        BlockImportance(FAST).run(tiny.replace(remove=["dit"]), PassContext(run_dir=tmp_path))


def test_plan_mode_records_no_scores(tmp_path):
    from ndopt.frontends import load_model

    meta = load_model("pyramid-flow-sd3-768p", meta=True)
    res = BlockImportance().plan(meta, PassContext(run_dir=tmp_path, plan=True))
    rec = res.pipeline.analyses[ANALYSIS_KEY]
    assert rec.n_blocks == 24 and rec.scores is None
    with pytest.raises(PassError, match="plan mode"):
        rec.order()
