"""The Pyramid-Flow SD3-variant MMDiT (the `dit` component), faithful to upstream, fx-traceable.

Upstream: `jy0205/Pyramid-Flow`, `PyramidDiffusionMMDiT` (`pyramid_dit/mmdit_modules/
modeling_pyramid_mmdit.py`) as the pipeline builds it for inference: `use_t5_mask=True,
add_temp_pos_embed=True, temp_pos_embed_type='rope', use_temporal_causal=True,
interp_condition_pos=True, use_flash_attn=False`, `pos_embed_type='sincos'`, `qk_norm='rms_norm'`,
one pyramid stage per call. Parameter and buffer names equal upstream's, so an upstream state dict
loads with `strict=True`. `MMDiTConfig.from_dict` reads a `config.json` as upstream's loader does:
typed and range-checked, with the flags upstream's `build_pyramid_dit` forces set to its values.

Every shape-dependent decision in `PyramidMMDiT.forward` reads ints from a `DiTLayout` (the static
shapes of one call), never from `tensor.shape`, so `trace_dit` gives one `torch.fx.GraphModule` per
call signature, with the transformer blocks as leaf `call_module` nodes for block-level passes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from ndopt.frontends.pyramid_flow.configs import ConfigError, DiTConfigFile, check
from ndopt.frontends.pyramid_flow.dit_layers import (
    ATTENTION_IMPLS,
    AdaLayerNormContinuous,
    CombinedTimestepConditionEmbeddings,
    JointAttention,
    JointTransformerBlock,
    PatchEmbed3D,
)

__all__ = [
    "UPSTREAM_OVERRIDES", "DiTBlockTracer", "DiTConfigError", "DiTLayout", "JointTransformerBlock", "MMDiTConfig",
    "PyramidMMDiT", "dit_block_names", "frame_ids", "joint_attention_mask", "randomize_",
    "temporal_rope", "tiny_config", "trace_dit",
]

logger = logging.getLogger("ndopt")

ROPE_THETA = 10000  # upstream EmbedNDRoPE(inner_dim, 10000, axes_dim=[attention_head_dim])


class DiTConfigError(ConfigError):
    """A DiT config selects a path ndopt does not implement, or is inconsistent (a CheckpointError)."""


# Upstream __init__ arguments that only matter for training, flash-attn or sequence parallelism.
_IGNORED_KEYS = frozenset({"use_flash_attn", "use_gradient_checkpointing", "gradient_checkpointing_ratio",
                           "use_mixed_training"})
# Upstream arguments whose value picks a code path: we implement exactly the pipeline's choice.
_REQUIRED_VALUES: dict[str, Any] = {"pos_embed_type": "sincos"}
# What upstream's `build_pyramid_dit` (pyramid_dit_for_video_gen_pipeline.py, model_name "pyramid_mmdit")
# passes to `PyramidDiffusionMMDiT.from_pretrained`, overriding config.json whatever it says (diffusers
# takes from_pretrained's keyword arguments over the file's). use_temporal_causal and
# interp_condition_pos are the pipeline's own defaults (True), which upstream's inference keeps.
UPSTREAM_OVERRIDES: dict[str, Any] = {"use_t5_mask": True, "add_temp_pos_embed": True,
                                      "temp_pos_embed_type": "rope", "use_temporal_causal": True,
                                      "interp_condition_pos": True}


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # 1 is not true in a config file


@dataclass(frozen=True)
class MMDiTConfig:
    """Architecture of the DiT; defaults are Pyramid-Flow SD3's checkpoint (24 blocks, 1536 wide)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 192
    max_num_frames: int = 200  # upstream: only the sincos temporal embedding uses it (not the rope path)
    qk_norm: str | None = "rms_norm"
    joint_attention_dim: int = 4096
    use_temporal_causal: bool = True
    interp_condition_pos: bool = True

    def __post_init__(self) -> None:
        if self.qk_norm not in (None, "rms_norm"):
            raise DiTConfigError(f"MMDiTConfig.qk_norm={self.qk_norm!r}: only 'rms_norm' or None is implemented")
        if self.caption_projection_dim != self.inner_dim:
            raise DiTConfigError(
                f"MMDiTConfig.caption_projection_dim={self.caption_projection_dim} must equal the block width "
                f"num_attention_heads*attention_head_dim={self.inner_dim} (the SD3 blocks are square)")
        if self.attention_head_dim % 2:
            raise DiTConfigError(f"MMDiTConfig.attention_head_dim={self.attention_head_dim} must be even (RoPE pairs)")
        if self.inner_dim % 4:
            # diffusers' get_2d_sincos_pos_embed: half the width per axis, each half sin/cos pairs
            raise DiTConfigError(f"MMDiTConfig: the block width num_attention_heads*attention_head_dim="
                                 f"{self.inner_dim} must be a multiple of 4 (the 2D sin-cos position embedding)")
        if self.sample_size < self.patch_size:
            raise DiTConfigError(f"MMDiTConfig.sample_size={self.sample_size} is smaller than patch_size="
                                 f"{self.patch_size}: the position embedding's base grid would be empty")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path = "DiT config") -> MMDiTConfig:
        """Read an upstream `config.json` dict as upstream's pipeline does; `source` (the file) names errors.

        diffusers `_`-keys and training-only keys are ignored; every other value is checked by type and
        range (`configs.DiTConfigFile`). The flags upstream's `build_pyramid_dit` forces
        (`UPSTREAM_OVERRIDES`) take upstream's value whatever the file says, with a warning naming each
        one the file disagrees with. A missing key takes the released checkpoint's value (the defaults).
        """
        if not isinstance(d, dict):
            raise DiTConfigError(f"{source}: a DiT config must be a JSON object, found {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)} - set(UPSTREAM_OVERRIDES)
        values: dict[str, Any] = {}
        overridden = []
        for key, value in d.items():
            if not isinstance(key, str) or key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in UPSTREAM_OVERRIDES:
                if not _same(value, UPSTREAM_OVERRIDES[key]):
                    overridden.append(f"{key}={value!r} -> {UPSTREAM_OVERRIDES[key]!r}")
                continue
            if key in _REQUIRED_VALUES:
                if not _same(value, _REQUIRED_VALUES[key]):
                    raise DiTConfigError(
                        f"{source}: DiT config key {key!r}={value!r} selects a path ndopt does not implement; "
                        f"only {key}={_REQUIRED_VALUES[key]!r} (the upstream inference pipeline's) is supported")
                continue
            if key not in fields:
                raise DiTConfigError(f"{source}: DiT config key {key!r} is not a PyramidDiffusionMMDiT argument: "
                                     f"check the file is the SD3-variant DiT's config.json")
            values[key] = value
        kwargs = check(DiTConfigFile, values, source, "DiT config", DiTConfigError)
        forced = {k: v for k, v in UPSTREAM_OVERRIDES.items() if k in {f.name for f in dataclasses.fields(cls)}}
        try:
            config = cls(**kwargs, **forced)
        except DiTConfigError as e:
            raise DiTConfigError(f"{source}: {e}") from None
        if overridden:
            logger.warning("%s: upstream's build_pyramid_dit overrides %d of the file's values for the SD3 DiT; "
                           "using upstream's: %s", source, len(overridden), ", ".join(overridden))
        return config


@dataclass(frozen=True)
class DiTLayout:
    """The static shapes of one DiT call: what makes a call signature.

    `clips` are the (frames, height, width) of each latent clip in `sample` in latent pixels, oldest
    history first and the noisy current clip last.
    """

    batch: int
    text_len: int
    clips: tuple[tuple[int, int, int], ...]
    patch_size: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "clips", tuple(tuple(int(v) for v in c) for c in self.clips))
        if not self.clips:
            raise ValueError("DiTLayout.clips is empty: a DiT call needs at least the current clip")
        p, (_, cur_h, cur_w) = self.patch_size, self.clips[-1]
        for i, (t, h, w) in enumerate(self.clips):
            if t < 1 or h % p or w % p or h < p or w < p:
                raise ValueError(f"DiTLayout.clips[{i}]={(t, h, w)}: needs t >= 1 and h, w positive multiples "
                                 f"of patch_size={p}")
            if h > cur_h or w > cur_w:
                raise ValueError(f"DiTLayout.clips[{i}]={(t, h, w)} is larger than the current clip "
                                 f"{self.clips[-1]}: history clips are at the current resolution or lower")

    @classmethod
    def from_inputs(cls, sample: Sequence[Tensor], encoder_hidden_states: Tensor, patch_size: int = 2) -> DiTLayout:
        clips = tuple(tuple(int(s) for s in clip.shape[2:]) for clip in sample)
        return cls(int(encoder_hidden_states.shape[0]), int(encoder_hidden_states.shape[1]), clips, patch_size)

    def clip_tokens(self, i: int) -> int:
        t, h, w = self.clips[i]
        return t * (h // self.patch_size) * (w // self.patch_size)

    @property
    def tokens(self) -> int:
        """Image tokens in total; text_len + tokens is the joint sequence length."""
        return sum(self.clip_tokens(i) for i in range(len(self.clips)))

    @property
    def seq_len(self) -> int:
        return self.text_len + self.tokens


def frame_ids(layout: DiTLayout, device: torch.device) -> Tensor:
    """[S] float32 temporal index of every joint token: 0 for text, then a running latent-frame index
    over the clips (upstream `_prepare_pyramid_temporal_rope_ids`, text ids zero)."""
    parts = [torch.zeros(layout.text_len, dtype=torch.float32, device=device)]
    start = 0
    for i, (t, _, _) in enumerate(layout.clips):
        per_frame = layout.clip_tokens(i) // t
        ids = torch.arange(start, start + t, dtype=torch.float32, device=device)
        parts.append(ids[:, None].expand(t, per_frame).reshape(t * per_frame))
        start += t
    return torch.cat(parts)


def temporal_rope(ids: Tensor, head_dim: int, theta: int = ROPE_THETA) -> Tensor:
    """[2, S, head_dim/2] (cos, sin) of the 1-D temporal RoPE over the whole head dim.

    Upstream `rope()` computes the angles in float64 and casts the table to float32; so do we.
    """
    omega = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=ids.device) / head_dim)
    angles = ids.double()[:, None] * omega[None, :]
    return torch.stack([angles.cos(), angles.sin()]).float()


