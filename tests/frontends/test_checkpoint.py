"""Tests of the Pyramid-Flow checkpoint layout: save/load round trips and every named failure."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ndopt.errors import CheckpointError
from ndopt.frontends.pyramid_flow.checkpoint import (
    WEIGHT_NAMES,
    find_weight_files,
    load_into,
    load_state_dict,
    read_config,
    save_component,
)

CONFIG = {"_class_name": "TinyDiT", "num_layers": 2, "hidden": 8}


class Attn(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim, bias=False)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = Attn(dim)
        self.register_buffer("steps", torch.arange(3))  # integer buffer: never dtype-converted
        self.register_buffer("cache", torch.zeros(2), persistent=False)  # never expected


class TinyDiT(nn.Module):
    def __init__(self, dim: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.proj_out = nn.Linear(dim, 4)


def _model(seed: int = 0, **kw) -> TinyDiT:
    torch.manual_seed(seed)
    return TinyDiT(**kw)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- config


def test_read_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    assert read_config(tmp_path) == CONFIG


def test_read_config_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json.*not found"):
        read_config(tmp_path)


def test_read_config_malformed_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{\n  "a": 1,\n  "b": oops\n}\n')
    with pytest.raises(CheckpointError) as e:
        read_config(tmp_path)
    assert f"{tmp_path / 'config.json'}:3:" in str(e.value)


def test_read_config_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        read_config(tmp_path)


# ----------------------------------------------------------------------------- round trips


def test_save_unsharded_round_trip(tmp_path: Path) -> None:
    model = _model()
    d = tmp_path / "diffusion_transformer_384p"
    save_component(d, model, CONFIG)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert find_weight_files(d) == [d / "diffusion_pytorch_model.safetensors"]
    assert read_config(d) == CONFIG
    sd = load_state_dict(d)
    _assert_same(sd, model.state_dict())
    assert "transformer_blocks.0.cache" not in sd  # non-persistent buffers are not saved

    fresh = _model(seed=1)
    load_into(fresh, sd, source=str(d))
    _assert_same(fresh.state_dict(), model.state_dict())


def test_save_sharded_round_trip(tmp_path: Path) -> None:
    model = _model()
    d = tmp_path / "dit"
    # Each block is 8*8*4 + 8*4 + 8*8*4 + 3*8 bytes = 568 bytes; a 600-byte limit forces shards.
    save_component(d, model, CONFIG, max_shard_bytes=600)
    index = json.loads((d / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in model.state_dict().values()
    )
    assert not (d / "diffusion_pytorch_model.safetensors").exists()
    assert [p.name for p in find_weight_files(d)] == shards
    sd = load_state_dict(d)
    _assert_same(sd, model.state_dict())
    fresh = _model(seed=1)
    load_into(fresh, sd, source=str(d))
    _assert_same(fresh.state_dict(), model.state_dict())


def test_resave_replaces_old_shards(tmp_path: Path) -> None:
    d = tmp_path / "dit"
    save_component(d, _model(), CONFIG, max_shard_bytes=600)
    save_component(d, _model(seed=2), CONFIG)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    _assert_same(load_state_dict(d), _model(seed=2).state_dict())


def test_save_failure_keeps_previous_component(tmp_path: Path) -> None:
    d = tmp_path / "dit"
    save_component(d, _model(), CONFIG)
    before = load_state_dict(d)
    with pytest.raises(TypeError):
        save_component(d, _model(seed=2), {"bad": object()})  # config not serializable
    _assert_same(load_state_dict(d), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit"]


def test_save_tied_and_non_contiguous_tensors(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Embedding(10, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.shared.weight  # tied
            self.register_buffer("t", torch.randn(4, 3).t())  # non-contiguous

    torch.manual_seed(0)
    model = Tied()
    save_component(tmp_path / "te", model, {})
    sd = load_state_dict(tmp_path / "te")
    _assert_same(sd, model.state_dict())
    assert sd["shared.weight"].data_ptr() != sd["lm_head.weight"].data_ptr()


def test_load_into_tied_names_one_key_present(tmp_path: Path) -> None:
    """transformers saves only one name of a tied pair; the other is not missing."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Embedding(10, 4)
            self.embed_tokens = nn.Embedding(10, 4)
            self.embed_tokens.weight = self.shared.weight

    torch.manual_seed(0)
    sd = {"shared.weight": torch.randn(10, 4)}
    model = Tied()
    load_into(model, sd, source="te3")
    assert torch.equal(model.embed_tokens.weight, sd["shared.weight"])

    with torch.device("meta"):
        meta = Tied()
    load_into(meta, sd, source="te3", assign=True)
    assert meta.embed_tokens.weight is meta.shared.weight  # still tied after assign
    assert torch.equal(meta.embed_tokens.weight, sd["shared.weight"])

    bad = {"shared.weight": sd["shared.weight"], "embed_tokens.weight": torch.zeros(10, 4)}
    with pytest.raises(CheckpointError, match=r"embed_tokens\.weight: tied to shared\.weight"):
        load_into(Tied(), bad, source="te3")


