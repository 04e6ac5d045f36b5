"""CFG folding (exact): fewer DiT launches for the same numbers.

Pyramid-Flow evaluates the DiT twice per step for classifier-free guidance (unconditional and
conditional, REFERENCE.md: CFG 7 / 5). A guided model gets both branches in one call of batch 2; a
guidance-free model (step-distilled, or guidance scale 1 where v_u + 1 (v_c - v_u) = v_c) drops the
unconditional branch, and with it the negative prompt's text encoding.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ndopt.errors import PassError
from ndopt.ir.pipeline import Pipeline
from ndopt.passmanager import Exact, Pass, PassConfig, PassContext, PassResult, register

GUIDANCE_FREE = "guidance_free"  # the fact a step-distilled (guidance-free) DiT carries


def guidance_free(pipeline: Pipeline) -> bool:
    g = pipeline.schedule.guidance
    return GUIDANCE_FREE in pipeline.facts or (g.scale == 1.0 and g.video_scale == 1.0)


@register
class CfgFolding(Pass):
    """Batch the CFG branches into one call, or drop the unconditional one for a guidance-free model."""

    name = "cfg_folding"
    fidelity = Exact(tolerance=1e-5)  # batched GEMMs round differently from two calls: ~1e-6 relative
    provides = ("cfg_folded",)

    class Config(PassConfig):
        mode: Literal["auto", "batch", "drop"] = Field(
            "auto", description="batch: both CFG branches in one call; drop: only the conditional branch (for a "
                                "guidance-free DiT); auto: drop when the pipeline is guidance-free, else batch")

    def run(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        free = guidance_free(pipeline)
        if self.config.mode == "drop" and not free:
            g = pipeline.schedule.guidance
            raise PassError(f"cfg_folding: mode 'drop' needs a guidance-free DiT (fact {GUIDANCE_FREE!r} from "
                            f"step_distillation, or guidance scales 1.0); this one uses {g.scale:g}/{g.video_scale:g}")
        want = "none" if free and self.config.mode != "batch" else "cfg_batched"
        before = pipeline.schedule
        if before.guidance.mode in (want, "none"):
            return PassResult(pipeline, modified=False, metrics={"guidance": before.guidance.mode,
                                                                 "dit_calls_per_video": before.dit_calls_per_video})
        after = before.with_guidance(want)
        return PassResult(pipeline.replace(schedule=after), modified=True, metrics={
            "guidance": f"{before.guidance.mode} -> {want}",
            "dit_calls_per_video": f"{before.dit_calls_per_video} -> {after.dit_calls_per_video}",
            "dit_batch": after.guidance.batch})
