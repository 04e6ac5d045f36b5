"""The bundled step-distilled students of the tiny preset (`pyramid-flow-tiny-student-<steps>`).

Each is a DiT written by the step_distillation pass (`save_student`'s format: safetensors with the
teacher DiT's weight fingerprint and the steps it was distilled for in the metadata). Loading one
builds the tiny teacher, swaps in the student DiT and sets the schedule it was distilled for: the
teacher's, with the student's steps and guidance scales 1.0 (`StepDistillation.target_schedule`),
and the `guidance_free` fact, so `cfg_folding` may drop the unconditional branch. `save_student` and
`load_student` write and read the format (the pass reaches them through the frontend's interface).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ndopt.errors import CheckpointError, PassError
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.schedule import Schedule

TEACHER = "pyramid-flow-tiny"
PREFIX = f"{TEACHER}-student-"
STUDENT_FORMAT = "ndopt.step_distillation.student/1"
GUIDANCE_FREE = "guidance_free"  # the fact a step-distilled DiT carries (passes.cfg_folding reads it)


def student_files() -> dict[str, Path]:
    """Bundled student names -> their weight files."""
    folder = resources.files("ndopt.frontends.pyramid_flow") / "weights"
    return {p.name.removesuffix(".safetensors"): Path(str(p)) for p in folder.iterdir()
            if p.name.startswith(PREFIX) and p.name.endswith(".safetensors")}


def _parse_steps(key: str, path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        first, video = key.split("/")
        return tuple(int(s) for s in first.split("-")), tuple(int(s) for s in video.split("-"))
    except ValueError:
        raise CheckpointError(f"{path}: metadata steps {key!r} is not '<k-k-k>/<k-k-k>'") from None


def build_student(name: str, device: torch.device | str = "cpu", seed: int = 0, meta: bool = False) -> Pipeline:
    """The tiny teacher with the bundled student DiT `name` and the schedule it was distilled for."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ndopt.frontends.pyramid_flow.checkpoint import load_into
    from ndopt.frontends.pyramid_flow.presets import build_preset
    from ndopt.train.data import module_fingerprint

    files = student_files()
    if name not in files:
        raise CheckpointError(f"no bundled student {name!r}; bundled: {', '.join(sorted(files)) or 'none'}")
    path = files[name]
    with safe_open(str(path), framework="pt") as f:
        info = f.metadata() or {}
    if info.get("format") != STUDENT_FORMAT:
        raise CheckpointError(f"{path}: metadata format {info.get('format')!r} is not {STUDENT_FORMAT!r}; reinstall ndopt")
    steps, video = _parse_steps(info.get("steps", ""), path)
    pipeline = build_preset(TEACHER, "meta" if meta else device, seed)
    comp = pipeline.by_role("dit")[0]
    student = comp.module
    if not meta:
        if info.get("teacher") != module_fingerprint(comp.module):
            raise CheckpointError(f"{path}: distilled from another teacher (fingerprint {info.get('teacher')}, the "
                                  f"bundled {TEACHER} is {module_fingerprint(comp.module)}); reinstall ndopt")
        student = copy.deepcopy(comp.module)
        load_into(student, load_file(str(path), device=str(device)), source=str(path))
        student.eval().requires_grad_(False)
    sch = pipeline.schedule
    if len(steps) != len(sch.stages):
        raise CheckpointError(f"{path}: steps {steps} for {len(sch.stages)} pyramid stages")
    sch = replace(sch.with_steps(steps, video), guidance=replace(sch.guidance, scale=1.0, video_scale=1.0))
    out = pipeline.replace(schedule=sch, facts_add=(GUIDANCE_FREE,), **{comp.name: comp.with_module(student)})
    return replace(out, name=name)


# ---- the student format (what step_distillation writes and reuses) ----------------------------------
def steps_key(schedule: Schedule) -> str:
    """`<first-frame steps>/<later-frame steps>` per stage, e.g. `1-1-1/1-1-1`."""
    return f"{'-'.join(str(s.steps) for s in schedule.stages)}/{'-'.join(str(s.video_steps) for s in schedule.stages)}"


def save_student(path: Path, student: torch.nn.Module, teacher: torch.nn.Module, target: Schedule,
                 config: Mapping[str, Any]) -> Path:
    """Write a trained student DiT (safetensors, atomically) with what it was distilled from and for:
    the teacher DiT's weight fingerprint, the target steps and the pass config (metadata)."""
    import json

    from safetensors.torch import save_file

    from ndopt.io import atomic_path, jsonable
    from ndopt.train.data import module_fingerprint

    meta = {"format": STUDENT_FORMAT, "teacher": module_fingerprint(teacher), "steps": steps_key(target),
            "config": json.dumps(jsonable(dict(config)))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in student.state_dict().items()}, str(tmp),
                  metadata=meta)
    return path


def load_student(path: Path, teacher: torch.nn.Module, target: Schedule) -> torch.nn.Module:
    """A student written by `save_student`, for this teacher DiT and these steps (checked: a student
    distilled from other teacher weights, or for other steps, is refused; missing, unexpected or
    mis-shaped keys are listed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ndopt.frontends.pyramid_flow.checkpoint import load_into
    from ndopt.train.data import module_fingerprint

    path = Path(path)
    if not path.is_file():
        raise PassError(f"step_distillation: student_weights {path}: no such file")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != STUDENT_FORMAT:
        raise PassError(f"step_distillation: {path} is not a student written by step_distillation "
                        f"(metadata format {meta.get('format')!r})")
    if meta["teacher"] != module_fingerprint(teacher):
        raise PassError(f"step_distillation: {path} was distilled from another teacher (DiT fingerprint "
                        f"{meta['teacher']}, this pipeline's {module_fingerprint(teacher)}); distil it again")
    if meta["steps"] != steps_key(target):
        raise PassError(f"step_distillation: {path} is a student for steps {meta['steps']}, the config asks for "
                        f"{steps_key(target)}")
    student = copy.deepcopy(teacher)
    load_into(student, load_file(str(path)), source=str(path))
    return student.eval().requires_grad_(False)