# ----------------------------------------------------------------------------- load_into errors


def test_load_into_missing_key(tmp_path: Path) -> None:
    sd = _model().state_dict()
    del sd["transformer_blocks.1.attn.to_q.weight"]
    with pytest.raises(CheckpointError) as e:
        load_into(_model(), sd, source="ckpt/dit")
    msg = str(e.value)
    assert "ckpt/dit" in msg
    assert "1 missing key (transformer_blocks.1.attn.to_q.weight)" in msg
    assert "unexpected key" not in msg and "mismatch" not in msg
    assert "config.json" in msg  # says what to check


def test_load_into_unexpected_key() -> None:
    sd = _model().state_dict()
    sd["transformer_blocks.2.attn.to_q.weight"] = torch.zeros(8, 8)
    sd["pos_embed.proj.bias"] = torch.zeros(8)
    with pytest.raises(CheckpointError) as e:
        load_into(_model(), sd, source="ckpt/dit")
    msg = str(e.value)
    assert "2 unexpected keys (transformer_blocks.2.attn.to_q.weight, pos_embed.proj.bias)" in msg
    assert "missing key" not in msg


def test_load_into_shape_mismatch() -> None:
    sd = _model(dim=8).state_dict()
    with pytest.raises(CheckpointError) as e:
        load_into(_model(dim=16), sd, source="ckpt/dit")
    msg = str(e.value)
    assert "transformer_blocks.0.attn.to_q.weight: checkpoint (8, 8) vs model (16, 16)" in msg
    assert "proj_out.weight: checkpoint (4, 8) vs model (4, 16)" in msg
    assert "7 shape mismatches" in msg  # 2 blocks x (to_q.weight, to_q.bias, to_k.weight) + proj_out.weight


def test_load_into_shape_mismatch_even_when_not_strict() -> None:
    sd = _model(dim=8).state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_into(_model(dim=16), sd, source="ckpt/dit", strict=False)


def test_load_into_lists_first_20_of_30_missing() -> None:
    model = nn.ModuleDict({f"layer{i:02d}": nn.Linear(2, 2, bias=False) for i in range(30)})
    with pytest.raises(CheckpointError) as e:
        load_into(model, {}, source="ckpt/many")
    msg = str(e.value)
    assert "30 missing keys" in msg
    assert all(f"layer{i:02d}.weight" in msg for i in range(20))
    assert not any(f"layer{i:02d}.weight" in msg for i in range(20, 30))
    assert "10 more" in msg


def test_load_into_not_strict_logs_and_loads(caplog) -> None:
    src = _model()
    sd = src.state_dict()
    del sd["proj_out.bias"]
    sd["extra.weight"] = torch.zeros(1)
    model = _model(seed=1)
    with caplog.at_level(logging.WARNING, logger="ndopt"):
        load_into(model, sd, source="ckpt/dit", strict=False)
    assert "proj_out.bias" in caplog.text and "extra.weight" in caplog.text
    assert torch.equal(model.proj_out.weight, src.proj_out.weight)


