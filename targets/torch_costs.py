"""The torch front end of the estimator: per-node costs of a module run for shapes only.

A TorchDispatchMode records one `OpCost` per aten op (views, metadata and creation ops are free, as
their ONNX counterparts are), classifies matmuls (mm/addmm: a weight operand; bmm: two
activations) and tracks buffer lifetimes by data flow for the peak. `torch_graph_cost` runs a
pipeline component at a call signature under `ndopt.ir.cost.CostModel` (meta pipelines too).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from targets.estimator import MAC_CLASSES, GraphCost, OpCost, tiled


class _IdMap:
    """Tensors by identity -> a value, without keeping them alive (a WeakKeyDictionary compares keys
    with ==, which tensors overload); an entry goes when its tensor does, so ids are never stale."""

    def __init__(self) -> None:
        self.items: dict[int, tuple[weakref.ref, Any]] = {}

    def set(self, t: Any, value: Any) -> None:
        key = id(t)
        self.items[key] = (weakref.ref(t, self._dropper(key)), value)

    def _dropper(self, key: int) -> Any:
        return lambda _ref: self.items.pop(key, None)

    def get(self, t: Any, default: Any = None) -> Any:
        hit = self.items.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else default


# Ops the NPU converter fuses into the conv/matmul that produces their input: batch norm (folded into
# the weights), bias adds and pointwise activations (epilogues): free (onnx_costs.FUSED_ONNX likewise).
FUSED_TORCH = ("_native_batch_norm_legit_no_training", "native_batch_norm", "relu", "relu_", "hardtanh",
               "hardtanh_", "clamp", "clamp_", "gelu", "silu", "silu_", "hardswish", "hardswish_", "leaky_relu",
               "sigmoid", "add", "add_")
# Elementwise ops fused into the epilogue when every activation they read is a conv/matmul output
# (onnx_costs.ELEMENTWISE_ONNX likewise).
ELEMENTWISE_TORCH = frozenset({"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "erf", "tanh", "sigmoid",
                               "relu", "relu_", "clamp", "clamp_", "hardtanh", "hardtanh_", "gelu", "silu", "silu_",
                               "hardswish", "hardswish_", "hardsigmoid", "leaky_relu", "pow", "sqrt", "rsqrt", "exp",
                               "neg", "abs", "softplus", "mish", "elu"})
_EPILOGUE = frozenset(FUSED_TORCH) | ELEMENTWISE_TORCH
# Normalisations, softmax and reductions (the `norm` class; onnx_costs.NORM_ONNX likewise).
NORM_TORCH = frozenset({"native_layer_norm", "native_group_norm", "_softmax", "_log_softmax", "mean", "sum", "amax",
                        "amin", "var_mean", "var", "std",
                        "linalg_vector_norm", "norm", "argmax", "topk", "max", "min", "prod"})


class _Roofline:
    """Records an OpCost per executed aten op, and the buffers' lifetimes for the peak.

    `mode` is a TorchDispatchMode (built here so that importing this module does not import torch
    machinery). Views, metadata and allocation-only ops are free, as their ONNX counterparts are;
    epilogues of a conv/matmul (`FUSED_TORCH`, on its output or a view of it) are free too.
    Liveness is by data flow, as in a compiled graph (not by Python references): a buffer lives
    from the op that writes it to the last op that reads it or a view of it."""

    def __init__(self) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        aten = torch.ops.aten
        self.ops: list[OpCost] = []
        self.buffers: list[list[int]] = []  # [float elements, other bytes, first step, last step]
        self.buffer_of = _IdMap()  # tensor (or a view of it) -> its buffer index
        self.mac_outputs = _IdMap()  # tensors a conv/matmul (+ an epilogue) produced -> True
        self.ew_outputs = _IdMap()  # tensors an elementwise op (+ fused successors) produced -> its op's index
        self.step = 0
        owner = self
        free = {aten.empty.memory_format, aten.empty_strided.default, aten.detach.default,
                aten.lift_fresh.default, aten._local_scalar_dense.default}

        outs_of_call: list[Any] = []  # the outputs of the op being recorded

        def fused(func: Any, args: tuple) -> bool:
            if func.overloadpacket.__name__ not in _EPILOGUE or not args \
                    or not isinstance(args[0], torch.Tensor):
                return False
            name = func.overloadpacket.__name__
            acts = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.dim() > 1 and t.numel() > 1]
            if name in ELEMENTWISE_TORCH and len(acts) == 1 and acts[0] is args[0] \
                    and owner.mac_outputs.get(args[0], False):
                return True  # an activation (with scalar operands) on a conv/matmul output
            roots = {owner.ew_outputs.get(t) for t in acts}
            if name in ELEMENTWISE_TORCH and acts and len(roots) == 1 and None not in roots:
                for t in outs_of_call:
                    owner.ew_outputs.set(t, next(iter(roots)))
                return True  # elementwise after elementwise (a ReLU after a residual add): one pass
            if name not in FUSED_TORCH or not owner.mac_outputs.get(args[0], False):
                return False
            if func.overloadpacket.__name__.startswith("add"):  # a bias: a 1-D (or broadcast) operand
                other = args[1] if len(args) > 1 else None
                return isinstance(other, torch.Tensor) and other.dim() <= 1
            return True

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if func.namespace == "prim":
                    return out
                owner.step += 1
                ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                for t in ins:
                    b = owner.buffer_of.get(t)
                    if b is not None:
                        owner.buffers[b][3] = owner.step
                if getattr(func, "is_view", False) or any(r.alias_info is not None for r in func._schema.returns):
                    if ins:  # a view (or an in-place op): the same buffer
                        b = owner.buffer_of.get(ins[0])
                        for t in outs:
                            if b is not None:
                                owner.buffer_of.set(t, b)
                            if owner.mac_outputs.get(ins[0], False):
                                owner.mac_outputs.set(t, True)
                            if owner.ew_outputs.get(ins[0]) is not None:
                                owner.ew_outputs.set(t, owner.ew_outputs.get(ins[0]))
                    if getattr(func, "is_view", False):
                        return out
                else:
                    owner.track(outs)
                if func in free or not outs or not ins:
                    return out  # allocation and creation ops (the ONNX graph holds them as constants)
                outs_of_call[:] = outs
                if fused(func, args):
                    for t in outs:
                        if owner.ew_outputs.get(t) is None:
                            owner.mac_outputs.set(t, True)
                    return out
                op = _classify(func, args, kwargs, outs, tree_leaves)
                if op.kind in MAC_CLASSES:
                    for t in outs:
                        owner.mac_outputs.set(t, True)
                elif func.overloadpacket.__name__ in ELEMENTWISE_TORCH or op.kind == "norm":  # onnx_costs likewise
                    for t in outs:
                        owner.ew_outputs.set(t, len(owner.ops))
                owner.ops.append(op)
                return out

        self.mode = Mode()

    def track(self, tensors: Iterable[Any]) -> None:
        """New buffers written now (graph inputs are tracked this way before the run)."""
        for t in tensors:
            nf, no = _sizes([t])
            self.buffer_of.set(t, len(self.buffers))
            self.buffers.append([nf, no, self.step, self.step])

    @property
    def peak(self) -> tuple[int, int]:
        """Largest (float elements, other bytes) live at once, compared at 16-bit activations."""
        events: dict[int, list[int]] = {}
        for nf, no, first, last in self.buffers:
            events.setdefault(first, [0, 0, 0, 0])
            events.setdefault(last + 1, [0, 0, 0, 0])
            events[first][0] += nf
            events[first][1] += no
            events[last + 1][2] += nf
            events[last + 1][3] += no
        live, best = [0, 0], (0, 0)
        for step in sorted(events):
            e = events[step]
            live = [live[0] - e[2], live[1] - e[3]]  # freed before this step's writes
            live = [live[0] + e[0], live[1] + e[1]]
            if live[0] * 2 + live[1] > best[0] * 2 + best[1]:
                best = (live[0], live[1])
        return best


def _sizes(ts: Iterable[Any]) -> tuple[int, int]:
    f = o = 0
    for t in ts:
        if t.dtype.is_floating_point:
            f += t.numel()
        else:
            o += t.numel() * t.element_size()
    return f, o


def _classify(func: Any, args: tuple, kwargs: dict, outs: list, tree_leaves: Any) -> OpCost:
    import torch

    from targets.onnx_costs import vector_padded

    aten = torch.ops.aten
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    tile = 0
    if func in (aten.convolution.default, aten._convolution.default):
        from targets.onnx_costs import conv_kind_and_tiles

        x, w, bias, transposed = args[0], args[1], args[2], bool(args[6])
        groups = int(args[8]) if len(args) > 8 else 1
        kind, macs, tile = conv_kind_and_tiles(outs[0].numel(), tuple(w.shape), transposed, x.numel(), groups)
        acts, weights = [x, *outs], [w] + ([bias] if bias is not None else [])
    elif func in (aten.mm.default, aten.addmm.default):  # Linear: the second matrix is the weight
        a, b = (args[1], args[2]) if func is aten.addmm.default else (args[0], args[1])
        macs = a.shape[0] * a.shape[1] * b.shape[1]
        tile = a.shape[0] * tiled(b.shape[1]) * tiled(a.shape[1])
        acts, weights, kind = [a, *outs], [t for t in tensors if t is not a], "matmul"
    elif func in (aten.bmm.default, aten.baddbmm.default):
        a, b = (args[1], args[2]) if func is aten.baddbmm.default else (args[0], args[1])
        macs = a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        tile = a.shape[0] * a.shape[1] * tiled(b.shape[2]) * tiled(a.shape[2])
        acts, weights, kind = [*tensors, *outs], [], "attention"
    elif func is aten.embedding.default:  # a table lookup reads the rows it gathers
        f, o = _sizes([*tensors[1:], *outs])
        return OpCost("vector", 0, f, outs[0].numel(), o)
    else:
        name = func.overloadpacket.__name__
        pooled = name.startswith(("_adaptive_avg_pool", "adaptive_max_pool")) and all(d == 1 for d in outs[0].shape[2:])
        kind = "norm" if name in NORM_TORCH or pooled else "vector"  # a global pool is a reduction
        macs, acts, weights = 0, [*tensors, *outs], []
        if name in ("native_layer_norm", "_softmax", "_log_softmax") and tensors:  # onnx_costs.ROW_NORMS_ONNX
            n = int(tensors[0].shape[int(args[1]) if name != "native_layer_norm" else -1]) if tensors[0].dim() else 1
            f, o = _sizes(acts)
            return OpCost(kind, 0, int(f * vector_padded(n) // max(n, 1)), 0, int(o))
    f, o = _sizes(acts)
    wf, wo = _sizes(weights)
    return OpCost(kind, int(macs), int(f), int(wf), int(o + wo), int(tile))


def torch_graph_cost(component: Any, sig: Any, costs: Any | None = None) -> GraphCost:
    """The GraphCost of one component call, from a shapes-only run of `ndopt.ir.cost.CostModel`.

    `costs` must not have run this (component, signature) yet (a cached result runs nothing):
    pass a fresh CostModel shared by the signatures of one pipeline. The cost model runs each
    repeated block (a member of an nn.ModuleList) once per input shape and skips its twins; hooks on
    those blocks see the skipped calls (no op ran between entry and exit) and replay the recorded
    nodes of the twin that ran, so the nodes are those of an unmemoized run (a test checks it)."""
    from ndopt.ir.cost import CostModel

    costs = costs if costs is not None else CostModel(disk=False)
    if costs.disk:
        raise ValueError("torch_graph_cost needs a CostModel(disk=False): a shape run read from the disk cache "
                         "records no nodes")
    rec = _Roofline()
    handles = _replay_skipped_blocks(component.module, rec)
    try:
        with rec.mode:
            sc = costs.signature_cost(component, sig)
    finally:
        for h in handles:
            h.remove()
    params = list(component.module.parameters()) + list(component.module.buffers())
    weights = sum(p.numel() for p in params if p.is_floating_point())
    other = sum(p.numel() * p.element_size() for p in params if not p.is_floating_point())
    peak = rec.peak
    return GraphCost(tuple(rec.ops), int(weights), int(other), int(peak[0]), int(peak[1]),
                     flops=float(sc.flops))


def _replay_skipped_blocks(root: Any, rec: _Roofline) -> list[Any]:
    """Forward hooks on repeated blocks: a call that recorded no node (the cost model skipped it)
    gets the nodes of the identical block that ran at the same input shapes."""
    import torch
    from torch import nn

    recorded: dict[Any, list[OpCost]] = {}
    starts: dict[int, list[int]] = {}
    handles = []

    def key(block: nn.Module, args: tuple) -> Any:
        shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
        params = tuple((n, tuple(p.shape)) for n, p in block.named_parameters())
        return type(block).__qualname__, params, shapes

    def pre(block: nn.Module, args: tuple) -> None:
        starts.setdefault(id(block), []).append(len(rec.ops))

    def post(block: nn.Module, args: tuple, out: Any) -> None:
        start = starts[id(block)].pop()
        k = key(block, args)
        if len(rec.ops) > start:
            recorded.setdefault(k, rec.ops[start:])
        elif k in recorded:
            rec.ops.extend(recorded[k])

    for mod in root.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            for block in mod:
                handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    return handles


def module_graph_cost(module: Any, *args: Any, **kwargs: Any) -> GraphCost:
    """The GraphCost of `module(*args, **kwargs)` on whatever device the module and inputs are on
    (meta: shapes only). What calibration models are costed with: no memoization, no Component."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._pytree import tree_leaves

    rec = _Roofline()
    rec.track(t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))  # graph inputs
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), rec.mode:
        module(*args, **kwargs)
    params = list(module.parameters()) + list(module.buffers())
    weights = sum(p.numel() for p in params if p.is_floating_point())
    other = sum(p.numel() * p.element_size() for p in params if not p.is_floating_point())
    peak = rec.peak
    return GraphCost(tuple(rec.ops), int(weights), int(other), int(peak[0]), int(peak[1]),
                     flops=2.0 * sum(o.macs for o in rec.ops))
