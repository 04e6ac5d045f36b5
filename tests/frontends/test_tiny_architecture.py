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

    # the miniFLUX tiny preset reuses the SD3 teacher's VAE: at the widths the weights record
    from ndopt.frontends.miniflux import presets as mf_presets

    mf = mf_presets.build_preset(mf_presets.TINY)
    assert mf["vae_decoder"].module.config == arch["vae"]
    c = mf["vae_decoder"].module.state_dict()
    assert all(torch.equal(c[k], b[k]) for k in b)


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


def test_a_patch_1_dit_is_planned_at_its_own_patch_size():
    """The call plan's DiT layouts carry the DiT's patch size (a patch-1 teacher has 4x the tokens of
    patch 2): the traced call and its cost see the real token count, and the layout check accepts it."""
    p2, p1 = fresh_pipeline(0), fresh_pipeline(0, {"dit": {"patch_size": 1}})
    plans = [[s for s in p.call_plan() if s.component == "dit"] for p in (p2, p1)]
    assert [s.key for s in plans[0]] == [s.key for s in plans[1]]
    for a, b in zip(*plans):
        la, lb = a.static_dict["layout"], b.static_dict["layout"]
        assert (la.patch_size, lb.patch_size) == (2, 1) and lb.tokens == 4 * la.tokens
    sig = plans[1][-1]
    args = {k: (tuple(torch.randn(t.shape) for t in v) if isinstance(v, tuple)
                else torch.zeros(v.shape, dtype=torch.long) if v.dtype == "int64" else torch.randn(v.shape))
            for k, v in sig.args}
    with torch.no_grad():
        out = p1["dit"].module(**args, layout=sig.static_dict["layout"])
        free = p1["dit"].module(**args)
    assert out.shape == args["sample"][-1].shape and torch.equal(out, free)
