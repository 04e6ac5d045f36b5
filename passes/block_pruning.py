"""Block pruning (Neodragon, MMDiT block pruning): drop the least important DiT blocks, then recover.

The seed prunes Pyramid-Flow's 24 MMDiT blocks to 18 (16 also reported) by the block importance
BI_i = 1 - E cos(X_i, X_{i+1}) (`block_importance`), then fine-tunes in two stages: stage 1
distils the pruned DiT from the unpruned teacher (output and block-feature matching), stage 2
trains it on data with the pyramidal flow-matching objective.

Structurally the pass is a rewrite of the fx block graph (`trace_dit`: blocks are leaf nodes): each
removed block's node is erased and its users rewired to its inputs, the graph is linted and
recompiled, and the kept blocks are renumbered 0..k-1 into a new `PyramidMMDiT` whose state dict
is the old one with renumbered keys. The rewritten graph must equal a fresh trace of the new
module (checked). When the last block is removed, the new last block's text-stream output is dead
(nothing reads it): with `fold_last_context` (default) it is folded into upstream's
`context_pre_only` form, an exact rewrite that drops the dead weights and keeps the pruned DiT
loadable as a standard `num_layers=k` checkpoint.

`plan()` applies only the structural effect (meta device, no training); `keep` counts blocks of
the 24-block reference model and scales to other depths (`reference_depth`).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx
from pydantic import Field, model_validator
from torch import nn

from ndopt.errors import PassError, VerificationError
from ndopt.frontends.pyramid_flow.dit import DiTLayout, PyramidMMDiT, trace_dit
from ndopt.frontends.pyramid_flow.dit_layers import AdaLayerNormContinuous, JointTransformerBlock
from ndopt.io import atomic_write_text
from ndopt.ir.pipeline import Pipeline
from ndopt.passmanager import Lossy, Pass, PassConfig, PassContext, PassResult, register
from passes.block_importance import ANALYSIS_KEY, BlockImportanceScores, pass_index

log = logging.getLogger("ndopt")

REFERENCE_DEPTH = 24  # Pyramid-Flow SD3's MMDiT; the seed's 18 and 16 are counts of its blocks


# ---- selection ----------------------------------------------------------------------------------
def blocks_to_keep(n_blocks: int, keep: int, reference_depth: int | None) -> int:
    """`keep` of the reference depth, scaled to this DiT's depth (round half up)."""
    if reference_depth is None or n_blocks == reference_depth:
        k = keep
    else:
        k = math.floor(n_blocks * keep / reference_depth + 0.5)
    if not 1 <= k < n_blocks:
        raise PassError(f"block_pruning: keeping {k} of {n_blocks} blocks (keep={keep}, reference_depth="
                        f"{reference_depth}) removes nothing or everything; choose keep so that 1 <= kept < "
                        f"{n_blocks}")
    return k


def select_by_importance(scores: BlockImportanceScores, n_remove: int) -> list[int]:
    """The n_remove least important blocks (the criterion's order)."""
    return sorted(scores.order()[:n_remove])


def plan_placeholder(n_blocks: int, n_remove: int) -> list[int]:
    """Plan mode has no scores (meta weights): remove the deepest blocks before the last one.

    Which blocks go does not change params or FLOPs (all blocks but the last are alike)."""
    return list(range(n_blocks - 1 - n_remove, n_blocks - 1))


