"""The pyramidal sampler: upstream schedule constants, history layout, determinism, call counts, fx."""

from __future__ import annotations

import pytest
import torch

from ndopt.frontends.pyramid_flow.dit import trace_dit
from ndopt.frontends.pyramid_flow.sampler import block_noise, count_dit_calls, history_clips
from ndopt.frontends.pyramid_flow.schedule import GAMMA, pyramid_stages, renoise_coefficients


def test_stage_windows_and_renoise_match_upstream():
    # REFERENCE.md: windows 1000->744, 744->386, 386->~0; renoise (0.600, 0.693) and (0.750, 0.434)
    s = pyramid_stages()
    assert [round(x.timestep_start) for x in s] == [1000, 744, 386]
    assert [round(x.timestep_end) for x in s] == [744, 386, 1]
    assert [round(x, 3) for x in renoise_coefficients(s[1], GAMMA)] == [0.6, 0.693]
    assert [round(x, 3) for x in renoise_coefficients(s[2], GAMMA)] == [0.75, 0.434]
    assert [x.scale for x in s] == [0.25, 0.5, 1.0]


def test_history_follows_upstream_temporal_pyramid():
    # (first frame, frames, stage): nearest frame at the current stage, older ones a stage lower each,
    # then everything older at stage 0 in one clip
    assert history_clips(0, 2, 3) == []
    assert history_clips(1, 2, 3) == [(0, 1, 2)]
    assert history_clips(2, 2, 3) == [(0, 1, 1), (1, 1, 2)]
    assert history_clips(5, 2, 3) == [(0, 3, 0), (3, 1, 1), (4, 1, 2)]
    assert history_clips(5, 0, 3) == [(0, 4, 0), (4, 1, 0)]
    assert history_clips(3, 1, 3) == [(0, 2, 0), (2, 1, 1)]


def test_block_noise_covariance():
    g = torch.Generator().manual_seed(0)
    n = block_noise((1, 1, 1, 256, 256), GAMMA, g)
    blocks = n.reshape(128, 2, 128, 2).permute(0, 2, 1, 3).reshape(-1, 4)
    cov = torch.cov(blocks.T)
    want = torch.eye(4) * (1 + GAMMA) - GAMMA
    assert torch.allclose(cov, want, atol=0.03)


def _small(tiny):
    sch = tiny.schedule.with_steps((2, 2, 2), (1, 1, 1))
    return tiny.replace(schedule=sch.with_frames(3))


def test_deterministic_for_a_seed_and_different_across_seeds(tiny):
    p = _small(tiny)
    a = p.sampler.sample(p, ["a red circle"], generator=torch.Generator().manual_seed(1))
    b = p.sampler.sample(p, ["a red circle"], generator=torch.Generator().manual_seed(1))
    c = p.sampler.sample(p, ["a red circle"], generator=torch.Generator().manual_seed(2))
    assert a.shape == (1, 16, 3, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)


def test_one_generator_per_sample(tiny):
    """Per-row generators: a sample's noise is its own generator's, whatever batch it is drawn in (what a
    distillation bank replays); one generator given per row draws what that one generator draws."""
    from ndopt.errors import NdoptError

    p = _small(tiny).replace(schedule=_small(tiny).schedule.with_guidance("none"))

    def g(seed):
        return torch.Generator().manual_seed(seed)

    with torch.no_grad():
        pair = p.sampler.sample(p, ["a red circle", "a blue ring"], generator=[g(3), g(4)])
        alone = p.sampler.sample(p, ["a blue ring"], generator=[g(4)])
        shared = g(5)
        rows = p.sampler.sample(p, ["a red circle", "a blue ring"], generator=[shared, shared])
        one = p.sampler.sample(p, ["a red circle", "a blue ring"], generator=g(5))
    assert torch.allclose(pair[1:], alone, atol=1e-5) and not torch.allclose(pair[:1], alone, atol=1e-2)
    assert torch.allclose(rows, one, atol=1e-6)
    with pytest.raises(NdoptError, match="one per sample"):
        p.sampler.sample(p, ["a red circle", "a blue ring"], generator=[g(3)])


@pytest.mark.parametrize("mode", ["cfg", "cfg_batched", "none"])
def test_dit_calls_counted_equal_the_plan(tiny, mode):
    p = _small(tiny)
    p = p.replace(schedule=p.schedule.with_guidance(mode))
    n = count_dit_calls(p, lambda: p.sampler.sample(p, ["a red circle"], generator=torch.Generator().manual_seed(0)))
    planned = sum(s.count for s in p.call_plan() if s.component == "dit")
    assert n == planned == p.schedule.dit_calls_per_video == (6 + 2 * 3) * (2 if mode == "cfg" else 1)


def test_cfg_batched_equals_separate_calls(tiny):
    p = _small(tiny)
    run = {}
    for mode in ("cfg", "cfg_batched"):
        q = p.replace(schedule=p.schedule.with_guidance(mode))
        run[mode] = q.sampler.sample(q, ["a red circle"], generator=torch.Generator().manual_seed(0))
    rel = (run["cfg"] - run["cfg_batched"]).abs().max() / run["cfg"].abs().max()
    assert rel < 1e-5  # batched GEMMs round differently; relative to the latents' range


def test_fx_traces_the_dit_at_every_call_signature(tiny):
    dit = tiny["dit"]
    g = torch.Generator().manual_seed(0)
    for sig in (s for s in tiny.call_plan() if s.component == "dit"):
        layout = sig.static_dict["layout"]
        gm = trace_dit(dit.module, layout)
        gm.graph.lint()
        inputs = sig.make_inputs("cpu", g)
        inputs["encoder_attention_mask"][:, 20:] = 0  # real padding
        with torch.no_grad():
            eager = dit.call(**inputs)
            traced = gm(**{k: v for k, v in inputs.items() if k != "layout"})
        assert torch.allclose(traced, eager, atol=1e-6, rtol=1e-6), sig.key


def test_schedule_drives_the_sampler(tiny):
    """A pass that changes the schedule changes what the sampler does (fewer calls, other output)."""
    p = _small(tiny)
    q = p.replace(schedule=p.schedule.with_steps((1, 1, 1)))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    n = count_dit_calls(q, lambda: q.sampler.sample(q, ["a red circle"], generator=g()))
    assert n == 3 * 3 * 2
    assert not torch.equal(p.sampler.sample(p, ["x"], generator=g()), q.sampler.sample(q, ["x"], generator=g()))
