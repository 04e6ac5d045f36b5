"""The MMDiT's blocks for block-level passes: their listing, and a copy keeping some of them.

SD3's MMDiT has one block kind, "joint" (`JointTransformerBlock`: image and text streams in, text and
image streams out). `without_blocks` renumbers the kept blocks 0..k-1 into a new `PyramidMMDiT` whose
state dict is the old one with renumbered keys (strict load). When the kept last block is not
upstream's last (`context_pre_only`), its text-stream output is dead: `fold_context_pre_only` turns it
into upstream's `context_pre_only` form, an exact rewrite that drops the dead weights and keeps the
pruned DiT loadable as a standard `num_layers=k` checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import replace as dc_replace

import torch
from torch import nn

from ndopt.errors import PassError, VerificationError
from ndopt.frontends.pyramid_flow.dit import PyramidMMDiT
from ndopt.frontends.pyramid_flow.dit_layers import AdaLayerNormContinuous, JointTransformerBlock
from ndopt.model import Block, BlockIO

JOINT = "joint"
# JointTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, ...) -> (context, hidden)
JOINT_IO = BlockIO(inputs=("hidden_states", "encoder_hidden_states"), outputs=("encoder_hidden_states", "hidden_states"))


def mmdit(dit: nn.Module) -> PyramidMMDiT:
    """`dit` if it is an MMDiT (or a shallow copy of one, as passes make); a PassError otherwise."""
    if not isinstance(dit, PyramidMMDiT):
        raise PassError(f"the dit is a {type(dit).__name__}, not a PyramidMMDiT (no MMDiT blocks to read)")
    return dit


def mmdit_blocks(dit: nn.Module) -> list[Block]:
    return [Block(i, JOINT, f"transformer_blocks.{i}") for i in range(len(mmdit(dit).transformer_blocks))]


def fold_context_pre_only(block: JointTransformerBlock) -> JointTransformerBlock:
    """An exactly equivalent context_pre_only block (its text-stream output was dead anyway).

    AdaLayerNormZero's first two chunks (shift, scale of the attention input) become
    AdaLayerNormContinuous's (scale, shift); the text MLP, its norm and `to_add_out` are dropped."""
    if block.context_pre_only:
        return block
    dim = block.norm1.linear.in_features
    device, dtype = block.norm1.linear.weight.device, block.norm1.linear.weight.dtype
    with torch.device("meta"):
        new = JointTransformerBlock(dim, block.attn.heads, block.attn.head_dim,
                                    "rms_norm" if block.attn.norm_q is not None else None, context_pre_only=True)
    sd = block.state_dict()
    w, b = sd.pop("norm1_context.linear.weight"), sd.pop("norm1_context.linear.bias")
    sd["norm1_context.linear.weight"] = torch.cat([w[dim:2 * dim], w[:dim]])  # (shift, scale) -> (scale, shift)
    sd["norm1_context.linear.bias"] = torch.cat([b[dim:2 * dim], b[:dim]])
    for k in [k for k in sd if k.startswith(("attn.to_add_out.", "ff_context.", "norm2_context."))]:
        del sd[k]
    new.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True, assign=True)
    new.attn.attention_impl = block.attn.attention_impl
    assert isinstance(new.norm1_context, AdaLayerNormContinuous)
    return new.to(device=device, dtype=dtype)


def without_blocks(dit: nn.Module, keep: list[int], fold_last_context: bool = True) -> PyramidMMDiT:
    """A new PyramidMMDiT with blocks `keep` renumbered 0..k-1 (renumbered state dict, strict load)."""
    dit = mmdit(dit)
    n = len(dit.transformer_blocks)
    if not keep or sorted(set(keep)) != list(keep) or not all(0 <= i < n for i in keep):
        raise PassError(f"keep={keep}: give increasing block indices in 0..{n - 1}, at least one")
    k = len(keep)
    cfg = dc_replace(dit.config, num_layers=k)
    with torch.device("meta"):
        new = PyramidMMDiT(cfg)
    for name, child in dit.named_children():  # earlier passes' rewrites (e.g. a dropped context_embedder) stay
        if name != "transformer_blocks" and type(child) is not type(getattr(new, name, None)):
            setattr(new, name, copy.deepcopy(child))
    last = dit.transformer_blocks[keep[-1]]
    if last.context_pre_only or fold_last_context:
        blocks = {i: dit.transformer_blocks[i] for i in keep}
        if not last.context_pre_only:
            blocks[keep[-1]] = fold_context_pre_only(last)
    else:  # keep the last kept block as it is: its (dead) text stream stays
        with torch.device("meta"):
            new.transformer_blocks[k - 1] = JointTransformerBlock(
                cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.qk_norm, context_pre_only=False)
        blocks = {i: dit.transformer_blocks[i] for i in keep}
    sd = {}
    for name, t in dit.state_dict().items():
        if not name.startswith("transformer_blocks."):
            sd[name] = t
    for new_i, old_i in enumerate(keep):
        for name, t in blocks[old_i].state_dict().items():
            sd[f"transformer_blocks.{new_i}.{name}"] = t
    missing, unexpected = new.load_state_dict({n: t.clone() for n, t in sd.items()}, strict=False, assign=True)
    if missing or unexpected:
        raise VerificationError(f"block_pruning: renumbered state dict does not fit the pruned DiT "
                                f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    new.set_attention_impl(dit.attention_impl)
    return new.eval().requires_grad_(False)
