"""The AIMET sim as a pipeline component: wrapper, calibration records, op census, ONNX export and check.

`QuantizedComponent` puts a `QuantizationSimModel` behind the float module's interface, so the
sampler, the verifier and the fidelity probe call it as they called the float component.
`record_calls` records every call of the components while the float pipeline samples (calibration
data from the pipeline itself). `unquantized_ops` lists the float compute ops a sim still runs,
`onnx_matches_sim` checks an exported QDQ graph in onnxruntime against the sim, and `weight_bytes`
prices a module's parameters at a precision (plan mode: meta modules).
"""

from __future__ import annotations

import collections
import fnmatch
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ndopt.ir.pipeline import Pipeline
from passes._aimet import support as aq

# Ops that multiply two operands or normalise a distribution: none may run unquantized in the DiT.
MATMUL_LIKE = frozenset({"matmul", "bmm", "mm", "addmm", "baddbmm", "linear", "conv1d", "conv2d", "conv3d",
                         "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "einsum", "softmax",
                         "log_softmax", "scaled_dot_product_attention"})
# Arithmetic that changes values (as opposed to data movement: reshape, cat, slicing, padding).
ARITHMETIC = frozenset({"add", "sub", "mul", "div", "true_divide", "pow", "exp", "log", "sqrt", "rsqrt", "sin",
                        "cos", "tanh", "sigmoid", "gelu", "silu", "relu", "mean", "sum", "group_norm",
                        "layer_norm", "masked_fill", "where", "interpolate", "neg", "square", "erf"})


def inner_name(name: str) -> str:
    """A module name in a sim (`inner.transformer_blocks.0...`) as a name in the component."""
    return "" if name in ("", "inner") else name.removeprefix("inner.")


