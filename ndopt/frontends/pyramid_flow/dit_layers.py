"""Layers of the Pyramid-Flow SD3-variant MMDiT, with upstream's parameter names.

Upstream: `jy0205/Pyramid-Flow`, `pyramid_dit/mmdit_modules/` (`modeling_mmdit_block.py`,
`modeling_embedding.py`, `modeling_normalization.py`). We write the modules ourselves rather than
take diffusers' because (1) upstream names differ from diffusers' (`attn.norm_add_q` vs
`attn.norm_added_q`) and an upstream state dict must load strictly, (2) upstream's q/k RMSNorm uses
eps 1e-5 where diffusers' SD3 block uses 1e-6, and (3) attention needs a masked, RoPE'd, switchable
(`sdpa` / explicit `matmul`) form that quantization and NPU lowering can see. Pure math (the
sinusoidal tables) comes from diffusers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_IMPLS = ("sdpa", "matmul")


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (upstream `modeling_normalization.RMSNorm`)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return (y * self.weight).to(x.dtype)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: six modulations from the conditioning; returns the modulated input and the rest."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim, bias=True)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: Tensor, emb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm (no affine) then scale/shift from the conditioning (note the order: scale first)."""

    def __init__(self, dim: int, conditioning_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_dim, 2 * dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)

    def forward(self, x: Tensor, conditioning: Tensor) -> Tensor:
        scale, shift = self.linear(self.silu(conditioning).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class GELU(nn.Module):
    """Linear then tanh-approximate GELU (diffusers' `GELU(approximate="tanh")`, name `proj`)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """`net.0.proj` -> GELU(tanh) -> dropout -> `net.2` (upstream activation_fn="gelu-approximate")."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim, bias=True)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class Timesteps(nn.Module):
    """Sinusoidal timestep features (256 channels, cos first, no shift: SD3's `time_proj`).

    Upstream's `get_timestep_embedding` with flip_sin_to_cos=True, downscale_freq_shift=0; written
    out because diffusers' copy asserts on `len(shape)`, which fx cannot trace.
    """

    def __init__(self, num_channels: int = 256, max_period: int = 10000) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_period = max_period

    def forward(self, timesteps: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        exponent = exponent / half
        args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TextProjection(nn.Module):
    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class CombinedTimestepConditionEmbeddings(nn.Module):
    """temb = MLP(sinusoid(timestep)) + MLP(pooled CLIP projection)."""

    def __init__(self, dim: int, pooled_projection_dim: int) -> None:
        super().__init__()
        self.time_proj = Timesteps(256)
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TextProjection(pooled_projection_dim, dim)

    def forward(self, timestep: Tensor, pooled_projection: Tensor) -> Tensor:
        t = self.timestep_embedder(self.time_proj(timestep).to(pooled_projection.dtype))
        return t + self.text_embedder(pooled_projection)


class PatchEmbed3D(nn.Module):
    """Per-frame 2D patchify plus a 2D sin-cos position embedding cropped from a fixed grid.

    With `interp_condition_pos`, every clip takes the crop of the *current* (last, largest) clip and
    history clips at lower resolution get it bilinearly resized to their size (upstream
    `PatchEmbed3D.cropped_pos_embed`), so a low-res history frame covers the same field of view.
    """

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, dim: int,
                 pos_embed_max_size: int, interp_condition_pos: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.interp_condition_pos = interp_condition_pos
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)
        # Built with torch (not numpy) so that it lands on the ambient device (meta included).
        # diffusers is imported here, not at module level: it costs seconds, and `ndopt plan` should not.
        if torch.get_default_device().type == "meta":  # shapes only: no table to compute
            grid = torch.empty(pos_embed_max_size * pos_embed_max_size, dim)
        else:
            from diffusers.models.embeddings import get_2d_sincos_pos_embed

            grid = get_2d_sincos_pos_embed(dim, pos_embed_max_size, base_size=sample_size // patch_size,
                                           device=torch.get_default_device())
        self.register_buffer("pos_embed", grid.float().unsqueeze(0), persistent=True)

    def cropped_pos_embed(self, height: int, width: int, ori_height: int, ori_width: int) -> Tensor:
        """[1, height*width, dim] position embedding for a clip of height x width patches."""
        g = self.pos_embed_max_size
        if self.interp_condition_pos:
            crop_h, crop_w = ori_height, ori_width
        else:
            crop_h, crop_w = height, width
        top, left = (g - crop_h) // 2, (g - crop_w) // 2
        pos = self.pos_embed.reshape(1, g, g, -1)[:, top:top + crop_h, left:left + crop_w, :]
        if (crop_h, crop_w) != (height, width):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(height, width), mode="bilinear")
            pos = pos.permute(0, 2, 3, 1)
        return pos.reshape(1, height * width, -1)

    def forward(self, clips: list[Tensor], sizes: tuple[tuple[int, int, int], ...], batch: int) -> Tensor:
        """clips[i]: [B, C, t, h, w] latent pixels of size sizes[i]; returns [B, tokens, dim]."""
        p = self.patch_size
        ori_h, ori_w = sizes[-1][1] // p, sizes[-1][2] // p
        tokens = []
        for i, (t, h, w) in enumerate(sizes):
            x = clips[i].transpose(1, 2).reshape(batch * t, -1, h, w)
            x = self.proj(x).flatten(2).transpose(1, 2)                       # [B*t, n, dim]
            x = x + self.cropped_pos_embed(h // p, w // p, ori_h, ori_w).to(x.dtype)
            tokens.append(x.reshape(batch, t * (h // p) * (w // p), -1))
        return torch.cat(tokens, dim=1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x [B, H, S, D] by rope [2, S, D/2] (cos, sin).

    Same per-element arithmetic as upstream `apply_rope` ((x0, x1) -> (cos x0 - sin x1,
    sin x0 + cos x1), computed in float32), but with batch and heads flattened so no tensor exceeds
    rank 4 (HTP prefers rank <= 4).
    """
    pairs = x.float().flatten(0, 1).unflatten(-1, (-1, 2))                   # [B*H, S, D/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = rope[0], rope[1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).view_as(x).type_as(x)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, impl: str) -> Tensor:
    """Softmax attention over [B, H, S, D]; mask is bool [B, 1, S, S], True = attend."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # Explicit form: every op is a module-free primitive that quantizers and NPU lowering see.
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        # A finite minimum instead of -inf: identical softmax (every row keeps its own token).
        scores = scores.masked_fill(mask.logical_not(), torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(dim=-1), v)


class JointAttention(nn.Module):
    """Joint text+image attention of one MMDiT block (upstream `JointAttention`, non-flash path)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None,
                 context_pre_only: bool, eps: float = 1e-5) -> None:
        super().__init__()
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm={qk_norm!r} is not implemented: use 'rms_norm' or None")
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.context_pre_only = context_pre_only
        self.attention_impl = "sdpa"
        # Registration order follows upstream so state_dict() iterates in the same order.
        self.norm_q = RMSNorm(head_dim, eps) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps) if qk_norm else None
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.add_q_proj = nn.Linear(dim, inner)
        self.norm_add_q = RMSNorm(head_dim, eps) if qk_norm else None
        self.norm_add_k = RMSNorm(head_dim, eps) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = None if context_pre_only else nn.Linear(inner, dim)

    def _heads(self, x: Tensor, norm: nn.Module | None) -> Tensor:
        x = x.unflatten(-1, (self.heads, self.head_dim))                     # [B, N, H, D]
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2)                                              # [B, H, N, D]

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor,
                attention_mask: Tensor | None = None, image_rotary_emb: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        # Text tokens first, as upstream's VarlenSelfAttentionWithT5Mask concatenates them.
        q = torch.cat([self._heads(self.add_q_proj(encoder_hidden_states), self.norm_add_q),
                       self._heads(self.to_q(hidden_states), self.norm_q)], dim=2)
        k = torch.cat([self._heads(self.add_k_proj(encoder_hidden_states), self.norm_add_k),
                       self._heads(self.to_k(hidden_states), self.norm_k)], dim=2)
        v = torch.cat([self._heads(self.add_v_proj(encoder_hidden_states), None),
                       self._heads(self.to_v(hidden_states), None)], dim=2)
        if image_rotary_emb is not None:
            q, k = apply_rope(q, image_rotary_emb), apply_rope(k, image_rotary_emb)
        out = attend(q, k, v, attention_mask, self.attention_impl).transpose(1, 2).flatten(2)
        text_len = encoder_hidden_states.shape[1]
        context_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = self.to_out[1](self.to_out[0](image_out))
        if self.to_add_out is not None:
            context_out = self.to_add_out(context_out)
        return image_out, context_out


class JointTransformerBlock(nn.Module):
    """One SD3 MMDiT block: adaLN-Zero on both streams, joint attention, two GELU MLPs.

    `context_pre_only` (the last block upstream): the text stream is only read, so its norm is
    AdaLayerNormContinuous, there is no `to_add_out` / `ff_context`, and it returns None for it.
    `attention_head_dim` is the per-head width (diffusers' meaning; upstream passes the inner width
    and divides by the head count).
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int,
                 qk_norm: str | None = "rms_norm", context_pre_only: bool = False) -> None:
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormContinuous(dim, dim) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, num_attention_heads, attention_head_dim, qk_norm, context_pre_only)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        if context_pre_only:
            self.norm2_context = None
            self.ff_context = None
        else:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim)

    @property
    def attention_impl(self) -> str:
        return self.attn.attention_impl

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                attention_mask: Tensor | None = None, image_rotary_emb: Tensor | None = None
                ) -> tuple[Tensor | None, Tensor]:
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        if self.context_pre_only:
            norm_c = self.norm1_context(encoder_hidden_states, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)

        attn_out, context_attn_out = self.attn(norm_x, norm_c, attention_mask, image_rotary_emb)

        hidden_states = hidden_states + gate_msa[:, None] * attn_out
        norm_x = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp[:, None] * self.ff(norm_x)

        if self.context_pre_only:
            return None, hidden_states
        context = encoder_hidden_states + c_gate_msa[:, None] * context_attn_out
        norm_c = self.norm2_context(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context = context + c_gate_mlp[:, None] * self.ff_context(norm_c)
        return context, hidden_states
