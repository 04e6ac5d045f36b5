"""Tests of the Pyramid-Flow SD3-variant MMDiT (ndopt/frontends/pyramid_flow/dit.py)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from ndopt.frontends.pyramid_flow.dit import (
    DiTConfigError,
    DiTLayout,
    JointTransformerBlock,
    MMDiTConfig,
    PyramidMMDiT,
    dit_block_names,
    frame_ids,
    joint_attention_mask,
    randomize_,
    temporal_rope,
    tiny_config,
    trace_dit,
)
from ndopt.frontends.pyramid_flow.dit_layers import apply_rope

# REFERENCE.md: diffusers' SD3Transformer2DModel at Pyramid-Flow's config.
PAPER_TOTAL = 2.028e9
PAPER_PER_BLOCK = 84.98e6

FIRST_FRAME_LAYOUTS = [((1, 4, 4),), ((1, 8, 8),), ((1, 16, 16),)]
HISTORY_LAYOUTS = [
    ((1, 4, 4), (1, 8, 8), (1, 16, 16)),                  # current (1,16,16) after two history frames
    ((2, 4, 4), (1, 8, 8), (1, 16, 16), (1, 16, 16)),     # final stage, older history at lower res
    ((1, 4, 6), (1, 8, 12), (1, 8, 12)),                  # middle stage, non-square
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny() -> PyramidMMDiT:
    torch.manual_seed(0)
    return randomize_(PyramidMMDiT(tiny_config()), _gen(0)).eval()


def _inputs(cfg: MMDiTConfig, clips, batch: int = 2, text_len: int = 7, seed: int = 1, pad_from=(5, 7)):
    g = _gen(seed)
    sample = [torch.randn(batch, cfg.in_channels, *c, generator=g) for c in clips]
    ehs = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    for b in range(batch):  # CFG-like batch: rows padded differently
        mask[b, pad_from[b % len(pad_from)]:] = 0
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    t = torch.linspace(900.0, 100.0, batch)
    return sample, ehs, mask, pooled, t


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# 1. size, on the meta device ------------------------------------------------------------------

def test_real_size_param_count_on_meta():
    from diffusers.models.attention import JointTransformerBlock as DiffusersBlock

    with torch.device("meta"):
        dit = PyramidMMDiT(MMDiTConfig())
        ref_blocks = [DiffusersBlock(1536, 24, 64, context_pre_only=c, qk_norm="rms_norm") for c in (False, True)]
    assert all(t.is_meta for t in [*dit.parameters(), *dit.buffers()])  # nothing allocated
    total, block = _numel(dit), _numel(dit.transformer_blocks[0])
    assert abs(total / PAPER_TOTAL - 1) < 0.005, total
    assert abs(block / PAPER_PER_BLOCK - 1) < 0.005, block
    assert block == _numel(ref_blocks[0])
    assert _numel(dit.transformer_blocks[-1]) == _numel(ref_blocks[1])
    assert dit.pos_embed.pos_embed.shape == (1, 192 * 192, 1536)
    # REFERENCE.md: 18 blocks = 1.518B (the seed's pruning table)
    with torch.device("meta"):
        pruned = PyramidMMDiT(MMDiTConfig(num_layers=18))
    assert abs(_numel(pruned) / 1.518e9 - 1) < 0.005


# 2. one block == diffusers' SD3 JointTransformerBlock -----------------------------------------

@pytest.mark.parametrize("context_pre_only", [False, True])
def test_block_matches_diffusers(context_pre_only):
    from diffusers.models.attention import JointTransformerBlock as DiffusersBlock

    dim, heads, head_dim = 128, 4, 32
    ours = randomize_(JointTransformerBlock(dim, heads, head_dim, "rms_norm", context_pre_only), _gen(3)).eval()
    ref = DiffusersBlock(dim, heads, head_dim, context_pre_only=context_pre_only, qk_norm="rms_norm").eval()
    state = {k.replace("attn.norm_add_", "attn.norm_added_"): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(state, strict=True)
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        getattr(ref.attn, name).eps = 1e-5  # upstream Pyramid-Flow's q/k RMSNorm eps; diffusers uses 1e-6
    g = _gen(4)
    x, c, temb = torch.randn(2, 24, dim, generator=g), torch.randn(2, 6, dim, generator=g), torch.randn(2, dim, generator=g)
    with torch.no_grad():
        c_ours, x_ours = ours(x, c, temb)
        c_ref, x_ref = ref(x, c, temb)
    torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5)
    if context_pre_only:
        assert c_ours is None and c_ref is None
    else:
        torch.testing.assert_close(c_ours, c_ref, atol=1e-5, rtol=1e-5)
    assert x_ours.abs().mean() > 0.1  # the weights are not trivial


# 3. upstream state-dict keys --------------------------------------------------------------------

def _upstream_block_keys(i: int, last: bool) -> set[str]:
    """Read off upstream modeling_mmdit_block.py: JointTransformerBlock / JointAttention / FeedForward."""
    linears = ["norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v",
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0",
               "ff.net.0.proj", "ff.net.2"]
    if not last:
        linears += ["attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2"]
    keys = {f"{lin}.{p}" for lin in linears for p in ("weight", "bias")}
    keys |= {f"attn.{n}.weight" for n in ("norm_q", "norm_k", "norm_add_q", "norm_add_k")}
    return {f"transformer_blocks.{i}.{k}" for k in keys}


def test_state_dict_keys_equal_upstream(tiny):
    cfg = tiny.config
    top = {"pos_embed.pos_embed", "pos_embed.proj.weight", "pos_embed.proj.bias"}
    for lin in ("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
                "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
                "context_embedder", "norm_out.linear", "proj_out"):
        top |= {f"{lin}.weight", f"{lin}.bias"}
    expected = top.union(*(_upstream_block_keys(i, i == cfg.num_layers - 1) for i in range(cfg.num_layers)))
    assert set(tiny.state_dict()) == expected
    assert tiny.transformer_blocks[-1].context_pre_only and not tiny.transformer_blocks[-2].context_pre_only
    # shapes of the real model, on meta
    with torch.device("meta"):
        sd = PyramidMMDiT(MMDiTConfig()).state_dict()
    assert sd["pos_embed.proj.weight"].shape == (1536, 16, 2, 2)
    assert sd["context_embedder.weight"].shape == (1536, 4096)
    assert sd["time_text_embed.timestep_embedder.linear_1.weight"].shape == (1536, 256)
    assert sd["transformer_blocks.0.attn.norm_add_q.weight"].shape == (64,)
    assert sd["transformer_blocks.23.norm1_context.linear.weight"].shape == (3072, 1536)
    assert sd["proj_out.weight"].shape == (64, 1536)


def test_state_dict_round_trip_is_strict_and_exact(tiny):
    cfg = tiny.config
    other = PyramidMMDiT(cfg).eval()
    assert other.load_state_dict(tiny.state_dict(), strict=True)
    args = _inputs(cfg, HISTORY_LAYOUTS[0])
    with torch.no_grad():
        torch.testing.assert_close(other(*args), tiny(*args), atol=0, rtol=0)


def test_upstream_init_zeroes_output():
    cfg = tiny_config()
    with torch.no_grad():
        out = PyramidMMDiT(cfg)(*_inputs(cfg, ((1, 8, 8),)))
    assert out.shape == (2, 16, 1, 8, 8) and out.abs().max() == 0  # adaLN-zero + zero proj_out


# formulas against upstream's, re-typed from modeling_embedding.py / modeling_pyramid_mmdit.py ---

def _upstream_2d_sincos(embed_dim: int, grid_size: int, base_size: int) -> np.ndarray:
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32) / (grid_size / base_size)
    grid_w = np.arange(grid_size, dtype=np.float32) / (grid_size / base_size)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_pos_embed_and_crop_match_upstream(tiny):
    cfg = tiny.config
    ref = torch.from_numpy(_upstream_2d_sincos(cfg.inner_dim, 32, cfg.sample_size // cfg.patch_size)).float()
    torch.testing.assert_close(tiny.pos_embed.pos_embed[0], ref, atol=1e-6, rtol=0)
    pe = tiny.pos_embed
    grid = pe.pos_embed.reshape(1, 32, 32, -1)
    cur = grid[:, 12:20, 10:22]                                              # centre crop of 8x12 patches
    torch.testing.assert_close(pe.cropped_pos_embed(8, 12, 8, 12), cur.reshape(1, 96, -1))
    small = torch.nn.functional.interpolate(cur.permute(0, 3, 1, 2), size=(4, 6), mode="bilinear")
    torch.testing.assert_close(pe.cropped_pos_embed(4, 6, 8, 12), small.permute(0, 2, 3, 1).reshape(1, 24, -1))


def test_rope_matches_upstream_formula():
    head_dim, g = 32, _gen(5)
    layout = DiTLayout(batch=2, text_len=3, clips=((2, 4, 4), (1, 4, 4)))
    ids = frame_ids(layout, torch.device("cpu"))
    assert ids.tolist() == [0.0] * 3 + [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    # upstream rope(): [B, S, D/2, 2, 2] of [[cos, -sin], [sin, cos]], applied on [B, S, H, D]
    scale = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    out = torch.einsum("...n,d->...nd", ids[None].double(), 1.0 / (10000 ** scale))
    freqs = torch.stack([out.cos(), -out.sin(), out.sin(), out.cos()], -1).view(1, -1, head_dim // 2, 2, 2).float()
    freqs = freqs.unsqueeze(2)
    x = torch.randn(2, ids.numel(), 4, head_dim, generator=g)                # [B, S, H, D]
    x_ = x.reshape(*x.shape[:-1], -1, 1, 2)
    ref = (freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]).reshape(x.shape)
    ours = apply_rope(x.transpose(1, 2), temporal_rope(ids, head_dim)).transpose(1, 2)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_attention_mask_matches_upstream_token_ids():
    layout = DiTLayout(batch=2, text_len=5, clips=((1, 2, 2), (2, 2, 2)))
    enc_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ids = frame_ids(layout, torch.device("cpu"))
    ours = joint_attention_mask(enc_mask, ids, layout)
    # upstream merge_input: text ids b+1 (0 where padded), image ids b+1, equal ids attend; & order ids i >= j
    b = torch.arange(1, 3)[:, None]
    token_ids = torch.cat([(b * enc_mask), b.expand(2, layout.tokens)], dim=1)
    ref = (token_ids[:, None, :, None] == token_ids[:, None, None, :]) & (ids[:, None] >= ids[None, :])
    assert ours.shape == (2, 1, layout.seq_len, layout.seq_len) and torch.equal(ours, ref)
    # earlier frames ignore later ones; text sees text and the first latent frame only
    t0, f0, f1 = slice(0, 5), slice(5, 6), slice(6, 7)
    assert not ours[1, 0, f0, f1].any() and ours[1, 0, f1, f0].all()
    assert ours[1, 0, t0, f0].all() and not ours[1, 0, t0, 7:].any()
    assert not ours[0, 0, :3, 3:5].any()  # real text never sees padding


# 4. fx ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("clips", FIRST_FRAME_LAYOUTS + HISTORY_LAYOUTS)
def test_trace_matches_eager(tiny, clips):
    args = _inputs(tiny.config, clips)
    layout = DiTLayout.from_inputs(args[0], args[1])
    gm = trace_dit(tiny, layout)
    gm.graph.lint()
    names = [f"transformer_blocks.{i}" for i in range(tiny.config.num_layers)]
    assert dit_block_names(gm) == names
    block_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in names]
    assert [n.name for n in block_nodes] == [t.replace(".", "_") for t in names]
    assert not any(n.target.startswith("transformer_blocks.0.") for n in gm.graph.nodes if n.op == "call_module")
    with torch.no_grad():
        eager = tiny(*args, layout=layout)
        traced = gm(*args)
        assert eager.shape == (2, 16, *clips[-1]) and eager.abs().mean() > 0.1
        torch.testing.assert_close(traced, eager, atol=1e-6, rtol=0)
        tiny.set_attention_impl("matmul")
        try:
            assert all(b.attention_impl == "matmul" for b in tiny.transformer_blocks)
            torch.testing.assert_close(gm(*args), eager, atol=1e-5, rtol=0)
        finally:
            tiny.set_attention_impl("sdpa")


def test_trace_reads_shapes_from_layout_only(tiny):
    layout = DiTLayout(batch=2, text_len=7, clips=((1, 8, 8), (1, 16, 16)))
    code = trace_dit(tiny, layout).code
    assert ".shape" not in code and "size()" not in code


# 5. causality and text padding ------------------------------------------------------------------

@pytest.mark.parametrize("clips", [((2, 8, 8),), ((1, 4, 4), (2, 8, 8))])
def test_earlier_frames_ignore_later_frames(tiny, clips):
    sample, *rest = _inputs(tiny.config, clips)
    changed = [s.clone() for s in sample]
    changed[-1][:, :, 1] += torch.randn(changed[-1][:, :, 1].shape, generator=_gen(9))
    with torch.no_grad():
        a, b = tiny(sample, *rest), tiny(changed, *rest)
    torch.testing.assert_close(a[:, :, 0], b[:, :, 0], atol=1e-6, rtol=0)   # frame 0 cannot see frame 1
    assert (a[:, :, 1] - b[:, :, 1]).abs().max() > 1e-2                     # frame 1 does


def test_history_conditions_the_current_clip(tiny):
    sample, *rest = _inputs(tiny.config, HISTORY_LAYOUTS[0])
    changed = [sample[0] + 1.0, *sample[1:]]
    with torch.no_grad():
        assert (tiny(sample, *rest) - tiny(changed, *rest)).abs().max() > 1e-2


def test_padded_text_is_ignored(tiny):
    sample, ehs, mask, pooled, t = _inputs(tiny.config, HISTORY_LAYOUTS[0])
    noisy = ehs.clone()
    noisy[mask == 0] = torch.randn(int((mask == 0).sum()), ehs.shape[-1], generator=_gen(8)) * 10
    real_changed = ehs.clone()
    real_changed[:, 0] += 1.0
    with torch.no_grad():
        base = tiny(sample, ehs, mask, pooled, t)
        torch.testing.assert_close(tiny(sample, noisy, mask, pooled, t), base, atol=1e-6, rtol=0)
        assert (tiny(sample, real_changed, mask, pooled, t) - base).abs().max() > 1e-3


# 6. pruned and adapted copies --------------------------------------------------------------------

def test_pruned_copy_runs_and_traces(tiny):
    pruned = copy.deepcopy(tiny)
    del pruned.transformer_blocks[-1]          # the context_pre_only block goes
    del pruned.transformer_blocks[1]
    assert not pruned.transformer_blocks[-1].context_pre_only
    args = _inputs(tiny.config, HISTORY_LAYOUTS[1])
    layout = DiTLayout.from_inputs(args[0], args[1])
    gm = trace_dit(pruned, layout)
    assert dit_block_names(gm) == [f"transformer_blocks.{i}" for i in range(4)]
    with torch.no_grad():
        out = pruned(*args)
        assert out.shape == (2, 16, 1, 16, 16) and torch.isfinite(out).all()
        torch.testing.assert_close(gm(*args), out, atol=1e-6, rtol=0)
        assert (out - tiny(*args)).abs().max() > 1e-3


def test_context_embedder_replaced_by_identity(tiny):
    adapted = copy.deepcopy(tiny)
    adapted.context_embedder = nn.Identity()
    sample, _, mask, pooled, t = _inputs(tiny.config, ((1, 8, 8),))
    ctx = torch.randn(2, 7, tiny.config.caption_projection_dim, generator=_gen(6))
    with torch.no_grad():
        out = adapted(sample, ctx, mask, pooled, t)
        layout = DiTLayout.from_inputs(sample, ctx)
        torch.testing.assert_close(trace_dit(adapted, layout)(sample, ctx, mask, pooled, t), out, atol=1e-6, rtol=0)
        # feeding context_embedder's output through the adapted copy reproduces the original
        projected = tiny.context_embedder(_inputs(tiny.config, ((1, 8, 8),))[1])
        torch.testing.assert_close(adapted(sample, projected, mask, pooled, t),
                                   tiny(*_inputs(tiny.config, ((1, 8, 8),))), atol=1e-6, rtol=0)
    assert out.shape == (2, 16, 1, 8, 8)


# config and error paths --------------------------------------------------------------------------

def _upstream_config_json() -> dict:
    """An upstream config.json as diffusers' save_config writes it (all __init__ arguments)."""
    return {"_class_name": "PyramidDiffusionMMDiT", "_diffusers_version": "0.30.3", "sample_size": 128,
            "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
            "num_attention_heads": 24, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
            "pos_embed_max_size": 192, "max_num_frames": 200, "qk_norm": "rms_norm", "pos_embed_type": "sincos",
            "temp_pos_embed_type": "rope", "joint_attention_dim": 4096, "use_gradient_checkpointing": False,
            "use_flash_attn": False, "use_temporal_causal": True, "use_t5_mask": True,
            "add_temp_pos_embed": True, "interp_condition_pos": True, "gradient_checkpointing_ratio": 0.6}


