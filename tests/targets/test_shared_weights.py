"""One weights file per component: every graph of a component points into `<component>.weights.bin`
(ONNX external data), each unique tensor once at an aligned offset, small tensors inline; every
graph still loads and runs in onnxruntime from the bundle directory with unchanged numerics."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from targets.numerics import onnxruntime_outputs
from targets.shared_weights import ALIGN, INLINE_BYTES, SharedWeightsWriter


def _graph(names: tuple[str, str], bias: float) -> onnx.ModelProto:
    """y = x @ W + b with a 64x64 weight (16 KB) and a small bias (256 B); names chosen by the caller."""
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", names[0]], ["h"]), helper.make_node("Add", ["h", names[1]], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(w, names[0]), numpy_helper.from_array(np.full(64, bias, np.float32), names[1])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_dedupes_by_content_keeps_small_tensors_inline(tmp_path):
    a, b = _graph(("W", "b"), 1.0), _graph(("renamed_weight", "b"), 2.0)  # same W under another name
    with SharedWeightsWriter("comp", tmp_path) as writer:
        writer.add("ga.onnx", a)
        writer.add("gb.onnx", b)
    sw = writer.info
    assert sw.file == "comp.weights.bin" and sw.tensors == 1 and sw.references == 2
    assert (tmp_path / sw.file).stat().st_size == sw.bytes == 64 * 64 * 4
    assert sw.to_json()["bytes_without_sharing"] == 2 * 64 * 64 * 4 and sw.unique_float_elems == 64 * 64
    on_disk = onnx.load(str(tmp_path / "gb.onnx"), load_external_data=False)
    w = next(t for t in on_disk.graph.initializer if t.name == "renamed_weight")
    fields = {e.key: e.value for e in w.external_data}
    assert w.data_location == TensorProto.EXTERNAL and fields["location"] == "comp.weights.bin"
    assert int(fields["offset"]) % ALIGN == 0 and int(fields["length"]) == 64 * 64 * 4
    small = next(t for t in on_disk.graph.initializer if t.name == "b")
    assert small.data_location != TensorProto.EXTERNAL and len(small.raw_data) < INLINE_BYTES
    # the in-memory models are restored (the lowering cache keeps them)
    assert all(t.data_location != TensorProto.EXTERNAL for t in a.graph.initializer)
    x = np.ones((2, 64), np.float32)
    for name, bias in (("ga", 1.0), ("gb", 2.0)):
        got = onnxruntime_outputs(tmp_path / f"{name}.onnx", {"x": x})[0]
        want = x @ (np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096) + bias
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_an_unrestored_graph_lets_go_of_its_tensors(tmp_path):
    """restore=False (a QDQ graph, saved and dropped): the in-memory model keeps only pointers into the
    file, so its weights leave memory as soon as it is written; priced=False: not counted for the estimator."""
    a, q = _graph(("W", "b"), 1.0), _graph(("W_q", "b"), 1.0)
    with SharedWeightsWriter("comp", tmp_path) as writer:
        writer.add("a.onnx", a)
        writer.add("a.qdq.onnx", q, priced=False, restore=False)
    big = next(t for t in q.graph.initializer if t.name == "W_q")
    assert big.data_location == TensorProto.EXTERNAL and not big.raw_data
    assert writer.info.tensors == 1 and writer.info.unique_float_elems == 64 * 64
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(onnxruntime_outputs(tmp_path / "a.qdq.onnx", {"x": x})[0],
                               onnxruntime_outputs(tmp_path / "a.onnx", {"x": x})[0])


def test_a_component_of_small_tensors_writes_no_file(tmp_path):
    small = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [numpy_helper.from_array(np.ones(2, np.float32), "c")]),
        opset_imports=[helper.make_opsetid("", 17)])
    with SharedWeightsWriter("tiny", tmp_path) as writer:
        writer.add("g.onnx", small)
    assert writer.info.file is None and not (tmp_path / "tiny.weights.bin").exists() and (tmp_path / "g.onnx").is_file()
