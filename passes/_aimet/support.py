"""AIMET plumbing for `aimet_quantization`: module trees whose every compute op AIMET can quantize.

AIMET 2.x quantizes *modules*: every module it knows becomes a quantized module with input, output
and parameter quantizers, while functional calls inside a forward (`torch.matmul`, `softmax`, the
residual adds and adaLN modulations) get none. `make_quantizable` rewrites a component's module
tree so that its compute ops are modules:

- a subtree that torch.fx traces is traced with `QuantTracer` (unlike `trace_dit`, transformer
  blocks are not leaves: their insides are what needs quantizers) and its functional ops become
  AIMET's elementwise modules (`aimet_torch.model_preparer`'s conversion, which we drive node by
  node); the traced subtree must reproduce the float module on a recorded input before it
  replaces it;
- a subtree that does not trace (Python control flow on shapes, layouts or lists: the DiT's top
  level, the patch embedding) is descended into, and its own functional ops stay float (the op
  census reports them);
- a custom leaf module AIMET does not know (RMSNorm, CausalGroupNorm, HF's T5LayerNorm, the
  sinusoidal timestep features) gets a one-op definition with input, parameter and output
  quantizers, as AIMET's own `RmsNorm`.

Also here: `quiet_aimet` (AIMET logs every traced op: its records and warnings go to a log file,
the console gets one line) and `frozen_weight_encodings` (a faster
route to the same weight encodings). Traced subtrees keep shapes symbolic, so one sim serves every call signature of a component (the
DiT's layouts differ per pyramid stage and temporal history) and calibration covers all of them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

AIMET_LOGGER = "ndopt.aimet"  # what AIMET logs and warns inside `quiet_aimet` goes here ...
AIMET_LOG = "aimet.log"  # ... and is kept in this file: in the pass's directory, or the bundle
logging.getLogger(AIMET_LOGGER).propagate = False  # never the console: only the handlers a caller attaches,
logging.getLogger(AIMET_LOGGER).addHandler(logging.NullHandler())  # and not logging's last-resort stderr

QUANTIZER_LISTS = ("input_quantizers", "output_quantizers")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # AIMET colours its deprecation warnings
_depth = 0  # nested quiet_aimet blocks: the outermost reroutes AIMET, the inner ones join it


class AimetTally(logging.Handler):
    """Counts the warnings (and worse) reaching the `ndopt.aimet` logger, by message."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages[(_ANSI.sub("", record.getMessage()).splitlines() or [""])[0][:100]] += 1

    def summary(self, path: Path | str) -> str:
        top, n = self.messages.most_common(1)[0]
        top = top if len(top) <= 60 else top[:57] + "..."
        return f"AIMET: {self.messages.total()} warnings written to {path} (most often, {n}x: {top})"


@contextlib.contextmanager
def aimet_log_file(path: Path | str) -> Iterator[AimetTally]:
    """Keep what reaches the `ndopt.aimet` logger in `path` (appended, created on the first record);
    then one `ndopt` line: how many warnings, where, and the most frequent."""
    lg = logging.getLogger(AIMET_LOGGER)
    file = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    tally = AimetTally()
    lg.addHandler(file)
    lg.addHandler(tally)
    try:
        yield tally
    finally:
        lg.removeHandler(file)
        lg.removeHandler(tally)
        file.close()
        if tally.messages:
            logging.getLogger("ndopt").info("%s", tally.summary(path))


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    logging.getLogger(AIMET_LOGGER).warning("%s: %s (%s:%d)", category.__name__, _ANSI.sub("", str(message)),
                                            filename, lineno)


