"""Bad checkpoints are refused with a CheckpointError naming the file and the field or tensor.

One tiny upstream-layout checkpoint per module (presets.save_checkpoint_dir); each case edits one config
or weight file of a hard-linked copy (an edit replaces the file, never writes through the link). Config
cases also check that nothing was built (the module constructors raise if called). The CLI cases run
`ndopt generate` in-process: exit 2, one `ndopt: error:` line on stderr, no output, checkpoint unchanged.
Upstream's loader overrides (build_pyramid_dit) are applied with a warning, and dit_config_json round-trips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ndopt.errors import CheckpointError, NdoptError
from ndopt.frontends import load_model
from ndopt.frontends.pyramid_flow import checkpoint as ckpt
from ndopt.frontends.pyramid_flow import dit as dit_mod
from ndopt.frontends.pyramid_flow import text as text_mod
from ndopt.frontends.pyramid_flow import vae as vae_mod
from ndopt.frontends.pyramid_flow.presets import dit_config_json, load_checkpoint_dir, save_checkpoint_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DIT = "diffusion_transformer_768p/config.json"
VAE = "causal_video_vae/config.json"
CLIP_L = "text_encoder/config.json"
CLIP_G = "text_encoder_2/config.json"
T5 = "text_encoder_3/config.json"
SAMPLER = "ndopt_sampler.json"
DIT_W = "diffusion_transformer_768p/diffusion_pytorch_model.safetensors"
VAE_W = "causal_video_vae/diffusion_pytorch_model.safetensors"
CLIP_G_W = "text_encoder_2/model.safetensors"
T5_W = "text_encoder_3/model.safetensors"
DROP = object()  # a key to remove


@pytest.fixture(scope="module")
def ckpt_dir(tiny, tmp_path_factory) -> Path:
    return save_checkpoint_dir(tiny, tmp_path_factory.mktemp("valid") / "pyramid-flow-sd3")


def _case(src: Path, tmp_path: Path) -> Path:
    """A copy of `src` made of hard links: edit it only with _replace (which unlinks first)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _edit_json(path: Path, changes: dict) -> None:
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    _replace(path, json.dumps(cfg).encode())


def _edit_tensors(path: Path, edit) -> None:
    sd = load_file(path)
    edit(sd)
    path.unlink()
    save_file(sd, path, metadata={"format": "pt"})


@pytest.fixture
def nothing_built(monkeypatch):
    """Building any component fails the test: a config error must come before."""
    def built(*_a, **_k):
        raise AssertionError("a module was built before the config was refused")

    monkeypatch.setattr(dit_mod.PyramidMMDiT, "__init__", built)
    monkeypatch.setattr(vae_mod.CausalVideoVAE, "__init__", built)
    monkeypatch.setattr(text_mod, "_load_model", built)


