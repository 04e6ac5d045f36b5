"""Does a tiny pipeline follow its prompt? The dominant colour of the generated shape vs the caption.

Each decoded frame is split into background (pixels close to the median border colour) and
foreground; every foreground pixel votes for its nearest palette colour, and the winner is the
shape's colour. A sample follows its prompt when that colour is the caption's. This is the
held-out check of the trained tiny teacher and a cheap semantic figure for any tiny pipeline
(`ndopt.train.teacher_eval` runs it with the teacher's own settings on pipelines derived from it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ndopt.ir.pipeline import Pipeline
from ndopt.train.data import PALETTE, ProceduralConfig, ProceduralVideos, SceneSpec


def shape_colour(frame: Tensor, colours: Sequence[str], threshold: float = 0.2) -> str | None:
    """The palette colour (among `colours`) of the object in a [3, H, W] frame in [-1, 1]; None if empty."""
    img = ((frame.float().clamp(-1, 1) + 1) / 2).reshape(3, -1).T  # [HW, 3] in [0, 1]
    h, w = frame.shape[-2:]
    border = torch.cat([frame[:, 0], frame[:, -1], frame[:, :, 0], frame[:, :, -1]], dim=1).float()
    bg = ((border.clamp(-1, 1) + 1) / 2).median(dim=1).values
    fg = img[(img - bg).norm(dim=1) > threshold * 3 ** 0.5]
    if fg.shape[0] < max(4, h * w // 200):
        return None
    pal = torch.tensor([PALETTE[c] for c in colours])
    votes = torch.cdist(fg, pal).argmin(dim=1).bincount(minlength=len(colours))
    return colours[int(votes.argmax())]


@dataclass(frozen=True)
class PromptFollowing:
    rate: float
    n: int
    results: tuple[tuple[str, str, str | None], ...]  # (caption, wanted colour, found colour)

    def to_json(self) -> dict:
        return {"rate": self.rate, "n": self.n,
                "samples": [{"caption": c, "colour": w, "found": f} for c, w, f in self.results]}


def held_out_scenes(n: int, config: ProceduralConfig | None = None, seed: int = 1234) -> list[SceneSpec]:
    """n scenes whose (colour, shape) pairs never appear in training captions."""
    config = config or ProceduralConfig()
    ds = ProceduralVideos(config, seed=seed, held_out=True)
    return [ds.scene(i)[0] for i in range(n)]


def prompt_following(pipeline: Pipeline, scenes: Sequence[SceneSpec], *, seed: int = 0,
                     steps: tuple[int, int, int] | None = (6, 6, 6), latent_frames: int = 1,
                     batch: int = 16, config: ProceduralConfig | None = None) -> PromptFollowing:
    """Generate one clip per scene caption; the share whose first frame's shape has the caption's colour."""
    config = config or ProceduralConfig()
    sch = pipeline.schedule.with_frames(latent_frames, config.height, config.width)
    if steps is not None:
        sch = sch.with_steps(tuple(steps))
    pipe = pipeline.replace(schedule=sch)
    g = torch.Generator().manual_seed(seed)
    results = []
    with torch.no_grad():
        for start in range(0, len(scenes), batch):
            chunk = list(scenes[start:start + batch])
            latents = pipe.sampler.sample(pipe, [s.caption for s in chunk], generator=g)
            video = pipe.sampler.decode(pipe, latents)
            for s, v in zip(chunk, video):
                results.append((s.caption, s.colour, shape_colour(v[:, 0], config.colours)))
    hits = sum(1 for _, want, got in results if want == got)
    return PromptFollowing(hits / max(1, len(results)), len(results), tuple(results))
