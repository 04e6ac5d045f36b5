"""Neodragon's hybrid pipeline (issue 22): an image model's first frame, the DiT's other frames,
chunked causal decode, 2x super-resolution, and a sequential memory plan that fits a phone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ndopt.frontends import hybrid_pipeline, load_model
from ndopt.frontends.neodragon.hybrid import MODE, HybridSampler
from ndopt.frontends.pyramid_flow.tiny_decoder import TinyDecoderConfig, TinyVideoDecoder
from ndopt.frontends.pyramid_flow.vae import normalize_latents
from ndopt.ir.verify import verify

PROMPT = "a red circle moving left on a dark background"


@pytest.fixture(scope="module")
def hybrid():
    torch.set_num_threads(1)
    return hybrid_pipeline(load_model("pyramid-flow-tiny"))


# ---- chunked causal decode ----------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 2, 3])
def test_chunked_tiny_decode_equals_whole_clip_decode(window):
    """The tiny decoder (Neodragon's widths' topology: three MemBlocks per stage) decoded chunk by chunk
    with each MemBlock's cached last frame equals the whole-clip decode within 1e-5."""
    torch.manual_seed(0)
    dec = TinyVideoDecoder(TinyDecoderConfig(n_f=(16, 8, 8, 8), mem_blocks=3)).eval()
    z = torch.randn(1, 16, 7, 4, 6)
    with torch.no_grad():
        whole = dec(z)
        dec.window_size = window
        chunked = dec(z)
        dec.window_size = None
        again = dec(z)  # the cache is dropped after a chunked decode: a whole-clip decode is unaffected
    assert chunked.shape == whole.shape == (1, 3, 49, 32, 48)
    assert (chunked - whole).abs().max().item() <= 1e-5
    assert torch.equal(again, whole)
    # the cache matters: chunks decoded without it differ from the whole clip
    with torch.no_grad():
        cold = torch.cat([dec(z[:, :, :window + 1])] + [dec._decode(z[:, :, a:a + window], trim=False)
                                                         for a in range(window + 1, 7, window)], dim=2)
    assert (cold - whole).abs().max().item() > 10 * 1e-5  # (random weights: small, but 50x the tolerance)


def test_hybrid_decoder_decodes_in_chunks(hybrid):
    dec = hybrid["vae_decoder"].module
    assert dec.window_size == 1 and hybrid["vae_decoder"].attrs["decode_window"] == 1
    z = torch.randn(1, 16, 3, 8, 8)
    with torch.no_grad():
        chunked = dec(z)
        dec.window_size = None
        try:
            whole = dec(z)
        finally:
            dec.window_size = 1
    assert (chunked - whole).abs().max().item() <= 1e-5


# ---- structure ----------------------------------------------------------------------------------
def test_hybrid_pipeline_structure_verifies(hybrid):
    verify(hybrid)
    assert hybrid.schedule.first_frame == MODE and isinstance(hybrid.sampler, HybridSampler)
    roles = {n: c.role for n, c in hybrid.components.items()}
    assert [n for n, r in roles.items() if r == "image_model"] == ["image_text_encoder", "image_unet", "image_decoder"]
    assert roles["super_resolution"] == "super_resolution"
    plan = {s.component: s for s in hybrid.call_plan()}
    assert plan["image_unet"].count == 4 and plan["image_text_encoder"].count == 1
    assert plan["vae_encoder"].count == 1  # the image model's frame, at the DiT's size
    assert plan["super_resolution"].count == 9  # every frame
    # the DiT generates every unit but the first
    assert hybrid.schedule.dit_calls_per_video == sum(s.count for s in hybrid.call_plan() if s.component == "dit")
    # the plain pipeline is untouched
    plain = load_model("pyramid-flow-tiny")
    assert plain.schedule.first_frame == "generate" and plain["vae_decoder"].module.__dict__.get("window_size") is None


