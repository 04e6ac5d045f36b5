"""The pipeline IR: components, typed data-flow graph, schedule, verifier and cost analysis."""

from ndopt.ir.component import QUANTIZED_BY_DEFAULT, QUANTIZED_WHEN_CALLED, ROLES, Component
from ndopt.ir.cost import CostModel, PipelineCost, pipeline_cost
from ndopt.ir.pipeline import SINK, AppliedPass, Pipeline, Sampler
from ndopt.ir.schedule import Guidance, Schedule, Stage, TemporalPyramid
from ndopt.ir.spec import CallSignature, Port, TensorSpec
from ndopt.ir.verify import verify, verify_calls, verify_structure
from ndopt.precision import PRECISION_BITS, PrecisionName, weight_bytes

__all__ = [
    "PRECISION_BITS", "QUANTIZED_BY_DEFAULT", "QUANTIZED_WHEN_CALLED", "ROLES", "SINK", "AppliedPass",
    "CallSignature", "Component", "CostModel", "Guidance", "Pipeline", "PipelineCost", "Port", "PrecisionName",
    "Sampler", "Schedule", "Stage", "TemporalPyramid", "TensorSpec", "pipeline_cost", "verify", "verify_calls",
    "verify_structure", "weight_bytes",
]
