"""ndopt.train: the one training engine (Trainer), its objectives and its data.

Passes that train (block pruning's fine-tunes, encoder substitution, decoder distillation, step
distillation) build a Trainer from these pieces:

- `Trainer(trainable=..., frozen=..., objective=..., data=..., config=TrainConfig(...), run_dir=...)`
  and `.fit() -> TrainResult` (resumes from `run_dir/checkpoints`);
- objectives: `PyramidalFlowMatching` (seed eq. 6-7), `Distillation` (teacher-student output and
  feature matching) with `pyramid_distillation_inputs`, `VAEReconstruction`;
- data: `ProceduralVideos`, `FolderVideos`, `LatentCache`.
"""

from ndopt.train.data import (
    Batch,
    Example,
    FolderVideos,
    LatentCache,
    ProceduralConfig,
    ProceduralVideos,
    SceneSpec,
)
from ndopt.train.engine import TrainConfig, Trainer, TrainResult
from ndopt.train.objectives import (
    Distillation,
    FeatureTap,
    LossOutput,
    Objective,
    PromptEncoder,
    PyramidalFlowMatching,
    StepInfo,
    VAEReconstruction,
    frozen_copy,
    pyramid_distillation_inputs,
    pyramid_flow_inputs,
)

__all__ = [
    "Batch", "Distillation", "Example", "FeatureTap", "FolderVideos", "LatentCache", "LossOutput", "Objective",
    "ProceduralConfig", "ProceduralVideos", "PromptEncoder", "PyramidalFlowMatching", "SceneSpec", "StepInfo",
    "TrainConfig", "TrainResult", "Trainer", "VAEReconstruction", "frozen_copy", "pyramid_distillation_inputs",
    "pyramid_flow_inputs",
]
