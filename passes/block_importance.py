"""Block importance (Neodragon, MMDiT block pruning, analysis): how much each DiT block changes its input.

    BI_i = 1 - E_{X,t} cos(X_{i,t}, X_{i+1,t})        (seed: "Block Importance score")

X_i is the image-token stream entering block i and X_{i+1} the stream leaving it. The expectation
runs over probe prompts, every pyramid stage and several timesteps per stage: forward hooks on the
blocks observe the sampler's own DiT calls (guided and unguided halves alike). A block with
BI near 0 barely changes its input and is the first candidate for `block_pruning`.

Importance is a pluggable criterion object (Torch-Pruning style): `cosine` (the paper's) and
`relative_l2` ship; `register_criterion` adds others. Scores go to
`pipeline.analyses["block_importance"]`, with a plot and a JSON in the pass directory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ndopt.errors import PassError
from ndopt.io import atomic_path, atomic_write_json
from ndopt.ir.pipeline import Pipeline
from ndopt.model import interface_for
from ndopt.passmanager import Analysis, Pass, PassConfig, PassContext, PassResult, register

log = logging.getLogger("ndopt")

ANALYSIS_KEY = "block_importance"


# ---- criteria ---------------------------------------------------------------------------------
class BlockCriterion(Protocol):
    """Accumulates one number per (block, stage) from block inputs and outputs; higher = more important."""

    name: ClassVar[str]

    def observe(self, block: int, stage: int, x_in: Tensor, x_out: Tensor) -> None: ...

    def scores(self) -> list[float]: ...

    def stage_scores(self) -> list[list[float]]: ...


class _MeanPerCall:
    """Averages a per-call statistic: per (block, stage) over calls, and per block over all calls."""

    name: ClassVar[str] = ""

    def __init__(self, n_blocks: int, n_stages: int) -> None:
        self.sum = torch.zeros(n_blocks, n_stages, dtype=torch.float64)
        self.count = torch.zeros(n_blocks, n_stages, dtype=torch.float64)

    def statistic(self, x_in: Tensor, x_out: Tensor) -> Tensor:
        raise NotImplementedError

    def observe(self, block: int, stage: int, x_in: Tensor, x_out: Tensor) -> None:
        self.sum[block, stage] += float(self.statistic(x_in.detach().double(), x_out.detach().double()))
        self.count[block, stage] += 1

    def scores(self) -> list[float]:
        return (self.sum.sum(1) / self.count.sum(1).clamp(min=1)).tolist()

    def stage_scores(self) -> list[list[float]]:
        return (self.sum / self.count.clamp(min=1)).T.tolist()


class CosineImportance(_MeanPerCall):
    """The paper's BI: 1 - cos(X_i, X_{i+1}) per token, averaged over tokens, batch, calls."""

    name = "cosine"

    def statistic(self, x_in: Tensor, x_out: Tensor) -> Tensor:
        return (1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1, eps=1e-12)).mean()


class RelativeL2Importance(_MeanPerCall):
    """||X_{i+1} - X_i|| / ||X_i|| per token (sensitive to magnitude, not only direction)."""

    name = "relative_l2"

    def statistic(self, x_in: Tensor, x_out: Tensor) -> Tensor:
        return ((x_out - x_in).norm(dim=-1) / x_in.norm(dim=-1).clamp(min=1e-12)).mean()


CRITERIA: dict[str, Callable[[int, int], BlockCriterion]] = {}


def register_criterion(cls: type) -> type:
    """Make a criterion available to the pass config by its `name`."""
    CRITERIA[cls.name] = cls
    return cls


for _c in (CosineImportance, RelativeL2Importance):
    register_criterion(_c)


