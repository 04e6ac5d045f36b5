"""A whole pipeline in the upstream directory layout: written, loaded, and its errors."""

from __future__ import annotations

import pytest
import torch

from ndopt.errors import CheckpointError
from ndopt.frontends import load_model
from ndopt.frontends.pyramid_flow.checkpoint import load_state_dict
from ndopt.frontends.pyramid_flow.presets import save_checkpoint_dir


@pytest.fixture(scope="module")
def ckpt_dir(tiny, tmp_path_factory):
    return save_checkpoint_dir(tiny, tmp_path_factory.mktemp("pf") / "pyramid-flow-sd3")


def test_layout_and_full_key_set(ckpt_dir, tiny):
    for sub in ("diffusion_transformer_768p", "causal_video_vae", "text_encoder", "text_encoder_2",
                "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        assert (ckpt_dir / sub).is_dir(), sub
    sd = load_state_dict(ckpt_dir / "diffusion_transformer_768p")
    assert set(sd) == set(tiny["dit"].module.state_dict())
    vae = load_state_dict(ckpt_dir / "causal_video_vae")
    assert {k.split(".")[0] for k in vae} == {"encoder", "quant_conv", "post_quant_conv", "decoder"}


def test_loaded_pipeline_equals_the_saved_one(ckpt_dir, tiny):
    loaded = load_model(str(ckpt_dir))
    assert loaded.summary().split("\n", 1)[1] == tiny.summary().split("\n", 1)[1]
    assert loaded.sampler == tiny.sampler and loaded.schedule == tiny.schedule
    for name in ("dit", "vae_decoder", "vae_encoder", "text_encoder"):
        a, b = tiny[name].module.state_dict(), loaded[name].module.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    sch = tiny.schedule.with_steps((1, 1, 1)).with_frames(1)
    x = tiny.replace(schedule=sch)
    y = loaded.replace(schedule=sch)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = x.sampler.sample(x, ["a red circle"], generator=g())
    b = y.sampler.sample(y, ["a red circle"], generator=g())
    # same weights; transformers may pick another attention kernel on load: equal to float rounding
    assert (a - b).abs().max() / a.abs().max() < 1e-5


def test_truncated_dit_weights(ckpt_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt_dir, bad)
    f = bad / "diffusion_transformer_768p" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        load_model(str(bad))


def test_mismatched_dit_config_lists_keys(ckpt_dir, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt_dir, bad)
    cfg_path = bad / "diffusion_transformer_768p" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] += 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys.*transformer_blocks\.6\."):
        load_model(str(bad))


def test_wrong_variant_and_missing_dir(ckpt_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no diffusion_transformer_384p"):
        load_model(str(ckpt_dir), variant="384p")
