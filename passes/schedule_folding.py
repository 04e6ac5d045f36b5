"""Schedule folding (exact): a fixed schedule becomes constants and an explicit call list.

Once steps are fixed, every timestep, local sigma, Euler step and renoise coefficient is a constant
per (frame, stage, step). The timestep MLP (`time_text_embed.timestep_embedder`) then only ever sees
a handful of values: its outputs are precomputed into a table and the MLP leaves every per-call DiT
graph, which takes the table row (`timestep_embedding`) instead of the timestep. The unrolled call
list (`sampler.unroll`) is what lowering writes into the manifest.
"""

from __future__ import annotations

from dataclasses import replace

from ndopt.ir.pipeline import Pipeline
from ndopt.ir.spec import Port, TensorSpec
from ndopt.model import interface_for
from ndopt.passmanager import Exact, Pass, PassConfig, PassContext, PassResult, register


def schedule_rows(pipeline: Pipeline) -> tuple[list[float], dict[tuple[str, int, int], int]]:
    """Distinct timesteps of the schedule and the row each (kind, stage, step) uses."""
    stage_timesteps = interface_for(pipeline).require("sampler", user="schedule_folding").sampler.stage_timesteps
    timesteps: list[float] = []
    rows: dict[tuple[str, int, int], int] = {}
    for kind, attr in (("first", "steps"), ("video", "video_steps")):
        for s, stage in enumerate(pipeline.schedule.stages):
            for i, t in enumerate(stage_timesteps(stage, getattr(stage, attr))):
                if t not in timesteps:
                    timesteps.append(t)
                rows[(kind, s, i)] = timesteps.index(t)
    return timesteps, rows


@register
class ScheduleFolding(Pass):
    """Precompute the schedule's constants, fold the timestep MLP out of the DiT, unroll the calls."""

    name = "schedule_folding"
    fidelity = Exact(tolerance=1e-5)
    provides = ("schedule_folded",)

    class Config(PassConfig):
        pass

    def run(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        model = interface_for(pipeline).require("sampler", "fold_timestep_embedding", user=self.name)
        math = model.sampler
        dit = pipeline.by_role("dit")[0]
        if math.folded_time(dit):
            return PassResult(pipeline, modified=False, metrics={"already_folded": True})
        timesteps, rows = schedule_rows(pipeline)
        before = dit.params()
        module, table = model.fold_timestep_embedding(dit.module, timesteps)
        d = int(table.shape[-1])  # the DiT's width: the timestep MLP's output
        inputs = tuple(Port("timestep_embedding", TensorSpec(("B", d)), optional=True)
                       if p.name == "timestep_ratio" else p for p in dit.inputs)
        new_dit = replace(dit.with_module(module), inputs=inputs)
        folded = math.FoldedSchedule(pipeline.schedule.stages, tuple(timesteps), table, rows)
        out = pipeline.replace(schedule=replace(pipeline.schedule, folded=True),
                               analyses={**pipeline.analyses, math.FOLDED: folded}, **{dit.name: new_dit})
        return PassResult(out, modified=True, metrics={
            "table_rows": len(timesteps), "calls_unrolled": len(math.unroll(out)),
            "params_folded": before - new_dit.params()})
