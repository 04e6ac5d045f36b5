"""Frontends: the model families behind ndopt's model interface (`ndopt.model`), one package each
(`pyramid_flow/`, Neodragon's hybrid additions in `neodragon/`), registered by entry points.

Code outside the frontends uses `ndopt.model`; these names stay here for code inside them.
"""

from ndopt.model import HYBRID, hybrid_pipeline, load_model, preset_names

__all__ = ["HYBRID", "hybrid_pipeline", "load_model", "preset_names"]