# ---- the record ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockImportanceScores:
    """Scores of one DiT's blocks (index = block position), per block and per pyramid stage.

    `scores` is None in plan mode (no weights to run); `n_blocks` and `dit_id` let block_pruning
    check the scores belong to the DiT it prunes."""

    criterion: str
    n_blocks: int
    scores: tuple[float, ...] | None
    stage_scores: tuple[tuple[float, ...], ...] = ()
    calls: int = 0
    dit_id: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def order(self) -> list[int]:
        """Block indices from least to most important (ties: the deeper block first)."""
        if self.scores is None:
            raise PassError("block importance scores were not computed (plan mode)")
        return sorted(range(self.n_blocks), key=lambda i: (self.scores[i], -i))

    def to_json(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "n_blocks": self.n_blocks,
                "scores": list(self.scores) if self.scores is not None else None,
                "stage_scores": [list(s) for s in self.stage_scores], "calls": self.calls, "settings": self.settings}


# ---- measuring --------------------------------------------------------------------------------
def _stage_of(pipeline: Pipeline, width: int) -> int:
    stage_hw = interface_for(pipeline).require("sampler", user="block_importance").sampler.stage_hw
    for s in range(len(pipeline.schedule.stages)):
        if stage_hw(pipeline.schedule, s)[1] == width:
            return s
    raise PassError(f"block_importance: a DiT call at latent width {width} matches no pyramid stage")


def measure_block_importance(pipeline: Pipeline, criterion: BlockCriterion, prompts: list[str],
                             generator: torch.Generator) -> int:
    """Run the sampler on `prompts` with hooks on every block (the model interface's `blocks`, each
    observed on its image stream); returns the number of DiT calls seen."""
    model = interface_for(pipeline).require("blocks", user="block_importance")
    dit = pipeline.by_role("dit")[0].module
    state = {"stage": 0, "calls": 0}

    def on_dit(_m: Any, args: tuple, kwargs: dict) -> None:
        sample = kwargs.get("sample", args[0] if args else None)
        state["stage"] = _stage_of(pipeline, int(sample[-1].shape[-1]))
        state["calls"] += 1

    def on_block(i: int, kind: str) -> Callable:
        io = model.block_io(kind)
        pos, out_pos = io.inputs.index(io.image), io.outputs.index(io.image)

        def hook(_m: Any, args: tuple, kwargs: dict, out: Any) -> None:
            x_in = kwargs.get(io.image, args[pos] if len(args) > pos else None)
            criterion.observe(i, state["stage"], x_in, out if len(io.outputs) == 1 else out[out_pos])
        return hook

    handles = [dit.register_forward_pre_hook(on_dit, with_kwargs=True)]
    handles += [dit.get_submodule(b.name).register_forward_hook(on_block(b.index, b.kind), with_kwargs=True)
                for b in model.blocks(dit)]
    try:
        with torch.no_grad():
            pipeline.sampler.sample(pipeline, prompts, generator=generator)
    finally:
        for h in handles:
            h.remove()
    return state["calls"]


