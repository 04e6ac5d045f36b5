"""Dead component elimination: drop components that no path from the active inputs to the video needs.

A text-to-video pipeline carries the VAE encoder (image-to-video conditioning, training) although
nothing reachable from the prompt feeds it: lowering it would waste a graph and its weights.
"""

from __future__ import annotations

import networkx as nx
from pydantic import Field

from ndopt.ir.pipeline import SINK, Pipeline
from ndopt.passmanager import Exact, Pass, PassConfig, PassContext, PassResult, register


def live_components(pipeline: Pipeline) -> set[str]:
    """Components on some path from an active input to the video."""
    g = pipeline.graph
    from_inputs: set[str] = set()
    for src in pipeline.inputs:
        if src in g:
            from_inputs |= nx.descendants(g, src)
    to_sink = nx.ancestors(g, SINK) if SINK in g else set()
    return {n for n in pipeline.components if n in from_inputs and n in to_sink}


@register
class DeadComponentElimination(Pass):
    """Remove components unreachable from the pipeline's inputs or unable to reach the video."""

    name = "dead_component_elimination"
    fidelity = Exact(tolerance=0.0)  # removing unused components cannot change a single number

    class Config(PassConfig):
        keep: list[str] = Field(default_factory=list, description="components to keep even if dead (e.g. the VAE "
                                "encoder for a later image-to-video recipe)")

    def run(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        unknown = [k for k in self.config.keep if k not in pipeline.components]
        if unknown:
            from ndopt.errors import PassError

            raise PassError(f"dead_component_elimination: keep names unknown components {unknown}; "
                            f"the pipeline has {sorted(pipeline.components)}")
        live = live_components(pipeline) | set(self.config.keep)
        dead = sorted(set(pipeline.components) - live)
        if not dead:
            return PassResult(pipeline, modified=False, metrics={"removed": [], "params_removed": 0})
        params = sum(pipeline[n].params() for n in dead)
        return PassResult(pipeline.replace(remove=dead), modified=True,
                          metrics={"removed": dead, "params_removed": params})
