"""Legalization rewrites over ONNX graphs for the Hexagon NPU (`legality.legalize` applies them).

Each rewrite is a function `model -> number of changes`, editing the graph in place:
- `decompose_einsum`: two-operand Einsum -> ReduceSum / Transpose / Reshape / MatMul;
- `lower_int64`: int64 run-time tensors -> int32 (graph inputs and outputs, casts, the constants
  that meet them); int64 constants in shape-parameter slots (Reshape shape, Slice starts, axes)
  are static parameters the converter consumes, not NPU tensors, and stay;
- `narrow_double`: float64 casts and constants -> float32;
- `reduce_transpose_rank`: a Transpose of rank >= warn_rank runs on merged axes, or as a chain of
  rank-4 "move one axis" transposes, then `fuse_reshape_chains` collapses Reshape chains so a
  Reshape -> rank-6 Transpose -> Reshape (a patchify) never materializes a rank-6 tensor.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from targets.onnx_costs import infer_shapes, onnx_tensor_types

# Inputs that are static parameters of an op (ONNX requires int64 there); not NPU tensors.
PARAM_SLOTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Unsqueeze": (1,), "Squeeze": (1,),
    "ConstantOfShape": (0,), "TopK": (1,), "Pad": (1, 3), "Resize": (3,), "Split": (1,), "ReduceSum": (1,),
    "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "OneHot": (1,), "Upsample": (1,),
}
# Ops whose output is int64 by the ONNX spec: their result is cast to int32 right after.
INT64_RESULT_OPS = frozenset({"ArgMax", "ArgMin", "Shape", "Size", "NonZero", "TopK"})



class _Graph:
    """Name bookkeeping over a GraphProto: producers, consumers, constants, fresh names."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.types = onnx_tensor_types(model)
        self.inits = {i.name: i for i in self.g.initializer}
        for n in self.g.node:  # Constant nodes become initializers: one kind of constant to handle
            if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute):
                t = next(a.t for a in n.attribute if a.name == "value")
                t = onnx.TensorProto.FromString(t.SerializeToString())
                t.name = n.output[0]
                self.g.initializer.append(t)
                self.inits[t.name] = t
        keep = [n for n in self.g.node if not (n.op_type == "Constant" and n.output[0] in self.inits)]
        del self.g.node[:]
        self.g.node.extend(keep)
        self._n = 0
        self.used = {x for n in self.g.node for x in (*n.input, *n.output)} | set(self.inits) | \
            {v.name for v in (*self.g.input, *self.g.output)}

    def fresh(self, base: str) -> str:
        while True:
            self._n += 1
            name = f"{base}__lg{self._n}"
            if name not in self.used:
                self.used.add(name)
                return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.g.initializer.append(numpy_helper.from_array(array, name))
        self.inits[name] = self.g.initializer[-1]
        return name

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        out: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for x in n.input:
                out.setdefault(x, []).append(n)
        return out

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.types.get(name, (0, None))[1]

    def elem(self, name: str) -> int:
        return self.types.get(name, (0, None))[0]


def _refresh(model: onnx.ModelProto) -> onnx.ModelProto:
    del model.graph.value_info[:]
    return infer_shapes(model)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def lower_int64(model: onnx.ModelProto) -> int:
    """int64 runtime tensors -> int32; returns the number of values changed."""
    gr = _Graph(model)
    g = gr.g
    changed = 0
    for v in g.input:
        if v.type.tensor_type.elem_type == TensorProto.INT64:
            v.type.tensor_type.elem_type = TensorProto.INT32
            changed += 1
    new_nodes: list[onnx.NodeProto] = []
    i32_consts: dict[str, str] = {}
    runtime_i32: set[str] = {v.name for v in g.input if v.type.tensor_type.elem_type == TensorProto.INT32}

    def as_i32(name: str) -> str:
        if name not in i32_consts:
            arr = numpy_helper.to_array(gr.inits[name])
            if arr.size and (arr.max() > np.iinfo(np.int32).max or arr.min() < np.iinfo(np.int32).min):
                arr = np.clip(arr, np.iinfo(np.int32).min, np.iinfo(np.int32).max)
            i32_consts[name] = gr.const(name, arr.astype(np.int32))
        return i32_consts[name]

    for node in g.node:
        slots = PARAM_SLOTS.get(node.op_type, ())
        touches_i32 = any(x in runtime_i32 for x in node.input)
        for k, x in enumerate(node.input):
            if k in slots:
                if x in runtime_i32:  # a shape computed at run time: keep int64 there (check reports it)
                    cast = gr.fresh(x + "_i64")
                    new_nodes.append(helper.make_node("Cast", [x], [cast], to=TensorProto.INT64))
                    node.input[k] = cast
                continue
            if touches_i32 and x in gr.inits and gr.inits[x].data_type == TensorProto.INT64:
                node.input[k] = as_i32(x)
                changed += 1
        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i == TensorProto.INT64:
                to.i = TensorProto.INT32
                changed += 1
            if to.i == TensorProto.INT32:
                runtime_i32.add(node.output[0])
            new_nodes.append(node)
            continue
        new_nodes.append(node)
        if node.op_type in INT64_RESULT_OPS:
            for j, o in enumerate(node.output):
                if o and gr.elem(o) == TensorProto.INT64 and not (node.op_type == "TopK" and j == 0):
                    raw = gr.fresh(o + "_i64")
                    node.output[j] = raw
                    new_nodes.append(helper.make_node("Cast", [raw], [o], to=TensorProto.INT32))
                    runtime_i32.add(o)
                    changed += 1
        elif touches_i32:
            runtime_i32.update(o for o in node.output if gr.elem(o) in (TensorProto.INT64, TensorProto.INT32))
    del g.node[:]
    g.node.extend(new_nodes)
    for v in g.output:
        if v.type.tensor_type.elem_type == TensorProto.INT64 and v.name in runtime_i32:
            v.type.tensor_type.elem_type = TensorProto.INT32
    _drop_unused_initializers(model)
    return changed