# ---- configs: a table of bad values per field ---------------------------------------------------------
CONFIG_CASES = [
    # the DiT's config.json
    (DIT, {"num_layers": "6"}, r'num_layers = "6" \(a string\): expected an integer >= 1'),
    (DIT, {"num_layers": 6.0}, r"num_layers = 6\.0 \(a number\): expected an integer"),
    (DIT, {"num_layers": 0}, r"num_layers = 0 .*>= 1"),
    (DIT, {"num_layers": 10**9}, r"num_layers = 1000000000 .*<= 4096"),
    (VAE, {"decoder_layers_per_block": [2, 2, 10**12, 2]}, r"decoder_layers_per_block\[2\] = 1000000000000"),
    (DIT, {"patch_size": True}, r"patch_size = true \(a boolean\)"),
    (DIT, {"num_attention_heads": [4]}, r"num_attention_heads = \[4\] \(a list\)"),
    (DIT, {"pooled_projection_dim": -64}, r"pooled_projection_dim = -64"),
    (DIT, {"joint_attention_dim": None}, r"joint_attention_dim = null"),
    (DIT, {"attention_head_dim": 31, "caption_projection_dim": 124}, r"attention_head_dim=31 must be even"),
    (DIT, {"num_attention_heads": 3}, r"caption_projection_dim=128 must equal .*num_attention_heads"),
    (DIT, {"sample_size": 1}, r"sample_size=1 is smaller than patch_size=2"),
    (DIT, {"qk_norm": "layer_norm"}, r'qk_norm = "layer_norm" .*"rms_norm" or null'),
    (DIT, {"pos_embed_type": "rope"}, r"'pos_embed_type'='rope' selects a path ndopt does not implement"),
    (DIT, {"use_rope_3d": True}, r"'use_rope_3d' is not a PyramidDiffusionMMDiT argument"),
    (DIT, {"in_channels": 8}, r"in_channels = 8 but causal_video_vae/config.json latent channels = 16"),
    (DIT, {"joint_attention_dim": 32}, r"joint_attention_dim = 32 but text_encoder_3/config.json d_model = 64"),
    # the VAE's config.json
    (VAE, {"encoder_block_out_channels": 8}, r"encoder_block_out_channels = 8 \(an integer\): expected a non-empty list"),
    (VAE, {"encoder_layers_per_block": [1, "1", 1, 1]}, r'encoder_layers_per_block\[1\] = "1"'),
    (VAE, {"decoder_layers_per_block": [1, 1, 0, 1]}, r"decoder_layers_per_block\[2\] = 0"),
    (VAE, {"encoder_layers_per_block": [1, 1, 1]}, r"encoder_layers_per_block: 3 entries"),
    (VAE, {"encoder_spatial_down_sample": [1, 1, 1, 0]}, r"encoder_spatial_down_sample\[0\] = 1 \(an integer\)"),
    (VAE, {"encoder_norm_num_groups": 0}, r"encoder_norm_num_groups = 0"),
    (VAE, {"decoder_norm_num_groups": 3}, r"multiple of decoder_norm_num_groups=3"),
    (VAE, {"encoder_out_channels": "16"}, r'encoder_out_channels = "16"'),
    (VAE, {"decoder_in_channels": 8}, r"encoder_out_channels=16 != decoder_in_channels=8"),
    (VAE, {"interpolate": "no"}, r'interpolate = "no" \(a string\): expected true or false'),
    (VAE, {"interpolate": True}, r"interpolate=True is not implemented"),
    (VAE, {"decoder_act_fn": "tanh"}, r"decoder_act_fn: 'tanh' is not one of"),
    (VAE, {"encoder_use_attention": False}, r"unknown keys \['encoder_use_attention'\]"),
    # the text encoders' config.json (transformers)
    (CLIP_L, {"num_hidden_layers": "2"}, r'num_hidden_layers = "2" \(a string\)'),
    (CLIP_L, {"num_attention_heads": 3}, r"num_attention_heads = 3 does not divide hidden_size = 32"),
    (CLIP_L, {"hidden_act": "nope"}, r'hidden_act = "nope": expected one of'),
    (CLIP_L, {"max_position_embeddings": 16}, r"max_position_embeddings = 16 is below the prompt length 77"),
    (CLIP_L, {"model_type": "t5"}, r'model_type = "t5" .*"clip_text_model"'),
    (CLIP_G, {"projection_dim": 0}, r"projection_dim = 0"),
    (CLIP_G, {"layer_norm_eps": -1e-5}, r"layer_norm_eps = -1e-05 \(a number\): expected a number > 0"),
    (CLIP_G, {"projection_dim": 16}, r"pooled_projection_dim = 64 but .*projection_dim = 48"),
    (CLIP_G, {"initializer_factor": "x"}, r"CLIPTextConfig refuses it: .*initializer_factor"),
    (T5, {"num_heads": "4"}, r'num_heads = "4" \(a string\)'),
    (T5, {"d_model": 64.5}, r"d_model = 64\.5"),
    (T5, {"num_layers": None}, r"num_layers = null"),
    (T5, {"feed_forward_proj": "gated-foo"}, r'feed_forward_proj = "gated-foo": expected "<act>" or "gated-<act>"'),
    (T5, {"dropout_rate": 2.0}, r"dropout_rate = 2\.0 .*<= 1"),
    # ndopt's sampler settings
    (SAMPLER, {"steps": [1, 2]}, r"steps = \[1, 2\] \(a list\): expected a list of 3 integers >= 1"),
    (SAMPLER, {"steps": 20}, r"steps = 20 \(an integer\)"),
    (SAMPLER, {"video_steps": [1, "2", 1]}, r'video_steps\[1\] = "2"'),
    (SAMPLER, {"video_steps": [0, 1, 1]}, r"video_steps\[0\] = 0"),
    (SAMPLER, {"guidance_scale": -1.0}, r"guidance_scale = -1\.0 \(a number\): expected a number >= 0"),
    (SAMPLER, {"guidance_scale": "7"}, r'guidance_scale = "7" \(a string\)'),
    (SAMPLER, {"video_guidance_scale": float("nan")}, r"video_guidance_scale = NaN"),
    (SAMPLER, {"height": 63}, r"height = 63: .*multiples of 64"),
    (SAMPLER, {"width": 0}, r"width = 0"),
    (SAMPLER, {"latent_frames": 1.5}, r"latent_frames = 1\.5"),
    (SAMPLER, {"negative_prompt": 3}, r"negative_prompt = 3 \(an integer\): expected a string or null"),
    (SAMPLER, {"fps": 24}, r"unknown key 'fps' \(known: height"),
]