def joint_attention_mask(encoder_attention_mask: Tensor, ids: Tensor, layout: DiTLayout,
                         temporal_causal: bool = True) -> Tensor:
    """[B, 1, S, S] bool, True = attend (upstream `merge_input`, non-flash path).

    Upstream gives real text and image tokens of batch row b the id b+1 and padded text tokens 0,
    and lets tokens with equal ids attend; within one row that is "both real or both padding".
    The temporal-causal mask lets a token attend to tokens whose frame id is not later than its own
    (text has id 0, so it sees text and the first latent frame).
    """
    text_valid = encoder_attention_mask != 0
    image_valid = torch.ones(layout.batch, layout.tokens, dtype=torch.bool, device=text_valid.device)
    valid = torch.cat([text_valid, image_valid], dim=1)
    mask = valid[:, None, :, None] == valid[:, None, None, :]
    if temporal_causal:
        mask = mask & (ids[:, None] >= ids[None, :])
    return mask


def _is_proxy(x: Any) -> bool:
    return isinstance(x, torch.fx.Proxy)


class PyramidMMDiT(nn.Module):
    """Pyramid-Flow's SD3 MMDiT for one pyramid stage: predicts the velocity of the last clip."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.config = config
        self.attention_impl = "sdpa"
        dim = config.inner_dim
        self.pos_embed = PatchEmbed3D(config.sample_size, config.patch_size, config.in_channels, dim,
                                      config.pos_embed_max_size, config.interp_condition_pos)
        self.time_text_embed = CombinedTimestepConditionEmbeddings(dim, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, config.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            JointTransformerBlock(dim, config.num_attention_heads, config.attention_head_dim, config.qk_norm,
                                  context_pre_only=i == config.num_layers - 1)
            for i in range(config.num_layers)])
        self.norm_out = AdaLayerNormContinuous(dim, dim, eps=1e-6)
        self.proj_out = nn.Linear(dim, config.patch_size ** 2 * config.in_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Upstream `initialize_weights`: xavier, N(0, 0.02) conditioning, zero adaLN and output."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.pos_embed.proj.weight  # patch embed initialised like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        tte = self.time_text_embed
        for lin in (tte.timestep_embedder.linear_1, tte.timestep_embedder.linear_2,
                    tte.text_embedder.linear_1, tte.text_embedder.linear_2, self.context_embedder):
            nn.init.normal_(lin.weight, std=0.02)
        zeroed = [b.norm1.linear for b in self.transformer_blocks]
        zeroed += [b.norm1_context.linear for b in self.transformer_blocks]
        for lin in [*zeroed, self.norm_out.linear, self.proj_out]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def set_attention_impl(self, name: str) -> PyramidMMDiT:
        """'sdpa' (F.scaled_dot_product_attention) or 'matmul' (explicit q k^T, mask, softmax, @ v)."""
        if name not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={name!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
        self.attention_impl = name
        for m in self.modules():
            if isinstance(m, JointAttention):
                m.attention_impl = name
        return self

    def _check_layout(self, layout: DiTLayout, sample: Sequence[Tensor], encoder_hidden_states: Tensor) -> None:
        if layout.patch_size != self.config.patch_size:
            raise ValueError(f"DiTLayout.patch_size={layout.patch_size} but the DiT patchifies by "
                             f"{self.config.patch_size}")
        _, h, w = layout.clips[-1]
        limit = self.config.pos_embed_max_size
        if max(h, w) // layout.patch_size > limit:
            raise ValueError(f"current clip {layout.clips[-1]} exceeds pos_embed_max_size={limit} patches")
        if not _is_proxy(encoder_hidden_states) and not _is_proxy(sample):
            actual = DiTLayout.from_inputs(sample, encoder_hidden_states, layout.patch_size)
            if actual != layout:
                raise ValueError(f"DiT inputs have layout {actual}, but the call was given {layout}")

    def forward(self, sample: list[Tensor], encoder_hidden_states: Tensor, encoder_attention_mask: Tensor,
                pooled_projections: Tensor, timestep_ratio: Tensor | None = None, layout: DiTLayout | None = None,
                timestep_embedding: Tensor | None = None) -> Tensor:
        """sample: [B, C, t_i, h_i, w_i] clips, history first; returns [B, C, t, h, w] for the last one.

        `timestep_embedding` [B, D] replaces `timestep_ratio` once schedule folding has precomputed the
        timestep MLP for every step (`fold_timestep_embedding`)."""
        if layout is None:
            layout = DiTLayout.from_inputs(sample, encoder_hidden_states, self.config.patch_size)
        self._check_layout(layout, sample, encoder_hidden_states)

        if timestep_embedding is not None:
            temb = timestep_embedding + self.time_text_embed.text_embedder(pooled_projections)
        elif isinstance(self.time_text_embed, FoldedTimeTextEmbed):
            raise ValueError("this DiT's timestep MLP was folded into the schedule: pass timestep_embedding "
                             "(the schedule's precomputed row), not timestep_ratio")
        else:
            temb = self.time_text_embed(timestep_ratio, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        hidden = self.pos_embed(sample, layout.clips, layout.batch)

        ids = frame_ids(layout, hidden.device)
        rope = temporal_rope(ids, self.config.attention_head_dim)
        mask = joint_attention_mask(encoder_attention_mask, ids, layout, self.config.use_temporal_causal)

        for block in self.transformer_blocks:
            out = block(hidden, context, temb, mask, rope)
            context, hidden = out[0], out[1]

        hidden = self.proj_out(self.norm_out(hidden, temb))
        return self._unpatchify(hidden[:, layout.tokens - layout.clip_tokens(-1):], layout)

    def _unpatchify(self, x: Tensor, layout: DiTLayout) -> Tensor:
        """[B, t*h*w, p*p*C] tokens of the last clip -> [B, C, t, h*p, w*p] (upstream split_output)."""
        p, c = self.config.patch_size, self.config.in_channels
        t, height, width = layout.clips[-1]
        h, w = height // p, width // p
        x = x.reshape(layout.batch * t, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)   # [Bt, C, h, p, w, p]
        return x.reshape(layout.batch, t, c, height, width).transpose(1, 2)


class FoldedTimeTextEmbed(nn.Module):
    """`time_text_embed` after schedule folding: only the pooled-text MLP stays in the graph; the
    timestep MLP's outputs are constants of the schedule, fed as `timestep_embedding`."""

    def __init__(self, text_embedder: nn.Module) -> None:
        super().__init__()
        self.text_embedder = text_embedder