def narrow_double(model: onnx.ModelProto) -> int:
    """float64 casts and constants -> float32 (the NPU has no double); returns the count."""
    gr = _Graph(model)
    n = 0
    for node in gr.g.node:
        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i == TensorProto.DOUBLE:
                to.i = TensorProto.FLOAT
                n += 1
    for init in list(gr.g.initializer):
        if init.data_type == TensorProto.DOUBLE:
            arr = numpy_helper.to_array(init).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            n += 1
    for v in (*gr.g.input, *gr.g.output):
        if v.type.tensor_type.elem_type == TensorProto.DOUBLE:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
            n += 1
    return n


def _einsum_plan(eq: str) -> tuple[list[str], str] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or any(len(set(t)) != len(t) for t in (*terms, out)):
        return None
    return terms, out


def _arrange(gr: _Graph, out_nodes: list[onnx.NodeProto], base: str, name: str, term: str, order: list[str],
             shape3: list[int]) -> str:
    """Transpose an einsum operand's axes into `order`, then reshape it to 3-D `shape3`."""
    perm = [term.index(c) for c in order]
    if perm != list(range(len(perm))):
        t = gr.fresh(base + "_t")
        out_nodes.append(helper.make_node("Transpose", [name], [t], perm=perm))
        name = t
    s = gr.const(base + "_shape", np.array(shape3, np.int64))
    r = gr.fresh(base + "_r")
    out_nodes.append(helper.make_node("Reshape", [name, s], [r]))
    return r


def decompose_einsum(model: onnx.ModelProto) -> int:
    """Two-operand Einsum -> ReduceSum (indices only one side sums), Transpose, Reshape, MatMul."""
    gr = _Graph(model)
    out_nodes: list[onnx.NodeProto] = []
    n = 0
    for node in gr.g.node:
        plan = _einsum_plan(next((a.s.decode() for a in node.attribute if a.name == "equation"), "")) \
            if node.op_type == "Einsum" else None
        shapes = [gr.shape(x) for x in node.input] if plan else []
        if not plan or any(s is None for s in shapes):
            out_nodes.append(node)
            continue
        (ta, tb), to = plan
        dims = {c: d for t, s in zip((ta, tb), shapes) for c, d in zip(t, s)}
        names, terms = list(node.input), [ta, tb]
        for side in (0, 1):  # indices in one operand only, not in the output: sum them first
            other = terms[1 - side]
            lone = [c for c in terms[side] if c not in other and c not in to]
            if lone:
                axes = gr.const(node.name + "_axes", np.array([terms[side].index(c) for c in lone], np.int64))
                red = gr.fresh(node.name + "_sum")
                out_nodes.append(helper.make_node("ReduceSum", [names[side], axes], [red], keepdims=0))
                names[side], terms[side] = red, "".join(c for c in terms[side] if c not in lone)
        ta, tb = terms
        batch = [c for c in ta if c in tb and c in to]
        contract = [c for c in ta if c in tb and c not in to]
        left = [c for c in ta if c not in tb]
        right = [c for c in tb if c not in ta]
        size = {k: int(math.prod(dims[c] for c in cs)) for k, cs in
                (("batch", batch), ("left", left), ("contract", contract), ("right", right))}
        a3 = _arrange(gr, out_nodes, node.name, names[0], ta, batch + left + contract,
                      [size["batch"], size["left"], size["contract"]])
        b3 = _arrange(gr, out_nodes, node.name, names[1], tb, batch + contract + right,
                      [size["batch"], size["contract"], size["right"]])
        mm = gr.fresh(node.name + "_mm")
        out_nodes.append(helper.make_node("MatMul", [a3, b3], [mm]))
        order = batch + left + right
        s = gr.const(node.name + "_shape", np.array([dims[c] for c in order], np.int64))
        perm = [order.index(c) for c in to]
        if perm == list(range(len(perm))):
            out_nodes.append(helper.make_node("Reshape", [mm, s], [node.output[0]]))
        else:
            r = gr.fresh(node.name + "_r")
            out_nodes.append(helper.make_node("Reshape", [mm, s], [r]))
            out_nodes.append(helper.make_node("Transpose", [r], [node.output[0]], perm=perm))
        n += 1
    del gr.g.node[:]
    gr.g.node.extend(out_nodes)
    return n