@pytest.mark.usefixtures("nothing_built")
@pytest.mark.parametrize(("file", "changes", "match"), CONFIG_CASES,
                         ids=[f"{f.split('/')[0]}-{next(iter(c))}-{i}" for i, (f, c, _) in enumerate(CONFIG_CASES)])
def test_bad_config_value_is_refused(ckpt_dir, tmp_path, file, changes, match):
    d = _case(ckpt_dir, tmp_path)
    _edit_json(d / file, changes)
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(str(d))
    msg = str(e.value)
    assert str(d) in msg and file in msg, msg  # the file (or, for two files that disagree, both)
    assert "\n" not in msg


@pytest.mark.usefixtures("nothing_built")
@pytest.mark.parametrize("file", [DIT, VAE, T5, SAMPLER, "tokenizer_3/tokenizer_config.json"])
@pytest.mark.parametrize(("data", "match"), [(b'{"num_layers": 6,', r":1:\d+: malformed JSON"),
                                             (b"[1, 2]", r"must be a JSON object, found list"),
                                             (b'{"a": "\xff\xfe"}', r"is not UTF-8 text \(byte 0xff at offset 7\)")],
                         ids=["not-json", "not-object", "not-utf8"])
def test_unreadable_config_file_is_refused(ckpt_dir, tmp_path, file, data, match):
    d = _case(ckpt_dir, tmp_path)
    _replace(d / file, data)
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(str(d))
    assert str(d / file) in str(e.value)


def test_all_bad_fields_in_one_message(ckpt_dir, tmp_path):
    d = _case(ckpt_dir, tmp_path)
    _edit_json(d / DIT, {"num_layers": "6", "patch_size": 0, "in_channels": 16.0})
    with pytest.raises(CheckpointError) as e:
        load_model(str(d))
    assert all(f in str(e.value) for f in ('num_layers = "6"', "patch_size = 0", "in_channels = 16.0"))


def test_dit_config_error_is_a_checkpoint_error_and_a_value_error():
    assert issubclass(dit_mod.DiTConfigError, CheckpointError) and issubclass(dit_mod.DiTConfigError, ValueError)
    assert issubclass(vae_mod.VAEConfigError, CheckpointError) and issubclass(vae_mod.VAEConfigError, ValueError)


# ---- weights --------------------------------------------------------------------------------------------
def _int32(key):
    def edit(sd):
        sd[key] = (sd[key] * 100).to(torch.int32)
    return edit


def _poison(key, value, count=1):
    def edit(sd):
        flat = sd[key].reshape(-1)
        flat[:count] = value
    return edit


WEIGHT_CASES = [
    (DIT_W, _int32("proj_out.weight"), r"1 dtype mismatch \(proj_out\.weight: checkpoint int32 vs model float32\)"),
    (DIT_W, _poison("proj_out.weight", float("nan"), 3), r"'proj_out\.weight' \(float32, .*\) holds 3 NaN and 0 inf"),
    (DIT_W, _poison("pos_embed.pos_embed", float("inf")), r"'pos_embed\.pos_embed' .* holds 0 NaN and 1 inf"),
    (VAE_W, _int32("post_quant_conv.conv.weight"), r"post_quant_conv\.conv\.weight: checkpoint int32 vs model float32"),
    (VAE_W, _poison("decoder.conv_in.conv.bias", float("-inf"), 2), r"'decoder\.conv_in\.conv\.bias' .* 2 inf"),
    (T5_W, _int32("shared.weight"), r"dtype mismatch \(shared\.weight: checkpoint int32 vs model float32\)"),
    (CLIP_G_W, _poison("text_model.final_layer_norm.weight", float("nan")),
     r"'text_model\.final_layer_norm\.weight' .* holds 1 NaN"),
]