def test_config_from_upstream_dict():
    assert MMDiTConfig.from_dict(_upstream_config_json()) == MMDiTConfig()
    assert MMDiTConfig().inner_dim == 1536
    assert MMDiTConfig.from_dict({"num_layers": 18, "use_mixed_training": True}).num_layers == 18


# temp_pos_embed_type, add_temp_pos_embed, use_t5_mask: upstream's loader overrides them, so do we (a warning;
# tests/frontends/test_checkpoint_validation.py)
@pytest.mark.parametrize(("key", "value"), [("pos_embed_type", "rope"), ("qk_norm", "layer_norm"),
                                            ("not_an_argument", 1)])
def test_config_rejects_unimplemented_paths(key, value):
    d = {**_upstream_config_json(), key: value}
    with pytest.raises(ValueError, match=key if key != "qk_norm" else "qk_norm"):
        MMDiTConfig.from_dict(d)
    with pytest.raises(DiTConfigError):
        MMDiTConfig.from_dict(d)


def test_layout_errors(tiny):
    with pytest.raises(ValueError, match="multiples"):
        DiTLayout(batch=1, text_len=4, clips=((1, 5, 4),))
    with pytest.raises(ValueError, match="larger than the current"):
        DiTLayout(batch=1, text_len=4, clips=((1, 16, 16), (1, 8, 8)))
    args = _inputs(tiny.config, ((1, 8, 8),))
    with pytest.raises(ValueError, match="layout"):
        tiny(*args, layout=DiTLayout(batch=2, text_len=7, clips=((1, 16, 16),)))
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        tiny(*_inputs(tiny.config, ((1, 2 * 33, 8),), batch=1))
    with pytest.raises(ValueError, match="attention_impl"):
        tiny.set_attention_impl("flash")
    layout = DiTLayout(batch=2, text_len=7, clips=((1, 4, 4), (1, 8, 8)))
    assert layout.tokens == 4 + 16 and layout.seq_len == 27 and math.isclose(layout.clip_tokens(-1), 16)
