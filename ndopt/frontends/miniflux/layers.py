"""Layers of Pyramid-Flow's miniFLUX DiT, with upstream's parameter names, and its 3-axis RoPE.

Upstream: `jy0205/Pyramid-Flow`, `pyramid_dit/flux_modules/` (`modeling_flux_block.py`,
`modeling_normalization.py`, `modeling_pyramid_flux.py`), non-flash inference path, one pyramid
stage per call (so upstream's `hidden_length` bookkeeping is a single segment and its per-token
modulation equals the per-sample one). What is the same as the SD3 variant's layers is imported
from there: RMSNorm, adaLN-Zero, the GELU-tanh MLP, the pair-wise RoPE rotation and the
switchable (`sdpa` / `matmul`) masked attention. The q/k RMSNorm eps is 1e-6 here (upstream's
FluxTransformerBlock and FluxSingleTransformerBlock), not the SD3 variant's 1e-5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ndopt.frontends.pyramid_flow.dit import DiTLayout
from ndopt.frontends.pyramid_flow.dit_layers import AdaLayerNormZero, FeedForward, RMSNorm, apply_rope, attend

__all__ = [
    "AdaLayerNormZeroSingle", "FluxAttention", "FluxSingleAttention", "FluxSingleTransformerBlock",
    "FluxTransformerBlock", "rope_ids", "rope_table",
]

ROPE_THETA = 10000  # upstream EmbedND(dim=inner_dim, theta=10000, axes_dim=axes_dims_rope)
QK_NORM_EPS = 1e-6  # upstream FluxTransformerBlock(eps=1e-6) and FluxSingleTransformerBlock's Attention(eps=1e-6)


def _positions(full: int, size: int) -> Tensor:
    """Positions of `size` tokens along an axis of the current clip's `full` tokens (upstream
    `_prepare_image_ids`): 0..full-1, linearly resampled for a lower-resolution history clip, so it
    covers the same field of view (upstream does this whatever `interp_condition_pos` says)."""
    base = torch.arange(full, device="cpu").float()
    if size == full:
        return base
    return F.interpolate(base[None, None], size, mode="linear").squeeze(0).squeeze(0)


def rope_ids(layout: DiTLayout) -> Tensor:
    """[S, 3] float32 (time, height, width) position of every joint token, on the CPU.

    Text tokens are all 0 (upstream `text_ids = zeros`); image tokens of clip i have the running
    latent-frame index as time and `_positions` of the current clip's grid as height and width."""
    p = layout.patch_size
    _, cur_h, cur_w = layout.clips[-1]
    parts = [torch.zeros(layout.text_len, 3, device="cpu")]
    start = 0
    for t, h, w in layout.clips:
        ids = torch.zeros(t, h // p, w // p, 3, device="cpu")
        ids[..., 0] += torch.arange(start, start + t, device="cpu")[:, None, None]
        ids[..., 1] += _positions(cur_h // p, h // p)[None, :, None]
        ids[..., 2] += _positions(cur_w // p, w // p)[None, None, :]
        parts.append(ids.reshape(-1, 3))
        start += t
    return torch.cat(parts)


def rope_table(ids: Tensor, axes_dims: Sequence[int], theta: int = ROPE_THETA) -> Tensor:
    """[2, S, sum(axes_dims)/2] (cos, sin) of the per-axis RoPE, axes concatenated (upstream `EmbedND`).

    Angles in float64 (upstream `rope()` multiplies float32 ids by float64 frequencies), the table
    cast to float32; `pyramid_flow.dit_layers.apply_rope` then rotates adjacent channel pairs exactly
    as upstream's `[[cos, -sin], [sin, cos]]` product does."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[:, axis].double()[:, None] * omega[None, :])
    a = torch.cat(angles, dim=-1)
    return torch.stack([a.cos(), a.sin()]).float()


def _split_heads(x: Tensor, heads: int, head_dim: int, norm: nn.Module | None) -> Tensor:
    x = x.unflatten(-1, (heads, head_dim))                                    # [B, N, H, D]
    if norm is not None:
        x = norm(x)
    return x.transpose(1, 2)                                                  # [B, H, N, D]


class FluxAttention(nn.Module):
    """Joint text+image attention of a double-stream block (upstream `Attention` + `FluxAttnProcessor2_0`
    with `VarlenSelfAttentionWithT5Mask`): text tokens first, RoPE over the joint sequence."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = QK_NORM_EPS) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.attention_impl = "sdpa"
        # registration order follows upstream's Attention.__init__, so state_dict() iterates the same way
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(inner, dim)
        self.norm_added_q = RMSNorm(head_dim, eps)
        self.norm_added_k = RMSNorm(head_dim, eps)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, attention_mask: Tensor | None = None,
                image_rotary_emb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h, d = self.heads, self.head_dim
        q = torch.cat([_split_heads(self.add_q_proj(encoder_hidden_states), h, d, self.norm_added_q),
                       _split_heads(self.to_q(hidden_states), h, d, self.norm_q)], dim=2)
        k = torch.cat([_split_heads(self.add_k_proj(encoder_hidden_states), h, d, self.norm_added_k),
                       _split_heads(self.to_k(hidden_states), h, d, self.norm_k)], dim=2)
        v = torch.cat([_split_heads(self.add_v_proj(encoder_hidden_states), h, d, None),
                       _split_heads(self.to_v(hidden_states), h, d, None)], dim=2)
        if image_rotary_emb is not None:
            q, k = apply_rope(q, image_rotary_emb), apply_rope(k, image_rotary_emb)
        out = attend(q, k, v, attention_mask, self.attention_impl).transpose(1, 2).flatten(2)
        text_len = encoder_hidden_states.shape[1]
        image_out = self.to_out[1](self.to_out[0](out[:, text_len:]))
        return image_out, self.to_add_out(out[:, :text_len])


class FluxSingleAttention(nn.Module):
    """Self-attention of a single-stream block over the joint sequence (upstream `Attention(pre_only=True)`
    + `FluxSingleAttnProcessor2_0` with `VarlenSelfAttnSingle`): no output projection of its own."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = QK_NORM_EPS) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.attention_impl = "sdpa"
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                image_rotary_emb: Tensor | None = None) -> Tensor:
        h, d = self.heads, self.head_dim
        q = _split_heads(self.to_q(hidden_states), h, d, self.norm_q)
        k = _split_heads(self.to_k(hidden_states), h, d, self.norm_k)
        v = _split_heads(self.to_v(hidden_states), h, d, None)
        if image_rotary_emb is not None:
            q, k = apply_rope(q, image_rotary_emb), apply_rope(k, image_rotary_emb)
        return attend(q, k, v, attention_mask, self.attention_impl).transpose(1, 2).flatten(2)


class AdaLayerNormZeroSingle(nn.Module):
    """adaLN-Zero with three modulations (shift, scale, gate) of the single-stream blocks."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 3 * dim, bias=True)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale, gate = self.linear(self.silu(emb)).chunk(3, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], gate


class FluxTransformerBlock(nn.Module):
    """Double-stream (MMDiT) block: adaLN-Zero on the image and the text stream, joint attention,
    one GELU-tanh MLP per stream. Returns (encoder_hidden_states, hidden_states) as upstream.

    Upstream's `encoder_attention_mask` (flash-attn only) and `hidden_length` (several pyramid stages
    in one training batch) are not arguments: inference calls one stage with a dense mask."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int,
                 eps: float = QK_NORM_EPS) -> None:
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, eps)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim)

    @property
    def attention_impl(self) -> str:
        return self.attn.attention_impl

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                attention_mask: Tensor | None = None, image_rotary_emb: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)
        attn_out, context_attn_out = self.attn(norm_x, norm_c, attention_mask, image_rotary_emb)

        hidden_states = hidden_states + gate_msa[:, None] * attn_out
        norm_x = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp[:, None] * self.ff(norm_x)

        encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * context_attn_out
        norm_c = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp[:, None] * self.ff_context(norm_c)
        if encoder_hidden_states.dtype == torch.float16:  # upstream clips the text stream in fp16
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on the joint [text; image] sequence: attention and a GELU-tanh MLP in
    parallel from one adaLN-Zero, concatenated into one output projection, gated residual."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0,
                 eps: float = QK_NORM_EPS) -> None:
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, self.mlp_hidden_dim)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.attn = FluxSingleAttention(dim, num_attention_heads, attention_head_dim, eps)

    @property
    def attention_impl(self) -> str:
        return self.attn.attention_impl

    def forward(self, hidden_states: Tensor, temb: Tensor, attention_mask: Tensor | None = None,
                image_rotary_emb: Tensor | None = None) -> Tensor:
        residual = hidden_states
        norm_x, gate = self.norm(hidden_states, temb)
        mlp = self.act_mlp(self.proj_mlp(norm_x))
        attn = self.attn(norm_x, attention_mask, image_rotary_emb)
        hidden_states = residual + gate[:, None] * self.proj_out(torch.cat([attn, mlp], dim=2))
        if hidden_states.dtype == torch.float16:  # as upstream
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states
