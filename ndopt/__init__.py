"""ndopt: a compiler-style optimization toolkit for on-device video diffusion.

From Python: `ndopt.run(recipe)`, `ndopt.plan(recipe)`, `ndopt.load_model(name)`.
"""

from ndopt.errors import (
    CheckpointError,
    FidelityError,
    LoweringError,
    NdoptError,
    PassError,
    RecipeError,
    TargetError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "FidelityError", "LoweringError", "NdoptError", "PassError", "RecipeError",
    "TargetError", "VerificationError", "load_model", "plan", "run",
]


def run(recipe, **kwargs):
    from ndopt.runner import run as _run

    return _run(recipe, **kwargs)


def plan(recipe=None, **kwargs):
    from ndopt.runner import plan as _plan

    return _plan(recipe, **kwargs)


def load_model(ref, **kwargs):
    from ndopt.model import load_model as _load

    return _load(ref, **kwargs)
