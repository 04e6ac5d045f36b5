"""The miniFLUX DiT's blocks for block-level passes: their listing, and a copy keeping some of them.

Two kinds run in order: "double" (`transformer_blocks.i`, FluxTransformerBlock: image and text
streams in, text and image streams out, like SD3's joint block) then "single"
(`single_transformer_blocks.j`, FluxSingleTransformerBlock: one joint [text; image] stream in and
out). Block indices count both kinds in execution order, double first, so block importance scores
and block pruning's `remove` see one list. The single blocks' stream holds the text tokens too:
block importance compares that joint stream, the one the block rewrites.

`without_blocks` keeps blocks by index through `dit.keep_blocks` (renumbered, weights copied, strict
load). `fold_last_context` has nothing to fold while a single block remains (every double block's
text output feeds the joint sequence); with none left, the last double block's text output is
sliced off unused but kept, as upstream's FLUX block has no `context_pre_only` form to fold into.
"""

from __future__ import annotations

from torch import nn

from ndopt.errors import PassError
from ndopt.frontends.miniflux.dit import PyramidFluxDiT, keep_blocks
from ndopt.model import Block, BlockIO

DOUBLE = "double"
SINGLE = "single"
# FluxTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, ...) -> (context, hidden)
DOUBLE_IO = BlockIO(inputs=("hidden_states", "encoder_hidden_states"),
                    outputs=("encoder_hidden_states", "hidden_states"))
# FluxSingleTransformerBlock.forward(hidden_states, temb, ...) -> hidden_states ([text; image] tokens)
SINGLE_IO = BlockIO(inputs=("hidden_states",), outputs=("hidden_states",))
BLOCK_IO = {DOUBLE: DOUBLE_IO, SINGLE: SINGLE_IO}


def flux_dit(dit: nn.Module) -> PyramidFluxDiT:
    """`dit` if it is a miniFLUX DiT (or a shallow copy of one, as passes make); a PassError otherwise."""
    if not isinstance(dit, PyramidFluxDiT):
        raise PassError(f"the dit is a {type(dit).__name__}, not a PyramidFluxDiT (no miniFLUX blocks to read)")
    return dit


def flux_blocks(dit: nn.Module) -> list[Block]:
    """Double then single blocks, indexed in execution order."""
    dit = flux_dit(dit)
    n = len(dit.transformer_blocks)
    return [Block(i, DOUBLE, f"transformer_blocks.{i}") for i in range(n)] + \
        [Block(n + j, SINGLE, f"single_transformer_blocks.{j}") for j in range(len(dit.single_transformer_blocks))]


def block_io(kind: str) -> BlockIO:
    if kind not in BLOCK_IO:
        raise PassError(f"the miniFLUX DiT has {DOUBLE!r} and {SINGLE!r} blocks, not {kind!r}")
    return BLOCK_IO[kind]


def without_blocks(dit: nn.Module, keep: list[int]) -> PyramidFluxDiT:
    """A new miniFLUX DiT with the blocks `keep` (indices of `flux_blocks`), each kind renumbered from 0."""
    dit = flux_dit(dit)
    n_double = len(dit.transformer_blocks)
    n = n_double + len(dit.single_transformer_blocks)
    if not keep or sorted(set(keep)) != list(keep) or not all(isinstance(i, int) and 0 <= i < n for i in keep):
        raise PassError(f"keep={keep}: give increasing block indices in 0..{n - 1}, at least one")
    double = [i for i in keep if i < n_double]
    single = [i - n_double for i in keep if i >= n_double]
    try:
        new = keep_blocks(dit, double, single)
    except ValueError as e:  # a folded timestep MLP: pruning belongs before schedule_folding
        raise PassError(f"block_pruning: {e}") from None
    return new.eval().requires_grad_(False)