def test_first_latent_is_the_image_models_frame_through_the_vae_encoder(hybrid):
    """Upstream's image-to-video path: the image (area-downsampled to the DiT's size) VAE-encoded and
    normalized with the image factors is the first latent frame; the DiT's units start at 1."""
    with torch.no_grad():
        image = hybrid.sampler.first_frame(hybrid, [PROMPT], generator=np.random.default_rng(3))
        assert image.shape == (1, 3, 128, 128) and image.abs().max() <= 1
        small = F.interpolate(image, size=(64, 64), mode="area")
        want = normalize_latents(hybrid["vae_encoder"].module(small.unsqueeze(2)))
        lat = hybrid.sampler.sample(hybrid, [PROMPT], generator=np.random.default_rng(3))
    assert lat.shape == (1, 16, 2, 8, 8)
    assert torch.allclose(lat[:, :, :1], want, atol=1e-5)


def test_hybrid_video_is_twice_the_dits_size_and_starts_with_the_image(hybrid):
    with torch.no_grad():
        image = hybrid.sampler.first_frame(hybrid, [PROMPT], generator=np.random.default_rng(0))
        lat = hybrid.sampler.sample(hybrid, [PROMPT], generator=np.random.default_rng(0))
        video = hybrid.sampler.decode(hybrid, lat)
    assert video.shape == (1, 3, 9, 128, 128) and video.abs().max() <= 1
    mse = F.mse_loss(video[0, :, 0], image[0]).item()
    other = F.mse_loss(video[0, :, 0], image[0].flip(-1)).item() if image[0].flip(-1).ne(image[0]).any() else None
    psnr = 10 * np.log10(4 / mse)
    assert psnr > 14, f"frame 0 vs the image model's frame: {psnr:.1f} dB"
    if other is not None:
        assert mse < other


def test_generate_first_frame_image_model_from_the_cli(tmp_path):
    import imageio.v3 as iio
    from click.testing import CliRunner

    from ndopt.cli import main

    out = tmp_path / "v.png"
    res = CliRunner().invoke(main, ["generate", "--prompt", PROMPT, "--first-frame", "image-model", "--out", str(out)])
    assert res.exit_code == 0, res.output
    strip = iio.imread(out)  # the frames side by side
    assert strip.shape == (128, 9 * 128, 3)
    res = CliRunner().invoke(main, ["generate", "--bundle", str(tmp_path), "--prompt", PROMPT,
                                    "--first-frame", "image-model", "--out", str(tmp_path / "b.png")])
    assert res.exit_code == 2 and "--first-frame" in res.output


# ---- the real-size plan ---------------------------------------------------------------------------
@pytest.mark.slow
def test_plan_of_the_hybrid_neodragon_chain_fits_3_gb(tmp_path):
    """49 frames, DiT at 320x512, video 640x1024, w8a16 on the 8 Elite: peak <= 3.0 GB (Neodragon: 3.5),
    phases run one at a time in the order they are called, and every component is priced."""
    from ndopt.runner import plan

    r = plan("recipes/neodragon-hybrid-8elite.yaml", model="pyramid-flow-sd3-384p", frames=49, height=320,
             width=512, report_dir=tmp_path)  # the recipe says `first_frame: image-model`
    est = r["estimates"]["snapdragon-8-elite"]
    mp = est["memory_plan"]
    assert mp["policy"] == "sequential" and est["peak_memory_mb"] <= 3.0 * 1024, mp
    assert mp["all_resident_mb"] > 2 * mp["peak_mb"]  # what the phases save
    order = [ph["phase"] for ph in mp["phases"]]
    assert order.index("image_unet") < order.index("vae_encoder") < order.index("text_encoder") < order.index("dit") \
        < order.index("vae_decoder") < order.index("super_resolution")
    dit_phase = next(ph for ph in mp["phases"] if ph["phase"] == "dit")
    assert dit_phase["weights_mb"] == pytest.approx(mp["weights_mb"]["dit"], abs=1e-3)  # the image model is freed
    comps = est["components"]
    assert set(comps) >= {"image_text_encoder", "image_unet", "image_decoder", "vae_encoder", "text_encoder", "dit",
                          "vae_decoder", "super_resolution"}
    assert all(c["latency_ms"] > 0 and c["precision"] == "w8a16" for c in comps.values()), comps
    assert comps["image_unet"]["calls_per_video"] == 4 and comps["super_resolution"]["calls_per_video"] == 49
    params = r["final"]["params"]
    assert 4.5e9 < sum(params.values()) < 5.3e9  # Neodragon: 4.945B (the bench states what each side counts)
    assert 1.2e9 < params["image_unet"] < 1.4e9  # SSD-1B's UNet: 1.3B on its model card


