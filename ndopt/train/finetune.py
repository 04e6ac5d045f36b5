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
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ndopt.errors import PassError
from ndopt.ir.pipeline import Pipeline
from ndopt.train.data import FolderVideos, LatentCache, ProceduralConfig, ProceduralVideos
from ndopt.train.engine import TrainConfig, Trainer, TrainResult
from ndopt.train.objectives import (
    Distillation,
    PromptEncoder,
    PyramidalFlowMatching,
    pyramid_distillation_inputs,
)

log = logging.getLogger("ndopt")


@dataclass(frozen=True)
class DataSpec:
    """Where fine-tuning clips come from: `procedural` or a folder with captions.jsonl."""

    source: str = "procedural"
    clips: int = 512
    frames: int = 9
    height: int = 64
    width: int = 64
    seed: int = 0


def _clip_source(data: DataSpec) -> tuple[ProceduralVideos | FolderVideos, str]:
    """The clip dataset the spec names, and its latent-cache name."""
    if data.source == "procedural":
        pc = ProceduralConfig(frames=data.frames, height=data.height, width=data.width)
        return ProceduralVideos(pc, seed=data.seed + 7), f"procedural-{pc.fingerprint()}-s{data.seed}"
    ds = FolderVideos(data.source, frames=data.frames, height=data.height, width=data.width)
    return ds, Path(data.source).name or "folder"


def training_latents(pipeline: Pipeline, data: DataSpec, cache_dir: Path) -> LatentCache:
    enc = pipeline.components.get("vae_encoder")
    if enc is None:
        raise PassError("fine-tuning on data needs the pipeline's vae_encoder to encode clips: run this pass "
                        "before dead_component_elimination (or keep vae_encoder there)")
    ds, name = _clip_source(data)
    from ndopt import cache

    # procedural clips are a function of their config and seed (both in `name`): encoded once per
    # machine, not once per run directory; a folder's clips can change under the same name
    shared = cache.shared_dir("latents") if data.source == "procedural" else None
    return LatentCache(ds, enc.module, shared or cache_dir, size=data.clips, name=name).load()


def training_captions(data: DataSpec, n: int, *, held_out: bool = False) -> list[str]:
    """The first `n` captions of the clip source, without rendering or reading any video: procedural
    data draws scenes 0..n-1 (its first `clips` are the captions of `training_latents`, the rest new
    scenes of the same distribution); a folder repeats its captions in order once they run out.

    `held_out`: procedural scenes over every (colour, shape) pair of the vocabulary, the pairs the
    data holds out of training included (prompts only: no clip of them is rendered). For distillation
    onto a teacher's samples, whose prompts are the teacher's whole prompt space, not its training set."""
    ds, _ = _clip_source(data)
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
    te = PromptEncoder(teacher.by_role("text_encoder")[0].module, text_len_for(teacher, data.captions))
    objective = Distillation(
        student="dit", teacher="teacher", inputs=pyramid_distillation_inputs(teacher.schedule),
        feature_weight=feature_weight if feature_pairs else 0.0,
        features=tuple((f"transformer_blocks.{s}", f"transformer_blocks.{t}") for s, t in feature_pairs))
    return Trainer(trainable={"dit": student.by_role("dit")[0].module},
                   frozen={"teacher": teacher.by_role("dit")[0].module, "text_encoder": te},
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