@pytest.mark.parametrize(("file", "edit", "match"), WEIGHT_CASES,
                         ids=["dit-int32", "dit-nan", "dit-buffer-inf", "vae-int32", "vae-inf", "t5-int32", "clip-nan"])
def test_bad_weights_are_refused(ckpt_dir, tmp_path, file, edit, match):
    d = _case(ckpt_dir, tmp_path)
    _edit_tensors(d / file, edit)
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(str(d))
    assert str((d / file).parent) in str(e.value)  # the file (NaN/inf) or the component directory (dtypes)


def test_every_dtype_mismatch_is_listed(ckpt_dir):
    sd = ckpt.load_state_dict(ckpt_dir / "diffusion_transformer_768p")
    sd["proj_out.weight"] = sd["proj_out.weight"].to(torch.int64)
    sd["proj_out.bias"] = sd["proj_out.bias"] > 0
    sd["norm_out.linear.weight"] = sd["norm_out.linear.weight"].half()  # float widths are interchangeable
    with torch.device("meta"):
        dit = dit_mod.PyramidMMDiT(dit_mod.MMDiTConfig.from_dict(ckpt.read_config(ckpt_dir / "diffusion_transformer_768p")))
    with pytest.raises(CheckpointError, match=r"2 dtype mismatches \(proj_out\.bias: checkpoint bool vs model "
                                              r"float32, proj_out\.weight: checkpoint int64 vs model float32\)"):
        ckpt.load_into(dit, dict(sorted(sd.items())), source="x", assign=True)
    with pytest.raises(CheckpointError, match="dtype mismatch"):  # strict=False loosens keys, not dtypes
        ckpt.load_into(dit, dict(sorted(sd.items())), source="x", assign=True, strict=False)


def test_overflow_of_the_load_dtype_is_named(ckpt_dir, tmp_path):
    d = _case(ckpt_dir, tmp_path)
    _edit_tensors(d / DIT_W, _poison("proj_out.bias", 1e6))
    with pytest.raises(CheckpointError, match=r"'proj_out\.bias' \(float16.*\): 1 of 64 values overflow float16 "
                                              r"\(they are finite as stored in float32\)"):
        ckpt.load_state_dict(d / "diffusion_transformer_768p", dtype=torch.float16)
    assert ckpt.load_state_dict(d / "diffusion_transformer_768p", dtype=torch.bfloat16)["proj_out.bias"].isfinite().all()


@pytest.fixture(scope="module")
def saved_dir(tiny, tmp_path_factory) -> Path:
    from ndopt.saved import save_pipeline

    path = tmp_path_factory.mktemp("saved") / "model"
    save_pipeline(tiny, path)
    return path


@pytest.mark.parametrize(("edit", "match"), [
    (_int32("dit.proj_out.weight"), r"1 dtype mismatches \(dit\.proj_out\.weight: saved int32 vs rebuilt float32\)"),
    (_poison("vae_decoder.post_quant_conv.conv.bias", float("nan")),
     r"model\.safetensors: tensor 'vae_decoder\.post_quant_conv\.conv\.bias' .* holds 1 NaN"),
], ids=["int32", "nan"])
def test_bad_weights_in_a_saved_pipeline(saved_dir, tmp_path, edit, match):
    from ndopt.saved import load_saved

    d = _case(saved_dir, tmp_path)
    _edit_tensors(d / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=match):
        load_saved(d)


def test_malformed_saved_index(saved_dir, tmp_path):
    from ndopt.saved import load_saved

    d = _case(saved_dir, tmp_path)
    (d / "model.safetensors.index.json").write_text('{"weight_map": []}')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: malformed shard index"):
        load_saved(d)