# ---- lowering and the bundle runtime --------------------------------------------------------------
@pytest.mark.slow
def test_hybrid_pipeline_lowers_to_both_targets_and_its_bundle_gives_the_torch_video(hybrid, tmp_path):
    """Every graph (image model, SR and the rest) passes legality and onnxruntime-vs-torch numerics on
    both targets; the bundle's program runs the image model, the DiT and SR phase by phase (each
    phase's sessions released when it ends) and gives the torch sampler's video."""
    import json

    from ndopt.target import get_target
    from targets import runtime
    from targets.bundle import graph_calls

    expected = {s.component for s in hybrid.call_plan()}
    for name in ("snapdragon-8-elite", "snapdragon-x-elite"):
        out = tmp_path / name
        r = get_target(name).lower(hybrid, out)
        assert r["status"] == "ok"
        assert {g.split("__")[0] for g in r["graphs"]} == expected
        for g, v in r["graphs"].items():
            assert v["legal"] and v["numerics_ok"], (name, g, v)
    man = json.loads((tmp_path / "snapdragon-8-elite" / "manifest.json").read_text())
    assert man["memory_plan"]["policy"] == "sequential"
    assert [p["phase"] for p in man["memory_plan"]["phases"]][:3] == ["image_text_encoder", "image_unet", "image_decoder"]
    released = [c for op in man["program"] if op["op"] == "release" for c in op["components"]]
    assert sorted(released) == sorted(expected)  # every phase ends with its weights freed
    assert graph_calls(man["program"])["super_resolution__frame"] == 9
    res = runtime.generate(tmp_path / "snapdragon-8-elite", PROMPT, seed=0, provider="cpu")
    with torch.no_grad():
        lat = hybrid.sampler.sample(hybrid, [PROMPT], generator=np.random.default_rng(0))
        video = hybrid.sampler.decode(hybrid, lat)
    assert np.abs(res.latents - lat.numpy()).max() < 1e-3
    assert res.video.shape == (1, 3, 9, 128, 128) and np.abs(res.video - video.numpy()).max() < 1e-3


def test_recipe_first_frame_is_checked_and_names_its_line(tmp_path):
    from ndopt.errors import NdoptError
    from ndopt.recipe import load_recipe

    bad = tmp_path / "r.yaml"
    bad.write_text("name: r\nmodel: pyramid-flow-tiny\nfirst_frame: image_model\npasses: [cfg_folding]\n")
    with pytest.raises(NdoptError, match=r"r.yaml:3.*first_frame"):
        load_recipe(bad)
    good = tmp_path / "g.yaml"
    good.write_text("name: g\nmodel: pyramid-flow-tiny\nfirst_frame: image-model\npasses: [cfg_folding]\n")
    assert load_recipe(good).spec.first_frame == "image-model"


def test_a_saved_hybrid_pipeline_reloads_and_samples_the_same(hybrid, tmp_path):
    from ndopt.ir.pipeline import Pipeline

    hybrid.save_pretrained(tmp_path / "model")
    back = Pipeline.from_pretrained(tmp_path / "model")
    assert back.schedule.first_frame == MODE and sorted(back.components) == sorted(hybrid.components)
    assert back["vae_decoder"].module.window_size == 1
    with torch.no_grad():
        a = hybrid.sampler.sample(hybrid, [PROMPT], generator=np.random.default_rng(5))
        b = back.sampler.sample(back, [PROMPT], generator=np.random.default_rng(5))
    assert torch.allclose(a, b, atol=1e-6)
