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


@pytest.mark.parametrize("name", ["tiny_teacher.yaml", "tiny_teacher_video.yaml"])
def test_the_recipe_that_trained_the_teacher_is_valid(name):
    cfg = load_config(DEFAULT_CONFIG.with_name(name))
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


# ---- the video bars (issue: a tiny teacher that makes the caption's video) --------------------------
# The bundled teacher predates them: its VAE keeps latent frame 0 (20.7 dB) but not frame 1 (11.7 dB),
# and its clips follow the caption's colour and shape on every frame 0/16 and its motion 5/16
# (bench/bench_video_fidelity.py). The next teacher (ndopt/train/tiny_teacher_video.yaml) is trained
# for them; strict xfails turn into failures the day it is installed, so these markers go with it.
TEACHER_NOT_YET_RETRAINED = pytest.mark.xfail(strict=True, reason="the bundled teacher predates the video bars")


@needs_teacher
@TEACHER_NOT_YET_RETRAINED
def test_vae_reconstructs_every_latent_frame_of_held_out_clips():
    from ndopt.train.teacher import vae_reconstruction

    db = vae_reconstruction(load_model("pyramid-flow-tiny"), load_config(DEFAULT_CONFIG).procedural())
    assert len(db) == 2 and min(db) >= 26.0, db


@pytest.mark.nightly  # 16 clips of 9 frames at 6-6-6 steps with CFG: ~30 s on one core
@needs_teacher
@TEACHER_NOT_YET_RETRAINED
def test_teacher_follows_colour_shape_and_motion_on_every_frame():
    from ndopt.train.teacher_eval import teacher_video_following

    got = teacher_video_following(load_model("pyramid-flow-tiny"))
    assert got.count("every_frame") >= 12 and got.count("moves") >= 12, got.to_json()


def test_a_decoder_only_vae_phase_keeps_the_encoder(tmp_path):
    """`train_encoder: false`: the decoder trains against the frozen encoder, whose latents (and a DiT
    trained on them) stay valid; the default phase trains both."""
    import torch

    from ndopt.train.teacher import TeacherConfig, train_vae_phase

    cfg = TeacherConfig(vae=[{"frames": 9, "steps": 2, "batch_size": 1, "lr": 1e-3},
                             {"frames": 9, "steps": 2, "batch_size": 1, "lr": 1e-3, "train_encoder": False}],
                        dit={"steps": 1, "batch_size": 1, "lr": 1e-3}, checkpoint_every=1)
    pipe = fresh_pipeline(0)
    enc, dec = pipe["vae_encoder"].module, pipe["vae_decoder"].module

    def snap(m):
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    def changed(a, b):
        return any(not torch.equal(a[k], b[k]) for k in a)

    e0, d0 = snap(enc), snap(dec)
    train_vae_phase(pipe, cfg.vae[0], 0, cfg, tmp_path, device=torch.device("cpu"), show_progress=False)
    e1, d1 = snap(enc), snap(dec)
    assert changed(e0, e1) and changed(d0, d1)
    res = train_vae_phase(pipe, cfg.vae[1], 1, cfg, tmp_path, device=torch.device("cpu"), show_progress=False)
    assert res.final["step"] == 2
    assert not changed(e1, snap(enc)) and changed(d1, snap(dec))


def test_decoder_phases_train_beside_the_dit_and_resume(tmp_path):
    """`decoder_beside_dit`: the trailing decoder-only phases run in a second process while the DiT
    trains; the encoder (and so the DiT's latents) is the standardized one, the decoder is the one the
    child trained, and a rerun resumes both from their checkpoints instead of training again."""
    import torch
    from safetensors.torch import load_file

    from ndopt.train.teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig(vae=[{"frames": 9, "steps": 2, "batch_size": 1, "lr": 1e-3},
                             {"frames": 9, "steps": 3, "batch_size": 1, "lr": 1e-3, "train_encoder": False}],
                        dit={"steps": 2, "batch_size": 2, "lr": 1e-3}, latent_clips=8, checkpoint_every=1,
                        decoder_beside_dit=True, eval={"prompts": 1, "steps": (1, 1, 1)})
    assert cfg.decoder_tail() == 1
    pipe, report = train_teacher(cfg, tmp_path, show_progress=False)
    assert report["phases"]["vae1"]["final"]["step"] == 3 and report["phases"]["dit"]["final"]["step"] == 2
    handed = load_file(str(tmp_path / "vae_standardized.safetensors"))
    trained = load_file(str(tmp_path / "vae_decoder.safetensors"))
    enc, dec = pipe["vae_encoder"].module.state_dict(), pipe["vae_decoder"].module.state_dict()
    assert all(torch.equal(v, handed[f"vae_encoder.{k}"]) for k, v in enc.items())
    assert all(torch.equal(v, trained[k]) for k, v in dec.items())
    assert any(not torch.equal(v, handed[f"vae_decoder.{k}"]) for k, v in dec.items())
    assert len(report["vae_reconstruction_db"]) == 2

    assert (tmp_path / "vae1-beside").is_dir() and not (tmp_path / "vae1").exists()

    again, report2 = train_teacher(cfg, tmp_path, show_progress=False)
    # resumed, not retrained: each phase's last logged step (its timing included) comes from its checkpoint
    for phase in ("vae1", "dit"):
        assert report2["phases"][phase]["final"] == report["phases"][phase]["final"], phase
    assert all(torch.equal(v, again["vae_decoder"].module.state_dict()[k]) for k, v in dec.items())
    assert all(torch.equal(v, again["dit"].module.state_dict()[k]) for k, v in pipe["dit"].module.state_dict().items())
