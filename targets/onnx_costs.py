"""The ONNX front end of the estimator: per-node costs and peak live activations of an ONNX graph.

Reads shapes only (shape inference; weights may stay on disk). Nodes that torch expresses as views
(reshapes, slices, transposes, constant selects) and the epilogues the NPU converter fuses into a
conv/matmul are free, so this front end counts the nodes the torch one does (and the calibration did).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from targets.estimator import MAC_CLASSES, GraphCost, OpCost

# Nodes priced as free: metadata, and the layout ops torch expresses as views (slices, splits,
# transposes, expands), so that both front ends count the same nodes as the calibration did.
FREE_ONNX_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Constant", "Shape",
                           "Size", "Dropout", "Slice", "Split", "Transpose", "Expand"})
ALIAS_ONNX_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
# Epilogues the NPU converter fuses into the conv/matmul producing their input (torch_costs.FUSED_TORCH).
FUSED_ONNX = frozenset({"BatchNormalization", "Relu", "Clip", "Gelu", "HardSwish", "LeakyRelu", "Sigmoid", "Add"})


def _onnx_float(elem_type: int) -> bool:
    from onnx import TensorProto

    return elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def _onnx_itemsize(elem_type: int) -> int:
    from onnx import helper

    return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize) if elem_type else 4


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape)) if shape else 1


def onnx_tensor_types(model: Any) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """name -> (elem_type, static shape or None) for every value and initializer of the graph."""
    g = model.graph
    out: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    for v in (*g.input, *g.value_info, *g.output):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        shape = None if (not t.HasField("shape") or any(d is None for d in dims)) else tuple(dims)
        out[v.name] = (t.elem_type, shape)
    for init in g.initializer:
        out[init.name] = (init.data_type, tuple(init.dims))
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = (a.t.data_type, tuple(a.t.dims))
    return out


def infer_shapes(model: Any) -> Any:
    """Shape inference that also works past 2 GB (it only reads the graph, not the weights)."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except ValueError:  # > 2 GB: infer on a weightless copy, then copy the value infos back
        light = onnx.ModelProto()
        light.CopyFrom(model)
        for init in light.graph.initializer:
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.ClearField("external_data")
            init.data_location = onnx.TensorProto.DEFAULT
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=False)
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred.graph.value_info)
        return model


