"""The ONNX front end of the estimator: per-node costs and peak live activations of an ONNX graph.

Reads shapes only (shape inference; weights may stay on disk). Nodes that torch expresses as views
(reshapes, slices, transposes below rank 5, constant selects), shape arithmetic (folded ahead of time
on static shapes), the epilogues the NPU converter fuses into a conv/matmul and elementwise nodes
that follow another elementwise node or a normalisation (one pass) are free, so this front end counts
the nodes the torch one does (and the calibration did). Normalised rows are priced padded to the
vector width (`VECTOR_LANES`).

`static_graph` is the door for a file from a person (`ndopt estimate`): it refuses what is not an
ONNX graph, and graphs whose dims stay unknown (symbolic inputs, data-dependent shapes) unless
input shapes are given, because an unknown dim would be priced as zero.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ndopt.errors import TargetError
from targets.estimator import MAC_CLASSES, GraphCost, OpCost, tiled


class GraphInputError(TargetError):
    """An ONNX file cannot be estimated: not an ONNX graph, bad input shapes, or dims left unknown."""


# Nodes priced as free: metadata, and the layout ops torch expresses as views (slices, splits,
# transposes, expands), so that both front ends count the same nodes as the calibration did.
FREE_ONNX_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Constant", "Shape",
                           "Size", "Dropout", "Slice", "Split", "Transpose", "Expand"})
ALIAS_ONNX_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
# Epilogues the NPU converter fuses into the conv/matmul producing their input (torch_costs.FUSED_TORCH).
FUSED_ONNX = frozenset({"BatchNormalization", "Relu", "Clip", "Gelu", "HardSwish", "LeakyRelu", "Sigmoid", "Add"})
# Elementwise nodes: fused into the conv/matmul epilogue when every activation they read comes from
# one (a decomposed GELU or SiLU after a Linear is the converter's one fused activation, as in torch).
ELEMENTWISE_ONNX = frozenset({"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "Clip", "Gelu",
                              "HardSwish", "HardSigmoid", "LeakyRelu", "Pow", "Sqrt", "Exp", "Neg", "Abs",
                              "Softplus", "BatchNormalization", "PRelu", "Elu", "Mish", "IsNaN", "Where"})
# Normalisations, softmax and reductions: several passes over their input (the `norm` class).
NORM_ONNX = frozenset({"LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax", "LogSoftmax",
                       "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceProd",
                       "ReduceSumSquare", "LpNormalization", "ArgMax", "TopK", "GlobalAveragePool",
                       "GlobalMaxPool", "GlobalLpPool"})
ROW_NORMS_ONNX = frozenset({"LayerNormalization", "Softmax", "LogSoftmax"})  # reduce along one (last) axis
PROTOBUF_LIMIT = 2**31 - 1  # bytes: the largest message protobuf serializes
SHAPE_CONSTANT_BYTES = 4096  # initializers up to this size stay when shapes are inferred past the limit
LAYOUT_RANK = 5  # transposes of tensors with this many non-unit dims or more are copies (`_moves_data`)
VECTOR_LANES = 128  # a normalised row is processed in chunks of 128 16-bit values (two HVX registers)
DEPTHWISE_MAX_CHANNELS = 8  # a grouped conv with at most this many input channels per group: `dwconv`


def conv_kind_and_tiles(out_elems: int, wshape: Sequence[int], transposed: bool = False, in_elems: int = 0,
                        groups: int = 1) -> tuple[str, int, int]:
    """(class, MACs, tiled MACs) of a conv with weight `wshape` ([cout, cin/groups, *kernel]; for a
    transposed conv [cin, cout/groups, *kernel]) writing `out_elems` (reading `in_elems`).
    Depthwise and narrow grouped convs run on the vector units (`dwconv`); the others pay for their
    channel dims padded to the matrix engine's tile (a stem conv's few input channels are packed)."""
    if len(wshape) < 2:
        return "conv", 0, 0
    kernel, per_group = _numel(wshape[2:]), int(wshape[1])
    if transposed:  # MACs = input elements x (cout / groups) x kernel
        macs = in_elems * per_group * kernel
        cin = int(wshape[0])
        tile = (in_elems // max(cin, 1)) * tiled(cin // max(groups, 1)) * tiled(per_group) * kernel * max(groups, 1)
        return "conv", macs, max(tile, macs)
    macs = out_elems * per_group * kernel
    if groups > 1 and per_group <= DEPTHWISE_MAX_CHANNELS:
        return "dwconv", macs, macs
    cout = int(wshape[0])
    cin_t = tiled(per_group) if per_group > 4 else per_group
    tile = (out_elems // max(cout, 1)) * tiled(cout // groups) * groups * cin_t * kernel
    return "conv", macs, max(tile, macs)


def vector_padded(n: int) -> int:
    """A row of `n` elements rounded up to whole vector registers (`VECTOR_LANES`)."""
    return -(-int(n) // VECTOR_LANES) * VECTOR_LANES if n > 0 else 0


def matmul_tiles(out_shape: Sequence[int], k: int) -> int:
    """MACs of a matmul writing `out_shape` over a reduction of `k`, with N and K padded to the tile."""
    if not out_shape:
        return 0
    return _numel(out_shape[:-1]) * tiled(int(out_shape[-1])) * tiled(int(k))


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


def fits_protobuf(model: Any) -> bool:
    """Whether `model` serializes as one protobuf message (under 2 GB). Asking its size past that
    raises by itself (EncodeError) on some protobuf builds."""
    try:
        return model.ByteSize() < PROTOBUF_LIMIT
    except Exception:  # google.protobuf.message.EncodeError: "Failed to serialize proto"
        return False


def infer_shapes(model: Any, strict: bool = False) -> Any:
    """Shape inference that also works past 2 GB (it only reads the graph, not the weights).
    `strict`: raise onnx's InferenceError where shapes contradict each other."""
    import onnx

    if fits_protobuf(model):
        return onnx.shape_inference.infer_shapes(model, data_prop=True, strict_mode=strict)
    # past 2 GB onnx cannot serialize it (ValueError or EncodeError, by version): infer on a copy that holds
    # the large tensors as bare shapes (small ones stay: shape arithmetic reads them; copying the whole
    # model would double a multi-gigabyte proto), then copy the value infos back
    light = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = model.graph
    light.graph.name = g.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(light.graph, field).extend(getattr(g, field))
    for init in g.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL and init.ByteSize() <= SHAPE_CONSTANT_BYTES:
            light.graph.initializer.append(init)
        else:
            light.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    inferred = onnx.shape_inference.infer_shapes(light, data_prop=True, strict_mode=strict)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _moves_data(node: Any, types: Mapping[str, tuple[int, tuple[int, ...] | None]]) -> bool:
    """A transpose of a rank-5+ tensor (window partitions, patch unfolds): a real copy on the NPU,
    not a view (the converter's layouts stop at rank 4)."""
    if node.op_type != "Transpose" or not node.input:
        return False
    shape = types.get(node.input[0], (0, None))[1]
    return shape is not None and len([d for d in shape if d > 1]) >= LAYOUT_RANK


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

    stored = set(consts)  # the graph's own weights (folded constants are derived from them)
    ops: list[OpCost] = []
    mac_out: dict[str, str] = {}  # values a conv/matmul (+ fused epilogue) produced -> that conv/matmul's output
    ew_out: dict[str, str] = {}  # values an elementwise node (+ fused successors) produced -> its output
    for node in g.node:
        ins = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size") or (ins and all(i in consts for i in ins)):
            consts.update(o for o in node.output if o)  # constant-folded by the converter: no runtime cost
            continue
        if node.op_type in FREE_ONNX_OPS and not _moves_data(node, types):
            if node.op_type in ALIAS_ONNX_OPS and node.input:
                for made in (mac_out, ew_out):
                    if node.input[0] in made:
                        made.update(dict.fromkeys(node.output, made[node.input[0]]))
            continue
        if node.op_type == "Cast" and types.get(ins[0], (0,))[0] == types.get(node.output[0], (1,))[0]:
            continue  # a cast to the type it already has (the exporter's .float() on float32)
        if node.op_type == "Gather" and len(ins) == 2 and ins[1] in consts and ins[0] not in consts:
            continue  # a select with constant indices: a view in torch
        if node.op_type in FUSED_ONNX and ins and (
                (node.op_type != "Add" and ins[0] in mac_out)
                or (node.op_type == "Add" and len(ins) == 2 and any(
                    a in mac_out and b in consts for a, b in ((ins[0], ins[1]), (ins[1], ins[0]))))):
            root = mac_out[ins[0] if ins[0] in mac_out else ins[1]]
            mac_out.update(dict.fromkeys(node.output, root))  # folded batch norm, bias add or activation epilogue
            continue
        roots = {mac_out.get(i) for i in ins if i not in consts and elems(i)[0] > 1}
        if node.op_type in ELEMENTWISE_ONNX and len(roots) == 1 and None not in roots:
            # a decomposed activation (GELU, SiLU) reading one conv/matmul output: part of its epilogue
            mac_out.update(dict.fromkeys(node.output, roots.pop()))
            continue
        ew_roots = {ew_out.get(i) for i in ins if i not in consts and elems(i)[0] > 1}
        if node.op_type in ELEMENTWISE_ONNX and len(ew_roots) == 1 and None not in ew_roots:
            # elementwise after elementwise (a ReLU after a residual add, x * sigmoid(x)): one pass
            ew_out.update(dict.fromkeys(node.output, ew_roots.pop()))
            continue
        w_in = [i for i in ins if i in consts]
        a_in = [i for i in ins if i not in consts]
        act = sum(elems(i)[0] for i in a_in) + sum(elems(o)[0] for o in node.output)
        other = sum(elems(i)[1] for i in ins) + sum(elems(o)[1] for o in node.output)
        w = sum(elems(i)[0] for i in w_in)
        kind, macs, tile = "norm" if node.op_type in NORM_ONNX else "vector", 0, 0
        if node.op_type in ROW_NORMS_ONNX:  # rows shorter than a vector register waste its lanes
            shape = types.get(ins[0], (0, None))[1]
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            if shape:
                act = act * vector_padded(int(shape[axis])) // max(int(shape[axis]), 1)
        if node.op_type in ("Conv", "ConvTranspose"):
            wshape = types.get(ins[1], (0, None))[1] or ()
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            kind, macs, tile = conv_kind_and_tiles(elems(node.output[0])[0], wshape, node.op_type == "ConvTranspose",
                                                   elems(ins[0])[0], groups)
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
                if node.op_type != "Einsum":
                    tile = matmul_tiles(out_shape, macs // max(_numel(out_shape), 1))
            kind = "matmul" if any(i in consts for i in ins[:2]) else "attention"
        elif node.op_type == "Gather" and ins and ins[0] in consts:
            # a table lookup reads the rows it gathers, not the table
            w = elems(node.output[0])[0]
        if kind in MAC_CLASSES:
            mac_out.update({o: node.output[0] for o in node.output})
        elif node.op_type in ELEMENTWISE_ONNX or kind == "norm":  # a softmax's NaN guard, a norm's affine
            ew_out.update({o: node.output[0] for o in node.output})
        ops.append(OpCost(kind, int(macs), int(act), int(w), int(other), int(tile)))

    weight_elems = sum(elems(c)[0] for c in stored)
    other_w = sum(elems(c)[1] for c in stored)
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


# ---- a graph from a file (`ndopt estimate`) ---------------------------------------------------------
_SHAPE_SPEC = re.compile(r"^\s*([^=\s][^=]*?)\s*=\s*(-?\d+(?:\s*[xX]\s*-?\d+)*)\s*$")
_SHOWN = 4  # values named in a message; the rest are counted


def parse_input_shapes(specs: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """`NAME=1x3x224x224` strings -> {name: dims}; each bad one is a one-line GraphInputError."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        m = _SHAPE_SPEC.match(spec)
        if m is None:
            raise GraphInputError(f"input shape {spec!r}: expected NAME=D1xD2x... with integer dims, e.g. "
                                  "x=1x3x224x224 (a scalar input takes no shape)")
        name, dims = m.group(1), tuple(int(d) for d in re.split(r"\s*[xX]\s*", m.group(2)))
        if name in out:
            raise GraphInputError(f"input shape {spec!r}: input {name!r} is given twice; give each input once")
        out[name] = dims
    return out


def _dims(value: Any) -> list[int | str] | None:
    """A value's dims as written in the graph (a dim_param's name, '?' for an unnamed unknown dim),
    or None when its rank is unknown."""
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def _show(name: str, dims: list[int | str] | None) -> str:
    return f"{name}[{','.join(str(d) for d in dims)}]" if dims is not None else f"{name}[rank unknown]"


def _more(items: Sequence[str]) -> str:
    extra = f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + extra


def read_graph(path: Path) -> Any:
    """An ONNX file as a checked ModelProto, weights left on disk; refuses (GraphInputError naming the
    file and why) a file that is empty, does not parse, or is not a valid ONNX graph."""
    import onnx

    path = Path(path)
    cannot = f"{path}: cannot read it as an ONNX model"
    try:
        size = path.stat().st_size
        model = onnx.load(str(path), load_external_data=False) if size else None  # weights stay on disk
    except OSError as e:
        raise GraphInputError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # protobuf's DecodeError, a text format's ParseError, ...
        first = next(iter(str(e).splitlines()), "")
        raise GraphInputError(f"{cannot}: it does not parse ({type(e).__name__}: {first}); a truncated file or "
                              "another format: pass an .onnx file as torch.onnx.export or onnx.save writes it") from None
    if model is None:
        raise GraphInputError(f"{cannot}: the file is empty (0 bytes); pass an .onnx file")
    if not model.ir_version or not (model.graph.node or model.graph.output):
        raise GraphInputError(f"{cannot}: it parses ({size} bytes) but holds no graph (ir_version {model.ir_version}, "
                              f"{len(model.graph.node)} nodes, {len(model.graph.output)} outputs); a truncated file "
                              "or another protobuf: pass an .onnx file")
    try:  # by path: external data is looked for beside the file, and models past 2 GB are checked too
        onnx.checker.check_model(str(path))
    except Exception as e:
        first = next(iter(str(e).splitlines()), "")
        raise GraphInputError(f"{path}: not a valid ONNX graph (onnx.checker: {first}); fix or re-export it") from None
    return model


def graph_inputs(model: Any) -> list[Any]:
    """The graph's real inputs (older exports also list their initializers as inputs)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _static(dims: list[int | str] | None) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


def static_graph(model: Any, source: str, input_shapes: Mapping[str, Sequence[int]] | None = None) -> Any:
    """`model` with every dim known, after shape inference: `input_shapes` fix the inputs' unknown
    dims first. Refuses (GraphInputError) bad input shapes, inputs left unknown, and values whose
    dims inference cannot find (data-dependent shapes, ops it does not know)."""
    import onnx

    inputs = {i.name: i for i in graph_inputs(model)}
    shapes = {name: tuple(int(d) for d in dims) for name, dims in (input_shapes or {}).items()}
    for name, dims in shapes.items():
        given = f"{name}={'x'.join(str(d) for d in dims)}"
        if name not in inputs:
            raise GraphInputError(f"input shape {given}: {source} has no input {name!r}; its inputs are "
                                  f"{', '.join(inputs) or 'none'}")
        have = _dims(inputs[name])
        if have is not None and len(have) != len(dims):
            raise GraphInputError(f"input shape {given}: input {name} of {source} has rank {len(have)} "
                                  f"({_show(name, have)}), not {len(dims)}")
        bad = [d for d in dims if d <= 0]
        if bad:
            raise GraphInputError(f"input shape {given}: dims must be positive, got {bad[0]}")
        fixed = [(i, h, d) for i, (h, d) in enumerate(zip(have or dims, dims)) if isinstance(h, int) and h != d]
        if fixed:
            i, h, d = fixed[0]
            raise GraphInputError(f"input shape {given}: dim {i} of input {name} is fixed at {h} in {source}, not {d}")
    unknown = [_show(n, _dims(v)) for n, v in inputs.items() if n not in shapes and not _static(_dims(v))]
    if unknown:
        example = " ".join(f"--input-shape {n}={'x'.join(str(d) if isinstance(d, int) else 'N' for d in _dims(v) or ['N'])}"
                           for n, v in inputs.items() if n not in shapes and not _static(_dims(v)))
        raise GraphInputError(f"{source}: input dims unknown: {_more(unknown)}; the estimate needs every dim: give "
                              f"them ({example}, N a positive size)")

    model = _with_inputs(model, shapes)
    try:
        model = infer_shapes(model, strict=bool(shapes))
    except onnx.shape_inference.InferenceError as e:
        first = next(iter(str(e).splitlines()), "")
        raise GraphInputError(f"{source}: the input shapes given do not fit the graph (onnx shape inference: "
                              f"{first}); check them against the graph's inputs") from None
    left = _unresolved(model)
    if left:
        model = _symbolic_infer(model) or model
    if left and _unresolved(model):
        model = _folded(model) or model
    if left and _unresolved(model):
        raise GraphInputError(f"{source}: shape inference leaves {len(left)} value(s) with unknown dims: {_more(left)}; "
                              "their sizes depend on the data or on ops onnx cannot infer, and the estimator would "
                              "price them as zero: export the graph with static shapes")
    return model


def _with_inputs(model: Any, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """A copy with the inputs' dims set and every shape recorded for values and outputs that is not
    fully static dropped (inference recomputes them from the inputs)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for v in g.input:
        if v.name in shapes:
            t = v.type.tensor_type
            t.shape.ClearField("dim")
            for d in shapes[v.name]:
                t.shape.dim.add().dim_value = d
    kept = [v for v in g.value_info if _static(_dims(v))]
    del g.value_info[:]
    g.value_info.extend(kept)
    for v in g.output:
        if v.type.HasField("tensor_type") and not _static(_dims(v)):
            v.type.tensor_type.ClearField("shape")
    return out


def folded_values(model: Any) -> set[str]:
    """Values the NPU converter computes ahead of time, given static shapes: initializers, constants,
    tensor shapes and everything computed from them alone (shape arithmetic, masks, index tables)."""
    g = model.graph
    out = {i.name for i in g.initializer}
    for node in g.node:
        ins = [i for i in node.input if i]
        if node.op_type in ("Constant", "Shape", "Size") or (ins and all(i in out for i in ins)):
            out.update(o for o in node.output if o)
    return out


def _unresolved(model: Any) -> list[str]:
    """Node outputs whose dims are not all known, as `name[dims] (OpType)` (inputs are checked before);
    values folded ahead of time (`folded_values`) are not priced and need no shape."""
    g = model.graph
    known = {v.name: v for v in (*g.value_info, *g.output)}
    folded = folded_values(model)
    left = []
    for node in g.node:
        if all(o in folded for o in node.output if o):
            continue
        for name in node.output:
            v = known.get(name)
            if not name or node.op_type == "Constant" or (v is not None and not v.type.HasField("tensor_type")):
                continue  # unused optional outputs, constants, sequences and maps: nothing the estimator prices
            dims = _dims(v) if v is not None else None
            if not _static(dims):
                left.append(f"{_show(name, dims)} ({node.op_type})")
    return left


def _weights_as_inputs(model: Any) -> Any:
    """A copy of the graph whose initializers without data (on disk, or stripped) are typed graph
    inputs: shape inference and onnxsim then read their shapes, not their values (only shape
    arithmetic needs values, and its small constants stay), so a multi-GB model costs no memory."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    g = light.graph
    empty = [i for i in g.initializer if i.data_location == onnx.TensorProto.EXTERNAL or not (
        i.raw_data or i.float_data or i.int64_data or i.int32_data or i.double_data)]
    names = {i.name for i in empty}
    keep = [i for i in g.initializer if i.name not in names]
    del g.initializer[:]
    g.initializer.extend(keep)
    have = {i.name for i in g.input}
    g.input.extend(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                   for i in empty if i.name not in have)
    return light


def _with_shapes_of(model: Any, inferred: Any) -> Any:
    """`model` with the static shapes another inference found for its values (its nodes unchanged:
    the estimator prices the graph as written)."""
    import onnx

    shapes = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.output) if _static(_dims(v))}
    for init in inferred.graph.initializer:  # values onnxsim folded into constants
        shapes.setdefault(init.name, onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for o in g.output:
        if not _static(_dims(o)) and o.name in shapes:
            o.type.CopyFrom(shapes[o.name].type)
    produced = {o for n in g.node for o in n.output}
    keep = [v for v in g.value_info if _static(_dims(v)) or v.name not in shapes]
    known = {v.name for v in keep} | {o.name for o in g.output}
    del g.value_info[:]
    g.value_info.extend(keep)
    g.value_info.extend(v for name, v in shapes.items() if name in produced and name not in known)
    return out


def _symbolic_infer(model: Any) -> Any:
    """onnxruntime's symbolic shape inference (it folds more shape arithmetic than onnx's), or None
    when it is not installed or fails on this graph."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return None
    import contextlib
    import tempfile

    # on a graph it cannot finish it saves `sym_shape_infer_temp.onnx` (+ external data) in the working
    # directory before raising: let that land in a directory that is then removed
    with tempfile.TemporaryDirectory(prefix="ndopt-symshape-") as tmp, contextlib.chdir(tmp):
        try:
            inferred = SymbolicShapeInference.infer_shapes(_weights_as_inputs(model), auto_merge=False,
                                                           guess_output_rank=False)
        except Exception:  # it raises on graphs it cannot follow: onnx's answer stands
            return None
    return _with_shapes_of(model, inferred) if inferred is not None else None


FOLD_FILL_BYTES = 1 << 30  # onnxsim runs with zero weights only below this (its copy of the model is in memory)


def _folded(model: Any) -> Any:
    """The graph's shapes after onnxsim has constant-folded its shape arithmetic (what the NPU
    converter does before it sees shapes), for graphs whose sizes onnx's and onnxruntime's inference
    leave unknown (torchvision's Swin pads by sizes computed from Shape ops); None when onnxsim is not
    installed or fails. onnxsim first sees the weights as graph inputs (`_weights_as_inputs`: memory
    stays the graph's); where sizes are computed from weight-like buffers (index tables), it runs
    again with the weights it lacks as zeros, for graphs under `FOLD_FILL_BYTES`. The graph priced is
    the file's: only the shapes found are kept."""
    try:
        import onnxsim
    except ImportError:
        return None
    import onnx
    from onnx import numpy_helper

    def simplified(m: Any) -> Any:
        try:
            out, _ = onnxsim.simplify(m, check_n=0, perform_optimization=False)
            return _with_shapes_of(model, infer_shapes(out))
        except Exception:  # onnxsim raises on graphs it cannot run: the caller's error stands
            return None

    light = _weights_as_inputs(model)
    out = simplified(light)
    if out is not None and not _unresolved(out):
        return out
    have = {i.name for i in light.graph.initializer}
    missing = [i for i in model.graph.initializer if i.name not in have]
    nbytes = sum(_numel(i.dims) * _onnx_itemsize(i.data_type) for i in missing)
    if nbytes > FOLD_FILL_BYTES:
        return out
    filled = onnx.ModelProto()
    filled.CopyFrom(model)
    gone = {i.name for i in missing}
    for init in filled.graph.initializer:
        if init.name in gone:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            init.CopyFrom(numpy_helper.from_array(np.zeros(tuple(init.dims), dtype=dtype), init.name))
    return simplified(filled) or out


def load_static_graph(path: Path, input_shapes: Mapping[str, Sequence[int]] | Iterable[str] | None = None) -> Any:
    """An ONNX file, checked, with every dim known (`read_graph`, then `static_graph`).
    `input_shapes`: {name: dims}, or `NAME=1x3x224x224` strings (`ndopt estimate --input-shape`)."""
    if input_shapes is not None and not isinstance(input_shapes, Mapping):
        input_shapes = parse_input_shapes(input_shapes)
    return static_graph(read_graph(path), str(path), input_shapes)
