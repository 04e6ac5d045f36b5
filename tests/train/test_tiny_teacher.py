"""The trained tiny teacher: the tiny preset's bundled weights follow their prompts.

The weights were trained by `python -m ndopt.train.teacher` with `ndopt/train/tiny_teacher.yaml`;
this checks what they do, on (colour, shape) pairs that never appear in a training caption. The
untrained preset (seeded random weights) is the control: the same check fails on it.
"""

from __future__ import annotations

import pytest

from ndopt.frontends import load_model
from ndopt.frontends.pyramid_flow.presets import bundled_weights
from ndopt.train.data import ProceduralVideos
from ndopt.train.prompt_following import held_out_scenes, prompt_following
from ndopt.train.teacher import DEFAULT_CONFIG, fresh_pipeline, load_config

WEIGHTS = bundled_weights("pyramid-flow-tiny")
needs_teacher = pytest.mark.skipif(WEIGHTS is None, reason="no bundled tiny teacher weights in this build")


def test_the_recipe_that_trained_the_teacher_is_valid():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.dit.steps > 0 and cfg.vae and cfg.latent_clips > 0
    train = {ProceduralVideos(cfg.procedural(), seed=1).scene(i)[0].caption for i in range(300)}
    held = [s.caption for s in held_out_scenes(16, cfg.procedural())]
    assert not set(held) & train


@needs_teacher
def test_bundled_weights_are_small_safetensors():
    assert WEIGHTS.suffix == ".safetensors" and WEIGHTS.stat().st_size < 20e6


@pytest.fixture(scope="module")
def teacher_and_random():
    cfg = load_config(DEFAULT_CONFIG)
    scenes = held_out_scenes(16, cfg.procedural())
    kw = {"seed": 0, "steps": tuple(cfg.eval.steps), "config": cfg.procedural()}
    untrained = prompt_following(fresh_pipeline(0), scenes, **kw)
    trained = prompt_following(load_model("pyramid-flow-tiny"), scenes, **kw) if WEIGHTS else None
    return trained, untrained


@needs_teacher
def test_teacher_follows_held_out_prompts(teacher_and_random):
    trained, _ = teacher_and_random
    assert trained.n == 16
    assert trained.rate >= 0.6, trained.to_json()


def test_untrained_pipeline_does_not_follow_prompts(teacher_and_random):
    """The control that makes the check above mean something: random weights fail it."""
    _, untrained = teacher_and_random
    assert untrained.rate < 0.3, untrained.to_json()