# ---- the fx rewrite -------------------------------------------------------------------------
def remove_block_nodes(gm: torch.fx.GraphModule, removed: set[str]) -> torch.fx.GraphModule:
    """Erase the call_module nodes of `removed` blocks; users of a block's (context, hidden) outputs
    read the block's own (context, hidden) inputs instead. Lints and recompiles."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_module" or node.target not in removed:
            continue
        hidden_in, context_in = node.args[0], node.args[1]
        for user in list(node.users):
            if user.op != "call_function" or user.target.__name__ != "getitem":
                raise VerificationError(f"block_pruning: block {node.target} output is used by {user.format_node()}, "
                                        "not by an index: the DiT's block loop changed; update the rewrite")
            user.replace_all_uses_with(context_in if user.args[1] == 0 else hidden_in)
            g.erase_node(user)
        g.erase_node(node)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm


def renumber_graph(gm: torch.fx.GraphModule, mapping: dict[str, str], root: nn.Module) -> torch.fx.GraphModule:
    """The same graph with block targets renamed (old -> new) over a new root module."""
    g = copy.deepcopy(gm.graph)
    for node in g.nodes:
        if node.op == "call_module" and node.target in mapping:
            node.target = mapping[node.target]
    out = torch.fx.GraphModule(root, g, class_name=type(gm).__name__)
    out.graph.lint()
    out.recompile()
    return out


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


def build_pruned_dit(dit: PyramidMMDiT, keep: list[int], fold_last_context: bool) -> PyramidMMDiT:
    """A new PyramidMMDiT with blocks `keep` renumbered 0..k-1 (renumbered state dict, strict load)."""
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


def dit_layout(pipeline: Pipeline) -> DiTLayout:
    for sig in pipeline.call_plan():
        if pipeline[sig.component].role == "dit":
            return sig.static_dict["layout"]
    raise PassError("block_pruning: the pipeline's sampler never calls the DiT")


def graph_structure(g: torch.fx.Graph) -> list[tuple]:
    """Nodes as (op, target, args, kwargs) with node references replaced by positions (names vary)."""
    pos = {n: i for i, n in enumerate(g.nodes)}

    def norm(a: Any) -> Any:
        return torch.fx.node.map_arg(a, lambda n: f"%{pos[n]}")

    return [(n.op, str(n.target), str(norm(n.args)), str(norm(n.kwargs))) for n in g.nodes]


def rewrite_block_graph(dit: PyramidMMDiT, new: PyramidMMDiT, keep: list[int], layout: DiTLayout
                        ) -> torch.fx.GraphModule:
    """The fx rewrite of the DiT's block graph; must equal a fresh trace of the pruned DiT."""
    gm = trace_dit(dit, layout)
    names = [f"transformer_blocks.{i}" for i in range(len(dit.transformer_blocks))]
    removed = {n for i, n in enumerate(names) if i not in keep}
    gm = remove_block_nodes(gm, removed)
    mapping = {f"transformer_blocks.{old}": f"transformer_blocks.{new_i}" for new_i, old in enumerate(keep)}
    root = trace_dit(new, layout)  # its modules (and, dead code aside, its graph) are the pruned DiT's
    rewritten = renumber_graph(gm, mapping, root)
    root.graph.eliminate_dead_code()
    if graph_structure(rewritten.graph) != graph_structure(root.graph):
        raise VerificationError("block_pruning: the rewritten block graph differs from a trace of the pruned DiT")
    return rewritten


class _Probe:
    """The fidelity probe (fixed prompts and seed), optionally with fewer steps per stage."""

    def __init__(self, latent_frames: int, steps: list[int] | None) -> None:
        from ndopt.eval.probe import FidelityProbe, ProbeSettings

        self.probe, self.steps = FidelityProbe(ProbeSettings(latent_frames=latent_frames)), steps
        self.compare = self.probe.compare

    def outputs(self, pipeline: Pipeline) -> Any:
        if self.steps is not None:
            pipeline = pipeline.replace(schedule=pipeline.schedule.with_steps(tuple(self.steps)))
        return self.probe.outputs(pipeline)


