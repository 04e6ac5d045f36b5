"""Fine-tunes of a pipeline's DiT that several passes share: data latents, distillation, flow matching.

- `training_latents(pipeline, data, ...)`: captioned clips (procedural or a folder) encoded once
  through the pipeline's VAE encoder into a LatentCache;
- `distill_dit(teacher, student, data, ...)`: teacher-student output matching on pyramidal
  flow-matching inputs, plus block-feature matching for given (student, teacher) block pairs
  (block pruning's stage 1);
- `flow_match_dit(pipeline, data, ...)`: the pyramidal flow-matching objective on data (stage 2).

Both train the student's DiT in place (the caller owns it: a pass builds it fresh) and leave the
teacher and the text encoder untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ndopt.errors import PassError
from ndopt.ir.pipeline import Pipeline
from ndopt.train.data import DataConfig, LatentCache, ProceduralVideos
from ndopt.train.engine import TrainConfig, Trainer, TrainResult
from ndopt.train.objectives import (
    Distillation,
    PromptEncoder,
    PyramidalFlowMatching,
    pyramid_distillation_inputs,
)

log = logging.getLogger("ndopt")


def training_latents(pipeline: Pipeline, data: DataConfig, cache_dir: Path) -> LatentCache:
    """The config's clips encoded once through the pipeline's VAE encoder (`data.seeded(seed)` draws
    procedural clips from that seed)."""
    enc = pipeline.components.get("vae_encoder")
    if enc is None:
        raise PassError("fine-tuning on data needs the pipeline's vae_encoder to encode clips: run this pass "
                        "before dead_component_elimination (or keep vae_encoder there)")
    ds, name = data.dataset()
    from ndopt import cache

    # procedural clips are a function of their config and seed (both in `name`): encoded once per
    # machine, not once per run directory; a folder's clips can change under the same name
    shared = cache.shared_dir("latents") if data.source == "procedural" else None
    from ndopt.model import DEFAULT_FRONTEND, sampler_math

    # the frontend's own latent normalisation (its first-frame constants differ); named in the cache
    if pipeline.frontend != DEFAULT_FRONTEND:
        name = f"{name}-{pipeline.frontend}"
    return LatentCache(ds, enc.module, shared or cache_dir, size=data.clips, name=name,
                       normalize=sampler_math(pipeline).normalize_latents).load()


def training_captions(data: DataConfig, n: int, *, held_out: bool = False) -> list[str]:
    """The first `n` captions of the clip source, without rendering or reading any video: procedural
    data draws scenes 0..n-1 (its first `clips` are the captions of `training_latents`, the rest new
    scenes of the same distribution); a folder repeats its captions in order once they run out.

    `held_out`: procedural scenes over every (colour, shape) pair of the vocabulary, the pairs the
    data holds out of training included (prompts only: no clip of them is rendered). For distillation
    onto a teacher's samples, whose prompts are the teacher's whole prompt space, not its training set."""
    ds, _ = data.dataset()
    if isinstance(ds, ProceduralVideos):
        if held_out:
            ds = ProceduralVideos(replace(ds.config, held_out=()), seed=ds.seed)
        return [ds.scene(i)[0].caption for i in range(n)]
    return [ds.items[i % len(ds.items)][1] for i in range(n)]


def text_len_for(pipeline: Pipeline, captions: Sequence[str]) -> int:
    """The shortest T5 length (a multiple of 8) that holds every caption: exact, and cheaper than 128."""
    te = pipeline.by_role("text_encoder")[0].module
    longest = int(te.tokenize([*captions, ""])["t5_mask"].sum(1).max())
    return min(int(te.config.max_sequence_length), -(-longest // 8) * 8)


def _config(steps: int, lr: float, batch_size: int, seed: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                       log_every=max(1, min(10, steps // 10)), **kw)


def distill_dit(teacher: Pipeline, student: Pipeline, data: LatentCache, *, steps: int, lr: float,
                batch_size: int, run_dir: Path, feature_pairs: Sequence[tuple[int, int]] = (),
                feature_weight: float = 1.0, seed: int = 0, device: torch.device | None = None,
                **train_kw) -> TrainResult:
    """Stage 1: the student DiT matches the teacher DiT's velocity (and paired block outputs)."""
    from ndopt.model import interface_for

    te = PromptEncoder(teacher.by_role("text_encoder")[0].module, text_len_for(teacher, data.captions))
    student_dit, teacher_dit = student.by_role("dit")[0].module, teacher.by_role("dit")[0].module
    if feature_pairs:  # block indices -> module paths, as the model's frontend names its blocks
        model = interface_for(teacher)
        s_names = [b.name for b in model.blocks(student_dit)]
        t_names = [b.name for b in model.blocks(teacher_dit)]
    objective = Distillation(
        student="dit", teacher="teacher", inputs=pyramid_distillation_inputs(teacher.schedule),
        feature_weight=feature_weight if feature_pairs else 0.0,
        features=tuple((s_names[s], t_names[t]) for s, t in feature_pairs))
    return Trainer(trainable={"dit": student_dit},
                   frozen={"teacher": teacher_dit, "text_encoder": te},
                   objective=objective, data=data, config=_config(steps, lr, batch_size, seed, **train_kw),
                   run_dir=run_dir, device=device, name="distill").fit()


def flow_match_dit(pipeline: Pipeline, data: LatentCache, *, steps: int, lr: float, batch_size: int,
                   run_dir: Path, seed: int = 0, device: torch.device | None = None, **train_kw) -> TrainResult:
    """Stage 2: the DiT learns the pyramidal flow-matching objective on the data's latents."""
    te = PromptEncoder(pipeline.by_role("text_encoder")[0].module, text_len_for(pipeline, data.captions))
    return Trainer(trainable={"dit": pipeline.by_role("dit")[0].module}, frozen={"text_encoder": te},
                   objective=PyramidalFlowMatching(pipeline.schedule), data=data,
                   config=_config(steps, lr, batch_size, seed, **train_kw), run_dir=run_dir, device=device,
                   name="flow_matching").fit()