class _Forward(logging.Handler):
    """Hands an AIMET log area's records to the `ndopt.aimet` logger."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(AIMET_LOGGER).handle(record)


@contextlib.contextmanager
def quiet_aimet(log_file: Path | str | None = None) -> Iterator[None]:
    """AIMET off the console while a sim is built, calibrated or exported.

    The records of every AIMET log area and the Python warnings raised inside the block (AIMET's
    deprecations, the tracer's warnings on its utilities, torch.onnx's) go to the `ndopt.aimet`
    logger. With `log_file` (`<pass dir>/aimet.log`) they are kept there and one line says how many
    (`aimet_log_file`); without, an enclosing block's file or the handlers a caller put on
    `ndopt.aimet` (the quantized lowering's) keep them; with neither, they are dropped."""
    global _depth
    # importing AIMET's quantsim (re)configures its loggers (levels, console handlers): import it
    # first, so the routing set here is the one in force while the sims are built
    import aimet_torch.quantsim  # noqa: F401
    from aimet_torch.common.utils import AimetLogger

    with contextlib.ExitStack() as stack:
        if log_file is not None:
            stack.enter_context(aimet_log_file(log_file))
        saved = []
        if _depth == 0:
            forward = _Forward()
            for area in AimetLogger.LogAreas:
                lg = logging.getLogger(area.value)
                saved.append((lg, lg.level, lg.handlers[:], lg.propagate))
                lg.handlers, lg.propagate = [forward], False
                lg.setLevel(logging.INFO)
        _depth += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")  # each one kept and counted, none on the console
                warnings.showwarning = _show_warning
                yield
        finally:
            _depth -= 1
            for lg, level, handlers, propagate in saved:
                lg.handlers, lg.propagate = handlers, propagate
                lg.setLevel(level)


def _aimet() -> Any:
    import aimet_torch.nn as aimet_nn

    return aimet_nn


def has_quantized_definition(cls: type) -> bool:
    q = _aimet().QuantizationMixin
    return cls in q.cls_to_qcls or cls in getattr(q, "_ignored_module_types", ())


def define_unary(cls: type[nn.Module]) -> None:
    """Register a one-op quantized definition for `cls`: first input, parameters and output quantized.

    AIMET's way for custom modules (`QuantizationMixin.implements`), as its own `QuantizedRmsNorm`."""
    aimet_nn = _aimet()
    if has_quantized_definition(cls):
        return

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args and self.input_quantizers[0] is not None and torch.is_floating_point(args[0]):
            args = (self.input_quantizers[0](args[0]), *args[1:])
        with self._patch_quantized_parameters():
            out = super(qcls, self).forward(*args, **kwargs)
        if self.output_quantizers[0] is not None:
            out = self.output_quantizers[0](out)
        return out

    qcls = type(f"Quantized{cls.__name__}", (aimet_nn.QuantizationMixin, cls),
                {"__quant_init__": aimet_nn.QuantizationMixin.__unary__, "forward": forward, "__module__": __name__,
                 "__qualname__": f"Quantized{cls.__name__}"})
    aimet_nn.QuantizationMixin.implements(cls)(qcls)


# ---- tracing ------------------------------------------------------------------------------------
class _StaticDtypeProxy(fx.Proxy):
    """A proxy whose `dtype` is the traced subtree's float dtype, not another proxy.

    `torch.finfo(scores.dtype)` and `if w.dtype in (float16, bfloat16)` need a concrete dtype to
    trace; every floating activation of one of our subtrees has its parameters' dtype (integer
    inputs such as masks are not asked for theirs). Shapes stay symbolic."""

    @property
    def dtype(self) -> torch.dtype:
        return self.tracer.float_dtype


class QuantTracer(fx.Tracer):
    """fx tracer for quantization: custom leaves, static dtypes, and AIMET's scope bookkeeping
    (new modules for functional ops are placed inside the module the op came from)."""

    proxy_buffer_attributes = True

    def __init__(self, float_dtype: torch.dtype, is_leaf: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        from aimet_torch.model_preparer import Scope

        self.float_dtype = float_dtype
        self._is_leaf = is_leaf
        self.scope = Scope("", None)
        self.node_name_to_scope: dict[str, tuple[str, type | None]] = {}

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _StaticDtypeProxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._is_leaf(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        from aimet_torch.model_preparer import Scope, ScopeContextManager

        with ScopeContextManager(self.scope, Scope(self.path_of_module(m), type(m))):
            return super().call_module(m, forward, args, kwargs)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        self.node_name_to_scope[node.name] = (self.scope.module_path, self.scope.module_type)
        return node


def _scalar_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that compute Python numbers from shapes (`q.shape[-1] ** -0.5`): not tensor ops."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        shape_read = ((n.op == "call_function" and n.target is getattr and n.args[1] in ("shape", "ndim", "dtype", "device"))
                      or (n.op == "call_method" and n.target in ("size", "dim")))
        from_shapes = (n.op in ("call_function", "call_method") and bool(n.all_input_nodes)
                       and all(a in out for a in n.all_input_nodes))
        if shape_read or from_shapes:
            out.add(n)
    return out


def _unshare(gm: fx.GraphModule, scope: Mapping[str, Any]) -> int:
    """A parameter-free module called twice (one SiLU object for two activations) would share one
    output encoding between two different tensors: give each later call its own copy (AIMET's
    preparer does the same). Modules with parameters stay shared: their weights are one tensor."""
    from aimet_torch import model_preparer as mp

    seen: set[str] = set()
    copies = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        if node.target in seen and not any(True for _ in gm.get_submodule(node.target).parameters()):
            module = mp._create_module_for_reused_node(node, gm)
            parent, name, qualname = mp._get_info_for_reused_node(gm, node, scope)
            parent.add_module(name, module)
            mp._insert_node_for_new_module(gm, node, qualname)
            copies += 1
        seen.add(node.target)
    gm.graph.lint()
    gm.recompile()
    return copies


def _modularize(gm: fx.GraphModule, scope: Mapping[str, Any], mask_fill: float | None) -> int:
    """Functional tensor ops -> AIMET modules, in place (aimet_torch.model_preparer's conversion,
    minus shape arithmetic, which it would wrap too). Returns how many ops became modules."""
    from aimet_torch import model_preparer as mp

    scalars = _scalar_nodes(gm.graph)
    converted = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node in scalars:
            continue
        if mask_fill is not None and node.target in ("masked_fill", torch.masked_fill) and len(node.args) == 3 \
                and isinstance(node.args[2], float) and node.args[2] <= -1e4:
            # A fill of finfo.min would stretch the 16-bit encoding of the scores to 1e38 and
            # zero every real score; a finite fill below every reachable score gives the same
            # softmax (see AimetQuantization: attention_mask_fill).
            node.args = (node.args[0], node.args[1], float(mask_fill))
        functional = mp._find_functional_name_for_node(node.name)
        if functional is None:
            continue
        module = mp._create_module_for_functional_node(node, functional)
        parent, name, qualname = mp._get_info_for_functional_node(gm, node, scope)
        parent.add_module(name, module)
        mp._insert_node_for_new_module(gm, node, qualname, functional)
        converted += 1
    gm.graph.lint()
    gm.recompile()
    return converted


@dataclass
class PrepareReport:
    """What `make_quantizable` did to a module tree."""

    traced: list[str] = field(default_factory=list)  # subtrees replaced by traced, modularized graphs
    functional_ops: int = 0  # functional ops that became AIMET modules
    untraceable: dict[str, str] = field(default_factory=dict)  # subtree -> why it stayed eager
    custom_leaves: list[str] = field(default_factory=list)  # classes given a one-op definition
    float_leaves: list[str] = field(default_factory=list)  # classes AIMET is told to leave in float

    def to_json(self) -> dict[str, Any]:
        return {"traced_subtrees": len(self.traced), "functional_ops_to_modules": self.functional_ops,
                "eager_subtrees": dict(sorted(self.untraceable.items())), "custom_leaf_definitions": self.custom_leaves,
                "float_leaves": self.float_leaves}


def _record_examples(root: nn.Module, run: Callable[[nn.Module], Any]) -> dict[str, tuple[tuple, dict, Any]]:
    """The first (args, kwargs, output) of every submodule during `run(root)`."""
    examples: dict[str, tuple[tuple, dict, Any]] = {}
    handles = []
    for name, m in root.named_modules():
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any, name: str = name) -> None:
            examples.setdefault(name, (args, kwargs, out))
        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run(root)
    finally:
        for h in handles:
            h.remove()
    return examples


def _same(a: Any, b: Any) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return False
            if x.is_floating_point():
                scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
                if float((x - y).abs().max()) > 1e-4 * scale:
                    return False
            elif not torch.equal(x, y):
                return False
    return True


def _is_custom_leaf(m: nn.Module) -> bool:
    return (not type(m).__module__.startswith("torch.") and not any(True for _ in m.children())
            and type(m).forward is not nn.Module.forward)


def make_quantizable(root: nn.Module, run: Callable[[nn.Module], Any], *, eager: tuple[type, ...] = (),
                     mask_fill: float | None = None) -> PrepareReport:
    """Rewrite `root` in place so that AIMET gives its compute ops quantizers (module docstring).

    `run(module)` runs the module once on a representative input (to check traced subtrees);
    `eager` are classes never traced (modules with mutable Python state, e.g. streaming convs)."""
    report = PrepareReport()
    examples = _record_examples(root, run)
    dtype = next((p.dtype for p in root.parameters() if p.is_floating_point()), torch.float32)
    for name, m in root.named_modules():
        if not _is_custom_leaf(m) or has_quantized_definition(type(m)):
            continue
        if name in examples and not isinstance(examples[name][2], torch.Tensor):
            _aimet().QuantizationMixin.ignore(type(m))  # not one tensor out: no one-op definition fits
            report.float_leaves.append(type(m).__qualname__)
        else:
            define_unary(type(m))
            report.custom_leaves.append(type(m).__qualname__)

    def is_leaf(m: nn.Module) -> bool:
        return has_quantized_definition(type(m)) or isinstance(m, eager)

    def visit(parent: nn.Module | None, attr: str, m: nn.Module, name: str) -> None:
        traceable = (name in examples and not is_leaf(m) and not isinstance(m, (nn.ModuleList, nn.ModuleDict))
                     and type(m).forward is not nn.Module.forward)
        if traceable and parent is not None:
            why = _try_trace(parent, attr, m, name, examples[name], dtype, is_leaf, mask_fill, report)
            if why is None:
                return
            report.untraceable[name or "<root>"] = why
        elif traceable:
            report.untraceable["<root>"] = "the component root stays eager (its sim wrapper calls it)"
        for child_attr, child in list(m.named_children()):
            visit(m, child_attr, child, f"{name}.{child_attr}" if name else child_attr)

    visit(None, "", root, "")
    report.custom_leaves = sorted(set(report.custom_leaves))
    report.float_leaves = sorted(set(report.float_leaves))
    return report


def _try_trace(parent: nn.Module, attr: str, m: nn.Module, name: str, example: tuple, dtype: torch.dtype,
               is_leaf: Callable[[nn.Module], bool], mask_fill: float | None, report: PrepareReport) -> str | None:
    """Trace, modularize and check one subtree; install it in `parent` and return None, or say why not."""
    tracer = QuantTracer(dtype, is_leaf)
    try:
        graph = tracer.trace(m)
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError... on untraceable Python
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    gm = fx.GraphModule(m, graph, class_name=f"{type(m).__name__}Quantizable")
    n = _unshare(gm, tracer.node_name_to_scope) + _modularize(gm, tracer.node_name_to_scope, mask_fill)
    if n == 0:
        return "no functional op to quantize"  # nothing gained: keep the original module
    args, kwargs, out = example
    try:
        with torch.no_grad():
            got = gm(*args, **kwargs)
    except Exception as e:
        return f"traced graph fails on the recorded input: {type(e).__name__}: {e}"
    if not _same(got, out):
        return "traced graph differs from the module on the recorded input"
    setattr(parent, attr, gm)
    report.traced.append(name)
    report.functional_ops += n
    return None


# ---- calibration --------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_weight_encodings(model: nn.Module) -> Iterator[int]:
    """Weight encodings by min/max now, then held fixed while activations calibrate.

    AIMET 2.42's `compute_encodings` first tries to decompose every weight as an already-quantized
    grid (`_decompose_prequantized_tensor`), a divisor sweep that costs ~0.2 s per layer on a CPU and
    always falls back to min/max for float weights. Weights do not depend on the calibration data,
    so computing their encodings once, as that fallback does, gives the same encodings."""
    frozen = []
    for _, m in quantized_modules(model):
        for pname, q in (getattr(m, "param_quantizers", None) or {}).items():
            param = getattr(m, pname, None)
            if q is None or param is None or not q.is_overwrite_allowed():
                continue
            with torch.no_grad(), q.compute_encodings():
                q(param)
            q.allow_overwrite(False)
            frozen.append(q)
    try:
        yield len(frozen)
    finally:
        for q in frozen:
            q.allow_overwrite(True)


# ---- census -------------------------------------------------------------------------------------
def _quantizers(m: nn.Module) -> list[Any]:
    qs = [q for lst in QUANTIZER_LISTS for q in getattr(m, lst, ()) or () if q is not None]
    qs += [q for q in (getattr(m, "param_quantizers", None) or {}).values() if q is not None]
    return qs


def weight_quantizer(m: nn.Module) -> Any:
    qs = getattr(m, "param_quantizers", None)
    return qs["weight"] if qs is not None and "weight" in qs else None


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of AIMET quantized modules with at least one quantizer enabled."""
    base = _aimet().BaseQuantizationMixin
    for name, m in model.named_modules():
        if isinstance(m, base) and _quantizers(m):
            yield name, m


