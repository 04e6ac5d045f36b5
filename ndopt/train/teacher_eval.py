"""The tiny teacher's held-out prompt-following check, on any pipeline derived from it.

The teacher (ndopt/train/teacher.py) checks itself with `prompt_following` after training; the
passes' tests hold every pipeline derived from it (a swapped encoder or decoder, a quantized or
distilled DiT) to the same check and bar. This lives apart from both so that neither imports the
other: teacher -> prompt_following, and this module -> both.
"""

from __future__ import annotations

from ndopt.ir.pipeline import Pipeline
from ndopt.train.prompt_following import (
    PromptFollowing,
    VideoFollowing,
    held_out_scenes,
    prompt_following,
    video_following,
)
from ndopt.train.teacher import load_config


def teacher_prompt_following(pipeline: Pipeline, n: int = 16, *, steps: tuple[int, int, int] | str | None = "eval",
                             **kw) -> PromptFollowing:
    """The tiny teacher's own held-out check on any pipeline derived from it: the teacher recipe's data
    distribution (backgrounds, sizes), held-out scenes, evaluation steps and seed. `steps=None` keeps
    the pipeline's schedule (a distilled student's)."""
    cfg = load_config()
    data = cfg.procedural()
    kw.setdefault("seed", cfg.eval.seed)
    return prompt_following(pipeline, held_out_scenes(n, data), steps=tuple(cfg.eval.steps) if steps == "eval" else steps,
                            config=data, **kw)


def teacher_video_following(pipeline: Pipeline, n: int = 16, *, steps: tuple[int, int, int] | str | None = "eval",
                            **kw) -> VideoFollowing:
    """`teacher_prompt_following` over whole clips (`video_following`: every frame's colour and shape, and
    the motion), with the same held-out scenes, evaluation steps and seed."""
    cfg = load_config()
    data = cfg.procedural()
    kw.setdefault("seed", cfg.eval.seed)
    return video_following(pipeline, held_out_scenes(n, data), steps=tuple(cfg.eval.steps) if steps == "eval" else steps,
                           config=data, **kw)


#: the bar of the tiny teacher's test (issue: trained tiny teacher), kept by every pipeline derived from it
PROMPT_FOLLOWING_BAR = 0.6
