"""Block pruning (Neodragon, MMDiT block pruning): drop the least important DiT blocks, then recover.

The seed prunes Pyramid-Flow's 24 MMDiT blocks to 18 (16 also reported) by the block importance
BI_i = 1 - E cos(X_i, X_{i+1}) (`block_importance`), then fine-tunes in two stages: stage 1
distils the pruned DiT from the unpruned teacher (output and block-feature matching), stage 2
trains it on data with the pyramidal flow-matching objective.

The pass asks the model interface (`ndopt.model`) for the denoiser's blocks and never names a model
class. Structurally it is a rewrite of the fx block graph (the interface's `trace`: blocks are leaf
nodes): each removed block's node is erased and its users rewired to the block's input of the same
stream (`BlockIO`), the graph is linted and recompiled, and the interface builds the denoiser
without those blocks (`without_blocks`: renumbered, weights copied). The rewritten graph must equal
a fresh trace of the new module (checked). With `fold_last_context` (default) a new last block's dead
outputs are folded away (SD3: upstream's `context_pre_only` form, an exact rewrite that keeps the
pruned DiT loadable as a standard `num_layers=k` checkpoint). `kinds` limits pruning to some block
kinds (SD3's MMDiT has one, "joint"; FLUX has "double" and "single").

`plan()` applies only the structural effect (meta device, no training); `keep` counts blocks of
the 24-block reference model and scales to the number of prunable blocks (`reference_depth`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx
from pydantic import Field, model_serializer, model_validator
from torch import nn

from ndopt.errors import PassError, VerificationError
from ndopt.io import atomic_write_text
from ndopt.ir.pipeline import Pipeline
from ndopt.model import Block, BlockIO, ModelInterface, interface_for
from ndopt.passmanager import Lossy, Pass, PassConfig, PassContext, PassResult, register
from ndopt.train.data import DataConfig
from passes.block_importance import ANALYSIS_KEY, BlockImportanceScores

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


def select_by_importance(scores: BlockImportanceScores, prunable: list[int], n_remove: int) -> list[int]:
    """The n_remove least important of the `prunable` blocks (the criterion's order)."""
    return sorted([i for i in scores.order() if i in prunable][:n_remove])


def plan_placeholder(prunable: list[int], last: int, n_remove: int) -> list[int]:
    """Plan mode has no scores (meta weights): remove the deepest prunable blocks before the last one.

    Which blocks of a kind go does not change params or FLOPs (all blocks but the last are alike)."""
    return [i for i in prunable if i != last][-n_remove:]


# ---- the fx rewrite -------------------------------------------------------------------------
def remove_block_nodes(gm: torch.fx.GraphModule, removed: Mapping[str, BlockIO]) -> torch.fx.GraphModule:
    """Erase the call_module nodes of the `removed` blocks (node target -> how the block is called);
    a user of a removed block's output reads the block's input of the same stream instead. Lints and
    recompiles."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_module" or node.target not in removed:
            continue
        io = removed[node.target]

        def source(stream: str, node: torch.fx.Node = node, io: BlockIO = io) -> Any:
            pos = io.inputs.index(stream) if stream in io.inputs else len(node.args)
            if pos >= len(node.args):
                raise VerificationError(f"block_pruning: block {node.target} returns {stream!r}, which it is not "
                                        "passed positionally: the block call changed; update the model's BlockIO")
            return node.args[pos]

        if len(io.outputs) == 1:
            node.replace_all_uses_with(source(io.outputs[0]))
        for user in list(node.users):
            if user.op != "call_function" or user.target.__name__ != "getitem":
                raise VerificationError(f"block_pruning: block {node.target} output is used by {user.format_node()}, "
                                        "not by an index: the DiT's block loop changed; update the rewrite")
            user.replace_all_uses_with(source(io.outputs[user.args[1]]))
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



def graph_structure(g: torch.fx.Graph) -> list[tuple]:
    """Nodes as (op, target, args, kwargs) with node references replaced by positions (names vary)."""
    pos = {n: i for i, n in enumerate(g.nodes)}

    def norm(a: Any) -> Any:
        return torch.fx.node.map_arg(a, lambda n: f"%{pos[n]}")

    return [(n.op, str(n.target), str(norm(n.args)), str(norm(n.kwargs))) for n in g.nodes]



def rewrite_block_graph(model: ModelInterface, dit: nn.Module, new: nn.Module, keep: list[int], layout: Any
                        ) -> torch.fx.GraphModule:
    """The fx rewrite of the DiT's block graph; must equal a fresh trace of the pruned DiT."""
    gm = model.trace(dit, layout)
    old, kept = model.blocks(dit), model.blocks(new)
    gm = remove_block_nodes(gm, {b.name: model.block_io(b.kind) for b in old if b.index not in keep})
    mapping = {old[i].name: kept[new_i].name for new_i, i in enumerate(keep)}
    root = model.trace(new, layout)  # its modules (and, dead code aside, its graph) are the pruned DiT's
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

    steps: int = Field(100, ge=0, description="optimizer steps (0: skip the stage)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    batch_size: int = Field(12, ge=1, description="clips per step")
    warmup_steps: int = Field(0, description="linear learning-rate warm-up steps")
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="learning rate after the warm-up")
    feature_weight: float = Field(1.0, description="stage 1: weight of block-feature matching next to output "
                                                   "matching")
    checkpoint_every: int = Field(50, description="steps between resumable checkpoints")


@register
class BlockPruning(Pass):
    """Drop the least important MMDiT blocks (seed: 24 -> 18), then optional two-stage fine-tune."""

    name = "block_pruning"
    fidelity = Lossy(metric="latent_psnr", budget_db=12.0, frame_budget_db=10.0)  # tiny teacher, no fine-tune: see tests
    requires = (ANALYSIS_KEY,)
    invalidates = (ANALYSIS_KEY,)  # the scores describe the unpruned blocks

    class Config(PassConfig):
        keep: int = Field(18, ge=1, description="blocks to keep, counted at `reference_depth` and scaled to the "
                                                "DiT's depth")  # seed: the shipped 18-block model (16 also reported)
        reference_depth: int | None = Field(REFERENCE_DEPTH, description="the depth `keep` counts blocks of (null: "
                                                                         "`keep` is absolute)")
        remove: list[int] | None = Field(None, description="block indices to remove instead of the least important")
        kinds: list[str] | None = Field(None, description="the block kinds that may be pruned (SD3: joint; FLUX: "
                                                          "double, single); null: every kind the DiT has")
        fold_last_context: bool = Field(True, description="when the last block goes, fold the new last block's dead "
                                                          "text stream into `context_pre_only` (exact)")
        stage1: FinetuneSpec | None = Field(None, description="fine-tune stage 1: distillation from the unpruned "
                                                              "teacher (null: none)")
        stage2: FinetuneSpec | None = Field(None, description="fine-tune stage 2: pyramidal flow matching on data "
                                                              "(null: none)")
        data: DataConfig = Field(default_factory=DataConfig, description="the fine-tuning clips")
        evaluate: bool = Field(True, description="latent PSNR vs the unpruned pipeline after each stage (the "
                                                 "probe's settings)")
        evaluate_latent_frames: int = Field(2, ge=1, description="latent frames of that evaluation (the recipe "
                                                                 "probe's default)")
        evaluate_steps: list[int] | None = Field(None, description="its steps per pyramid stage (null: the "
                                                                   "pipeline's own)")

        @model_validator(mode="after")
        def _keep_or_remove(self) -> BlockPruning.Config:
            if self.remove is not None:
                if "keep" in self.model_fields_set:
                    raise ValueError("give either keep or remove, not both")
                if not self.remove or len(set(self.remove)) != len(self.remove):
                    raise ValueError(f"remove={self.remove}: name each block once, at least one")
            if self.kinds is not None and (not self.kinds or len(set(self.kinds)) != len(self.kinds)):
                raise ValueError(f"kinds={self.kinds}: name each block kind once, at least one")
            return self

        @model_serializer(mode="wrap")
        def _dump(self, handler: Any) -> dict[str, Any]:
            # `kinds` unset (every kind) is left out: provenance and saved pipelines read as before it existed
            out = handler(self)
            if self.kinds is None:
                out.pop("kinds", None)
            return out

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        if self.config.remove is not None:
            self.requires = ()  # named blocks need no importance scores

    # ---- selection --------------------------------------------------------------------------
    def prunable(self, blocks: list[Block]) -> list[int]:
        """The indices of the blocks whose kind may be pruned (`kinds`, checked against the DiT's)."""
        have = sorted({b.kind for b in blocks}, key=[b.kind for b in blocks].index)
        kinds = self.config.kinds if self.config.kinds is not None else have
        unknown = [k for k in kinds if k not in have]
        if unknown:
            raise PassError(f"block_pruning: kinds={kinds}: the DiT has no {', '.join(map(repr, unknown))} blocks "
                            f"(its block kinds: {', '.join(have)})")
        return [b.index for b in blocks if b.kind in kinds]

    def _selection(self, pipeline: Pipeline, blocks: list[Block], plan: bool) -> tuple[list[int], str]:
        n = len(blocks)
        cfg = self.config
        prunable = self.prunable(blocks)
        if cfg.remove is not None:
            bad = [i for i in cfg.remove if not 0 <= i < n]
            if bad or len(cfg.remove) >= n:
                raise PassError(f"block_pruning: remove={cfg.remove}: the DiT has blocks 0..{n - 1} and must keep one")
            other = [i for i in cfg.remove if i not in prunable]
            if other:
                raise PassError(f"block_pruning: remove={cfg.remove}: blocks {other} are "
                                f"{', '.join(sorted({blocks[i].kind for i in other}))} blocks, outside kinds={cfg.kinds}")
            return sorted(cfg.remove), "named"
        n_remove = len(prunable) - blocks_to_keep(len(prunable), cfg.keep, cfg.reference_depth)
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
            return plan_placeholder(prunable, n - 1, n_remove), "plan placeholder (no scores on meta)"
        return select_by_importance(scores, prunable, n_remove), f"lowest {scores.criterion} importance"

    def _prune(self, pipeline: Pipeline, ctx: PassContext) -> tuple[Pipeline, dict[str, Any], torch.fx.GraphModule]:
        model = interface_for(pipeline).require("blocks", "without_blocks", "trace", user=self.name)
        comp = pipeline.by_role("dit")[0]
        dit = comp.module
        blocks = model.blocks(dit)
        removed, how = self._selection(pipeline, blocks, ctx.plan or pipeline.is_meta)
        n = len(blocks)
        keep = [i for i in range(n) if i not in removed]
        new = model.without_blocks(dit, keep, fold_last_context=self.config.fold_last_context)
        graph = rewrite_block_graph(model, dit, new, keep, model.dit_layout(pipeline))
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
        d = ctx.pass_dir
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
            from ndopt.train.finetune import distill_dit, flow_match_dit, training_latents

            data = training_latents(pipeline, cfg.data.seeded(ctx.seed), d / "cache")
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
