"""ndopt.train.objectives: pyramidal flow-matching inputs (seed eq. 6-7), distillation, VAE latent scale."""

from __future__ import annotations

import copy

import pytest
import torch

from ndopt.frontends.pyramid_flow.schedule import stage_timesteps
from ndopt.train.data import Batch, Example, collate, sample_seed
from ndopt.train.objectives import (
    Distillation,
    FeatureTap,
    PromptEncoder,
    PyramidalFlowMatching,
    StepInfo,
    latent_pyramid,
    pyramid_distillation_inputs,
    pyramid_flow_inputs,
    resize,
    stage_grid,
    standardize_latents,
)


def _batch(n: int, frames: int = 2, start: int = 0):
    g = torch.Generator().manual_seed(0)
    ex = [Example("a red circle moving left on a blue background", latents=torch.randn(16, frames, 8, 8, generator=g))
          for _ in range(n)]
    pos = list(range(start, start + n))
    return collate(ex, pos, [sample_seed(0, p) for p in pos])


class _Mods:
    def __init__(self, **m):
        self.m = m

    def __getitem__(self, k):
        return self.m[k]

    def __contains__(self, k):
        return k in self.m

    def raw(self, k):
        return self.m[k]


def test_stage_grid_matches_the_sampler_timesteps(tiny):
    for stage in tiny.schedule.stages:
        _, t = stage_grid(stage, torch.tensor([0, 999]))
        ends = stage_timesteps(stage, 2)
        assert t.tolist() == pytest.approx(ends, abs=1e-3)


def test_pyramid_inputs_follow_eq_6_7(tiny):
    sch = tiny.schedule
    b = _batch(6, frames=1)
    stages = pyramid_flow_inputs(b.latents, b, sch, StepInfo(0))
    assert [s.stage for s in stages] == [0, 1, 2] and all(len(s.rows) == 2 for s in stages)
    pyr = latent_pyramid(b.latents, 3)
    last = stages[2]
    x = last.sample[-1]
    assert x.shape[-2:] == (8, 8) and stages[0].sample[-1].shape[-2:] == (2, 2)
    # stage 2 ends at the clean latent: noisy - (1 - r) * clean = r * start, and target = start - clean
    r = last.ratio.view(-1, 1, 1, 1, 1)
    start = last.target + pyr[2][last.rows]
    assert torch.allclose(x, r * start + (1 - r) * pyr[2][last.rows], atol=1e-5)
    # start of stage 2 = s_start * eps + (1 - s_start) * Up(Down(z)) (eq. 6): subtract the signal, the
    # rest is block-constant noise scaled by sigma_start
    st = sch.stages[2]
    up = resize(pyr[1][last.rows], 8, 8, "nearest")
    eps = (start - (1 - st.sigma_start) * up) / st.sigma_start
    assert 0.5 < eps.std() < 1.5


def test_inputs_are_per_sample_whatever_the_split(tiny):
    b = _batch(6, frames=2)
    whole = pyramid_flow_inputs(b.latents, b, tiny.schedule, StepInfo(3))
    half = collate([Example(c, latents=lat) for c, lat in zip(b.captions[3:], b.latents[3:])],
                   b.indices[3:].tolist(), b.seeds[3:].tolist())
    part = pyramid_flow_inputs(half.latents, half, tiny.schedule, StepInfo(3))
    w = {int(b.indices[r]): (s.stage, s.sample[-1][k], s.target[k]) for s in whole for k, r in enumerate(s.rows)}
    for s in part:
        for k, r in enumerate(s.rows):
            stage, x, t = w[int(half.indices[r])]
            assert stage == s.stage and torch.equal(x, s.sample[-1][k]) and torch.equal(t, s.target[k])


def test_history_clips_for_the_second_latent_frame(tiny):
    b = _batch(3, frames=2)
    units = set()
    for step in range(8):
        for s in pyramid_flow_inputs(b.latents, b, tiny.schedule, StepInfo(step)):
            units.add(s.unit)
            if s.unit == 1:
                assert len(s.sample) == 2 and s.sample[0].shape[2] == 1  # one history frame
    assert units == {0, 1}