# ---- the component --------------------------------------------------------------------
def _shape_only(args: Any, kwargs: Any) -> bool:
    """Fake or meta inputs: a run for shapes only (the verifier, the cost model)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, FakeTensor) or (isinstance(t, torch.Tensor) and t.is_meta)
               for t in tree_leaves((args, kwargs)))


class EntryCall(nn.Module):
    """The module a sim wraps: a component's entry point with positional inputs (AIMET traces
    `forward(*dummy_input)` to build its connected graph)."""

    def __init__(self, inner: nn.Module, entry: str, names: tuple[str, ...]) -> None:
        super().__init__()
        self.inner = inner
        self.entry = entry
        self.names = names

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.update(zip(self.names, args))
        if self.entry == "forward":
            return self.inner(**kwargs)
        return getattr(self.inner, self.entry)(**kwargs)


class QuantizedComponent(nn.Module):
    """A component's AIMET sim behind its float module's interface.

    Calls of the entry point (and, for the text encoder, `forward(prompts)`, which tokenizes and
    then calls the entry) run the sim. `reference` is the float module, shared with the input
    pipeline and never changed: parameters, device and structure (summaries, costing) read it, and
    shape-only runs (fake or meta tensors: the verifier and the cost model) call it, because
    AIMET's quantized tensors do not run under FakeTensorMode. Other attributes (`config`,
    `transformer_blocks`, `tokenize`, ...) come from the quantized copy. The sim is not a child
    module: `.to()` does not move it (the pass builds it on the context's device).
    `quantizer_state` holds every encoding (weights included) as flat tensors, taken before the
    weights were folded into their quantized values (`flat_tensors`).
    """

    def __init__(self, reference: nn.Module, sim: Any, entry: str, precision: str, config_file: str,
                 quantizer_state: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.reference = reference
        self.__dict__["sim"] = sim
        self.__dict__["quantizer_state"] = dict(quantizer_state or {})
        self.entry = entry
        self.precision = precision
        self.config_file = config_file

    @property
    def cost_reference(self) -> nn.Module:
        """What ndopt.ir.cost runs for shapes and FLOPs: the float module (the same calls, the same
        shapes; AIMET's quantize-dequantize ops are not the model's arithmetic)."""
        return self.reference

    @property
    def quantized(self) -> nn.Module:
        """The quantized copy of the float module (what the sim runs)."""
        return self.sim.model.inner

    def run_entry(self, *args: Any, **kwargs: Any) -> Any:
        if _shape_only(args, kwargs):
            ref = self.reference
            return ref(*args, **kwargs) if self.entry == "forward" else getattr(ref, self.entry)(*args, **kwargs)
        return self.sim.model(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.entry == "forward":
            return self.run_entry(*args, **kwargs)
        if _shape_only(args, kwargs):
            return self.reference(*args, **kwargs)
        return type(self.reference).forward(self, *args, **kwargs)  # its own logic around the entry

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if name == self.__dict__.get("entry"):
            return self.run_entry
        sim = self.__dict__.get("sim")
        if sim is None:
            raise AttributeError(name)
        return getattr(sim.model.inner, name)

    def export_onnx(self, inputs: Mapping[str, Any], path: Path, output_names: list[str]) -> list[str]:
        """QDQ ONNX (opset 21) of the sim at the static shapes of `inputs`; returns the input names."""
        import aimet_torch.onnx

        flat = FlatCall(self.sim.model, inputs)
        with aq.quiet_aimet(), torch.no_grad():
            aimet_torch.onnx.export(flat, flat.args, str(path), input_names=flat.input_names,
                                    output_names=output_names, opset_version=21, dynamo=False)
        self.sim.model.eval()
        return flat.input_names


class FlatCall(nn.Module):
    """A sim at one call signature with flat tensor inputs (lists such as the DiT's clips are split
    into `sample_0`, `sample_1`, ...): what ONNX export traces."""

    def __init__(self, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.layout = [(k, len(v) if isinstance(v, (list, tuple)) else None) for k, v in inputs.items()]
        self.args: tuple[torch.Tensor, ...] = tuple(t for v in inputs.values() for t in (v if isinstance(v, (list, tuple)) else [v]))
        self.input_names = [f"{k}_{i}" if n is not None else k for k, n in self.layout for i in range(n or 1)]
        self.eval()  # torch.onnx.export restores the root's mode recursively: a training root would flip the sim

    def forward(self, *flat: torch.Tensor) -> Any:
        kwargs, i = {}, 0
        for k, n in self.layout:
            if n is None:
                kwargs[k], i = flat[i], i + 1
            else:
                kwargs[k], i = list(flat[i:i + n]), i + n
        return self.model(**kwargs)


# ---- calibration records ----------------------------------------------------------------------
def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    return x


def record_calls(pipeline: Pipeline, names: list[str], prompts: list[str],
                 generator: torch.Generator) -> dict[str, list[dict[str, Any]]]:
    """Sample and decode `prompts` with the float pipeline; every call of the named components'
    entry points, as keyword inputs (forward hooks; an instance-level wrapper for entries other
    than forward, removed afterwards)."""
    records: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    undo: list[Callable[[], None]] = []
    for name in names:
        comp = pipeline[name]
        mod = comp.module
        fn = mod.forward if comp.entry == "forward" else getattr(mod, comp.entry)
        sig = inspect.signature(fn)

        def store(args: tuple, kwargs: dict, name: str = name, sig: inspect.Signature = sig) -> None:
            bound = sig.bind(*args, **kwargs)
            records[name].append({k: _detach(v) for k, v in bound.arguments.items()})

        if comp.entry == "forward":
            h = mod.register_forward_pre_hook(lambda m, a, k, store=store: store(a, k), with_kwargs=True)
            undo.append(h.remove)
        else:
            def wrapped(*a: Any, _fn: Callable = fn, _store: Callable = store, **k: Any) -> Any:
                _store(a, k)
                return _fn(*a, **k)

            setattr(mod, comp.entry, wrapped)
            undo.append(lambda mod=mod, entry=comp.entry: delattr(mod, entry))
    try:
        with torch.no_grad():
            latents = pipeline.sampler.sample(pipeline, list(prompts), generator=generator)
            pipeline.sampler.decode(pipeline, latents)
    finally:
        for u in undo:
            u()
    return records


def _shapes(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_shapes(x) for x in v)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else v


def same_shape_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The largest group of calls with identical input shapes (the last such group on a tie)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple((k, _shapes(v)) for k, v in r.items()), []).append(r)
    return max(reversed(list(groups.values())), key=len)


def signature_key(plan: list, component: str, record: Mapping[str, Any], index: int) -> str:
    """The call-plan key (`unit0/stage1`, `prompt`, `video`) whose shapes a recorded call has."""
    def shapes(v: Any) -> Any:
        return tuple(tuple(t.shape) for t in v) if isinstance(v, (list, tuple)) else tuple(getattr(v, "shape", ()))

    got = {k: shapes(v) for k, v in record.items()}
    for sig in plan:
        if sig.component != component:
            continue
        want = {k: (tuple(tuple(s.shape) for s in spec) if isinstance(spec, tuple) else tuple(spec.shape))
                for k, spec in sig.args}
        if all(got.get(k) == v for k, v in want.items()):
            return sig.key
    return f"call{index}"

def flat_tensors(state: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """A quantizer state dict as safetensors wants it: nested `_extra_state` dicts become dotted keys."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, Mapping):
            out.update(flat_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v.detach().cpu().contiguous().clone()
    return out


def onnx_matches_sim(qc: QuantizedComponent, inputs: Mapping[str, Any], path: Path) -> dict[str, float]:
    """Run the exported QDQ graph in onnxruntime on `inputs`; its largest error vs the sim, absolute
    and relative to the sim output's range (float accumulation order flips a few roundings of
    intermediate 16-bit quantizers: a few output steps)."""
    import onnxruntime as ort

    flat = FlatCall(qc.sim.model, inputs)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the QDQ pairs as exported
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {i.name: a.cpu().numpy() for i, a in zip(sess.get_inputs(), flat.args)}
    got = [torch.from_numpy(o) for o in sess.run(None, feed)]
    with torch.no_grad():
        want = flat(*flat.args)
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    err = max(float((g - w.float()).abs().max()) for g, w in zip(got, want))
    rng = max(float(w.max() - w.min()) for w in want) or 1.0
    return {"onnx_max_abs_err": err, "onnx_rel_err": err / rng}


# ---- census -----------------------------------------------------------------------------------
def quantized_op_counts(model: nn.Module) -> dict[str, int]:
    c = collections.Counter(type(m).__name__.removeprefix("Quantized") for _, m in aq.quantized_modules(model))
    return dict(sorted(c.items()))


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", str(func)).strip("_")
    if name.startswith(("r", "i")) and name[1:] in ARITHMETIC | MATMUL_LIKE:  # __rmul__, __iadd__
        name = name[1:]
    return {"truediv": "div", "true_divide": "div"}.get(name, name)


class _Census(TorchFunctionMode):
    """Counts float compute ops run outside every enabled quantized module, by the module running them."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # nesting of enabled quantized modules
        self.where: list[str] = [""]  # the module stack
        self.ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.depth == 0:
            name = _op_name(func)
            if name in MATMUL_LIKE | ARITHMETIC and any(
                    isinstance(t, torch.Tensor) and t.is_floating_point() for t in tree_leaves((args, kwargs))):
                self.ops[self.where[-1]][name] += 1
        return func(*args, **(kwargs or {}))


def unquantized_ops(model: nn.Module, run: Callable[[nn.Module], Any],
                    rename: Callable[[str], str] = lambda n: n) -> dict[str, Any]:
    """Float compute ops executed outside every enabled quantized module during `run(model)`:
    matmul-like ops and softmax, other arithmetic, and where each ran (module path)."""
    census = _Census()
    quantized = {id(m) for _, m in aq.quantized_modules(model)}
    handles = []

    def enter(name: str, q: bool) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            census.depth += q
            census.where.append(name)
        return hook

    def leave(q: bool) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            census.depth -= q
            census.where.pop()
        return hook

    for name, m in model.named_modules():
        q = id(m) in quantized
        handles += [m.register_forward_pre_hook(enter(rename(name), q)), m.register_forward_hook(leave(q))]
    try:
        with torch.no_grad(), census:
            run(model)
    finally:
        for h in handles:
            h.remove()
    total: dict[str, collections.Counter] = {"matmul_softmax": collections.Counter(), "elementwise": collections.Counter()}
    for ops in census.ops.values():
        for op, n in ops.items():
            total["matmul_softmax" if op in MATMUL_LIKE else "elementwise"][op] += n
    return {**{k: dict(sorted(v.items())) for k, v in total.items()},
            "by_module": {m or "<root>": dict(sorted(ops.items())) for m, ops in sorted(census.ops.items())}}


# ---- weight bytes (plan mode and metrics) ------------------------------------------------------
QUANTIZABLE_WEIGHTS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                       nn.ConvTranspose3d, nn.Embedding)
BLOCKWISE_WEIGHTS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def lpbq_eligible(m: nn.Module, block_size: int) -> bool:
    """LPBQ splits the input dimension (in_features / in_channels) into blocks of `block_size`."""
    return isinstance(m, BLOCKWISE_WEIGHTS) and int(m.weight.shape[1]) % block_size == 0


def match_override(name: str, patterns: Iterable[tuple[str, Any]]) -> Any:
    """The value of the last pattern matching `name` (fnmatch), or None."""
    found = None
    for pattern, value in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            found = value
    return found


def weight_bytes(module: nn.Module, prefix: str, weight_bits: int, *, block_size: int | None = None,
                 overrides: Iterable[tuple[str, int]] = ()) -> int:
    """Bytes of a module's parameters on the NPU at a precision (meta modules too).

    Weights of quantizable layers at `weight_bits` (4 only where LPBQ applies; LPBQ adds a float
    scale per output channel and a 4-bit scale per block), other parameters (norm weights) at 8
    bits as AIMET quantizes them, biases as int32 (QNN's bias type). `overrides` are (pattern on
    `prefix.module path`, weight bits)."""
    overrides = list(overrides)
    total = 0.0
    for mname, m in module.named_modules():
        full = f"{prefix}.{mname}" if mname else prefix
        for pname, p in m.named_parameters(recurse=False):
            n = p.numel()
            if pname == "bias":
                total += 4 * n
                continue
            quantizable = isinstance(m, QUANTIZABLE_WEIGHTS) and pname == "weight"
            bits = match_override(full, overrides) or (weight_bits if quantizable else 8)
            if bits == 4 and block_size and not lpbq_eligible(m, block_size):
                bits = 8  # the pass keeps layers LPBQ cannot block at 8 bits
            total += n * bits / 8
            if bits == 4 and block_size:
                total += 4 * int(p.shape[0]) + 0.5 * n / block_size
    return math.ceil(total)
