"""schedule_folding: structure, fired, numerics (1e-5 relative), idempotence, errors; the call list."""

from __future__ import annotations

import pytest
import torch
from golden import check_golden

from ndopt.errors import NdoptError
from ndopt.frontends.pyramid_flow.dit import trace_dit
from ndopt.frontends.pyramid_flow.sampler import unroll
from ndopt.ir import verify
from ndopt.passmanager import PassContext
from passes.schedule_folding import ScheduleFolding


def _small(p):
    return p.replace(schedule=p.schedule.with_steps((2, 2, 2), (1, 1, 1)).with_frames(2))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_structure_golden(tiny, tmp_path):
    out = ScheduleFolding().run(tiny, PassContext(tmp_path)).pipeline
    verify(out)
    check_golden("tiny_after_schedule_folding.txt", out.summary())


def test_fired(tiny, tmp_path):
    res = ScheduleFolding().run(tiny, PassContext(tmp_path))
    # 20-20-20 and 10-10-10 share each stage's first and last timestep: 60 + 30 - 6 distinct values
    assert res.modified and res.metrics["table_rows"] == 84
    mlp = tiny["dit"].module.time_text_embed.timestep_embedder
    assert res.metrics["params_folded"] == sum(p.numel() for p in mlp.parameters())
    assert res.metrics["calls_unrolled"] == tiny.schedule.steps_per_video
    assert res.pipeline.schedule.folded and not tiny.schedule.folded
    assert any(p.name == "timestep_ratio" for p in tiny["dit"].inputs)  # input untouched


def test_matches_unfolded(tiny, tmp_path):
    p = _small(tiny)
    q = ScheduleFolding().run(p, PassContext(tmp_path)).pipeline
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = p.sampler.sample(p, ["a red circle"], generator=g())
    b = q.sampler.sample(q, ["a red circle"], generator=g())
    assert _rel(b, a) < 1e-5


def test_folded_dit_traces_and_matches_eager(tiny, tmp_path):
    q = ScheduleFolding().run(_small(tiny), PassContext(tmp_path)).pipeline
    sig = next(s for s in q.call_plan() if s.component == "dit" and s.key == "unit1/stage2")
    gm = trace_dit(q["dit"].module, sig.static_dict["layout"])
    inputs = sig.make_inputs("cpu", torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = q["dit"].call(**inputs)
        traced = gm(**{k: v for k, v in inputs.items() if k != "layout"})
    assert torch.allclose(eager, traced, atol=1e-6)
    assert not any("timestep_embedder" in str(n.target) for n in gm.graph.nodes)


def test_call_list_constants(tiny, tmp_path):
    q = ScheduleFolding().run(tiny, PassContext(tmp_path)).pipeline
    calls = unroll(q)
    assert len(calls) == 90 and calls[0]["timestep"] == 1000.0 and calls[0]["dt"] == pytest.approx(-1 / 19 * 0.999)
    entering = [c for c in calls if c["renoise"] and c["unit"] == 0]
    assert [[round(x, 3) for x in c["renoise"]] for c in entering] == [[0.6, 0.693], [0.75, 0.434]]
    assert {c["guidance_scale"] for c in calls if c["unit"] == 0} == {tiny.schedule.guidance.scale}


def test_idempotent_and_schedule_change_rejected(tiny, tmp_path):
    once = ScheduleFolding().run(tiny, PassContext(tmp_path)).pipeline
    assert not ScheduleFolding().run(once, PassContext(tmp_path)).modified
    changed = once.replace(schedule=once.schedule.with_steps((1, 1, 1)))
    with pytest.raises(NdoptError, match="schedule changed after schedule_folding"):
        changed.sampler.sample(changed, ["x"], generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception, match="extra|unknown|forbid"):
        ScheduleFolding({"steps": 1})