def test_load_into_meta_module_with_assign(tmp_path: Path) -> None:
    src = _model()
    save_component(tmp_path / "dit", src, CONFIG)
    sd = load_state_dict(tmp_path / "dit", dtype=torch.bfloat16)
    with torch.device("meta"):
        model = TinyDiT()
    with pytest.raises(ValueError, match="assign=True"):
        load_into(model, sd, source="dit")  # copying into meta tensors would drop the values
    load_into(model, sd, source="dit", assign=True)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.proj_out.weight.dtype == torch.bfloat16
    assert isinstance(model.proj_out.weight, nn.Parameter)
    _assert_same(model.state_dict(), sd)


# ----------------------------------------------------------------------------- corrupt files


def test_truncated_safetensors_names_file(tmp_path: Path) -> None:
    d = tmp_path / "dit"
    save_component(d, _model(), CONFIG)
    f = d / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_state_dict(d)
    assert str(f) in str(e.value)


def test_garbage_safetensors_names_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError) as e:
        load_state_dict(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(e.value)


def test_index_with_missing_shard_names_shard(tmp_path: Path) -> None:
    d = tmp_path / "dit"
    save_component(d, _model(), CONFIG, max_shard_bytes=600)
    shards = find_weight_files(d)
    shards[-1].unlink()
    with pytest.raises(CheckpointError) as e:
        load_state_dict(d)
    assert shards[-1].name in str(e.value)
    assert f"1 of {len(shards)} shard" in str(e.value)


def test_malformed_index(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {\n"a": 3}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        find_weight_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../x.safetensors"}}')
    with pytest.raises(CheckpointError, match="not a file name"):
        find_weight_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{\n\n  nope")
    with pytest.raises(CheckpointError, match=r"index\.json:3:"):
        find_weight_files(tmp_path)


def test_index_key_absent_from_shards(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"1 tensor.*no shard holds: b"):
        load_state_dict(tmp_path)


def test_no_weight_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weight file") as e:
        find_weight_files(tmp_path)
    assert WEIGHT_NAMES[0] in str(e.value) and "config.json" in str(e.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        find_weight_files(tmp_path / "nope")


# ----------------------------------------------------------------------------- pickles and dtype


def test_bin_loads_with_weights_only(tmp_path: Path) -> None:
    model = _model()
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    _assert_same(load_state_dict(tmp_path), model.state_dict())


class _Payload:
    """A pickled object that is not a tensor; weights_only must refuse it."""


def test_pickle_with_arbitrary_object_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2), "obj": _Payload()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="refused") as e:
        load_state_dict(tmp_path)
    assert str(tmp_path / "model.pt") in str(e.value)


def test_pickle_wrapped_state_dict_is_explained(tmp_path: Path) -> None:
    torch.save({"model": _model().state_dict(), "step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a flat state dict"):
        load_state_dict(tmp_path)


def test_truncated_bin_names_file(tmp_path: Path) -> None:
    f = tmp_path / "pytorch_model.bin"
    torch.save(_model().state_dict(), f)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_state_dict(tmp_path)
    assert str(f) in str(e.value)


def test_dtype_conversion_applies_to_floats_only(tmp_path: Path) -> None:
    save_component(tmp_path / "dit", _model(), CONFIG, max_shard_bytes=600)
    sd = load_state_dict(tmp_path / "dit", dtype=torch.bfloat16)
    assert sd["transformer_blocks.0.attn.to_q.weight"].dtype == torch.bfloat16
    assert sd["proj_out.bias"].dtype == torch.bfloat16
    assert sd["transformer_blocks.0.steps"].dtype == torch.int64
    ref = _model().state_dict()
    assert torch.equal(sd["proj_out.weight"], ref["proj_out.weight"].to(torch.bfloat16))
    with pytest.raises(ValueError, match="floating"):
        load_state_dict(tmp_path / "dit", dtype=torch.int8)


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    a, b = _model(seed=0), _model(seed=1)
    save_component(tmp_path, a, CONFIG)
    torch.save(b.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    _assert_same(load_state_dict(tmp_path), a.state_dict())