def plot_scores(path: Path, scores: BlockImportanceScores) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = scores.n_blocks
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * n + 2), 3.6))
    ax.bar(range(n), scores.scores, color="#4477aa", label="all stages")
    for s, row in enumerate(scores.stage_scores):
        ax.plot(range(n), row, "o-", ms=3, lw=1, label=f"stage {s}")
    least = scores.order()[0]
    ax.annotate("least important", (least, scores.scores[least]), textcoords="offset points", xytext=(0, 8),
                ha="center", fontsize=7)
    ax.set_xlabel("MMDiT block")
    ax.set_ylabel(f"importance ({scores.criterion})")
    ax.set_xticks(range(n))
    ax.set_title("block importance: BI_i = 1 - E cos(X_i, X_i+1)" if scores.criterion == "cosine"
                 else f"block importance ({scores.criterion})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


@register
class BlockImportance(Pass):
    """Score every MMDiT block by how little it changes its input (seed: BI_i = 1 - E cos)."""

    name = "block_importance"
    fidelity = Analysis()
    provides = (ANALYSIS_KEY,)

    class Config(PassConfig):
        criterion: str = Field("cosine", description="the importance criterion: `cosine` (the seed's BI: 1 - E cos "
                                                     "of a block's input and output) or another registered one")
        prompts: list[str] = Field(default_factory=lambda: [
            "a red circle moving left on a blue background",
            "a yellow square moving up on a dark background",
            "a white triangle moving right on a green background",
            "a cyan ring moving down on a gray background",
        ], min_length=1, description="prompts whose sampling the block activations are observed on")
        steps: list[int] = Field(default_factory=lambda: [4, 4, 4],
                                 description="timesteps observed per pyramid stage (one count per stage)")
        latent_frames: int = Field(1, ge=1, description="latent frames of the observed samples")
        height: int = Field(64, ge=64, multiple_of=64, description="pixel height of the observed samples")
        width: int = Field(64, ge=64, multiple_of=64, description="pixel width of the observed samples")
        seed: int = Field(0, description="not read: the samples' noise comes from the run's seed")

        @field_validator("criterion")
        @classmethod
        def _known(cls, v: str) -> str:
            if v not in CRITERIA:
                raise ValueError(f"unknown criterion {v!r}; registered: {sorted(CRITERIA)}")
            return v

        @field_validator("steps")
        @classmethod
        def _positive(cls, v: list[int]) -> list[int]:
            if not v or any(s < 1 for s in v):
                raise ValueError(f"steps {v}: need at least one timestep per stage")
            return v

    def _dit(self, pipeline: Pipeline) -> tuple[Any, int]:
        """The DiT module and its number of blocks (the model interface's `blocks`)."""
        dits = pipeline.by_role("dit")
        if not dits:
            raise PassError("block_importance: the pipeline has no MMDiT (a `dit` component with transformer blocks)")
        model = interface_for(pipeline).require("blocks", user=self.name)
        return dits[0].module, len(model.blocks(dits[0].module))

    def plan(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        dit, n_blocks = self._dit(pipeline)
        record = BlockImportanceScores(self.config.criterion, n_blocks, None, dit_id=id(dit), settings={"plan": True})
        return PassResult(pipeline.replace(analyses={**pipeline.analyses, ANALYSIS_KEY: record}), modified=False,
                          metrics={"n_blocks": record.n_blocks, "scores": None})

    def run(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        if pipeline.is_meta:
            return self.plan(pipeline, ctx)
        cfg = self.config
        dit, n_blocks = self._dit(pipeline)
        n_stages = len(pipeline.schedule.stages)
        if len(cfg.steps) != n_stages:
            raise PassError(f"block_importance: steps {cfg.steps} gives {len(cfg.steps)} stages; the schedule has "
                            f"{n_stages}")
        sch = pipeline.schedule.with_frames(cfg.latent_frames, cfg.height, cfg.width).with_steps(tuple(cfg.steps))
        probe = pipeline.replace(schedule=sch)
        criterion = CRITERIA[cfg.criterion](n_blocks, n_stages)
        calls = measure_block_importance(probe, criterion, list(cfg.prompts), ctx.generator())
        record = BlockImportanceScores(
            cfg.criterion, n_blocks, tuple(criterion.scores()),
            tuple(tuple(r) for r in criterion.stage_scores()), calls, id(dit), cfg.model_dump())
        d = ctx.pass_dir
        plot = plot_scores(d / "block_importance.png", record)
        atomic_write_json(d / "block_importance.json", record.to_json())
        order = record.order()
        log.info("block_importance: least important blocks %s", order[: max(1, len(order) // 4)])
        return PassResult(pipeline.replace(analyses={**pipeline.analyses, ANALYSIS_KEY: record}), modified=False,
                          metrics={"criterion": cfg.criterion, "scores": [round(s, 6) for s in record.scores],
                                   "order": order, "dit_calls": calls},
                          artifacts={"plot": plot, "scores": d / "block_importance.json"})