def onnx_graph_cost(model: Any) -> GraphCost:
    """Per-node costs and the peak live activations of an ONNX graph (static shapes)."""
    model = infer_shapes(model)
    g = model.graph
    types = onnx_tensor_types(model)
    consts = {i.name for i in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}

    def elems(name: str) -> tuple[int, int]:
        """(float elements, other bytes) of a tensor; unknown shapes count zero."""
        et, shape = types.get(name, (0, None))
        if shape is None or not name:
            return 0, 0
        n = _numel(shape)
        return (n, 0) if _onnx_float(et) else (0, n * _onnx_itemsize(et))

    ops: list[OpCost] = []
    mac_out: set[str] = set()  # values a conv/matmul (+ fused epilogue) produced
    for node in g.node:
        if node.op_type in FREE_ONNX_OPS:
            if node.op_type in ALIAS_ONNX_OPS and node.input and node.input[0] in mac_out:
                mac_out.update(node.output)
            continue
        ins = [i for i in node.input if i]
        if node.op_type == "Cast" and types.get(ins[0], (0,))[0] == types.get(node.output[0], (1,))[0]:
            continue  # a cast to the type it already has (the exporter's .float() on float32)
        if node.op_type == "Gather" and len(ins) == 2 and ins[1] in consts and ins[0] not in consts:
            continue  # a select with constant indices: a view in torch
        if node.op_type in FUSED_ONNX and ins and (
                (node.op_type != "Add" and ins[0] in mac_out)
                or (node.op_type == "Add" and len(ins) == 2 and any(
                    a in mac_out and b in consts for a, b in ((ins[0], ins[1]), (ins[1], ins[0]))))):
            mac_out.update(node.output)  # folded batch norm, bias add or activation epilogue
            continue
        w_in = [i for i in ins if i in consts]
        a_in = [i for i in ins if i not in consts]
        act = sum(elems(i)[0] for i in a_in) + sum(elems(o)[0] for o in node.output)
        other = sum(elems(i)[1] for i in ins) + sum(elems(o)[1] for o in node.output)
        w = sum(elems(i)[0] for i in w_in)
        kind, macs = "vector", 0
        if node.op_type in ("Conv", "ConvTranspose"):
            kind = "conv"
            wshape = types.get(ins[1], (0, None))[1] or ()
            per = _numel(wshape[1:]) if wshape else 0
            ref = node.output[0] if node.op_type == "Conv" else ins[0]
            macs = elems(ref)[0] * per
        elif node.op_type in ("MatMul", "Gemm", "Einsum"):
            shapes = [types.get(i, (0, None))[1] for i in ins[:2]]
            out_shape = types.get(node.output[0], (0, None))[1]
            if all(s is not None for s in shapes) and out_shape is not None:
                if node.op_type == "Einsum":
                    k = max(1, _numel(shapes[0]) * _numel(shapes[1]) // max(1, _numel(out_shape)))
                    macs = int(math.isqrt(k) * _numel(out_shape)) if k > 1 else _numel(out_shape)
                elif node.op_type == "Gemm":
                    trans_a = any(a.name == "transA" and a.i for a in node.attribute)
                    macs = _numel(out_shape) * shapes[0][0 if trans_a else -1]
                else:
                    macs = _numel(out_shape) * shapes[0][-1]
            kind = "matmul" if any(i in consts for i in ins[:2]) else "attention"
        elif node.op_type == "Gather" and ins and ins[0] in consts:
            # a table lookup reads the rows it gathers, not the table
            w = elems(node.output[0])[0]
        if kind in MAC_CLASSES:
            mac_out.update(node.output)
        ops.append(OpCost(kind, int(macs), int(act), int(w), int(other)))

    weight_elems = sum(elems(c)[0] for c in consts)
    other_w = sum(elems(c)[1] for c in consts)
    peak_f, peak_o = _onnx_peak_live(model, types, consts, elems)
    return GraphCost(tuple(ops), int(weight_elems), int(other_w), int(peak_f), int(peak_o))


def _onnx_peak_live(model: Any, types: dict, consts: set[str], elems: Any) -> tuple[int, int]:
    """Peak of live activation buffers in node order; aliasing ops share their input's buffer."""
    g = model.graph
    root: dict[str, str] = {}

    def r(name: str) -> str:
        while name in root:
            name = root[name]
        return name

    for node in g.node:
        if node.op_type in ALIAS_ONNX_OPS and node.input and node.input[0] not in consts:
            root[node.output[0]] = node.input[0]
    end = len(g.node)
    last: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for x in node.input:
            if x and x not in consts:
                last[r(x)] = i
    for o in g.output:
        last[r(o.name)] = end
    dying: dict[int, list[str]] = {}
    for name, i in last.items():
        dying.setdefault(i, []).append(name)
    live: dict[str, tuple[int, int]] = {i.name: elems(i.name) for i in g.input if i.name not in consts}
    cur = [sum(v[0] for v in live.values()), sum(v[1] for v in live.values())]
    peak = (cur[0], cur[1])
    for i, node in enumerate(g.node):
        for o in node.output:
            if o and o not in root and node.op_type != "Constant" and o not in live:
                live[o] = elems(o)
                cur[0] += live[o][0]
                cur[1] += live[o][1]
        if cur[0] * 2 + cur[1] > peak[0] * 2 + peak[1]:  # compared at 16-bit activations
            peak = (cur[0], cur[1])
        for x in dying.get(i, ()):
            if x in live:
                f, o = live.pop(x)
                cur[0] -= f
                cur[1] -= o
        for o in node.output:  # outputs nobody reads die at once
            if o in live and o not in last:
                f, ob = live.pop(o)
                cur[0] -= f
                cur[1] -= ob
    return peak