def _transpose_steps(shape: tuple[int, ...], perm: tuple[int, ...], max_rank: int) -> list[tuple[list[int], list[int]]]:
    """(reshape-to shape, perm) steps that realize `perm` with no tensor above `max_rank`.

    Unit axes are dropped, axes that stay adjacent are merged; if that is still too high, each step
    moves one axis to its place: a rank-4 (A, B, C, D) -> (A, C, B, D) transpose."""
    keep = [a for a in perm if shape[a] != 1]
    order = sorted(keep)
    runs: list[list[int]] = []  # merge input axes that stay consecutive in the output
    for a in keep:
        if runs and order.index(a) == order.index(runs[-1][-1]) + 1:
            runs[-1].append(a)
        else:
            runs.append([a])
    groups = sorted(runs, key=lambda r: r[0])  # the merged axes in input order
    gdims = [int(math.prod(shape[a] for a in r)) for r in groups]
    target = [groups.index(r) for r in runs]
    if len(groups) <= max_rank:
        return [(gdims, target)] if target != sorted(target) else []
    steps = []
    cur = list(range(len(groups)))
    for i in range(len(groups)):
        if cur[i] == target[i]:
            continue
        j = cur.index(target[i])
        d = [gdims[c] for c in cur]
        steps.append(([int(math.prod(d[:i])), int(math.prod(d[i:j])), d[j], int(math.prod(d[j + 1:]))], [0, 2, 1, 3]))
        cur = [*cur[:i], cur[j], *cur[i:j], *cur[j + 1:]]
    return steps


def reduce_transpose_rank(model: onnx.ModelProto, warn_rank: int) -> int:
    """Rewrite Transposes of rank >= warn_rank as lower-rank ones (see `_transpose_steps`)."""
    gr = _Graph(model)
    out_nodes: list[onnx.NodeProto] = []
    n = 0
    for node in gr.g.node:
        shape = gr.shape(node.input[0]) if node.op_type == "Transpose" else None
        out_shape = gr.shape(node.output[0]) if shape is not None else None
        if shape is None or out_shape is None or len(shape) < warn_rank:
            out_nodes.append(node)
            continue
        perm = tuple(next((list(a.ints) for a in node.attribute if a.name == "perm"), range(len(shape))[::-1]))
        steps = _transpose_steps(tuple(shape), perm, max_rank=4)
        x = node.input[0]
        for dims, p in steps:
            s = gr.const(node.name + "_shape", np.array(dims, np.int64))
            r, t = gr.fresh(node.name + "_r"), gr.fresh(node.name + "_t")
            out_nodes += [helper.make_node("Reshape", [x, s], [r]), helper.make_node("Transpose", [r], [t], perm=p)]
            x = t
        s = gr.const(node.name + "_shape", np.array(out_shape, np.int64))
        out_nodes.append(helper.make_node("Reshape", [x, s], [node.output[0]]))
        n += 1
    del gr.g.node[:]
    gr.g.node.extend(out_nodes)
    if n:
        fuse_reshape_chains(model)
    return n


def fuse_reshape_chains(model: onnx.ModelProto) -> int:
    """Reshape(Reshape(x, a), b) -> Reshape(x, b) when the inner result has no other reader."""
    gr = _Graph(model)
    producers = {o: nd for nd in gr.g.node for o in nd.output}
    readers = gr.consumers()
    outputs = {o.name for o in gr.g.output}
    dead: set[int] = set()
    n = 0
    for node in gr.g.node:
        if node.op_type != "Reshape" or not _explicit_shape(gr, node):
            continue  # a 0 in the shape copies a dim of the (inner) input: not fusable
        src = producers.get(node.input[0])
        while (src is not None and src.op_type == "Reshape" and len(readers.get(src.output[0], [])) == 1
               and src.output[0] not in outputs):
            node.input[0] = src.input[0]
            dead.add(id(src))
            n += 1
            src = producers.get(node.input[0])
    keep = [nd for nd in gr.g.node if id(nd) not in dead]
    del gr.g.node[:]
    gr.g.node.extend(keep)
    _drop_unused_initializers(model)
    return n


def _explicit_shape(gr: _Graph, reshape: onnx.NodeProto) -> bool:
    init = gr.inits.get(reshape.input[1])
    if init is None:
        return False
    allowzero = any(a.name == "allowzero" and a.i for a in reshape.attribute)
    return allowzero or 0 not in numpy_helper.to_array(init).tolist()
