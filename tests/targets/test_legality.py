"""Legality: illegal graphs (int64 indices, rank 6, Einsum, double) are legalized with the math kept,
or reported naming the node and the rule."""

from __future__ import annotations

import io
import itertools
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ndopt.errors import LoweringError
from targets.legality import LegalityReport, Violation, check, legalize
from targets.lowering import simplify
from targets.numerics import onnxruntime_outputs
from targets.rewrites import _transpose_steps
from targets.spec import LegalityRules, specs

RULES = specs()["snapdragon-8-elite"].legality


def export(module: nn.Module, *args: torch.Tensor, names: list[str]) -> onnx.ModelProto:
    """Exported and simplified, as lowering does before legalizing (static shapes folded)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, buf, input_names=names, opset_version=17, dynamo=False)
    return simplify(onnx.load_from_string(buf.getvalue()), "test")[0]


def ranks(model: onnx.ModelProto) -> dict[str, int]:
    m = onnx.shape_inference.infer_shapes(model)
    return {v.name: len(v.type.tensor_type.shape.dim) for v in (*m.graph.value_info, *m.graph.input, *m.graph.output)}


def dtypes(model: onnx.ModelProto) -> set[int]:
    m = onnx.shape_inference.infer_shapes(model)
    consts = {i.name for i in m.graph.initializer}
    return {v.type.tensor_type.elem_type for v in (*m.graph.value_info, *m.graph.input, *m.graph.output)
            if v.name not in consts}


class Indexing(nn.Module):
    """int64 token ids through an embedding, id arithmetic, a gather and an argmax."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.emb((ids + 3) % 50)
        pos = (ids == 7).long().argmax(-1, keepdim=True)           # int64 by construction
        picked = torch.gather(x, 1, pos[..., None].expand(-1, -1, 8))
        return picked.squeeze(1) * (ids.sum(-1, keepdim=True) > 20)


def test_int64_indices_are_lowered_to_int32_and_the_math_kept():
    ids = torch.randint(0, 50, (2, 16))
    ids[0, 5] = 7
    model = export(Indexing(), ids, names=["ids"])
    assert onnx.TensorProto.INT64 in dtypes(model)
    assert not check(model, RULES).ok and any(v.rule == "forbidden_dtype" for v in check(model, RULES).errors)
    fixed, report = legalize(model, RULES, "indexing")
    assert report.ok, [str(v) for v in report.errors]
    assert report.rewrites["lower_int64"] > 0
    assert fixed.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT32
    onnx.checker.check_model(fixed, full_check=True)
    got = onnxruntime_outputs(fixed, {"ids": ids.numpy().astype(np.int32)})[0]
    np.testing.assert_allclose(got, _ref(ids, model), atol=1e-6)


def _ref(ids: torch.Tensor, model: onnx.ModelProto) -> np.ndarray:
    """The unlegalized graph on int64 ids: what the rewrite must keep."""
    return onnxruntime_outputs(model, {"ids": ids.numpy()})[0]


