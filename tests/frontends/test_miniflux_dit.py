"""Tests of the Pyramid-Flow miniFLUX DiT (ndopt/frontends/miniflux/dit.py, layers.py)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ndopt.frontends.miniflux.dit import (
    DiTConfigError,
    FluxDiTConfig,
    PyramidFluxDiT,
    dit_block_names,
    fold_timestep_embedding,
    keep_blocks,
    tiny_config,
    trace_dit,
)
from ndopt.frontends.miniflux.layers import (
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    rope_ids,
    rope_table,
)
from ndopt.frontends.pyramid_flow.dit import DiTLayout, frame_ids, joint_attention_mask, randomize_
from ndopt.frontends.pyramid_flow.dit_layers import apply_rope

# Upstream's own PyramidFluxTransformer at the released miniFLUX config, built on the meta device and counted:
#   PYTHONPATH=<dir with einops, optional> .venv/bin/python bench/check_miniflux_upstream.py
# (git archive of jy0205/Pyramid-Flow HEAD 3040d71, flux_modules imported with a stub trainer_misc).
UPSTREAM_PARAMS = 1_972_059_200
UPSTREAM_KEYS = 496
UPSTREAM_DOUBLE_BLOCK = 132_768_256
UPSTREAM_SINGLE_BLOCK = 55_317_248

LAYOUTS = [((1, 8, 8),), ((1, 4, 4), (1, 8, 8), (1, 8, 8)), ((2, 4, 6), (1, 8, 12), (2, 8, 12))]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def tiny() -> PyramidFluxDiT:
    torch.manual_seed(0)
    return randomize_(PyramidFluxDiT(tiny_config()), _gen(0)).eval()


def _inputs(cfg: FluxDiTConfig, clips, batch: int = 2, text_len: int = 7, seed: int = 1):
    g = _gen(seed)
    sample = [torch.randn(batch, cfg.in_channels, *c, generator=g) for c in clips]
    ehs = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, 5:] = 0  # CFG-like batch: rows padded differently
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    return sample, ehs, mask, pooled, torch.linspace(900.0, 100.0, batch)


# 1. size and names, on the meta device ----------------------------------------------------------

def test_real_size_equals_upstream_on_meta():
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock as RefSingle
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock as RefDouble

    with torch.device("meta"):
        dit = PyramidFluxDiT(FluxDiTConfig())
        ref_double, ref_single = RefDouble(1920, 30, 64), RefSingle(1920, 30, 64)
    assert all(p.is_meta for p in dit.parameters())
    assert (_numel(dit), len(dit.state_dict())) == (UPSTREAM_PARAMS, UPSTREAM_KEYS)
    assert _numel(dit.transformer_blocks[0]) == UPSTREAM_DOUBLE_BLOCK == _numel(ref_double)
    assert _numel(dit.single_transformer_blocks[0]) == UPSTREAM_SINGLE_BLOCK == _numel(ref_single)
    assert (dit.config.in_channels, dit.config.patch_size, dit.config.packed_channels) == (16, 2, 64)


def _upstream_keys(cfg: FluxDiTConfig) -> set[str]:
    """Read off upstream modeling_pyramid_flux.py / modeling_flux_block.py (Attention's module names)."""
    top = ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
           "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
           "context_embedder", "x_embedder", "norm_out.linear", "proj_out"]
    double = ["norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj",
              "attn.add_v_proj", "attn.add_q_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
              "ff_context.net.0.proj", "ff_context.net.2"]
    single = ["norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v"]
    keys = {f"{m}.{p}" for m in top for p in ("weight", "bias")}
    for i in range(cfg.num_layers):
        keys |= {f"transformer_blocks.{i}.{m}.{p}" for m in double for p in ("weight", "bias")}
        keys |= {f"transformer_blocks.{i}.attn.{n}.weight" for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")}
    for i in range(cfg.num_single_layers):
        keys |= {f"single_transformer_blocks.{i}.{m}.{p}" for m in single for p in ("weight", "bias")}
        keys |= {f"single_transformer_blocks.{i}.attn.{n}.weight" for n in ("norm_q", "norm_k")}
    return keys


def test_state_dict_keys_equal_upstream(tiny):
    assert set(tiny.state_dict()) == _upstream_keys(tiny.config)
    with torch.device("meta"):
        sd = PyramidFluxDiT(FluxDiTConfig()).state_dict()
    assert set(sd) == _upstream_keys(FluxDiTConfig())
    assert sd["x_embedder.weight"].shape == (1920, 64) and sd["proj_out.weight"].shape == (64, 1920)
    assert sd["context_embedder.weight"].shape == (1920, 4096)
    assert sd["time_text_embed.text_embedder.linear_1.weight"].shape == (1920, 768)
    assert sd["single_transformer_blocks.15.proj_out.weight"].shape == (1920, 1920 * 5)
    assert sd["transformer_blocks.7.attn.norm_added_k.weight"].shape == (64,)


def test_upstream_init_zeroes_output():
    cfg = tiny_config()
    dit = PyramidFluxDiT(cfg).eval()
    assert all(not b.norm.linear.weight.any() for b in dit.single_transformer_blocks)
    with torch.no_grad():
        out = dit(*_inputs(cfg, LAYOUTS[1]))
    assert out.shape == (2, 16, 1, 8, 8) and not out.any()


# 2. blocks == diffusers' FLUX blocks (upstream's blocks minus masks and stage bookkeeping) ---------------

def _diffusers_rope(layout: DiTLayout) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    return FluxPosEmbed(theta=10000, axes_dim=[16, 24, 24])(rope_ids(layout))


def test_rope_table_equals_diffusers_flux_pos_embed():
    layout = DiTLayout(batch=1, text_len=3, clips=((2, 4, 4), (1, 8, 8)))
    cos, sin = _diffusers_rope(layout)
    ours = rope_table(rope_ids(layout), (16, 24, 24))
    torch.testing.assert_close(ours[0].repeat_interleave(2, -1), cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[1].repeat_interleave(2, -1), sin, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["double", "single"])
def test_block_matches_diffusers(kind):
    from diffusers.models.transformers import transformer_flux as ref_mod

    dim, heads, head_dim = 128, 2, 64
    layout = DiTLayout(batch=2, text_len=6, clips=((1, 8, 8),))  # no padding, one frame: the mask is all-true
    ours_cls, ref_cls = ((FluxTransformerBlock, ref_mod.FluxTransformerBlock) if kind == "double"
                         else (FluxSingleTransformerBlock, ref_mod.FluxSingleTransformerBlock))
    ours = randomize_(ours_cls(dim, heads, head_dim), _gen(3)).eval()
    ref = ref_cls(dim, heads, head_dim).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # the same names as diffusers
    g = _gen(4)
    x, c = torch.randn(2, layout.tokens, dim, generator=g), torch.randn(2, layout.text_len, dim, generator=g)
    temb = torch.randn(2, dim, generator=g)
    rope = rope_table(rope_ids(layout), (16, 24, 24))
    with torch.no_grad():
        c_ref, x_ref = ref(x, c, temb, image_rotary_emb=_diffusers_rope(layout))
        if kind == "double":
            c_ours, x_ours = ours(x, c, temb, None, rope)
        else:
            joint = ours(torch.cat([c, x], dim=1), temb, None, rope)
            c_ours, x_ours = joint[:, :layout.text_len], joint[:, layout.text_len:]
    torch.testing.assert_close(x_ours, x_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c_ours, c_ref, atol=1e-6, rtol=1e-6)
    assert x_ours.abs().mean() > 0.1  # the weights are not trivial


# 3. RoPE ids, table and mask against upstream's formulas ---------------------------------------------

def _upstream_image_ids(t, h, w, train_h, train_w, start):
    """Re-typed upstream `_prepare_image_ids` (batch 1, rearrange as reshape)."""
    ids = torch.zeros(t, h, w, 3)
    ids[..., 0] = ids[..., 0] + torch.arange(start, start + t)[:, None, None]
    hp = (F.interpolate(torch.arange(train_h)[None, None, :].float(), h, mode="linear").squeeze(0, 1)
          if h != train_h else torch.arange(train_h).float())
    ids[..., 1] = ids[..., 1] + hp[None, :, None]
    wp = (F.interpolate(torch.arange(train_w)[None, None, :].float(), w, mode="linear").squeeze(0, 1)
          if w != train_w else torch.arange(train_w).float())
    ids[..., 2] = ids[..., 2] + wp[None, None, :]
    return ids.reshape(1, t * h * w, 3)


def _upstream_rope(ids: torch.Tensor, axes=(16, 24, 24)) -> torch.Tensor:
    """Re-typed upstream `EmbedND` / `rope()`: [B, S, 1, D/2, 2, 2] of [[cos, -sin], [sin, cos]]."""
    parts = []
    for i, dim in enumerate(axes):
        omega = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        out = torch.einsum("...n,d->...nd", ids[..., i], omega)
        parts.append(torch.stack([out.cos(), -out.sin(), out.sin(), out.cos()], -1).view(1, -1, dim // 2, 2, 2).float())
    return torch.cat(parts, dim=-3).unsqueeze(2)


@pytest.mark.parametrize("clips", LAYOUTS)
def test_rope_ids_and_rotation_match_upstream(clips):
    layout = DiTLayout(batch=1, text_len=5, clips=clips)
    _, th, tw = clips[-1]
    ref_ids, start = [torch.zeros(1, 5, 3)], 0
    for t, h, w in clips:
        ref_ids.append(_upstream_image_ids(t, h // 2, w // 2, th // 2, tw // 2, start))
        start += t
    ref_ids = torch.cat(ref_ids, dim=1)
    assert torch.equal(rope_ids(layout), ref_ids[0])
    assert torch.equal(frame_ids(layout, torch.device("cpu")), ref_ids[0, :, 0])  # the causal order ids
    x = torch.randn(1, layout.seq_len, 2, 64, generator=_gen(5))                   # [B, S, H, D]
    freqs = _upstream_rope(ref_ids)
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2)
    ref = (freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]).reshape(x.shape)
    ours = apply_rope(x.transpose(1, 2), rope_table(rope_ids(layout), (16, 24, 24))).transpose(1, 2)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_history_positions_are_resampled():
    ids = rope_ids(DiTLayout(batch=1, text_len=0, clips=((1, 4, 4), (1, 8, 8))))
    # the 2x2 history grid spans the current 4x4 grid: linear resampling, align_corners=False
    assert ids[:4, 1].tolist() == [0.5, 0.5, 2.5, 2.5] and ids[4:, 1].unique().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_attention_mask_matches_upstream_token_ids():
    layout = DiTLayout(batch=2, text_len=5, clips=((1, 2, 2), (2, 2, 2)))
    enc_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    order = rope_ids(layout)[:, 0]
    ours = joint_attention_mask(enc_mask, frame_ids(layout, torch.device("cpu")), layout)
    # upstream merge_input: text ids b+1 (0 where padded), image ids b+1, equal ids attend; & time ids i >= j
    b = torch.arange(1, 3)[:, None]
    token_ids = torch.cat([b * enc_mask, b.expand(2, layout.tokens)], dim=1)
    ref = (token_ids[:, None, :, None] == token_ids[:, None, None, :]) & (order[:, None] >= order[None, :])
    assert torch.equal(ours, ref)


# 4. the forward: packing, causality, fx, attention impls -------------------------------------------

def test_packing_is_upstream_rearrange(tiny):
    x = torch.randn(2, 16, 3, 4, 6, generator=_gen(6))
    layout = DiTLayout(batch=2, text_len=1, clips=((3, 4, 6),))
    packed = tiny._pack([x], layout)
    # upstream: 'b c t h w -> b t h w c', then 'b t (h p1) (w p2) c -> b (t h w) (p1 p2 c)'
    ref = x.permute(0, 2, 3, 4, 1).reshape(2, 3, 2, 2, 3, 2, 16).permute(0, 1, 2, 4, 3, 5, 6).reshape(2, 18, 64)
    assert torch.equal(packed, ref)
    assert torch.equal(tiny._unpack(packed, layout), x)


@pytest.mark.parametrize("clips", LAYOUTS)
def test_trace_matches_eager(tiny, clips):
    args = _inputs(tiny.config, clips)
    layout = DiTLayout.from_inputs(args[0], args[1])
    gm = trace_dit(tiny, layout)
    names = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(2)]
    assert dit_block_names(gm) == names
    assert not any(n.target.startswith("transformer_blocks.0.") for n in gm.graph.nodes if n.op == "call_module")
    assert ".shape" not in gm.code and "size()" not in gm.code
    with torch.no_grad():
        eager = tiny(*args, layout=layout)
        assert eager.shape == (2, 16, *clips[-1]) and eager.abs().mean() > 0.1
        torch.testing.assert_close(gm(*args), eager, atol=1e-6, rtol=0)
        tiny.set_attention_impl("matmul")
        try:
            assert all(b.attention_impl == "matmul" for b in [*tiny.transformer_blocks, *tiny.single_transformer_blocks])
            torch.testing.assert_close(gm(*args), eager, atol=1e-5, rtol=0)
        finally:
            tiny.set_attention_impl("sdpa")


def test_earlier_frames_ignore_later_frames_and_padding(tiny):
    sample, ehs, mask, pooled, t = _inputs(tiny.config, ((1, 4, 4), (2, 8, 8)))
    with torch.no_grad():
        out = tiny(sample, ehs, mask, pooled, t)
        later = [sample[0], sample[1].clone()]
        later[1][:, :, 1] += 1.0  # the current clip's second frame
        changed = tiny(later, ehs, mask, pooled, t)
        padded = ehs.clone()
        padded[0, 5:] += 3.0  # row 0's padded text tokens
        assert torch.equal(tiny(sample, padded, mask, pooled, t), out)
    assert torch.equal(changed[:, :, 0], out[:, :, 0]) and not torch.equal(changed[:, :, 1], out[:, :, 1])


def test_folded_timestep_embedding_equals_unfolded(tiny):
    args = _inputs(tiny.config, LAYOUTS[1])
    folded, table = fold_timestep_embedding(tiny, args[4].tolist())
    assert table.shape == (2, tiny.config.inner_dim) and folded.transformer_blocks is tiny.transformer_blocks
    layout = DiTLayout.from_inputs(args[0], args[1])
    with torch.no_grad():
        ref = tiny(*args)
        torch.testing.assert_close(folded(*args[:4], timestep_embedding=table), ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(trace_dit(folded, layout)(*args[:4], table), ref, atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="folded"):
            folded(*args)
    with pytest.raises(ValueError, match="keep_blocks needs"):
        keep_blocks(folded, [0], [0])


def test_keep_blocks_equals_manual_construction(tiny):
    kept = keep_blocks(tiny, [1], [0])
    assert (kept.config.num_layers, kept.config.num_single_layers) == (1, 1)
    manual = PyramidFluxDiT(FluxDiTConfig(**{**tiny.config.__dict__, "num_layers": 1, "num_single_layers": 1})).eval()
    for name in ("time_text_embed", "context_embedder", "x_embedder", "norm_out", "proj_out"):
        getattr(manual, name).load_state_dict(getattr(tiny, name).state_dict())
    manual.transformer_blocks[0].load_state_dict(tiny.transformer_blocks[1].state_dict())
    manual.single_transformer_blocks[0].load_state_dict(tiny.single_transformer_blocks[0].state_dict())
    args = _inputs(tiny.config, LAYOUTS[1])
    with torch.no_grad():
        assert torch.equal(kept(*args), manual(*args))
    assert kept.x_embedder.weight.data_ptr() != tiny.x_embedder.weight.data_ptr()  # a copy
    for bad in ([1, 0], [2], [0, 0]):
        with pytest.raises(ValueError, match="double-stream block indices"):
            keep_blocks(tiny, bad, [0])


# 5. config.json and errors ----------------------------------------------------------------------------

def _released_config_json() -> dict:
    """upstream's released miniFLUX config.json keys (PyramidFluxTransformer.__init__ arguments)."""
    return {"_class_name": "PyramidFluxTransformer", "_diffusers_version": "0.30.3", "patch_size": 1,
            "in_channels": 64, "num_layers": 8, "num_single_layers": 16, "attention_head_dim": 64,
            "num_attention_heads": 30, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "axes_dims_rope": [16, 24, 24], "use_flash_attn": False, "use_temporal_causal": True,
            "interp_condition_pos": True, "use_gradient_checkpointing": False, "gradient_checkpointing_ratio": 0.6}


def test_config_from_and_to_upstream_dict(caplog):
    assert FluxDiTConfig.from_dict(_released_config_json()) == FluxDiTConfig()
    assert FluxDiTConfig.from_dict(FluxDiTConfig().to_config_json()) == FluxDiTConfig()
    assert FluxDiTConfig.from_dict(tiny_config().to_config_json()) == tiny_config()
    # a missing key takes upstream's __init__ default, as diffusers would
    assert FluxDiTConfig.from_dict({"in_channels": 64}).num_single_layers == 38
    with caplog.at_level(logging.WARNING, logger="ndopt"):
        cfg = FluxDiTConfig.from_dict({**_released_config_json(), "use_temporal_causal": False})
    assert cfg.use_temporal_causal and "use_temporal_causal=False -> True" in caplog.text


@pytest.mark.parametrize(("key", "value", "match"), [
    ("num_layers", "8", r"num_layers = \"8\" \(a string\)"),
    ("num_attention_heads", 0, "num_attention_heads = 0"),
    ("in_channels", 63, "in_channels = 63: expected a multiple of 4"),
    ("patch_size", 2, "patch_size"),
    ("attention_head_dim", 32, "axes_dims_rope.*attention_head_dim=32"),
    ("guidance_embeds", True, "'guidance_embeds' is not a PyramidFluxTransformer argument"),
])
def test_config_errors_name_the_key(key, value, match):
    with pytest.raises(DiTConfigError, match=match):
        FluxDiTConfig.from_dict({**_released_config_json(), key: value}, source="x/config.json")


def test_layout_errors(tiny):
    sample, ehs, mask, pooled, t = _inputs(tiny.config, LAYOUTS[0])
    with pytest.raises(ValueError, match="but the call was given"):
        tiny(sample, ehs, mask, pooled, t, layout=DiTLayout(2, 7, ((1, 4, 4),)))
    with pytest.raises(ValueError, match="packs 2x2"):
        tiny(sample, ehs, mask, pooled, t, layout=DiTLayout(2, 7, ((1, 8, 8),), patch_size=1))
    with pytest.raises(ValueError, match="sample\\[0\\] has 4 channels"):
        tiny([s[:, :4] for s in sample], ehs, mask, pooled, t)
    with pytest.raises(ValueError, match="attention_impl"):
        tiny.set_attention_impl("flash")
