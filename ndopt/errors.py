"""The one error hierarchy of ndopt: every message says what, where, and what to do."""

from __future__ import annotations


class NdoptError(Exception):
    """Base of every error ndopt raises on purpose; the CLI prints it in one line and exits 2."""


class RecipeError(NdoptError):
    """A recipe is malformed: the message names the file, line and field."""


class CheckpointError(NdoptError):
    """A checkpoint cannot be loaded: the message lists missing, unexpected and mismatched keys."""


class ConfigError(CheckpointError, ValueError):
    """A checkpoint's config has a wrong type, an out-of-range value, an unknown key or inconsistent fields."""


class VerificationError(NdoptError):
    """The pipeline IR is inconsistent (graph, edge specs, fx lint, schedule)."""


class FidelityError(NdoptError):
    """A pass's output left its fidelity budget."""


class LoweringError(NdoptError):
    """A component could not be lowered (export, legality, numerics)."""


class TargetError(NdoptError):
    """A target file is malformed or unknown."""


class PassError(NdoptError):
    """A pass cannot run: unknown, bad config, or its requirements are not met."""


class InputError(NdoptError):
    """A value the user gave (a size, a path, a prompt) is out of range, malformed, or cannot be written."""
