"""The pipeline IR: components, typed data-flow graph, schedule, verifier and cost analysis."""

from ndopt.ir.component import ROLES, Component
from ndopt.ir.cost import CostModel, PipelineCost, pipeline_cost
from ndopt.ir.pipeline import SINK, AppliedPass, Pipeline, Sampler
from ndopt.ir.schedule import Guidance, Schedule, Stage, TemporalPyramid
from ndopt.ir.spec import CallSignature, Port, TensorSpec
from ndopt.ir.verify import verify, verify_calls, verify_structure

__all__ = [
    "ROLES", "SINK", "AppliedPass", "CallSignature", "Component", "CostModel", "Guidance", "Pipeline",
    "PipelineCost", "Port", "Sampler", "Schedule", "Stage", "TemporalPyramid", "TensorSpec",
    "pipeline_cost", "verify", "verify_calls", "verify_structure",
]