# ---- the pass -----------------------------------------------------------------------------------
class FinetuneSpec(PassConfig):
    """One fine-tuning stage (ndopt.train): steps, optimiser, batch."""

    steps: int = Field(100, ge=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(12, ge=1)
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    feature_weight: float = 1.0  # stage 1: weight of block-feature matching next to output matching
    checkpoint_every: int = 50


class DataConfig(PassConfig):
    """Fine-tuning clips: procedural captioned videos, or a folder with captions.jsonl."""

    source: str = "procedural"
    clips: int = Field(512, ge=1)  # encoded once through the pipeline's VAE encoder
    frames: int = 9
    height: int = 64
    width: int = 64


@register
class BlockPruning(Pass):
    """Drop the least important MMDiT blocks (seed: 24 -> 18), then optional two-stage fine-tune."""

    name = "block_pruning"
    fidelity = Lossy(metric="latent_psnr", budget_db=12.0)  # tiny teacher, no fine-tune: see tests
    requires = (ANALYSIS_KEY,)
    invalidates = (ANALYSIS_KEY,)  # the scores describe the unpruned blocks

    class Config(PassConfig):
        keep: int = Field(18, ge=1)  # seed: the shipped 18-block model (16 also reported)
        reference_depth: int | None = REFERENCE_DEPTH  # keep counts blocks of this depth; None: absolute
        remove: list[int] | None = None  # name the blocks instead (then no importance is needed)
        fold_last_context: bool = True
        stage1: FinetuneSpec | None = None  # distillation from the unpruned teacher
        stage2: FinetuneSpec | None = None  # pyramidal flow matching on data
        data: DataConfig = Field(default_factory=DataConfig)
        evaluate: bool = True  # latent PSNR vs the unpruned pipeline after each stage (the probe's settings)
        evaluate_latent_frames: int = Field(2, ge=1)  # the recipe probe's default
        evaluate_steps: list[int] | None = None  # None: the pipeline's own steps per stage

        @model_validator(mode="after")
        def _keep_or_remove(self) -> BlockPruning.Config:
            if self.remove is not None:
                if "keep" in self.model_fields_set:
                    raise ValueError("give either keep or remove, not both")
                if not self.remove or len(set(self.remove)) != len(self.remove):
                    raise ValueError(f"remove={self.remove}: name each block once, at least one")
            return self

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        if self.config.remove is not None:
            self.requires = ()  # named blocks need no importance scores

    # ---- selection --------------------------------------------------------------------------
    def _selection(self, pipeline: Pipeline, dit: PyramidMMDiT, plan: bool) -> tuple[list[int], str]:
        n = len(dit.transformer_blocks)
        cfg = self.config
        if cfg.remove is not None:
            bad = [i for i in cfg.remove if not 0 <= i < n]
            if bad or len(cfg.remove) >= n:
                raise PassError(f"block_pruning: remove={cfg.remove}: the DiT has blocks 0..{n - 1} and must keep one")
            return sorted(cfg.remove), "named"
        n_remove = n - blocks_to_keep(n, cfg.keep, cfg.reference_depth)
        replayed = (self._replay or {}).get("removed_blocks") if plan else None
        if replayed is not None and len(replayed) == n_remove:  # reloading a run: the blocks it removed
            return sorted(int(i) for i in replayed), "replayed from the run"
        scores = pipeline.analyses.get(ANALYSIS_KEY)
        if not isinstance(scores, BlockImportanceScores):
            raise PassError("block_pruning: no block importance scores on the pipeline; run block_importance "
                            "before it or name the blocks with remove: [...]")
        if scores.n_blocks != n:
            raise PassError(f"block_pruning: the importance scores cover {scores.n_blocks} blocks but the DiT has "
                            f"{n}: rerun block_importance after any pass that changes the DiT")
        if scores.scores is None:
            if not plan:
                raise PassError("block_pruning: the importance scores were made in plan mode; run block_importance "
                                "on real weights")
            return plan_placeholder(n, n_remove), "plan placeholder (no scores on meta)"
        return select_by_importance(scores, n_remove), f"lowest {scores.criterion} importance"

    def _prune(self, pipeline: Pipeline, ctx: PassContext) -> tuple[Pipeline, dict[str, Any], torch.fx.GraphModule]:
        comp = pipeline.by_role("dit")[0]
        dit = comp.module
        if not isinstance(dit, PyramidMMDiT):
            raise PassError(f"block_pruning: the dit is a {type(dit).__name__}, not a PyramidMMDiT")
        removed, how = self._selection(pipeline, dit, ctx.plan or pipeline.is_meta)
        n = len(dit.transformer_blocks)
        keep = [i for i in range(n) if i not in removed]
        new = build_pruned_dit(dit, keep, self.config.fold_last_context)
        graph = rewrite_block_graph(dit, new, keep, dit_layout(pipeline))
        pruned = pipeline.replace(**{comp.name: comp.with_module(new, config=new.config)})
        metrics = {"removed_blocks": removed, "kept_blocks": keep, "blocks": [n, len(keep)], "selection": how,
                   "params_removed": comp.params() - sum(p.numel() for p in new.parameters()),
                   "dit_params": sum(p.numel() for p in new.parameters())}
        return pruned, metrics, graph

    _replay: dict[str, Any] | None = None

    def plan(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        # a saved pipeline's replay (ndopt.saved) hands over the run's metrics: which blocks went matters
        # when the last block is kept unfolded (its text stream differs from the placeholder's)
        self._replay = ctx.options.get("replay_metrics")
        pruned, metrics, _ = self._prune(pipeline, ctx)
        return PassResult(pruned, modified=True, metrics=metrics)

    def run(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        if pipeline.is_meta or ctx.plan:
            return self.plan(pipeline, ctx)
        pruned, metrics, graph = self._prune(pipeline, ctx)
        d = ctx.pass_dir(pass_index(pipeline), self.name)
        artifacts: dict[str, Path] = {"block_graph": d / "block_graph.py"}
        atomic_write_text(artifacts["block_graph"], graph.code)
        fidelity: dict[str, float] = {}
        probe = ref = None
        if self.config.evaluate:
            probe = _Probe(self.config.evaluate_latent_frames, self.config.evaluate_steps)
            ref = probe.outputs(pipeline)
            fidelity["no_finetune"] = probe.compare(probe.outputs(pruned), ref)["latent_psnr"]
        cfg = self.config
        if any(st is not None and st.steps for st in (cfg.stage1, cfg.stage2)):
            from ndopt.train.finetune import DataSpec, distill_dit, flow_match_dit, training_latents

            data = training_latents(pipeline, DataSpec(**cfg.data.model_dump(), seed=ctx.seed), d / "cache")
            keep = metrics["kept_blocks"]
            for i, (stage, spec) in enumerate((("stage1", cfg.stage1), ("stage2", cfg.stage2))):
                if spec is None or spec.steps == 0:
                    continue
                kw = {"steps": spec.steps, "lr": spec.lr, "batch_size": spec.batch_size, "run_dir": d / stage,
                      "seed": ctx.seed + i, "device": ctx.device, "warmup_steps": spec.warmup_steps,
                      "lr_schedule": spec.lr_schedule, "checkpoint_every": spec.checkpoint_every}
                if stage == "stage1":  # seed: distillation from the unpruned teacher
                    res = distill_dit(pipeline, pruned, data, feature_pairs=list(enumerate(keep)),
                                      feature_weight=spec.feature_weight, **kw)
                else:  # seed: the pyramidal flow-matching objective on data
                    res = flow_match_dit(pruned, data, **kw)
                metrics[f"{stage}_loss"] = [round(x, 6) for x in res.loss_curve()]
                if res.resumed_from is not None:  # an interrupted run's rerun went on from its checkpoint
                    metrics[f"{stage}_resumed_from"] = res.resumed_from
                artifacts[f"{stage}_loss_plot"] = d / stage / "loss.png"
                if probe is not None:
                    fidelity[stage] = probe.compare(probe.outputs(pruned), ref)["latent_psnr"]
        if fidelity:
            metrics["latent_psnr_vs_unpruned"] = {k: round(v, 3) for k, v in fidelity.items()}
            log.info("block_pruning: latent PSNR vs the unpruned pipeline: %s",
                     ", ".join(f"{k} {v:.2f} dB" for k, v in fidelity.items()))
        return PassResult(pruned, modified=True, metrics=metrics, artifacts=artifacts)