# ---- upstream's loader overrides -----------------------------------------------------------------------
@pytest.fixture
def ndopt_log(caplog, monkeypatch):
    """The ndopt logger's records, also after a CLI test in this process turned its propagation off."""
    monkeypatch.setattr(logging.getLogger("ndopt"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="ndopt"):
        yield caplog


def test_upstream_overrides_are_applied_with_a_warning(ckpt_dir, tmp_path, ndopt_log):
    # upstream's PyramidDiffusionMMDiT.__init__ defaults, which its build_pyramid_dit overrides
    d = _case(ckpt_dir, tmp_path)
    _edit_json(d / DIT, {"use_t5_mask": False, "add_temp_pos_embed": False, "temp_pos_embed_type": "sincos",
                         "use_temporal_causal": False, "interp_condition_pos": DROP})
    cfg = load_model(str(d))["dit"].module.config
    assert cfg.use_temporal_causal is True and cfg.interp_condition_pos is True
    [warning] = [r.getMessage() for r in ndopt_log.records if "build_pyramid_dit" in r.getMessage()]
    assert str(d / DIT) in warning and "overrides 4 of the file's values" in warning
    for part in ("use_t5_mask=False -> True", "add_temp_pos_embed=False -> True",
                 "temp_pos_embed_type='sincos' -> 'rope'", "use_temporal_causal=False -> True"):
        assert part in warning
    assert "interp_condition_pos" not in warning  # absent from the file: nothing disagrees


def test_override_of_a_non_bool_value_is_named(ndopt_log):
    cfg = dit_mod.MMDiTConfig.from_dict({"use_t5_mask": 1, "interp_condition_pos": "no"}, source="f.json")
    assert cfg == dit_mod.MMDiTConfig()
    assert "use_t5_mask=1 -> True, interp_condition_pos='no' -> True" in ndopt_log.text


def test_dit_config_json_round_trips_without_warnings(ndopt_log):
    for cfg in (dit_mod.MMDiTConfig(), dit_mod.tiny_config()):
        assert dit_mod.MMDiTConfig.from_dict(json.loads(json.dumps(dit_config_json(cfg)))) == cfg
    assert not ndopt_log.records
    with pytest.raises(CheckpointError, match=r"use_temporal_causal=False, but upstream's build_pyramid_dit loads "
                                              r"every SD3 DiT with use_temporal_causal=True"):
        dit_config_json(replace(dit_mod.tiny_config(), use_temporal_causal=False))


def test_a_dit_upstream_would_override_is_not_saved_in_its_layout(tiny):
    import copy

    from ndopt.frontends.pyramid_flow.saved_upstream import upstream_dit_reason

    dit = copy.copy(tiny["dit"].module)
    dit.config = replace(dit.config, use_temporal_causal=False)
    reason = upstream_dit_reason(tiny.replace(dit=tiny["dit"].with_module(dit)))
    assert reason is not None and "use_temporal_causal=False, which upstream's loader overrides" in reason
    assert upstream_dit_reason(tiny) is None


# ---- the CLI: one line, exit 2, nothing written ----------------------------------------------------------
def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("src", "file", "edit", "match"), [
    ("ckpt", DIT, lambda p: _edit_json(p, {"num_layers": "6"}), 'num_layers = "6"'),
    ("ckpt", SAMPLER, lambda p: _edit_json(p, {"guidance_scale": -2}), "guidance_scale = -2"),
    ("ckpt", DIT_W, lambda p: _edit_tensors(p, _int32("proj_out.weight")), "proj_out.weight: checkpoint int32"),
    ("ckpt", CLIP_G_W, lambda p: _edit_tensors(p, _poison("text_model.final_layer_norm.weight", float("nan"))),
     "holds 1 NaN"),
    ("saved", "model.safetensors", lambda p: _edit_tensors(p, _int32("dit.proj_out.weight")),
     "dit.proj_out.weight: saved int32"),
], ids=["dit-config", "sampler", "dit-int32", "clip-nan", "saved-int32"])
def test_cli_refuses_in_one_line(ckpt_dir, saved_dir, tmp_path, src, file, edit, match):
    from ndopt.cli import main

    d = tmp_path / "model"
    shutil.copytree(ckpt_dir if src == "ckpt" else saved_dir, d)  # a real copy: hashed before and after
    edit(d / file)
    before = _hashes(d)
    out = tmp_path / "o.mp4"
    res = CliRunner().invoke(main, ["generate", "--model", str(d), "--prompt", "x", "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ndopt: error:") and match in lines[0], res.stderr
    assert "Traceback" not in res.output and not res.stdout
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert _hashes(d) == before


def test_good_checkpoint_still_loads(ckpt_dir, tiny):
    loaded = load_checkpoint_dir(ckpt_dir)
    assert loaded.summary().split("\n", 1)[1] == tiny.summary().split("\n", 1)[1]
    with pytest.raises(NdoptError):  # and the variant that is not there is still named
        load_checkpoint_dir(ckpt_dir, variant="384p")
