"""Frontends build Pipelines: from a preset name or from a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch

from ndopt.errors import CheckpointError, NdoptError
from ndopt.ir.pipeline import Pipeline


def preset_names() -> list[str]:
    """Presets and the bundled step-distilled students of the tiny preset."""
    from ndopt.frontends.pyramid_flow.presets import preset_specs
    from ndopt.frontends.pyramid_flow.students import student_files

    return sorted([*preset_specs(), *student_files()])


def load_model(ref: str, *, device: torch.device | str = "cpu", seed: int = 0, meta: bool = False,
               variant: str = "768p") -> Pipeline:
    """A preset name (built on `device`, or on meta when `meta`), a bundled student of the tiny preset
    (`pyramid-flow-tiny-student-1-1-1`), a pipeline saved by ndopt (`RUN/model`, a directory with
    `pipeline.json`), or an upstream checkpoint directory.

    Real-size presets have no bundled weights: they are built on the meta device (costs, plans)."""
    from ndopt.frontends.pyramid_flow.presets import build_preset, load_checkpoint_dir, preset_specs
    from ndopt.frontends.pyramid_flow.students import build_student, student_files
    from ndopt.saved import is_saved_pipeline, load_saved

    if ref in student_files():
        return build_student(ref, device, seed, meta=meta)
    if is_saved_pipeline(ref):
        if meta:
            raise NdoptError(f"{ref}: a saved pipeline holds weights; plan its recipe or its base model instead")
        return load_saved(ref, device=device)
    if ref in preset_specs():
        real = not ref.endswith("tiny")
        if real and not meta:
            raise NdoptError(f"preset {ref!r} has no bundled weights (2B+ parameters): use `ndopt plan` "
                             "(meta device), or pass the upstream checkpoint directory as the model")
        return build_preset(ref, "meta" if meta else device, seed)
    path = Path(ref)
    if path.is_dir():
        if meta:  # its configs only: `ndopt plan --model DIR`, and every size checked before the weights load
            from ndopt.saved_upstream import build_from_configs

            if not (path / f"diffusion_transformer_{variant}").is_dir():
                found = sorted(p.name for p in path.glob("diffusion_transformer_*"))
                raise CheckpointError(f"{path}: no diffusion_transformer_{variant}/ (found: {found or 'none'}); "
                                      "pass the variant that exists")
            return build_from_configs(path, [variant], name=path.name)
        return load_checkpoint_dir(path, variant=variant, device=str(device))
    if path.exists():
        raise CheckpointError(f"{ref}: a model is a preset name, a saved pipeline (RUN/model) or an upstream "
                              "checkpoint directory, not a file")
    raise NdoptError(f"unknown model {ref!r}: not a preset ({', '.join(preset_names())}) and no such directory")


HYBRID = "image-model"  # `--first-frame image-model`: Neodragon's hybrid pipeline


def hybrid_pipeline(pipeline: Pipeline, **kwargs: object) -> Pipeline:
    """The pipeline in Neodragon's hybrid mode: an image model's first frame, 2x super-resolution
    (ndopt.frontends.neodragon.hybrid.attach; keyword arguments go there)."""
    from ndopt.frontends.neodragon.hybrid import attach

    return attach(pipeline, **kwargs)  # type: ignore[arg-type]
