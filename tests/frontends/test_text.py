"""Tests of Pyramid-Flow's SD3 text conditioning (ndopt/frontends/pyramid_flow/text.py)."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest
import torch

from ndopt.errors import CheckpointError, NdoptError
from ndopt.frontends.pyramid_flow import text
from ndopt.frontends.pyramid_flow.text import (
    SD3TextEncoder,
    TextEncoderConfig,
    Tokenizers,
    real_config,
    tiny_config,
    tiny_tokenizers,
)

PROMPTS = ["a red circle moving left", "two blue box bouncing slowly on a dark background"]

# The procedural-caption vocabulary the tiny tokenizer must cover with one id per word.
VOCABULARY = [
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "white",
    "black",
    "pink",
    "cyan",
    "magenta",
    "gray",
    "brown",
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "ball",
    "box",
    "cube",
    "moving",
    "left",
    "right",
    "up",
    "down",
    "bouncing",
    "spinning",
    "growing",
    "shrinking",
    "still",
    "slowly",
    "quickly",
    "a",
    "an",
    "the",
    "on",
    "in",
    "with",
    "and",
    "of",
    "background",
    "over",
    "under",
    "dark",
    "light",
    "scene",
    "video",
    "frame",
    "camera",
    "small",
    "large",
    "big",
    "tiny",
    "two",
    "three",
]

ASSETS = Path(text.__file__).parent / "assets"


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # tied weights count once


def _clip_text_params(vocab: int, positions: int, hidden: int, ff: int, layers: int, proj: int) -> int:
    # CLIPTextModelWithProjection: token + position embeddings; per layer q/k/v/o with bias, the
    # fc1/fc2 MLP with bias and two LayerNorms; the final LayerNorm; text_projection without bias.
    per_layer = 4 * (hidden * hidden + hidden) + (hidden * ff + ff) + (ff * hidden + hidden) + 4 * hidden
    return (vocab + positions) * hidden + layers * per_layer + 2 * hidden + hidden * proj


@pytest.fixture(scope="module")
def tiny() -> SD3TextEncoder:
    torch.manual_seed(0)
    return SD3TextEncoder(tiny_config(), tiny_tokenizers())


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- 1. real size on the meta device ------------------------------------------------------------


def test_real_config_param_counts_on_meta() -> None:
    config = real_config()
    with torch.device("meta"):
        enc = SD3TextEncoder(config)
    tensors = list(enc.parameters()) + list(enc.buffers())
    assert tensors and all(t.is_meta for t in tensors)  # nothing allocated

    t5 = _params(enc.text_encoder_3)
    shared = enc.text_encoder_3.shared.weight.numel()
    assert enc.text_encoder_3.encoder.embed_tokens.weight is enc.text_encoder_3.shared.weight
    # T5 v1.1 encoder arithmetic: 24 x (q,k,v,o 4096x4096 + gated FF wi_0, wi_1, wo 4096x10240
    # + 2 RMSNorms) + final norm + relative bias (32 buckets x 64 heads); embedding 32128 x 4096.
    layers = 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096) + 4096 + 32 * 64
    assert t5 - shared == layers == 4_630_714_368
    assert t5 == layers + 32128 * 4096 == 4_762_310_656
    # REFERENCE.md: ~4.76B incl. embeddings (the Neodragon seed's table lists 4.732B).
    assert abs(t5 - 4.76e9) / 4.76e9 < 0.01

    clip_l, clip_g = _params(enc.text_encoder), _params(enc.text_encoder_2)
    assert clip_l == _clip_text_params(49408, 77, 768, 3072, 12, 768)
    assert clip_g == _clip_text_params(49408, 77, 1280, 5120, 32, 1280)
    # Published sizes: CLIP ViT-L/14 text tower 123.06M + 768x768 projection = 123.65M;
    # OpenCLIP ViT-bigG/14 text tower 693.02M + 1280x1280 projection = 694.66M (SD3's text_encoder_2).
    assert abs(clip_l - 123.65e6) / 123.65e6 < 1e-3
    assert abs(clip_g - 694.66e6) / 694.66e6 < 1e-3

    assert (config.context_dim, config.pooled_dim) == (4096, 768 + 1280)


# --- 2. tiny forward ----------------------------------------------------------------------------


def test_tiny_shapes_and_size(tiny: SD3TextEncoder) -> None:
    embeds, mask, pooled = tiny(PROMPTS)
    assert embeds.shape == (2, 128, 64) and mask.shape == (2, 128) and pooled.shape == (2, 64)
    assert mask.dtype == torch.int64 and embeds.dtype == pooled.dtype == torch.float32
    assert (tiny.config.context_dim, tiny.config.pooled_dim) == (64, 64)
    assert 100_000 < _params(tiny) < 1_000_000
    assert not any(p.requires_grad for p in tiny.parameters()) and not tiny.training


def test_tiny_deterministic(tiny: SD3TextEncoder) -> None:
    first = tiny(PROMPTS)
    second = tiny(PROMPTS)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    rebuilt = SD3TextEncoder(tiny_config(), tiny_tokenizers())
    for a, b in zip(first, rebuilt(PROMPTS), strict=True):
        assert torch.equal(a, b)


def test_tiny_padding_is_masked(tiny: SD3TextEncoder) -> None:
    tokens = tiny.tokenize(PROMPTS)
    # <s> + one id per word + </s>, then padding
    lengths = [len(p.split()) + 2 for p in PROMPTS]
    assert tokens["t5_mask"].sum(1).tolist() == lengths
    for row, n in zip(tokens["t5_mask"], lengths, strict=True):
        assert row[:n].eq(1).all() and row[n:].eq(0).all()
    assert tokens["clip_l_ids"].shape == tokens["clip_g_ids"].shape == (2, 77)
    assert tokens["t5_ids"].shape == (2, 128)

    # Garbage under the mask changes neither the unmasked T5 positions nor the pooled vectors
    # (CLIP is causal and pools at the first eos, before the padding).
    embeds, mask, pooled = tiny.encode_tokens(**tokens)
    noisy = {k: v.clone() for k, v in tokens.items()}
    generator = torch.Generator().manual_seed(0)
    pad = noisy["t5_mask"] == 0
    noisy["t5_ids"][pad] = torch.randint(4, 40, (int(pad.sum()),), generator=generator)
    for key in ("clip_l_ids", "clip_g_ids"):
        after = torch.arange(77) >= torch.tensor(lengths)[:, None]
        noisy[key][after] = torch.randint(4, 40, (int(after.sum()),), generator=generator)
    embeds2, _, pooled2 = tiny.encode_tokens(**noisy)
    valid = mask.bool()
    torch.testing.assert_close(embeds2[valid], embeds[valid], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled2, pooled, rtol=0, atol=1e-6)
    assert not torch.allclose(embeds2[~valid], embeds[~valid])  # the noise did reach the model


def test_tiny_pools_at_eos(tiny: SD3TextEncoder) -> None:
    tokens = tiny.tokenize(PROMPTS)
    eos = tiny.tokenizers.tokenizer.eos_token_id
    assert tiny.text_encoder.config.eos_token_id == eos != 2  # 2 selects transformers' argmax pooling
    out = tiny.text_encoder(input_ids=tokens["clip_l_ids"])
    positions = torch.tensor([len(p.split()) + 1 for p in PROMPTS])
    assert (tokens["clip_l_ids"][torch.arange(2), positions] == eos).all()
    expected = tiny.text_encoder.text_projection(out.last_hidden_state[torch.arange(2), positions])
    torch.testing.assert_close(out.text_embeds, expected)
    _, _, pooled = tiny.encode_tokens(**tokens)
    torch.testing.assert_close(pooled[:, :32], expected)


def test_tiny_different_prompts_differ(tiny: SD3TextEncoder) -> None:
    embeds, _, pooled = tiny(["a red circle", "a blue circle"])
    assert not torch.allclose(embeds[0, :5], embeds[1, :5], atol=1e-4)
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-4)


def test_long_prompt_truncates_and_keeps_eos(tiny: SD3TextEncoder) -> None:
    tokens = tiny.tokenize(["red " * 300])
    eos = tiny.tokenizers.tokenizer.eos_token_id
    assert tokens["t5_mask"].sum() == 128
    assert tokens["t5_ids"][0, -1] == eos and tokens["clip_l_ids"][0, -1] == eos


def test_no_tokenizers_is_a_named_error() -> None:
    with torch.device("meta"):
        enc = SD3TextEncoder(tiny_config())
    with pytest.raises(NdoptError, match="no tokenizers"):
        enc.tokenize(PROMPTS)


def test_clip_length_beyond_positions_is_rejected() -> None:
    config = tiny_config()
    bad = TextEncoderConfig(config.t5, config.clip_l, config.clip_g, clip_max_length=78)
    with pytest.raises(NdoptError, match="clip_max_length=78"), torch.device("meta"):
        SD3TextEncoder(bad)


# --- 3. checkpoint round trip -------------------------------------------------------------------


def test_save_then_load_round_trips_offline(tiny: SD3TextEncoder, tmp_path: Path, offline: None) -> None:
    tiny.save_pretrained_dir(tmp_path)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert (tmp_path / name / "config.json").is_file()
        assert list((tmp_path / name).glob("*.safetensors"))
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        assert (tmp_path / name / "tokenizer.json").is_file()

    loaded = SD3TextEncoder.from_pretrained_dir(tmp_path)
    assert loaded.config.t5["d_model"] == 64 and loaded.config.pooled_dim == 64
    for a, b in zip(tiny(PROMPTS), loaded(PROMPTS), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)

    # Saving again over it replaces each subdirectory and leaves no temporaries behind.
    loaded.save_pretrained_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*text.MODEL_SUBDIRS, *text.TOKENIZER_SUBDIRS]
    )


def test_load_sharded_and_dtype(tiny: SD3TextEncoder, tmp_path: Path, offline: None) -> None:
    tiny.save_pretrained_dir(tmp_path)
    shard_dir = tmp_path / "text_encoder_3"
    for f in shard_dir.glob("*.safetensors"):
        f.unlink()
    tiny.text_encoder_3.save_pretrained(shard_dir, max_shard_size="100KB")
    assert (shard_dir / "model.safetensors.index.json").is_file()
    assert len(list(shard_dir.glob("model-*.safetensors"))) > 1

    loaded = SD3TextEncoder.from_pretrained_dir(tmp_path, dtype=torch.bfloat16)
    assert loaded.text_encoder_3.shared.weight.dtype == torch.bfloat16
    assert "dtype" not in loaded.config.t5  # the config describes the architecture only
    torch.testing.assert_close(
        loaded.text_encoder_3.shared.weight, tiny.text_encoder_3.shared.weight.bfloat16()
    )


@pytest.mark.parametrize("missing", ["text_encoder_2", "tokenizer_3"])
def test_missing_subdir_is_named(tiny: SD3TextEncoder, tmp_path: Path, missing: str) -> None:
    tiny.save_pretrained_dir(tmp_path)
    for f in (tmp_path / missing).iterdir():
        f.unlink()
    (tmp_path / missing).rmdir()
    with pytest.raises(CheckpointError, match=rf"{missing} is missing") as err:
        SD3TextEncoder.from_pretrained_dir(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_missing_weights_and_wrong_config_are_named(tiny: SD3TextEncoder, tmp_path: Path) -> None:
    tiny.save_pretrained_dir(tmp_path)
    cfg_path = tmp_path / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] = 3  # the weights hold 2 layers
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"text_encoder: CLIPTextModelWithProjection.*missing_keys"):
        SD3TextEncoder.from_pretrained_dir(tmp_path)

    (tmp_path / "text_encoder_3" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"text_encoder_3 has no \*\.safetensors"):
        SD3TextEncoder.from_pretrained_dir(tmp_path)


def test_save_needs_tokenizers_and_real_weights(tmp_path: Path) -> None:
    with torch.device("meta"):
        enc = SD3TextEncoder(tiny_config(), tiny_tokenizers())
    with pytest.raises(NdoptError, match="meta device"):
        enc.save_pretrained_dir(tmp_path)
    enc.tokenizers = None
    with pytest.raises(NdoptError, match="no tokenizers"):
        enc.save_pretrained_dir(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


# --- 4. the tiny tokenizer ----------------------------------------------------------------------


def test_tiny_tokenizer_covers_vocabulary() -> None:
    tok = tiny_tokenizers().tokenizer
    ids = {}
    for word in VOCABULARY:
        pieces = tok(word, add_special_tokens=False)["input_ids"]
        assert len(pieces) == 1 and pieces[0] != tok.unk_token_id, word
        ids[word] = pieces[0]
        assert tok(word.upper(), add_special_tokens=False)["input_ids"] == pieces  # lowercased
    assert len(set(ids.values())) == len(set(VOCABULARY))
    assert len({tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id}) == 4
    assert len(tok) == tiny_config().t5["vocab_size"] == tiny_config().clip_l["vocab_size"]


def test_tiny_tokenizer_unknown_words_fall_back() -> None:
    tok = tiny_tokenizers().tokenizer
    zebra = tok("zebra", add_special_tokens=False)["input_ids"]
    assert len(zebra) == 5 and tok.unk_token_id not in zebra  # letter pieces
    assert tok.decode(zebra) == "zebra"
    assert tok("日本", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    framed = tok("a red ring, 3 zebras!")["input_ids"]
    assert framed[0] == tok.bos_token_id and framed[-1] == tok.eos_token_id
    assert tok.unk_token_id not in framed


def test_tiny_tokenizer_assets_regenerate_identically(tmp_path: Path) -> None:
    shipped = ASSETS / "tiny_tokenizer"
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 100_000
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", ASSETS / "make_tiny_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.OUT = tmp_path
    script.main()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name


def test_tokenizers_shared_is_one_tokenizer() -> None:
    tokenizers = tiny_tokenizers()
    assert isinstance(tokenizers, Tokenizers)
    assert tokenizers.tokenizer is tokenizers.tokenizer_2 is tokenizers.tokenizer_3


def test_config_is_a_hashable_record() -> None:
    a, b = tiny_config(), tiny_config()
    assert a == b and hash(a) == hash(b) and len({a, b, real_config()}) == 2
    with pytest.raises(AttributeError):
        a.max_sequence_length = 64  # type: ignore[misc]
