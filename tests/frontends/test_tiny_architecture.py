"""Bundled weights carry the VAE / DiT configs they were trained with: a teacher retrained wider than
the code's defaults loads as the tiny preset without a code change."""

from __future__ import annotations

import pytest
import torch

from ndopt.errors import CheckpointError, NdoptError
from ndopt.frontends.pyramid_flow import presets
from ndopt.train.teacher import fresh_pipeline

WIDER = {"vae": {"encoder_block_out_channels": [8, 16, 16, 24], "decoder_block_out_channels": [8, 16, 16, 24]}}


def test_wider_teacher_round_trips_through_bundled_weights(tmp_path, monkeypatch):
    wide = fresh_pipeline(0, WIDER)
    assert wide["vae_decoder"].module.config.decoder_block_out_channels == (8, 16, 16, 24)
    path = tmp_path / "pyramid-flow-tiny.safetensors"
    presets.save_bundled(path, wide)
    arch = presets.weights_architecture(path)
    assert arch["vae"] == wide["vae_decoder"].module.config and arch["dit"] == wide["dit"].module.config
    # installed as the preset's weights: the preset is built at the recorded widths and loads them
    monkeypatch.setattr(presets, "bundled_weights", lambda name: path if name == "pyramid-flow-tiny" else None)
    loaded = presets.build_preset("pyramid-flow-tiny")
    a, b = loaded["vae_decoder"].module.state_dict(), wide["vae_decoder"].module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert presets.build_preset("pyramid-flow-tiny", device="meta")["vae_decoder"].module.config == arch["vae"]


def test_weights_without_metadata_keep_the_presets_architecture(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    assert presets.weights_architecture(path) == {}


def test_bad_architecture_metadata_and_overrides(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"ndopt.vae_config": '{"widths": [1]}'})
    with pytest.raises(CheckpointError, match="CausalVAEConfig metadata"):
        presets.weights_architecture(path)
    with pytest.raises(NdoptError, match="architecture.vae"):
        fresh_pipeline(0, {"vae": {"no_such_field": 1}})
    with pytest.raises(NdoptError, match="unknown part 'text'"):
        fresh_pipeline(0, {"text": {}})


def test_bundled_weights_load_into_meta_built_modules(tmp_path, monkeypatch):
    """The DiT and VAE are built on the meta device and take the file's tensors: every value comes from
    the file (same output as an eagerly built, loaded preset), and a file missing a DiT key is refused
    naming it, not left on the meta device."""
    from safetensors.torch import load_file, save_file

    pipe = fresh_pipeline(0)
    path = tmp_path / "pyramid-flow-tiny.safetensors"
    presets.save_bundled(path, pipe)
    monkeypatch.setattr(presets, "bundled_weights", lambda name: path if name == "pyramid-flow-tiny" else None)
    loaded = presets.build_preset("pyramid-flow-tiny")
    for role in ("dit", "vae_decoder"):
        mod = loaded[role].module
        assert not any(t.is_meta for t in [*mod.parameters(), *mod.buffers()])
        a, b = mod.state_dict(), pipe[role].module.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    z = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded["vae_decoder"].module(z), pipe["vae_decoder"].module(z))
    sd = load_file(str(path))
    gone = next(k for k in sd if k.startswith("dit."))
    del sd[gone]
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=gone.removeprefix("dit.").replace(".", r"\.")):
        presets.build_preset("pyramid-flow-tiny")
