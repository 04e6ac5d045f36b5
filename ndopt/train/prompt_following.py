"""Does a tiny pipeline follow its prompt? The generated shape's colour, kind and motion vs the caption.

Each decoded frame is split into background (pixels close to the median border colour) and
foreground (`ndopt.eval.video.object_mask`); every foreground pixel votes for its nearest palette
colour, and the winner is the shape's colour. The shape's kind is the procedural shape whose ideal
mask, rendered at the foreground's centroid and area, overlaps it best (IoU), and its motion is the
direction of its fitted centroid velocity (`ndopt.eval.video.motion_direction`).

`prompt_following` is the first-frame colour check (the held-out check of the trained tiny teacher
and a cheap semantic figure for any tiny pipeline); `video_following` checks a whole clip: the
caption's colour on the first frame, the caption's colour and shape on every frame, and the
caption's direction of motion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ndopt.eval.video import caption_direction, centroid, motion_direction, object_mask, pixel_grid
from ndopt.ir.pipeline import Pipeline
from ndopt.train.data import PALETTE, ProceduralConfig, ProceduralVideos, SceneSpec, _shape_mask

# area of each procedural shape in units of r^2 (train.data._shape_mask's geometry)
_AREA = {"circle": math.pi, "ring": math.pi * (1.0 - 0.44 ** 2), "square": (2 * 0.85) ** 2,
         "box": (2 * 0.85) ** 2, "triangle": 3 * math.sqrt(3) / 4}
_ANGLES = (0.0, 0.1, 0.2, 0.3)  # the square's rotations the renderer draws (0..0.3 rad)


def shape_colour(frame: Tensor, colours: Sequence[str], threshold: float = 0.2) -> str | None:
    """The palette colour (among `colours`) of the object in a [3, H, W] frame in [-1, 1]; None if empty."""
    mask = object_mask(frame, threshold)
    if mask is None:
        return None
    fg = ((frame.float().clamp(-1, 1) + 1) / 2)[:, mask].T  # [N, 3] in [0, 1]
    pal = torch.tensor([PALETTE[c] for c in colours])
    votes = torch.cdist(fg, pal).argmin(dim=1).bincount(minlength=len(colours))
    return colours[int(votes.argmax())]


def shape_kind(frame: Tensor, shapes: Sequence[str], threshold: float = 0.2) -> str | None:
    """Which of `shapes` the object in a [3, H, W] frame is: the one whose ideal mask (at the object's
    centroid, sized to its area) overlaps its foreground best; None if there is no object."""
    mask = object_mask(frame, threshold)
    if mask is None:
        return None
    n = int(mask.sum())
    xs, ys = pixel_grid(*mask.shape)
    cx, cy = centroid(mask)
    best, best_iou = None, -1.0
    for shape in shapes:
        r = math.sqrt(n / _AREA[shape])
        for angle in _ANGLES if shape in ("square", "box") else (0.0,):
            ideal = _shape_mask(shape, xs - cx, ys - cy, r, angle) > 0.5
            iou = float((ideal & mask).sum()) / max(1.0, float((ideal | mask).sum()))
            if iou > best_iou:
                best, best_iou = shape, iou
    return best


@dataclass(frozen=True)
class PromptFollowing:
    rate: float
    n: int
    results: tuple[tuple[str, str, str | None], ...]  # (caption, wanted colour, found colour)

    def to_json(self) -> dict:
        return {"rate": self.rate, "n": self.n,
                "samples": [{"caption": c, "colour": w, "found": f} for c, w, f in self.results]}


@dataclass(frozen=True)
class ClipCheck:
    """What one generated clip shows against its caption."""

    caption: str
    colour: str
    shape: str
    direction: str
    colours: tuple[str | None, ...]  # found per frame
    shapes: tuple[str | None, ...]
    motion: str | None

    @property
    def first_frame(self) -> bool:
        return self.colours[0] == self.colour

    @property
    def every_frame(self) -> bool:
        return all(c == self.colour for c in self.colours) and all(s == self.shape for s in self.shapes)

    @property
    def moves(self) -> bool:
        return self.motion == self.direction


@dataclass(frozen=True)
class VideoFollowing:
    """Shares of clips that follow their captions: first-frame colour, colour and shape on every frame,
    and the direction of motion."""

    clips: tuple[ClipCheck, ...]

    @property
    def n(self) -> int:
        return len(self.clips)

    def count(self, what: str) -> int:
        return sum(getattr(c, what) for c in self.clips)

    def rate(self, what: str) -> float:
        return self.count(what) / max(1, self.n)

    def to_json(self) -> dict:
        return {"n": self.n, "first_frame": self.rate("first_frame"), "every_frame": self.rate("every_frame"),
                "motion": self.rate("moves"),
                "samples": [{"caption": c.caption, "colours": list(c.colours), "shapes": list(c.shapes),
                             "motion": c.motion, "direction": c.direction} for c in self.clips]}


def held_out_scenes(n: int, config: ProceduralConfig | None = None, seed: int = 1234) -> list[SceneSpec]:
    """n scenes whose (colour, shape) pairs never appear in training captions."""
    config = config or ProceduralConfig()
    ds = ProceduralVideos(config, seed=seed, held_out=True)
    return [ds.scene(i)[0] for i in range(n)]


def _generate(pipeline: Pipeline, captions: Sequence[str], *, seed: int, steps: tuple[int, int, int] | None,
              latent_frames: int, batch: int, config: ProceduralConfig) -> list[Tensor]:
    sch = pipeline.schedule.with_frames(latent_frames, config.height, config.width)
    if steps is not None:
        sch = sch.with_steps(tuple(steps))
    pipe = pipeline.replace(schedule=sch)
    g = torch.Generator().manual_seed(seed)
    videos: list[Tensor] = []
    with torch.no_grad():
        for start in range(0, len(captions), batch):
            latents = pipe.sampler.sample(pipe, list(captions[start:start + batch]), generator=g)
            videos.extend(pipe.sampler.decode(pipe, latents))
    return videos


def prompt_following(pipeline: Pipeline, scenes: Sequence[SceneSpec], *, seed: int = 0,
                     steps: tuple[int, int, int] | None = (6, 6, 6), latent_frames: int = 1,
                     batch: int = 16, config: ProceduralConfig | None = None) -> PromptFollowing:
    """Generate one clip per scene caption; the share whose first frame's shape has the caption's colour."""
    config = config or ProceduralConfig()
    videos = _generate(pipeline, [s.caption for s in scenes], seed=seed, steps=steps,
                       latent_frames=latent_frames, batch=batch, config=config)
    results = [(s.caption, s.colour, shape_colour(v[:, 0], config.colours)) for s, v in zip(scenes, videos)]
    hits = sum(1 for _, want, got in results if want == got)
    return PromptFollowing(hits / max(1, len(results)), len(results), tuple(results))


def check_clip(video: Tensor, scene: SceneSpec, config: ProceduralConfig) -> ClipCheck:
    """Colour and shape per frame and the motion of one [3, F, H, W] clip, against its scene."""
    frames = range(video.shape[1])
    return ClipCheck(scene.caption, scene.colour, scene.shape, caption_direction(scene.caption),
                     tuple(shape_colour(video[:, t], config.colours) for t in frames),
                     tuple(shape_kind(video[:, t], config.shapes) for t in frames), motion_direction(video))


def video_following(pipeline: Pipeline, scenes: Sequence[SceneSpec], *, seed: int = 0,
                    steps: tuple[int, int, int] | None = (6, 6, 6), latent_frames: int = 2,
                    batch: int = 16, config: ProceduralConfig | None = None) -> VideoFollowing:
    """Generate a clip of `latent_frames` (2: 9 frames) per scene caption and check every frame and the motion."""
    config = config or ProceduralConfig()
    videos = _generate(pipeline, [s.caption for s in scenes], seed=seed, steps=steps,
                       latent_frames=latent_frames, batch=batch, config=config)
    return VideoFollowing(tuple(check_clip(v, s, config) for s, v in zip(scenes, videos)))
