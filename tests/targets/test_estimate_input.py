"""`ndopt estimate` on what a person may hand it: files that are not ONNX graphs, graphs with unknown
(symbolic or data-dependent) dims, bad `--input-shape` options and precisions are refused in one
line (exit 2, the file untouched); a dynamic graph with its shapes given estimates as its static
export does; a graph with no compute estimates and says so."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from ndopt.cli import main
from targets import registry
from targets.onnx_costs import GraphInputError

TARGET = "snapdragon-8-elite"


class Small(torch.nn.Module):
    """Conv, matmul with weights, attention-like matmul: every MAC class, no shape arithmetic (so the
    dynamic and the static export have the same nodes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)  # (b, h*w, 8)
        y = self.proj(y)
        return torch.softmax(y @ y.transpose(1, 2), -1) @ y


def _export(path: Path, shape: tuple[int, ...], dynamic: dict[int, str] | None = None) -> Path:
    torch.manual_seed(0)
    torch.onnx.export(Small().eval(), (torch.zeros(shape),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": dynamic} if dynamic else None, opset_version=17, dynamo=False)
    return path


def _graph(path: Path, nodes: list, inputs: list, outputs: list) -> Path:
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                                opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _vi(name: str, shape: list | None, dtype: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("estimate-input")
    dyn = _export(d / "dynamic.onnx", (2, 3, 8, 8), {0: "batch", 2: "height", 3: "width"})
    whole = dyn.read_bytes()
    out = {"dynamic": dyn, "static": _export(d / "static.onnx", (1, 3, 8, 8))}
    for name, data in {"empty": b"", "text": b"hello, not a model\n", "truncated": whole[: len(whole) // 2]}.items():
        (d / f"{name}.onnx").write_bytes(data)
        out[name] = d / f"{name}.onnx"
    noopset = onnx.load(str(dyn))
    del noopset.opset_import[:]  # what a cut at a field boundary leaves: it parses, but is no valid graph
    onnx.save(noopset, str(d / "no_opset.onnx"))
    out["no_opset"] = d / "no_opset.onnx"
    # NonZero's output size depends on the data: no input shape can make it known
    out["data_dependent"] = _graph(d / "nonzero.onnx", [
        helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Cast", ["nz"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Relu", ["c"], ["y"])], [_vi("x", [4, 4])], [_vi("y", [2, "n"])])
    out["zero_compute"] = _graph(d / "reshape.onnx", [
        helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Flatten", ["i"], ["y"], axis=1)],
        [_vi("x", [1, 4, 4])], [_vi("y", [1, 16])])
    out["unnamed_dim"] = _graph(d / "unnamed.onnx", [helper.make_node("Relu", ["x"], ["y"])],
                                [_vi("x", [None, 4])], [_vi("y", [None, 4])])
    w = onnx.numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    matmul = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [_vi("x", ["b", "k"])],
                               [_vi("y", ["b", 4])], [w])
    onnx.save(helper.make_model(matmul, opset_imports=[helper.make_opsetid("", 17)]), str(d / "matmul.onnx"))
    out["matmul"] = d / "matmul.onnx"
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _estimate(*args: str):
    return CliRunner().invoke(main, ["estimate", *args, "--target", TARGET])


BAD = [  # (file, extra options, what the one line must say)
    ("empty", [], "empty.onnx: cannot read it as an ONNX model: the file is empty (0 bytes)"),
    ("text", [], "text.onnx: cannot read it as an ONNX model: it does not parse (DecodeError"),
    ("truncated", [], "truncated.onnx: cannot read it as an ONNX model: it does not parse"),
    ("no_opset", [], "no_opset.onnx: not a valid ONNX graph (onnx.checker: model with IR version >= 3 must specify "
                     "opset_import"),
    ("dynamic", [], "dynamic.onnx: input dims unknown: x[batch,3,height,width]; the estimate needs every dim: give "
                    "them (--input-shape x=Nx3xNxN"),
    ("unnamed_dim", [], "unnamed.onnx: input dims unknown: x[?,4]; the estimate needs every dim: give them "
                        "(--input-shape x=Nx4"),
    ("data_dependent", [], "nonzero.onnx: shape inference leaves 3 value(s) with unknown dims: nz[2,"),
    ("dynamic", ["--input-shape", "x=1x3x8"], "input shape x=1x3x8: input x of"),
    ("dynamic", ["--input-shape", "x=1x3x8"], "has rank 4 (x[batch,3,height,width]), not 3"),
    ("dynamic", ["--input-shape", "y=1x3x8x8"], "input shape y=1x3x8x8: "),
    ("dynamic", ["--input-shape", "y=1x3x8x8"], "has no input 'y'; its inputs are x"),
    ("dynamic", ["--input-shape", "x=0x3x8x8"], "input shape x=0x3x8x8: dims must be positive, got 0"),
    ("dynamic", ["--input-shape", "x=1x3x-8x8"], "dims must be positive, got -8"),
    ("dynamic", ["--input-shape", "x=1x4x8x8"], "dim 1 of input x is fixed at 3 in"),
    ("dynamic", ["--input-shape", "x=1x3xbigx8"], "input shape 'x=1x3xbigx8': expected NAME=D1xD2x... with integer dims"),
    ("dynamic", ["--input-shape", "1x3x8x8"], "input shape '1x3x8x8': expected NAME=D1xD2x..."),
    ("dynamic", ["--input-shape", "x=1x3x8x8", "--input-shape", "x=2x3x8x8"], "input 'x' is given twice"),
    ("matmul", ["--input-shape", "x=1x5"], "matmul.onnx: the input shapes given do not fit the graph (onnx shape "
                                           "inference:"),
    ("static", ["--precision", "int4"], "precision 'int4' is not supported; choose one of fp16, w8a16"),
]


@pytest.mark.parametrize(("name", "options", "says"), BAD,
                         ids=[f"{n}{'-' + '-'.join(o).replace('--', '') if o else ''}-{i}" for i, (n, o, _) in
                              enumerate(BAD)])
def test_refused_in_one_line(files, name, options, says, tmp_path, monkeypatch):
    path = files[name]
    before = _sha(path)
    monkeypatch.chdir(tmp_path)  # onnxruntime's shape inference leaves a temp graph in the cwd when it gives up
    res = _estimate(str(path), *options)
    assert list(tmp_path.iterdir()) == []
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ndopt: error: ") and says in lines[0], res.stderr
    assert "Traceback" not in res.output + res.stderr and res.stdout == ""
    assert _sha(path) == before


def test_the_error_is_a_target_error_naming_the_file(files):
    with pytest.raises(GraphInputError, match=r"empty\.onnx"):
        registry()[TARGET].estimate_onnx(files["empty"], "w8a16")


@pytest.mark.parametrize("precision", ["w8a16", "fp16"])
def test_dynamic_graph_with_input_shape_estimates_as_its_static_export(files, precision):
    before = _sha(files["dynamic"])
    dyn = _estimate(str(files["dynamic"]), "--input-shape", "x=1x3x8x8", "--precision", precision, "--json")
    static = _estimate(str(files["static"]), "--precision", precision, "--json")
    assert dyn.exit_code == 0 and static.exit_code == 0, dyn.output + static.output
    got, want = json.loads(dyn.stdout), json.loads(static.stdout)
    assert got == want and got["latency_ms"] > 0 and got["peak_memory_mb"] > 0
    assert _sha(files["dynamic"]) == before
    # the shapes matter: a larger input costs more (the dims are not priced as zero or ignored)
    big = json.loads(_estimate(str(files["dynamic"]), "--input-shape", "x=4x3x16x16", "--json").stdout)
    assert big["latency_ms"] > got["latency_ms"] and big["peak_memory_mb"] > got["peak_memory_mb"]


def test_python_callers_give_shapes_as_a_mapping(files):
    t = registry()[TARGET]
    assert t.estimate_onnx(files["dynamic"], "w8a16", {"x": (1, 3, 8, 8)}) == t.estimate_onnx(files["static"], "w8a16")


def test_a_graph_without_compute_estimates_and_says_so(files):
    res = _estimate(str(files["zero_compute"]), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["latency_ms"] == 0 and "has no compute" in out["note"] and "Flatten, Identity" in out["note"]
    text = _estimate(str(files["zero_compute"]))
    assert text.exit_code == 0 and "0.00 ms" in text.stdout and "has no compute" in text.stdout
    static = json.loads(_estimate(str(files["static"]), "--json").stdout)
    assert "note" not in static  # a graph that computes has the two figures only
