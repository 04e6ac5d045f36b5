"""Tests of ndopt/frontends/pyramid_flow/vae.py: Pyramid-Flow's causal video VAE."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import ndopt
from ndopt.frontends.pyramid_flow.vae import (
    IMAGE_SCALE,
    IMAGE_SHIFT,
    VIDEO_SCALE,
    VIDEO_SHIFT,
    CausalVAEConfig,
    CausalVideoVAE,
    VAEDecoder,
    VAEEncoder,
    denormalize_latents,
    normalize_latents,
    split_vae,
    tiny_config,
)

# The released checkpoint's causal_video_vae/config.json (rain1011/pyramid-flow-sd3).
RELEASED_CONFIG_JSON = {
    "_class_name": "CausalVideoVAE",
    "_diffusers_version": "0.29.2",
    "add_post_quant_conv": True,
    "decoder_act_fn": "silu",
    "decoder_block_dropout": [0.0, 0.0, 0.0, 0.0],
    "decoder_block_out_channels": [128, 256, 512, 512],
    "decoder_in_channels": 16,
    "decoder_layers_per_block": [3, 3, 3, 3],
    "decoder_norm_num_groups": 32,
    "decoder_out_channels": 3,
    "decoder_spatial_up_sample": [True, True, True, False],
    "decoder_temporal_up_sample": [True, True, True, False],
    "decoder_type": "causal_vae_conv",
    "decoder_up_block_types": ["UpDecoderBlockCausal3D"] * 4,
    "downsample_scale": 8,
    "encoder_act_fn": "silu",
    "encoder_block_dropout": [0.0, 0.0, 0.0, 0.0],
    "encoder_block_out_channels": [128, 256, 512, 512],
    "encoder_double_z": True,
    "encoder_down_block_types": ["DownEncoderBlockCausal3D"] * 4,
    "encoder_in_channels": 3,
    "encoder_layers_per_block": [2, 2, 2, 2],
    "encoder_norm_num_groups": 32,
    "encoder_out_channels": 16,
    "encoder_spatial_down_sample": [True, True, True, False],
    "encoder_temporal_down_sample": [True, True, True, False],
    "encoder_type": "causal_vae_conv",
    "interpolate": False,
    "sample_size": 256,
    "scaling_factor": 0.13025,
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def real_vae() -> CausalVideoVAE:
    with torch.device("meta"):
        return CausalVideoVAE(CausalVAEConfig())


@pytest.fixture
def tiny_vae() -> CausalVideoVAE:
    torch.manual_seed(0)
    return CausalVideoVAE(tiny_config()).eval()


# ---------------------------------------------------------------------------------------- config


def test_released_config_json_is_the_default_config():
    cfg = CausalVAEConfig.from_dict(RELEASED_CONFIG_JSON)
    assert cfg == CausalVAEConfig()
    assert (cfg.spatial_factor, cfg.temporal_factor, cfg.latent_channels) == (8, 8, 16)
    assert CausalVAEConfig.from_dict(cfg.to_dict()) == cfg
    assert CausalVAEConfig.from_dict(tiny_config().to_dict()) == tiny_config()


def test_from_dict_missing_latent_width_takes_upstream_default_of_4():
    assert CausalVAEConfig.from_dict({}).latent_channels == 4


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"encoder_use_attention": False}, "unknown keys \\['encoder_use_attention'\\]"),
        ({"decoder_in_channels": 8}, "encoder_out_channels=16 != decoder_in_channels=8"),
        ({"interpolate": True}, "interpolate=True"),
        ({"decoder_up_block_types": ["UpDecoderBlock2D"] * 4}, "only 'UpDecoderBlockCausal3D'"),
        ({"encoder_layers_per_block": [2, 2, 2]}, "encoder_layers_per_block: 3 entries"),
        ({"decoder_temporal_up_sample": [True, True, False, False]}, "temporal 3 vs 2"),
        ({"encoder_norm_num_groups": 24}, "multiple of encoder_norm_num_groups=24"),
    ],
)
def test_from_dict_rejects_what_would_change_or_break_the_network(extra, match):
    with pytest.raises(ValueError, match=match):
        CausalVAEConfig.from_dict({**RELEASED_CONFIG_JSON, **extra})


# ------------------------------------------------------------------------------- size and naming


def test_real_size_parameter_counts_match_the_released_model(real_vae):
    encoder, decoder = split_vae(real_vae)
    # REFERENCE.md: encoder ~109.6M, decoder ~225.8M
    assert _count(encoder) == pytest.approx(109.6e6, rel=0.01)
    assert _count(decoder) == pytest.approx(225.8e6, rel=0.01)
    assert _count(encoder) + _count(decoder) == _count(real_vae)


def test_real_size_keys_and_shapes_follow_upstream(real_vae):
    shapes = {k: tuple(v.shape) for k, v in real_vae.state_dict().items()}
    assert len(shapes) == 260  # upstream CausalVideoVAE at the released config
    assert list(shapes)[:4] == [
        "encoder.conv_in.conv.weight",
        "encoder.conv_in.conv.bias",
        "encoder.down_blocks.0.resnets.0.norm1.weight",
        "encoder.down_blocks.0.resnets.0.norm1.bias",
    ]
    assert list(shapes)[-4:] == [
        "quant_conv.conv.weight",
        "quant_conv.conv.bias",
        "post_quant_conv.conv.weight",
        "post_quant_conv.conv.bias",
    ]
    expected = {
        "encoder.conv_in.conv.weight": (128, 3, 3, 3, 3),
        "encoder.down_blocks.1.resnets.0.conv_shortcut.conv.weight": (256, 128, 1, 1, 1),
        "encoder.down_blocks.2.downsamplers.0.conv.conv.weight": (512, 512, 3, 3, 3),
        "encoder.down_blocks.2.temporal_downsamplers.0.conv.conv.weight": (512, 512, 3, 3, 3),
        "encoder.down_blocks.3.resnets.1.conv2.conv.weight": (512, 512, 3, 3, 3),
        "encoder.mid_block.attentions.0.group_norm.weight": (512,),
        "encoder.mid_block.attentions.0.to_out.0.weight": (512, 512),
        "encoder.conv_out.conv.weight": (32, 512, 3, 3, 3),
        "decoder.conv_in.conv.weight": (512, 16, 3, 3, 3),
        "decoder.up_blocks.0.resnets.2.conv2.conv.weight": (512, 512, 3, 3, 3),
        "decoder.up_blocks.0.upsamplers.0.conv.conv.weight": (2048, 512, 3, 3, 3),
        "decoder.up_blocks.2.temporal_upsamplers.0.conv.conv.weight": (512, 256, 3, 3, 3),
        "decoder.up_blocks.3.resnets.0.conv_shortcut.conv.weight": (128, 256, 1, 1, 1),
        "decoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "decoder.conv_norm_out.weight": (128,),
        "decoder.conv_out.conv.weight": (3, 128, 3, 3, 3),
        "quant_conv.conv.weight": (32, 32, 1, 1, 1),
        "post_quant_conv.conv.weight": (16, 16, 1, 1, 1),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert not any(k.startswith("decoder.up_blocks.3.upsamplers") for k in shapes)  # last block keeps size
    assert list(real_vae.buffers()) == []


def _resnet(prefix: str, shortcut: bool = False) -> list[str]:
    paths = ["norm1", "conv1.conv", "norm2", "conv2.conv"] + (["conv_shortcut.conv"] if shortcut else [])
    return [f"{prefix}.{p}" for p in paths]


def _mid(prefix: str) -> list[str]:
    attn = ["group_norm", "to_q", "to_k", "to_v", "to_out.0"]
    # upstream CausalUNetMidBlock2D registers its attentions before its resnets
    return [*(f"{prefix}.attentions.0.{a}" for a in attn), *_resnet(f"{prefix}.resnets.0"),
            *_resnet(f"{prefix}.resnets.1")]


# Upstream's module tree at the tiny config (one resnet per block), in registration order:
# the decoder registers up_blocks before mid_block (modeling_enc_dec.py sets mid_block = None first).
TINY_MODULES = [
    "encoder.conv_in.conv",
    *_resnet("encoder.down_blocks.0.resnets.0"),
    "encoder.down_blocks.0.downsamplers.0.conv.conv",
    "encoder.down_blocks.0.temporal_downsamplers.0.conv.conv",
    *_resnet("encoder.down_blocks.1.resnets.0", shortcut=True),
    "encoder.down_blocks.1.downsamplers.0.conv.conv",
    "encoder.down_blocks.1.temporal_downsamplers.0.conv.conv",
    *_resnet("encoder.down_blocks.2.resnets.0"),
    "encoder.down_blocks.2.downsamplers.0.conv.conv",
    "encoder.down_blocks.2.temporal_downsamplers.0.conv.conv",
    *_resnet("encoder.down_blocks.3.resnets.0"),
    *_mid("encoder.mid_block"),
    "encoder.conv_norm_out",
    "encoder.conv_out.conv",
    "decoder.conv_in.conv",
    *_resnet("decoder.up_blocks.0.resnets.0"),
    "decoder.up_blocks.0.upsamplers.0.conv.conv",
    "decoder.up_blocks.0.temporal_upsamplers.0.conv.conv",
    *_resnet("decoder.up_blocks.1.resnets.0"),
    "decoder.up_blocks.1.upsamplers.0.conv.conv",
    "decoder.up_blocks.1.temporal_upsamplers.0.conv.conv",
    *_resnet("decoder.up_blocks.2.resnets.0"),
    "decoder.up_blocks.2.upsamplers.0.conv.conv",
    "decoder.up_blocks.2.temporal_upsamplers.0.conv.conv",
    *_resnet("decoder.up_blocks.3.resnets.0", shortcut=True),
    *_mid("decoder.mid_block"),
    "decoder.conv_norm_out",
    "decoder.conv_out.conv",
    "quant_conv.conv",
    "post_quant_conv.conv",
]


def test_tiny_state_dict_keys_are_upstream_names(tiny_vae):
    expected = [f"{m}.{p}" for m in TINY_MODULES for p in ("weight", "bias")]
    assert list(tiny_vae.state_dict()) == expected


def test_split_components_share_the_vae_parameters_under_the_same_keys(tiny_vae):
    encoder, decoder = split_vae(tiny_vae)
    assert isinstance(encoder, VAEEncoder) and isinstance(decoder, VAEDecoder)
    full = tiny_vae.state_dict()
    enc, dec = encoder.state_dict(), decoder.state_dict()
    assert set(enc) == {k for k in full if k.startswith(("encoder.", "quant_conv."))}
    assert set(dec) == {k for k in full if k.startswith(("decoder.", "post_quant_conv."))}
    assert set(enc) | set(dec) == set(full)
    assert all(enc[k].data_ptr() == full[k].data_ptr() for k in enc)  # shared, not copied
    assert all(dec[k].data_ptr() == full[k].data_ptr() for k in dec)
    # a component's state dict loads strictly into a fresh VAE's component, and vice versa
    fresh_enc, fresh_dec = split_vae(CausalVideoVAE(tiny_config()))
    fresh_enc.load_state_dict(enc, strict=True)
    fresh_dec.load_state_dict(dec, strict=True)


def test_tiny_preset_is_small():
    encoder, decoder = split_vae(CausalVideoVAE(tiny_config()))
    assert _count(decoder) < 300_000
    assert _count(encoder) < 300_000


# --------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(("frames", "latent_frames"), [(9, 2), (1, 1)])
def test_encode_decode_shapes(tiny_vae, frames, latent_frames):
    video = torch.rand(1, 3, frames, 64, 64) * 2 - 1
    with torch.no_grad():
        z = tiny_vae.encode(video)
        assert z.shape == (1, 16, latent_frames, 8, 8)
        assert tiny_vae.decode(z).shape == video.shape


def test_encode_rejects_frame_counts_that_are_not_1_plus_8k(tiny_vae):
    with pytest.raises(ValueError, match="1 \\+ 8k"):
        tiny_vae.encode(torch.zeros(1, 3, 8, 64, 64))
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_vae.encode(torch.zeros(1, 3, 9, 60, 64))


def test_round_trip_of_random_weights_is_finite(tiny_vae):
    video = torch.rand(2, 3, 9, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        out = tiny_vae(video)
    assert out.shape == video.shape
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0


# -------------------------------------------------------------------------------------- causality


def test_first_latent_frame_sees_only_the_first_frame(tiny_vae):
    gen = torch.Generator().manual_seed(2)
    video = torch.rand(1, 3, 17, 32, 32, generator=gen) * 2 - 1
    changed = video.clone()
    changed[:, :, 1:] = torch.rand(1, 3, 16, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        z, z_changed = tiny_vae.encode(video), tiny_vae.encode(changed)
    torch.testing.assert_close(z[:, :, :1], z_changed[:, :, :1], rtol=0, atol=1e-6)
    assert (z[:, :, 1:] - z_changed[:, :, 1:]).abs().max() > 1e-4  # the rest does see them
    # latent frame 1 sees frames 0..8 only
    changed[:, :, :9] = video[:, :, :9]
    with torch.no_grad():
        z_changed = tiny_vae.encode(changed)
    torch.testing.assert_close(z[:, :, :2], z_changed[:, :, :2], rtol=0, atol=1e-6)


def test_decoded_frames_see_only_past_latents(tiny_vae):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1, 16, 3, 8, 8, generator=gen)
    changed = z.clone()
    changed[:, :, 1:] = torch.randn(1, 16, 2, 8, 8, generator=gen)
    with torch.no_grad():
        out, out_changed = tiny_vae.decode(z), tiny_vae.decode(changed)
    torch.testing.assert_close(out[:, :, :1], out_changed[:, :, :1], rtol=0, atol=1e-6)
    assert (out[:, :, 1:] - out_changed[:, :, 1:]).abs().max() > 1e-4
    # changing only latent frame 2 leaves frames 0..8 (latents 0 and 1) as they were
    changed[:, :, :2] = z[:, :, :2]
    with torch.no_grad():
        out_changed = tiny_vae.decode(changed)
    torch.testing.assert_close(out[:, :, :9], out_changed[:, :, :9], rtol=0, atol=1e-6)


@pytest.mark.parametrize("window_size", [1, 2])
def test_chunked_decode_equals_whole_clip_decode(tiny_vae, window_size):
    z = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = tiny_vae.decode(z)
        chunked = tiny_vae.decode(z, window_size=window_size)
        _, decoder = split_vae(tiny_vae)
        decoder.window_size = window_size
        component = decoder(z)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(component, whole, rtol=0, atol=1e-5)
    # the streaming state does not leak into the next whole-clip call
    with torch.no_grad():
        torch.testing.assert_close(tiny_vae.decode(z), whole, rtol=0, atol=0)


def test_components_trace_at_static_shapes_without_data_dependent_python(tiny_vae):
    encoder, decoder = split_vae(tiny_vae)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(1, 16, 2, 4, 4, generator=gen)
    video = torch.rand(1, 3, 9, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced_decoder = torch.jit.trace(decoder, (z,))
        traced_encoder = torch.jit.trace(encoder, (video,))
        torch.testing.assert_close(traced_decoder(z), decoder(z), rtol=0, atol=1e-6)
        torch.testing.assert_close(traced_encoder(video), encoder(video), rtol=0, atol=1e-6)
    # torch's own group_norm batch check warns while tracing; our code must not. "Ours" is a file inside
    # the ndopt package, not any path containing "ndopt" (a clone named ndopt holds torch in its .venv)
    package = Path(ndopt.__file__).resolve().parent
    ours = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
            and Path(w.filename).resolve().is_relative_to(package)]
    assert ours == []


# ------------------------------------------------------------------------------- normalisation


def test_normalize_uses_image_constants_on_the_first_frame_and_video_constants_after():
    z = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    n = normalize_latents(z)
    torch.testing.assert_close(n[:, :, 0], (z[:, :, 0] - 0.1490) / 1.8415)
    torch.testing.assert_close(n[:, :, 1:], (z[:, :, 1:] + 0.2343) / 3.0986)
    torch.testing.assert_close(denormalize_latents(n), z)
    torch.testing.assert_close(normalize_latents(denormalize_latents(z)), z)
    assert (IMAGE_SHIFT, IMAGE_SCALE, VIDEO_SHIFT, VIDEO_SCALE) == (0.1490, 1 / 1.8415, -0.2343, 1 / 3.0986)


def test_normalize_single_frame_is_an_image_latent():
    z = torch.randn(1, 16, 1, 4, 4)
    torch.testing.assert_close(normalize_latents(z), (z - 0.1490) / 1.8415)
    assert normalize_latents(z).data_ptr() != z.data_ptr()  # upstream edits in place; we do not