class Patchify(nn.Module):
    """The DiT's unpatchify: reshape to rank 6, permute, reshape back (all dims > 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, p, c = 2, 3, 4, 5, 2, 3
        y = x.reshape(b * t, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return y.reshape(b, t, c, h * p, w * p) * 2.0


def test_rank6_transpose_is_legalized_without_a_rank6_tensor():
    x = torch.randn(2 * 3, 4 * 5, 2 * 2 * 3)
    model = export(Patchify(), x, names=["x"])
    assert max(ranks(model).values()) == 6
    before = check(model, RULES)
    assert [v.rule for v in before.errors] and all(v.rule == "max_rank" for v in before.errors)
    fixed, report = legalize(model, RULES, "patchify")
    assert report.ok and report.rewrites["reduce_transpose_rank"] == 1
    r = ranks(fixed)
    assert max(r.values()) <= 5
    assert all(len(n.attribute[0].ints) <= 4 for n in fixed.graph.node if n.op_type == "Transpose")
    got = onnxruntime_outputs(fixed, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(got, Patchify()(x).numpy())


class Rank6Math(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(2, 2, 2, 2, 2, 3) * torch.arange(3.0)).sum(dim=(1, 2))


def test_rank6_math_is_reported_naming_node_and_rule():
    model = export(Rank6Math(), torch.randn(16, 6), names=["x"])
    _, report = legalize(model, RULES, "rank6")
    assert not report.ok
    v = report.errors[0]
    assert v.rule == "max_rank" and v.node and "rank 6" in v.detail
    assert {e.op for e in report.errors} <= {"Reshape", "Mul"}
    err = str(v)
    assert v.node in err and "max_rank" in err and "reshape to rank 4" in err  # what, where, what to do
    j = report.to_json()
    assert not j["ok"] and j["errors"][0]["node"] == v.node


class Contractions(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhqd,bhkd->bhqk", a, b) + torch.einsum("bij,bjk->bik", a[:, 0], b[:, 0].transpose(1, 2)).unsqueeze(1)


def test_einsum_is_decomposed_into_matmul():
    a, b = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    model = export(Contractions(), a, b, names=["a", "b"])
    assert "Einsum" in {n.op_type for n in model.graph.node}
    fixed, report = legalize(model, RULES, "einsum")
    assert report.ok and report.rewrites["decompose_einsum"] == 2
    assert "Einsum" not in {n.op_type for n in fixed.graph.node}
    got = onnxruntime_outputs(fixed, {"a": a.numpy(), "b": b.numpy()})[0]
    np.testing.assert_allclose(got, Contractions()(a, b).numpy(), atol=1e-5)


def test_einsum_the_rewrite_cannot_take_is_reported():
    class Trace(nn.Module):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bii->b", a)

    model = export(Trace(), torch.randn(2, 4, 4), names=["a"])
    _, report = legalize(model, RULES, "trace")
    assert [(v.rule, v.op) for v in report.errors] == [("forbidden_op", "Einsum")]
    assert "MatMul" in report.errors[0].detail


def test_double_is_narrowed():
    class Double(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.double() * 1.5).exp().float()

    x = torch.randn(3, 4)
    model = export(Double(), x, names=["x"])
    fixed, report = legalize(model, RULES, "double")
    assert report.ok and report.rewrites["narrow_double"] >= 1
    assert onnx.TensorProto.DOUBLE not in dtypes(fixed)
    np.testing.assert_allclose(onnxruntime_outputs(fixed, {"x": x.numpy()})[0], Double()(x).numpy(), rtol=1e-6)


def test_rank5_warns_and_dynamic_shapes_are_errors():
    model = export(nn.Conv3d(2, 2, 3, padding=1), torch.randn(1, 2, 3, 4, 4), names=["x"])
    report = check(model, RULES)
    assert report.ok and report.warnings and {v.rule for v in report.warnings} == {"warn_rank"}
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    assert any(v.rule == "static_shape" for v in check(model, RULES).errors)


def test_rules_come_from_the_target_file():
    lax = LegalityRules(max_rank=8, warn_rank=8, forbidden_ops=[], forbidden_dtypes=[])
    model = export(Rank6Math(), torch.randn(16, 6), names=["x"])
    assert check(model, lax).ok and not check(model, RULES).ok


@pytest.mark.parametrize("perm", [(0, 5, 1, 3, 2, 4), (5, 4, 3, 2, 1, 0), (1, 3, 5, 0, 2, 4), (0, 1, 2, 3, 5, 4)])
def test_transpose_steps_compose_to_the_permutation(perm):
    shape = (2, 3, 4, 5, 6, 7)
    x = np.arange(np.prod(shape)).reshape(shape)
    y = x
    for dims, p in _transpose_steps(shape, perm, max_rank=4):
        assert len(dims) <= 4
        y = y.reshape(dims).transpose(p)
    np.testing.assert_array_equal(y.reshape(x.transpose(perm).shape), x.transpose(perm))


def test_all_rank6_permutations_need_at_most_rank4():
    shape = (2, 3, 2, 3, 2, 3)
    x = np.arange(np.prod(shape)).reshape(shape)
    for perm in itertools.islice(itertools.permutations(range(6)), 0, 720, 7):
        y = x
        for dims, p in _transpose_steps(shape, perm, max_rank=4):
            y = y.reshape(dims).transpose(p)
        np.testing.assert_array_equal(y.reshape(x.transpose(perm).shape), x.transpose(perm))


def test_unfixable_graph_stops_lowering_with_node_and_rule():
    from targets.snapdragon import LoweredGraph, _raise_on_failures

    rep = LegalityReport("dit__x", [Violation("max_rank", "/blocks.0/Mul", "Mul", "tensor 'y' has rank 6")])
    lg = LoweredGraph(plan=type("P", (), {"name": "dit__x"})(), model=None, legality=rep, numerics=None,
                      simplify="ok", seconds=0.0)
    with pytest.raises(LoweringError, match=r"graph dit__x: node '/blocks.0/Mul' \(Mul\) breaks rule max_rank"):
        _raise_on_failures("snapdragon-8-elite", [lg])
