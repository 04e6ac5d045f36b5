"""The sampler schedule of a pyramidal-flow pipeline: stages, guidance, temporal pyramid, frames.

The Schedule decides how many times each component is called per video, hence the cost of a
video. Passes that fold steps or guidance return a new Schedule; the sampler reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

GuidanceMode = Literal["cfg", "cfg_batched", "none"]


@dataclass(frozen=True)
class Stage:
    """One pyramid stage: spatial scale (1 = full resolution), its sigma/timestep window and steps.

    `steps` is the step count for the first latent frame, `video_steps` for each later frame
    (Pyramid-Flow: 20-20-20 and 10-10-10). `ori_sigma_start` is the uncorrected start sigma whose
    signal coefficient the renoise at the stage boundary restores.
    """

    scale: float
    sigma_start: float
    sigma_end: float
    timestep_start: float
    timestep_end: float
    steps: int
    video_steps: int
    ori_sigma_start: float = 1.0


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: `cfg` calls the DiT twice per step (unconditional and conditional),
    `cfg_batched` once with batch 2, `none` once (a guidance-free, e.g. step-distilled, model)."""

    mode: GuidanceMode = "cfg"
    scale: float = 7.0  # first frame (REFERENCE.md: CFG 7.0)
    video_scale: float = 5.0  # later frames (REFERENCE.md: 5.0)

    @property
    def calls_per_step(self) -> int:
        return 2 if self.mode == "cfg" else 1

    @property
    def batch(self) -> int:
        return 2 if self.mode == "cfg_batched" else 1


@dataclass(frozen=True)
class TemporalPyramid:
    """Autoregressive generation over latent frames; history frames fed at lower resolution."""

    enabled: bool = True
    frame_per_unit: int = 1


@dataclass(frozen=True)
class Schedule:
    """Everything the sampler needs to know besides the components."""

    stages: tuple[Stage, ...]
    guidance: Guidance = field(default_factory=Guidance)
    temporal: TemporalPyramid = field(default_factory=TemporalPyramid)
    latent_frames: int = 1  # 1 + (video frames - 1) / temporal compression
    height: int = 384  # pixels
    width: int = 640
    gamma: float = 1 / 3  # block-noise correlation (REFERENCE.md)
    folded: bool = False  # constants precomputed and the call list unrolled (schedule_folding)
    # hybrid mode: "external" (an image from outside the pipeline) or "image-model" (its image_model components)
    first_frame: Literal["generate", "external", "image-model"] = "generate"

    @property
    def units(self) -> int:
        """Autoregressive units: the first latent frame, then one per frame_per_unit frames."""
        return 1 + (self.latent_frames - 1) // self.temporal.frame_per_unit

    @property
    def steps_per_video(self) -> int:
        """Denoising steps per video (each is one DiT evaluation, times CFG's calls per step)."""
        first = sum(s.steps for s in self.stages) if self.first_frame == "generate" else 0
        return first + (self.units - 1) * sum(s.video_steps for s in self.stages)

    @property
    def dit_calls_per_video(self) -> int:
        return self.steps_per_video * self.guidance.calls_per_step

    def with_steps(self, steps: tuple[int, ...], video_steps: tuple[int, ...] | None = None) -> Schedule:
        video_steps = steps if video_steps is None else video_steps
        if len(steps) != len(self.stages) or len(video_steps) != len(self.stages):
            raise ValueError(f"need {len(self.stages)} step counts per stage, got {steps} / {video_steps}")
        stages = tuple(replace(s, steps=a, video_steps=b) for s, a, b in zip(self.stages, steps, video_steps))
        return replace(self, stages=stages)

    def with_guidance(self, mode: GuidanceMode) -> Schedule:
        return replace(self, guidance=replace(self.guidance, mode=mode))

    def with_frames(self, latent_frames: int, height: int | None = None, width: int | None = None) -> Schedule:
        return replace(self, latent_frames=latent_frames, height=self.height if height is None else height,
                       width=self.width if width is None else width)

    def summary_lines(self) -> list[str]:
        steps = "-".join(str(s.steps) for s in self.stages)
        vsteps = "-".join(str(s.video_steps) for s in self.stages)
        lines = [
            f"schedule: {len(self.stages)} stages, steps {steps} (first) / {vsteps} (video), "
            f"guidance {self.guidance.mode} ({self.guidance.scale:g}/{self.guidance.video_scale:g}), "
            f"{self.latent_frames} latent frames at {self.height}x{self.width}, "
            f"first frame {self.first_frame}{', folded' if self.folded else ''}",
        ]
        for i, s in enumerate(self.stages):
            lines.append(
                f"  stage {i}: scale {s.scale:g} sigma {s.sigma_start:.4f}->{s.sigma_end:.4f} "
                f"t {s.timestep_start:.1f}->{s.timestep_end:.1f}"
            )
        return lines
