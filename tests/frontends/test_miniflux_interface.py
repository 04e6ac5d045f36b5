"""The miniFLUX frontend behind the model interface: which frontend claims which model, and the whole
Neodragon chain planned on the real-size 384p preset (meta device)."""

from __future__ import annotations

import json
import shutil

import pytest

from ndopt.errors import CheckpointError
from ndopt.frontends.miniflux import presets
from ndopt.frontends.miniflux.dit import PyramidFluxDiT
from ndopt.frontends.pyramid_flow.checkpoint import FLUX_DIT_CLASS, dit_class_name
from ndopt.model import frontend, frontend_of, load_model

MINIFLUX, SD3 = "pyramid-flow-miniflux", "pyramid-flow"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny preset written in upstream's miniFLUX layout (DiT config `_class_name` PyramidFluxTransformer)."""
    return presets.save_checkpoint_dir(presets.build_preset(presets.TINY), tmp_path_factory.mktemp("mf") / "ckpt")


def test_presets_belong_to_their_frontends():
    for name in (presets.TINY, presets.SMOKE, "pyramid-flow-miniflux-384p", "pyramid-flow-miniflux-768p"):
        assert frontend_of(name).name == MINIFLUX
    assert frontend_of("pyramid-flow-tiny").name == SD3 and frontend_of("pyramid-flow-sd3-smoke").name == SD3
    assert frontend(SD3).load(presets.TINY) is None and frontend(MINIFLUX).load("pyramid-flow-tiny") is None


def test_the_smoke_preset_keeps_every_real_width():
    smoke, real = (load_model(n, meta=True) for n in (presets.SMOKE, "pyramid-flow-miniflux-768p"))
    (sd, rd), (st, rt) = ((p["dit"].module.config for p in (smoke, real)),
                          (p["text_encoder"].module.config for p in (smoke, real)))
    assert (sd.num_layers, sd.num_single_layers) == (1, 1) and (rd.num_layers, rd.num_single_layers) == (8, 16)
    assert (sd.inner_dim, sd.joint_attention_dim, sd.pooled_projection_dim, sd.latent_channels) == (1920, 4096, 768, 16)
    assert sd == type(sd)(num_layers=1, num_single_layers=1) and rd == type(rd)()
    for key in ("d_model", "num_heads", "d_kv", "d_ff", "vocab_size"):
        assert st.t5[key] == rt.t5[key], key
    assert (st.t5["num_layers"], st.clip_l["num_hidden_layers"]) == (2, 2)
    assert st.clip_l["hidden_size"] == rt.clip_l["hidden_size"] == 768
    assert smoke["vae_decoder"].attrs["config"].decoder_block_out_channels == \
        real["vae_decoder"].attrs["config"].decoder_block_out_channels
    assert (smoke.schedule.height, smoke.schedule.width, smoke.schedule.latent_frames) == (64, 64, 2)


def test_a_miniflux_checkpoint_is_claimed_by_miniflux_only(ckpt):
    assert dit_class_name(ckpt, "768p") == FLUX_DIT_CLASS
    assert frontend(SD3).load(str(ckpt)) is None and frontend(SD3).load(str(ckpt), meta=True) is None
    p = load_model(str(ckpt))
    assert p.frontend == MINIFLUX and isinstance(p["dit"].module, PyramidFluxDiT) and not p.is_meta
    m = load_model(str(ckpt), meta=True)  # `ndopt plan --model DIR`: configs and tokenizers, no weights
    assert m.frontend == MINIFLUX and m.is_meta and m.summary() == p.summary()


def test_an_sd3_checkpoint_is_left_to_the_sd3_frontend(ckpt, tmp_path):
    sd3 = tmp_path / "sd3"
    shutil.copytree(ckpt, sd3)
    cfg = sd3 / "diffusion_transformer_768p" / "config.json"
    cfg.write_text(json.dumps({"_class_name": "PyramidDiffusionMMDiT", "num_layers": 2}))
    assert frontend(MINIFLUX).load(str(sd3)) is None
    with pytest.raises(CheckpointError, match="text_encoder_3"):  # SD3's loader claims it: its encoders are missing
        load_model(str(sd3))
    # a config without `_class_name` is told apart by its keys
    cfg.write_text(json.dumps({"num_layers": 2, "num_single_layers": 2}))
    assert dit_class_name(sd3, "768p") == FLUX_DIT_CLASS
    cfg.write_text(json.dumps({"num_layers": 2}))
    assert dit_class_name(sd3, "768p") is None and frontend(MINIFLUX).load(str(sd3)) is None


def test_the_neodragon_chain_plans_on_the_384p_preset(tmp_path):
    """Every pass's plan form on the real-size model (meta). One latent frame: the DiT's cost analysis
    runs once per call signature (3 here, 21 at the preset's 7 frames, ~4x the time)."""
    from ndopt.runner import plan

    d = plan("neodragon-8elite", model="pyramid-flow-miniflux-384p", report_dir=tmp_path, latent_frames=1)
    assert [p["name"] for p in d["passes"]] == [
        "encoder_substitution", "decoder_swap", "block_importance", "block_pruning", "step_distillation",
        "dead_component_elimination", "cfg_folding", "schedule_folding", "aimet_quantization"]
    assert all(p["modified"] or p["name"] == "block_importance" for p in d["passes"])
    pruning = d["passes"][3]["metrics"]
    assert pruning["blocks"] == [24, 18]  # 8 double + 16 single, keep 18 of Pyramid-Flow's 24
    final = d["final"]
    assert "vae_encoder" not in final["params"]
    assert (d["dit_calls_per_video"], final["dit_calls_per_video"]) == (120, 3)  # 20-20-20 with CFG -> 1-1-1 without
    assert final["params_total"] < d["params_total"] / 3  # T5-XXL -> DT5 + adapter dominates
    assert d["estimates"][d["targets"][0]]["latency_s"] > 0