def fold_timestep_embedding(dit: PyramidMMDiT, timesteps: Sequence[float]) -> tuple[PyramidMMDiT, Tensor]:
    """A DiT sharing every module but `time_text_embed`, and the [len(timesteps), D] table of the
    timestep MLP at those timesteps (upstream `timestep_embedder(time_proj(t))`). The input is untouched."""
    tte = dit.time_text_embed
    if isinstance(tte, FoldedTimeTextEmbed):
        raise ValueError("the timestep embedding is already folded")
    p = next(dit.parameters())
    t = torch.tensor(list(timesteps), dtype=torch.float32, device=p.device)
    with torch.no_grad():
        table = tte.timestep_embedder(tte.time_proj(t).to(p.dtype))
    new = copy.copy(dit)  # shallow: new module dicts below, shared submodules and parameters
    new._modules = dict(dit._modules)
    new._parameters = dict(dit._parameters)
    new._buffers = dict(dit._buffers)
    new.time_text_embed = FoldedTimeTextEmbed(tte.text_embedder)
    return new, table


@torch.no_grad()
def randomize_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Fill every parameter with seeded noise that keeps activations O(1), in place.

    Upstream's init zeroes the adaLN and output layers, so a fresh DiT outputs exactly 0; tests need
    non-trivial outputs. Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm weights ~ 1 + N(0, 0.1^2).
    """
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        if p.dim() >= 2:
            value = noise / p[0].numel() ** 0.5
        elif name.endswith("bias"):
            value = 0.02 * noise
        else:
            value = 1.0 + 0.1 * noise
        p.copy_(value.to(p))
    return model


class DiTBlockTracer(torch.fx.Tracer):
    """fx tracer that keeps each JointTransformerBlock as one leaf `call_module` node.

    Buffers are traced as `get_attr` nodes (not folded into constants), so the position-embedding
    crop stays in the graph and follows `load_state_dict` and device moves of the DiT.
    """

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, JointTransformerBlock) or super().is_leaf_module(m, module_qualified_name)


class _DiTAtLayout(nn.Module):
    """The DiT bound to one layout, with the DiT's children registered at top level so that node
    targets read `transformer_blocks.0`, not `dit.transformer_blocks.0`."""

    def __init__(self, dit: PyramidMMDiT, layout: DiTLayout) -> None:
        super().__init__()
        for name, child in dit.named_children():
            self.add_module(name, child)
        self.__dict__["_dit"] = dit  # not a submodule: its children are ours already
        self.layout = layout

    def forward(self, sample: list[Tensor], encoder_hidden_states: Tensor, encoder_attention_mask: Tensor,
                pooled_projections: Tensor, timestep_ratio: Tensor) -> Tensor:
        return self._dit.forward(sample, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                                 timestep_ratio, layout=self.layout)


class _FoldedDiTAtLayout(_DiTAtLayout):
    """A schedule-folded DiT at one layout: takes the precomputed timestep embedding."""

    def forward(self, sample: list[Tensor], encoder_hidden_states: Tensor, encoder_attention_mask: Tensor,
                pooled_projections: Tensor, timestep_embedding: Tensor) -> Tensor:
        return self._dit.forward(sample, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                                 layout=self.layout, timestep_embedding=timestep_embedding)


def trace_dit(dit: PyramidMMDiT, layout: DiTLayout) -> torch.fx.GraphModule:
    """One GraphModule per call signature; it shares parameters with `dit`.

    forward(sample, encoder_hidden_states, encoder_attention_mask, pooled_projections, timestep_ratio)
    equals `dit(..., layout=layout)` (timestep_embedding instead of timestep_ratio once folded).
    """
    folded = isinstance(dit.time_text_embed, FoldedTimeTextEmbed)
    wrapper = (_FoldedDiTAtLayout if folded else _DiTAtLayout)(dit, layout)
    graph = DiTBlockTracer().trace(wrapper)
    gm = torch.fx.GraphModule(wrapper, graph, class_name="PyramidMMDiTAtLayout")
    gm.graph.lint()
    logger.debug("traced dit at %s: %d nodes, %d blocks", layout, len(gm.graph.nodes), len(dit_block_names(gm)))
    return gm


def dit_block_names(gm: torch.fx.GraphModule) -> list[str]:
    """The call_module targets of the transformer blocks, in execution order."""
    return [n.target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), JointTransformerBlock)]


def tiny_config() -> MMDiTConfig:
    """The tiny preset (~3.6M params): same structure, 16 latent channels (the VAE contract)."""
    return MMDiTConfig(sample_size=16, patch_size=2, in_channels=16, num_layers=6, attention_head_dim=32,
                       num_attention_heads=4, caption_projection_dim=128, pooled_projection_dim=64,
                       pos_embed_max_size=32, max_num_frames=64, qk_norm="rms_norm", joint_attention_dim=64)
