"""cfg_folding: structure, fired, numerics (1e-5 relative), idempotence, errors; plan on 768p."""

from __future__ import annotations

import pytest
import torch
from golden import check_golden

from ndopt.errors import PassError
from ndopt.passmanager import PassContext
from passes.cfg_folding import CfgFolding


def _small(p, scale=None):
    sch = p.schedule.with_steps((2, 2, 2), (1, 1, 1)).with_frames(2)
    if scale is not None:
        from dataclasses import replace

        sch = replace(sch, guidance=replace(sch.guidance, scale=scale, video_scale=scale))
    return p.replace(schedule=sch)


def _latents(p):
    return p.sampler.sample(p, ["a red circle moving left"], generator=torch.Generator().manual_seed(0))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_structure_golden(tiny, tmp_path):
    out = CfgFolding().run(tiny, PassContext(tmp_path)).pipeline
    check_golden("tiny_after_cfg_folding.txt", out.summary())


def test_fired_halves_the_calls(tiny, tmp_path):
    res = CfgFolding().run(tiny, PassContext(tmp_path))
    assert res.modified and res.metrics["guidance"] == "cfg -> cfg_batched"
    assert res.metrics["dit_calls_per_video"] == "180 -> 90" and res.metrics["dit_batch"] == 2
    assert tiny.schedule.guidance.mode == "cfg"  # the input is untouched


def test_batched_matches_unfolded(tiny, tmp_path):
    p = _small(tiny)
    q = CfgFolding().run(p, PassContext(tmp_path)).pipeline
    assert _rel(_latents(q), _latents(p)) < 1e-5


def test_guidance_free_drops_the_unconditional_branch(tiny, tmp_path):
    p = _small(tiny, scale=1.0)
    res = CfgFolding().run(p, PassContext(tmp_path))
    q = res.pipeline
    assert q.schedule.guidance.mode == "none" and res.metrics["dit_calls_per_video"] == "18 -> 9"
    assert [s.count for s in q.call_plan() if s.component == "text_encoder"] == [1]
    assert _rel(_latents(q), _latents(p)) < 1e-5


def test_idempotent(tiny, tmp_path):
    once = CfgFolding().run(tiny, PassContext(tmp_path)).pipeline
    twice = CfgFolding().run(once, PassContext(tmp_path))
    assert not twice.modified and twice.pipeline is once


def test_errors(tiny, tmp_path):
    with pytest.raises(PassError, match="needs a guidance-free DiT"):
        CfgFolding({"mode": "drop"}).run(tiny, PassContext(tmp_path))
    with pytest.raises(Exception, match="mode"):
        CfgFolding({"mode": "sometimes"})


def test_plan_on_real_model():
    from ndopt.recipe import parse_recipe
    from ndopt.runner import plan

    r = parse_recipe("name: p\nmodel: pyramid-flow-sd3-768p\npasses: [cfg_folding]\n")
    d = plan(r)
    # 49 frames: (60 + 6 * 30) steps; CFG: 2 calls of batch 1 -> 1 call of batch 2, the same FLOPs
    assert d["dit_calls_per_video"] == 480 and d["passes"][0]["dit_calls_per_video"] == 240
    assert d["passes"][0]["flops_per_video"] == d["flops_per_video"]
    assert d["ratios"]["dit_calls_per_video"] == 2.0
