"""Pyramid-Flow's miniFLUX DiT (the `dit` component), faithful to upstream, fx-traceable.

Upstream: `jy0205/Pyramid-Flow`, `PyramidFluxTransformer` (`pyramid_dit/flux_modules/
modeling_pyramid_flux.py`) as `build_pyramid_dit("pyramid_flux", ...)` loads it for inference
(`use_temporal_causal=True, interp_condition_pos=True, axes_dims_rope=[16, 24, 24]`,
`use_flash_attn=False`), one pyramid stage per call. Parameter names equal upstream's, so an upstream
state dict loads with `strict=True`.

The DiT is called exactly like the SD3 variant's `PyramidMMDiT` (clips of 16-channel latents, history
first; the same `DiTLayout`), so the shared `PyramidFlowSampler` drives it. Inside, each clip is packed
2x2 into 64-channel tokens (upstream's hard-coded `patch_size = 2` over its `patch_size: 1` config),
positions are 3-axis RoPE ids (time, height, width; history clips take the current clip's positions,
resampled), and 8 double-stream then 16 single-stream blocks run with the temporal-causal mask. Every
shape-dependent decision reads the `DiTLayout`, so `trace_dit` gives one GraphModule per call
signature with the blocks as leaf `call_module` nodes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from ndopt.frontends.miniflux.config import PACK, UPSTREAM_OVERRIDES, DiTConfigError, FluxDiTConfig
from ndopt.frontends.miniflux.layers import (
    FluxAttention,
    FluxSingleAttention,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    rope_ids,
    rope_table,
)
from ndopt.frontends.pyramid_flow import dit as sd3_dit
from ndopt.frontends.pyramid_flow.dit import (
    DiTLayout,
    FoldedTimeTextEmbed,
    frame_ids,
    joint_attention_mask,
)
from ndopt.frontends.pyramid_flow.dit_layers import (
    ATTENTION_IMPLS,
    AdaLayerNormContinuous,
    CombinedTimestepConditionEmbeddings,
)

__all__ = [
    "PACK", "UPSTREAM_OVERRIDES", "DiTConfigError", "FluxBlockTracer", "FluxDiTConfig", "PyramidFluxDiT",
    "dit_block_names", "fold_timestep_embedding", "keep_blocks", "tiny_config", "trace_dit",
]

logger = logging.getLogger("ndopt")


def _is_proxy(x: Any) -> bool:
    return isinstance(x, torch.fx.Proxy)


class PyramidFluxDiT(nn.Module):
    """Pyramid-Flow's miniFLUX DiT for one pyramid stage: predicts the velocity of the last clip."""

    def __init__(self, config: FluxDiTConfig) -> None:
        super().__init__()
        self.config = config
        self.attention_impl = "sdpa"
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        # registration order follows upstream (its `pos_embed` EmbedND holds no tensors: `rope_table` here)
        self.time_text_embed = CombinedTimestepConditionEmbeddings(dim, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.packed_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(dim, heads, head_dim) for _ in range(config.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(config.num_single_layers)])
        self.norm_out = AdaLayerNormContinuous(dim, dim, eps=1e-6)
        self.proj_out = nn.Linear(dim, config.packed_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Upstream `initialize_weights`: xavier Linears, N(0, 0.02) conditioning, zero adaLN and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        tte = self.time_text_embed
        for lin in (tte.timestep_embedder.linear_1, tte.timestep_embedder.linear_2,
                    tte.text_embedder.linear_1, tte.text_embedder.linear_2, self.context_embedder):
            nn.init.normal_(lin.weight, std=0.02)
        zeroed = [lin for b in self.transformer_blocks for lin in (b.norm1.linear, b.norm1_context.linear)]
        zeroed += [b.norm.linear for b in self.single_transformer_blocks]
        for lin in [*zeroed, self.norm_out.linear, self.proj_out]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def set_attention_impl(self, name: str) -> PyramidFluxDiT:
        """'sdpa' (F.scaled_dot_product_attention) or 'matmul' (explicit q k^T, mask, softmax, @ v)."""
        if name not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={name!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
        self.attention_impl = name
        for m in self.modules():
            if isinstance(m, (FluxAttention, FluxSingleAttention)):
                m.attention_impl = name
        return self

    def _check_layout(self, layout: DiTLayout, sample: Sequence[Tensor], encoder_hidden_states: Tensor) -> None:
        if layout.patch_size != PACK:
            raise ValueError(f"DiTLayout.patch_size={layout.patch_size} but the miniFLUX DiT packs {PACK}x{PACK} "
                             "latent pixels per token")
        if _is_proxy(encoder_hidden_states) or _is_proxy(sample):
            return
        actual = DiTLayout.from_inputs(sample, encoder_hidden_states, PACK)
        if actual != layout:
            raise ValueError(f"DiT inputs have layout {actual}, but the call was given {layout}")
        bad = [i for i, clip in enumerate(sample) if clip.shape[1] != self.config.latent_channels]
        if bad:
            raise ValueError(f"DiT sample[{bad[0]}] has {sample[bad[0]].shape[1]} channels; the miniFLUX DiT takes "
                             f"{self.config.latent_channels}-channel latent clips [B, C, t, h, w]")

    def forward(self, sample: list[Tensor], encoder_hidden_states: Tensor, encoder_attention_mask: Tensor,
                pooled_projections: Tensor, timestep_ratio: Tensor | None = None, layout: DiTLayout | None = None,
                timestep_embedding: Tensor | None = None) -> Tensor:
        """sample: [B, C, t_i, h_i, w_i] clips, history first; returns [B, C, t, h, w] for the last one.

        `timestep_embedding` [B, D] replaces `timestep_ratio` once schedule folding has precomputed the
        timestep MLP for every step (`fold_timestep_embedding`)."""
        if layout is None:
            layout = DiTLayout.from_inputs(sample, encoder_hidden_states, PACK)
        self._check_layout(layout, sample, encoder_hidden_states)

        if timestep_embedding is not None:
            temb = timestep_embedding + self.time_text_embed.text_embedder(pooled_projections)
        elif isinstance(self.time_text_embed, FoldedTimeTextEmbed):
            raise ValueError("this DiT's timestep MLP was folded into the schedule: pass timestep_embedding "
                             "(the schedule's precomputed row), not timestep_ratio")
        else:
            temb = self.time_text_embed(timestep_ratio, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        hidden = self.x_embedder(self._pack(sample, layout))

        # RoPE positions depend on the layout only: a constant table (of the traced graph too)
        rope = rope_table(rope_ids(layout), self.config.axes_dims_rope).to(hidden.device)
        ids = frame_ids(layout, hidden.device)  # the time axis of rope_ids, as the causal mask's order ids
        mask = joint_attention_mask(encoder_attention_mask, ids, layout, self.config.use_temporal_causal)

        for block in self.transformer_blocks:
            context, hidden = block(hidden, context, temb, mask, rope)
        hidden = torch.cat([context, hidden], dim=1)
        for block in self.single_transformer_blocks:
            hidden = block(hidden, temb, mask, rope)

        hidden = hidden[:, layout.seq_len - layout.clip_tokens(-1):]  # the current clip's tokens
        return self._unpack(self.proj_out(self.norm_out(hidden, temb)), layout)

    def _pack(self, sample: Sequence[Tensor], layout: DiTLayout) -> Tensor:
        """Clips [B, C, t, h, w] -> [B, tokens, 4C]: 'b c t (h p1) (w p2) -> b (t h w) (p1 p2 c)' (upstream)."""
        c, b = self.config.latent_channels, layout.batch
        tokens = []
        for i, (t, height, width) in enumerate(layout.clips):
            h, w = height // PACK, width // PACK
            x = sample[i].transpose(1, 2).reshape(b * t, c, h, PACK, w, PACK).permute(0, 2, 4, 3, 5, 1)
            tokens.append(x.reshape(b, t * h * w, PACK * PACK * c))
        return torch.cat(tokens, dim=1)

    def _unpack(self, x: Tensor, layout: DiTLayout) -> Tensor:
        """[B, t*h*w, 4C] tokens of the last clip -> [B, C, t, 2h, 2w] (upstream `split_output`)."""
        c = self.config.latent_channels
        t, height, width = layout.clips[-1]
        h, w = height // PACK, width // PACK
        x = x.reshape(layout.batch * t, h, w, PACK, PACK, c).permute(0, 5, 1, 3, 2, 4)   # [Bt, C, h, p1, w, p2]
        return x.reshape(layout.batch, t, c, height, width).transpose(1, 2)


def fold_timestep_embedding(dit: PyramidFluxDiT, timesteps: Sequence[float]) -> tuple[PyramidFluxDiT, Tensor]:
    """A DiT sharing every module but `time_text_embed`, and the [len(timesteps), D] table of the timestep
    MLP at those timesteps: the SD3 variant's fold (the same `time_text_embed` modules), reused."""
    if not isinstance(dit, PyramidFluxDiT):
        raise TypeError(f"fold_timestep_embedding takes a PyramidFluxDiT, got {type(dit).__name__}")
    return sd3_dit.fold_timestep_embedding(dit, timesteps)  # type: ignore[arg-type,return-value]


_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def keep_blocks(dit: PyramidFluxDiT, double: Sequence[int], single: Sequence[int]) -> PyramidFluxDiT:
    """A new DiT with only the given double- and single-stream blocks (in the given increasing order,
    renumbered from 0) and copies of every other weight, loaded with `strict=True`. A child an earlier
    pass replaced (the context embedder an encoder substitution dropped) is copied as it is."""
    if isinstance(dit.time_text_embed, FoldedTimeTextEmbed):
        raise ValueError("keep_blocks needs the DiT's timestep MLP: remove blocks before schedule folding")
    for what, keep, n in (("double", double, dit.config.num_layers), ("single", single, dit.config.num_single_layers)):
        keep = list(keep)
        if any(not isinstance(i, int) or isinstance(i, bool) for i in keep):
            raise ValueError(f"keep_blocks: {what}-stream block indices must be integers, got {keep}")
        if any(i < 0 or i >= n for i in keep) or keep != sorted(set(keep)):
            raise ValueError(f"keep_blocks: {what}-stream block indices {keep} must be increasing, distinct and in "
                             f"0..{n - 1} (the DiT has {n})")
    renumber = {f"transformer_blocks.{old}.": f"transformer_blocks.{new}." for new, old in enumerate(double)}
    renumber |= {f"single_transformer_blocks.{old}.": f"single_transformer_blocks.{new}."
                 for new, old in enumerate(single)}
    state = {}
    for key, value in dit.state_dict().items():
        if key.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            prefix = ".".join(key.split(".")[:2]) + "."
            if prefix not in renumber:
                continue
            key = renumber[prefix] + key[len(prefix):]
        state[key] = value.detach().clone()
    config = dataclasses.replace(dit.config, num_layers=len(double), num_single_layers=len(single))
    with torch.device("meta"):
        new = PyramidFluxDiT(config)
    for name, child in dit.named_children():  # earlier rewrites stay (a context adapter took context_embedder)
        if name not in _BLOCK_LISTS and type(child) is not type(getattr(new, name, None)):
            setattr(new, name, copy.deepcopy(child))
    new.load_state_dict(state, strict=True, assign=True)
    grads = dict(dit.named_parameters())
    for name, p in new.named_parameters():
        p.requires_grad_(grads[_old_name(name, double, single)].requires_grad)
    new.set_attention_impl(dit.attention_impl)
    return new.train(dit.training)


def _old_name(name: str, double: Sequence[int], single: Sequence[int]) -> str:
    parts = name.split(".")
    if parts[0] == "transformer_blocks":
        parts[1] = str(double[int(parts[1])])
    elif parts[0] == "single_transformer_blocks":
        parts[1] = str(single[int(parts[1])])
    return ".".join(parts)


class FluxBlockTracer(sd3_dit.DiTBlockTracer):
    """fx tracer that keeps each double- and single-stream block as one leaf `call_module` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (FluxTransformerBlock, FluxSingleTransformerBlock)) or \
            super().is_leaf_module(m, module_qualified_name)


def trace_dit(dit: PyramidFluxDiT, layout: DiTLayout) -> torch.fx.GraphModule:
    """One GraphModule per call signature; it shares parameters with `dit`.

    forward(sample, encoder_hidden_states, encoder_attention_mask, pooled_projections, timestep_ratio)
    equals `dit(..., layout=layout)` (timestep_embedding instead of timestep_ratio once folded)."""
    folded = isinstance(dit.time_text_embed, FoldedTimeTextEmbed)
    wrapper = (sd3_dit._FoldedDiTAtLayout if folded else sd3_dit._DiTAtLayout)(dit, layout)  # type: ignore[arg-type]
    graph = FluxBlockTracer().trace(wrapper)
    gm = torch.fx.GraphModule(wrapper, graph, class_name="PyramidFluxDiTAtLayout")
    gm.graph.lint()
    logger.debug("traced miniFLUX dit at %s: %d nodes, %d blocks", layout, len(gm.graph.nodes), len(dit_block_names(gm)))
    return gm


def dit_block_names(gm: torch.fx.GraphModule) -> list[str]:
    """The call_module targets of the double- and single-stream blocks, in execution order."""
    return [n.target for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), (FluxTransformerBlock, FluxSingleTransformerBlock))]


def tiny_config() -> FluxDiTConfig:
    """The tiny preset: 2 double + 2 single blocks, 2 heads of 64 (upstream's loader forces
    axes_dims_rope [16, 24, 24], so the head stays 64 wide for a tiny checkpoint to load as upstream
    does), the tiny text encoders' widths (T5 64, CLIP-L pooled 32), 16 latent channels."""
    return FluxDiTConfig(latent_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64,
                         num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32)