def test_video_prob_weights_the_later_frames(tiny):
    """video_prob=None draws units uniformly (upstream); 1.0 trains only later frames, 0.0 only the first,
    and 0.75 about three in four."""
    b = _batch(3, frames=3)

    def units(prob, steps=40):
        return [s.unit for step in range(steps)
                for s in pyramid_flow_inputs(b.latents, b, tiny.schedule, StepInfo(step), video_prob=prob)]

    assert set(units(1.0)) == {1, 2} and set(units(0.0)) == {0}
    assert set(units(None)) == {0, 1, 2}
    later = sum(u > 0 for u in units(0.75, 200)) / len(units(0.75, 200))
    assert 0.65 < later < 0.85


def test_flow_matching_loss_and_prompt_encoder_cut(tiny):
    te = tiny["text_encoder"].module
    full, short = te(["a red circle", ""]), PromptEncoder(te, 16)(["a red circle", ""])
    assert torch.equal(full[0][:, :16], short[0]) and torch.equal(full[2], short[2])
    mods = _Mods(dit=tiny["dit"].module, text_encoder=PromptEncoder(te, 16))
    out = PyramidalFlowMatching(tiny.schedule)(mods, _batch(3), StepInfo(0))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and "loss_stage2" in out.metrics


def test_distillation_of_a_copy_is_zero_and_features_are_tapped(tiny):
    dit = tiny["dit"].module
    student = copy.deepcopy(dit)
    mods = _Mods(dit=student, teacher=dit, text_encoder=PromptEncoder(tiny["text_encoder"].module, 16))
    obj = Distillation("dit", "teacher", pyramid_distillation_inputs(tiny.schedule),
                       feature_weight=1.0, features=(("transformer_blocks.0", "transformer_blocks.0"),))
    out = obj(mods, _batch(3, frames=1), StepInfo(0))
    assert out.metrics["output_mse"] == 0.0 and out.metrics["feature_mse"] == 0.0
    with torch.no_grad():
        student.transformer_blocks[0].ff.net[2].bias.add_(0.1)
    out = obj(mods, _batch(3, frames=1), StepInfo(0))
    assert out.metrics["feature_mse"] > 0 and out.metrics["output_mse"] > 0
    with pytest.raises(Exception, match="no submodule"):
        FeatureTap(student, ["transformer_blocks.99"])


def test_standardize_latents_is_exact(tiny):
    enc, dec = copy.deepcopy(tiny["vae_encoder"].module), copy.deepcopy(tiny["vae_decoder"].module)
    video = torch.rand(2, 3, 9, 64, 64) * 2 - 1
    with torch.no_grad():
        before = dec(enc(video))
        standardize_latents(enc, dec, video)
        z = enc(video)
        after = dec(z)
    zc = z.transpose(0, 1).flatten(1)
    assert torch.allclose(zc.std(1), torch.full((16,), 2.39), rtol=1e-3)
    assert torch.allclose(zc.mean(1), torch.zeros(16), atol=1e-4)
    assert torch.allclose(before, after, atol=1e-4)


def test_vae_chroma_weight_prices_hue_errors_not_brightness_errors():
    """`chroma_weight` adds the error's RGB-minus-mean part: a brightness shift (equal in R, G, B)
    costs nothing extra, a hue shift of the same size does."""
    from ndopt.train.objectives import VAEReconstruction

    video = torch.zeros(1, 3, 1, 8, 8)
    batch = Batch(["x"], video, None, torch.tensor([0]), torch.tensor([0]))
    shifts = {"brightness": torch.tensor([0.3, 0.3, 0.3]), "hue": torch.tensor([0.3, -0.3, 0.3])}

    def loss(chroma: float, shift: torch.Tensor) -> float:
        mods = _Mods(vae_encoder=lambda v: torch.randn(1, 4, 1, 2, 2),
                     vae_decoder=lambda z: video + shift.view(1, 3, 1, 1, 1))
        return float(VAEReconstruction(0.0, chroma_weight=chroma)(mods, batch, StepInfo(0)).loss)

    for name, s in shifts.items():
        extra = loss(3.0, s) - loss(0.0, s)
        assert (extra == pytest.approx(0.0, abs=1e-7)) == (name == "brightness"), (name, extra)
