"""The miniFLUX pipeline: presets, text encoder, sampling through the shared sampler, upstream checkpoints."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from ndopt.errors import CheckpointError, ConfigError
from ndopt.frontends.miniflux import presets
from ndopt.frontends.miniflux.sampler import IMAGE_SCALE, IMAGE_SHIFT, denormalize_latents, normalize_latents
from ndopt.frontends.pyramid_flow import vae as vae_mod
from ndopt.frontends.pyramid_flow.checkpoint import load_state_dict
from ndopt.frontends.pyramid_flow.presets import bundled_weights
from ndopt.frontends.pyramid_flow.sampler import PyramidFlowSampler, count_dit_calls
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.verify import verify

# transformers' CLIPTextModel and T5EncoderModel at the real configs on the meta device
# (bench/check_miniflux_upstream.py prints them): CLIP ViT-L/14 text tower, T5-XXL v1.1 encoder.
CLIP_L_PARAMS = 123_060_480
T5_XXL_ENCODER_PARAMS = 4_762_310_656


@pytest.fixture(scope="module")
def mf() -> Pipeline:
    return presets.build_preset(presets.TINY)


@pytest.fixture(scope="module")
def ckpt_dir(mf, tmp_path_factory):
    return presets.save_checkpoint_dir(mf, tmp_path_factory.mktemp("mf") / "pyramid-flow-miniflux")


def _fast(p: Pipeline, frames: int = 2) -> Pipeline:
    return p.replace(schedule=p.schedule.with_steps((1, 1, 1), (1, 1, 1)).with_frames(frames))


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_tiny_preset_is_seeded_and_reuses_the_trained_sd3_vae(mf):
    again = presets.build_preset(presets.TINY)
    for name in mf.components:
        a, b = mf[name].module.state_dict(), again[name].module.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other = presets.build_preset(presets.TINY, seed=1)["dit"].module.state_dict()
    assert not torch.equal(other["proj_out.weight"], mf["dit"].module.state_dict()["proj_out.weight"])
    assert mf["dit"].module.norm_out.linear.weight.abs().mean() > 0  # randomized, not upstream's zero init
    from safetensors.torch import load_file

    sd3 = {k[len("vae."):]: v for k, v in load_file(str(bundled_weights("pyramid-flow-tiny"))).items()
           if k.startswith("vae.")}
    ours = {**mf["vae_encoder"].module.state_dict(), **mf["vae_decoder"].module.state_dict()}
    assert ours.keys() == sd3.keys() and all(torch.equal(ours[k], sd3[k]) for k in sd3)


def test_tiny_samples_end_to_end_through_the_shared_sampler(mf):
    p = _fast(mf)
    verify(p)
    assert isinstance(p.sampler, PyramidFlowSampler)
    plan = p.call_plan()
    assert [n for n, _ in plan[0].args] == ["t5_ids", "t5_mask", "clip_l_ids"]  # no CLIP-G
    dit_calls = sum(s.count for s in plan if s.component == "dit")
    out = {}
    n = count_dit_calls(p, lambda: out.setdefault("z", p.sampler.sample(p, ["a red ball"], generator=_gen())))
    z = out["z"]
    assert n == dit_calls == 12  # 2 units x 3 stages x 1 step x (cond + uncond)
    assert z.shape == (1, 16, 2, 8, 8) and torch.isfinite(z).all() and z.std() > 0.1
    video = p.sampler.decode(p, z)
    assert video.shape == (1, 3, 9, 64, 64) and video.abs().max() <= 1
    again = p.sampler.sample(p, ["a red ball"], generator=_gen())
    assert torch.equal(again, z)


def test_latent_scaling_is_miniflux_s():
    z = torch.randn(1, 16, 3, 2, 2, generator=_gen())
    x = denormalize_latents(z)
    torch.testing.assert_close(x[:, :, 0], z[:, :, 0] * 1.8726 - 0.04)
    torch.testing.assert_close(x[:, :, 1:], z[:, :, 1:] * 3.0986 - 0.2343)
    torch.testing.assert_close(normalize_latents(x), z, atol=1e-6, rtol=0)
    assert (IMAGE_SHIFT, IMAGE_SCALE) != (vae_mod.IMAGE_SHIFT, vae_mod.IMAGE_SCALE)


def test_text_encoder_is_upstreams(mf):
    te = mf["text_encoder"].module
    tokens = te.tokenize(["a red ball", "a much longer prompt about a blue cube on a table"])
    assert tokens["t5_ids"].shape == (2, 128) and tokens["clip_l_ids"].shape == (2, 77)
    emb, mask, pooled = te.encode_tokens(**tokens)
    assert emb.shape == (2, 128, 64) and pooled.shape == (2, 32) and torch.equal(mask, tokens["t5_mask"])
    assert mask.dtype == torch.int64 and mask[0].sum() < mask[1].sum() < 128
    # CLIP-L's pooler_output: the final-norm state at the first end token (no projection, upstream)
    ids = tokens["clip_l_ids"]
    eos = (ids == te.text_encoder.config.eos_token_id).int().argmax(-1)
    hidden = te.text_encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(pooled, hidden[torch.arange(2), eos])
    assert type(te.text_encoder).__name__ == "CLIPTextModel"
    torch.testing.assert_close(emb, te.text_encoder_2(input_ids=tokens["t5_ids"], attention_mask=mask).last_hidden_state)


@pytest.mark.parametrize(("name", "size"), [("pyramid-flow-miniflux-384p", (384, 640)),
                                            ("pyramid-flow-miniflux-768p", (768, 1280))])
def test_real_presets_on_meta(name, size):
    p = presets.build_preset(name, "meta")
    assert p.is_meta
    te, dit = p["text_encoder"].module, p["dit"].module
    assert sum(x.numel() for x in dit.parameters()) == 1_972_059_200  # tests/frontends/test_miniflux_dit.py
    assert sum(x.numel() for x in te.text_encoder.parameters()) == CLIP_L_PARAMS
    assert sum(x.numel() for x in te.text_encoder_2.parameters()) == T5_XXL_ENCODER_PARAMS
    sch = p.schedule
    assert (sch.height, sch.width, sch.latent_frames) == (*size, 7)
    assert [s.steps for s in sch.stages] == [20, 20, 20] and [s.video_steps for s in sch.stages] == [10, 10, 10]
    assert (sch.guidance.scale, sch.guidance.video_scale) == (7.0, 5.0)
    assert p.frontend == presets.FRONTEND == "pyramid-flow-miniflux"
    assert set(p.components) == {"text_encoder", "dit", "vae_encoder", "vae_decoder"}


# upstream checkpoint directories ---------------------------------------------------------------------

def test_checkpoint_layout(ckpt_dir, mf):
    for sub in ("diffusion_transformer_768p", "causal_video_vae", "text_encoder", "text_encoder_2",
                "tokenizer", "tokenizer_2"):
        assert (ckpt_dir / sub).is_dir(), sub
    assert not (ckpt_dir / "text_encoder_3").exists()
    cfg = json.loads((ckpt_dir / "diffusion_transformer_768p" / "config.json").read_text())
    assert cfg["_class_name"] == "PyramidFluxTransformer" and (cfg["in_channels"], cfg["patch_size"]) == (64, 1)
    assert set(load_state_dict(ckpt_dir / "diffusion_transformer_768p")) == set(mf["dit"].module.state_dict())
    assert json.loads((ckpt_dir / "text_encoder" / "config.json").read_text())["architectures"] == ["CLIPTextModel"]


def test_checkpoint_round_trip(ckpt_dir, mf):
    loaded = presets.load_checkpoint_dir(ckpt_dir)
    assert loaded.summary().split("\n", 1)[1] == mf.summary().split("\n", 1)[1]
    assert loaded.sampler == mf.sampler and loaded.schedule == mf.schedule
    for name in mf.components:
        a, b = mf[name].module.state_dict(), loaded[name].module.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    x, y = _fast(mf, frames=1), _fast(loaded, frames=1)
    a = x.sampler.sample(x, ["a red circle"], generator=_gen())
    b = y.sampler.sample(y, ["a red circle"], generator=_gen())
    assert (a - b).abs().max() / a.abs().max() < 1e-5  # transformers may pick another attention kernel on load


def _edited(ckpt_dir, tmp_path, **changes):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt_dir, bad)
    path = bad / "diffusion_transformer_768p" / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, **{k: cfg[k] + v for k, v in changes.items()}}))
    return bad


def test_missing_and_extra_dit_keys_are_listed(ckpt_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"missing keys \(single_transformer_blocks\.2\."):
        presets.load_checkpoint_dir(_edited(ckpt_dir, tmp_path, num_single_layers=1))
    shutil.rmtree(tmp_path / "bad")
    with pytest.raises(CheckpointError, match=r"32 unexpected keys \(transformer_blocks\.1\."):
        presets.load_checkpoint_dir(_edited(ckpt_dir, tmp_path, num_layers=-1))


def test_checkpoint_config_errors(ckpt_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no diffusion_transformer_384p"):
        presets.load_checkpoint_dir(ckpt_dir, variant="384p")
    with pytest.raises(ConfigError, match="pooled_projection_dim = 40 but text_encoder/config.json hidden_size = 32"):
        presets.load_checkpoint_dir(_edited(ckpt_dir, tmp_path, pooled_projection_dim=8))


def test_save_refuses_what_upstream_would_load_differently(mf, tmp_path):
    from ndopt.frontends.miniflux.dit import PyramidFluxDiT

    odd = PyramidFluxDiT(dataclasses.replace(mf["dit"].module.config, use_temporal_causal=False))
    p = mf.replace(dit=dataclasses.replace(mf["dit"], module=odd))
    with pytest.raises(CheckpointError, match="use_temporal_causal=False"):
        presets.save_checkpoint_dir(p, tmp_path / "x")
    assert not (tmp_path / "x").exists()
