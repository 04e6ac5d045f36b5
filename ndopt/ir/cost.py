"""Cost analysis without weights: params, FLOPs and bytes per call signature, and per video.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` while each component runs for shapes
only (fake tensors over meta or real parameters; small real-weight components by a real call,
which is cheaper), so the real 2B pipeline is costed on a laptop.
Bytes written by every op are counted too (the activation traffic a roofline needs). A wrapper
that exposes `cost_reference` (the AIMET sim: its float module) is costed as that module.
Meta components' results are also kept on disk (ndopt.cache), keyed by structure and code.

Speed: a 2B DiT has 24 identical blocks and Pyramid-Flow calls it at dozens of distinct shapes.
Members of a repeated `nn.ModuleList` are memoized by (structure, input shapes): the first call
of a structurally equal block at a shape runs and records its FLOPs, bytes and output shapes;
later ones add the recorded figures and return fresh fake outputs of the recorded shapes. The
totals equal an unmemoized run (a test checks it); the plan of the real model takes seconds.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from ndopt import cache as disk_cache
from ndopt import threads
from ndopt.ir.component import Component
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.spec import CallSignature

# A small component with real weights on the CPU is costed by a real call: about 5x cheaper than a
# fake-tensor one, with the same FLOPs, bytes and shapes (tests/ir/test_cost.py checks it).
REAL_RUN_MAX_PARAMS = 50_000_000
REAL_RUN_MAX_INPUT_BYTES = 16 * 2**20  # and small inputs: a real call allocates its activations


def real_run_ok(component: Component) -> bool:
    """Whether a real call costs `component` exactly and cheaply: small, on the CPU, and free of
    libraries whose code branches on tensor values (transformers' mask helpers take another path
    on real tensors than on fake ones, and AIMET's quantizers compute their encodings)."""
    if component.device.type != "cpu" or component.params() > REAL_RUN_MAX_PARAMS:
        return False
    return not any(type(m).__module__.startswith(("transformers.", "aimet")) for m in component.module.modules())


@contextlib.contextmanager
def shape_mode(component: Component, fake: bool = True) -> Iterator[torch.device]:
    """Run a component for shapes only.

    With `fake` False, meta components run on bare meta tensors (fastest: C++ meta kernels) and
    real ones for real, leaving torch's RNG as it was (`real_run_ok` says when that is right);
    otherwise under a FakeTensorMode over the parameters (real or meta). Fake tensors are also what
    libraries that branch on tensor values (transformers' mask helpers) recognise as tracing."""
    if not fake and component.device.type == "meta":
        with torch.no_grad():
            yield component.device
        return
    if not fake:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            yield component.device
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        yield component.device


class _BytesWritten(TorchDispatchMode):
    """Sums the bytes of every op's tensor outputs (activation traffic) and the largest one."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                self.total += n
                self.largest = max(self.largest, n)
        return out


@dataclass(frozen=True)
class SignatureCost:
    component: str
    key: str
    count: int
    flops: int
    activation_bytes: int
    largest_activation_bytes: int
    input_bytes: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComponentCost:
    name: str
    role: str
    params: int
    weight_bytes: int
    calls_per_video: int
    flops_per_video: int


@dataclass(frozen=True)
class PipelineCost:
    components: tuple[ComponentCost, ...]
    signatures: tuple[SignatureCost, ...]

    @property
    def params(self) -> int:
        return sum(c.params for c in self.components)

    @property
    def flops_per_video(self) -> int:
        return sum(c.flops_per_video for c in self.components)

    def calls_per_video(self, role: str | None = None) -> int:
        return sum(c.calls_per_video for c in self.components if role is None or c.role == role)

    def to_json(self) -> dict[str, Any]:
        return {
            "params_total": self.params,
            "params": {c.name: c.params for c in self.components},
            "weight_bytes": {c.name: c.weight_bytes for c in self.components},
            "calls_per_video": {c.name: c.calls_per_video for c in self.components},
            "flops_per_video": self.flops_per_video,
            "flops_per_video_by_component": {c.name: c.flops_per_video for c in self.components},
            "flops_per_call_signature": [asdict(s) for s in self.signatures],
        }


@dataclass(frozen=True)
class ShapeRun:
    """What one shape-only call produced: FLOPs, bytes, and the outputs' shapes and dtypes."""

    flops: int
    activation_bytes: int
    largest_activation_bytes: int
    outputs: tuple[tuple[tuple[int, ...], torch.dtype], ...]


def _structure_key(m: nn.Module) -> tuple:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters())
    subs = tuple((n, type(s).__name__) for n, s in m.named_modules())
    flags = tuple(sorted((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str))))
    return type(m).__qualname__, params, subs, flags


def _arg_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(_arg_key(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _arg_key(v)) for k, v in x.items()))
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return ("obj", type(x).__qualname__, repr(x))


class _BlockMemo:
    """Memoizes repeated ModuleList members during one shape run (see the module docstring)."""

    def __init__(self, counter: FlopCounterMode, written: _BytesWritten) -> None:
        self.counter, self.written = counter, written
        self.memo: dict[Any, tuple[int, int, int, Any, list]] = {}

    @contextlib.contextmanager
    def patched(self, root: nn.Module) -> Iterator[None]:
        patched: list[nn.Module] = []
        for mod in root.modules():
            if isinstance(mod, nn.ModuleList) and len(mod) > 1:
                for block in mod:
                    # opt-outs: empty slots, blocks with state across calls (`ndopt_memoize = False`),
                    # blocks whose forward is already patched on the instance
                    if (not isinstance(block, nn.Module) or not getattr(block, "ndopt_memoize", True)
                            or "forward" in vars(block)):
                        continue
                    block.forward = self._wrap(block, _structure_key(block))
                    patched.append(block)
        try:
            yield
        finally:
            for block in patched:
                del block.forward

    def _wrap(self, block: nn.Module, skey: tuple) -> Any:
        original = type(block).forward.__get__(block)

        def forward(*args: Any, **kwargs: Any) -> Any:
            key = (skey, _arg_key(args), _arg_key(kwargs))
            hit = self.memo.get(key)
            if hit is not None:
                flops, nbytes, largest, spec, leaves = hit
                before = self.written.total
                outs = [torch.empty(s, dtype=d, device=dev) if kind == "T" else v for kind, s, d, dev, v in leaves]
                self.written.total = before  # the stand-in outputs are not the model's traffic
                self._add(flops, nbytes, largest)
                return tree_unflatten(outs, spec)
            f0, b0 = self.counter.get_total_flops(), self.written.total
            out = original(*args, **kwargs)
            flat, spec = tree_flatten(out)
            leaves = [("T", tuple(t.shape), t.dtype, t.device, None) if isinstance(t, torch.Tensor)
                      else ("V", None, None, None, t) for t in flat]
            self.memo[key] = (self.counter.get_total_flops() - f0, self.written.total - b0,
                              self.written.largest, spec, leaves)
            return out

        return forward

    def _add(self, flops: int, nbytes: int, largest: int) -> None:
        # FlopCounterMode keeps per-module, per-op counts; get_total_flops sums "Global"
        self.counter.flop_counts["Global"][_MEMO_OP] += flops
        self.written.total += nbytes
        self.written.largest = max(self.written.largest, largest)


_MEMO_OP = torch.ops.aten.mm.default  # memoized FLOPs are filed under mm (they are matmul FLOPs, mostly)


def _forget(costs: weakref.ref, ident: int) -> None:
    """A module `CostModel._watch` watched is gone: its entries go with it (if the CostModel still lives)."""
    model = costs()
    if model is None:
        return
    model._watched.discard(ident)
    model._needs_fake.discard(ident)
    model._structure.pop(ident, None)
    for key in [k for k in model._cache if k[0] == ident]:
        del model._cache[key]


class CostModel:
    """Runs components at call signatures for shapes, counting FLOPs and bytes; caches results.

    The cache is keyed by module identity and signature, so costing a pipeline after a pass
    recomputes only the components the pass changed."""

    def __init__(self, memoize_blocks: bool = True, disk: bool = True) -> None:
        self.memoize_blocks = memoize_blocks
        self.disk = disk  # False: every signature really runs (a recording mode around it must see the ops)
        self._cache: dict[tuple[int, Any], ShapeRun] = {}
        self._needs_fake: set[int] = set()
        self._structure: dict[int, str] = {}  # module id -> structure digest (the on-disk shape cache's key)
        self._watched: set[int] = set()  # ids of the modules whose entries _forget drops when they die

    def run(self, component: Component, sig: CallSignature) -> ShapeRun:
        ref = getattr(component.module, "cost_reference", None)  # a wrapper costed as the module it wraps
        if isinstance(ref, nn.Module):
            component = component.with_module(ref)
        key = (id(component.module), component.entry, sig.args, tuple(sorted(map(str, sig.static_dict.items()))))
        disk_key = None
        if key not in self._cache and component.device.type == "meta" and self.disk and disk_cache.enabled():
            disk_key = _disk_key(component, key[1:], self.memoize_blocks, self._structure)
            hit = _from_json(disk_cache.load_json("shapes", disk_key))
            if hit is not None:
                self._cache[key] = hit
                self._watch(component.module)
        if key not in self._cache:
            cheap = component.device.type == "meta" or (real_run_ok(component)
                                                         and sig.input_bytes() <= REAL_RUN_MAX_INPUT_BYTES)
            if cheap and id(component.module) not in self._needs_fake:
                try:
                    self._cache[key] = self._run(component, sig, fake=False)
                except RuntimeError:  # e.g. a library calls .item(): fake tensors take its static path
                    self._needs_fake.add(id(component.module))
            if key not in self._cache:
                self._cache[key] = self._run(component, sig, fake=True)
            self._watch(component.module)
            if disk_key is not None:
                disk_cache.store_json("shapes", disk_key, _to_json(self._cache[key]))
        return self._cache[key]

    def _watch(self, module: nn.Module) -> None:
        """Drop a module's entries when it is collected, so a new module reusing its id is not answered
        from them. The cache must not keep modules alive: a run costs the pipeline after every pass, and
        every component a pass replaced (the teacher DiT, T5-XXL) would stay in memory to the end."""
        if id(module) not in self._watched:
            self._watched.add(id(module))
            weakref.finalize(module, _forget, weakref.ref(self), id(module))

    def _run(self, component: Component, sig: CallSignature, fake: bool) -> ShapeRun:
        sized = contextlib.nullcontext() if fake or component.device.type == "meta" else threads.for_module(component.module)
        with sized, shape_mode(component, fake) as device:
            inputs = sig.make_inputs(device=device)
            counter = FlopCounterMode(display=False)
            written = _BytesWritten()
            memo = _BlockMemo(counter, written)
            patch = memo.patched(component.module) if self.memoize_blocks else contextlib.nullcontext()
            # the math SDPA backend decomposes attention into matmuls + softmax on every device, so
            # attention FLOPs are counted the same on meta, CPU and CUDA (fused kernels vary in
            # whether the flop counter knows them)
            with sdpa_kernel(SDPBackend.MATH), counter, written, patch:
                out = component.call(**inputs)
        outs = out if isinstance(out, tuple) else (out,)
        return ShapeRun(int(counter.get_total_flops()), int(written.total), int(written.largest),
                        tuple((tuple(t.shape), t.dtype) for t in outs))

    def signature_cost(self, component: Component, sig: CallSignature) -> SignatureCost:
        r = self.run(component, sig)
        return SignatureCost(sig.component, sig.key, sig.count, r.flops, r.activation_bytes,
                             r.largest_activation_bytes, sig.input_bytes(), sig.info_dict)

    def pipeline_cost(self, pipeline: Pipeline) -> PipelineCost:
        plan = pipeline.call_plan()
        sigs = tuple(self.signature_cost(pipeline[s.component], s) for s in plan)
        comps = []
        for name in pipeline.topo_order():
            c = pipeline[name]
            mine = [s for s in sigs if s.component == name]
            comps.append(ComponentCost(name, c.role, c.params(), c.weight_bytes(),
                                       sum(s.count for s in mine), sum(s.flops * s.count for s in mine)))
        return PipelineCost(tuple(comps), sigs)


def _disk_key(component: Component, call: tuple, memoize: bool, structure: dict[int, str]) -> str:
    """A meta component's shape run depends only on the module's structure (types, plain attributes,
    tensor shapes and dtypes: no values exist on meta), the call and the code (disk_cache.code_version).
    `structure` memoizes the module's part by module identity (the caller forgets a module that dies)."""
    import hashlib

    sid = structure.get(id(component.module))
    if sid is None:
        sid = structure[id(component.module)] = _structure_digest(component.module)
    ident = repr((disk_cache.code_version(), component.role, sid, call, memoize))
    return hashlib.sha256(ident.encode()).hexdigest()[:40]


def _structure_digest(m: nn.Module) -> str:
    import hashlib

    mods = tuple((n, type(x).__module__, type(x).__qualname__,
                  tuple(sorted((k, v if not callable(v) else getattr(v, "__qualname__", repr(v)))
                               for k, v in vars(x).items()
                               if (callable(v) or isinstance(v, (bool, int, float, str, type(None))))
                               and not k.startswith("_"))))
                 for n, x in m.named_modules(remove_duplicate=False))
    tensors = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in [*m.named_parameters(), *m.named_buffers()])
    return hashlib.sha256(repr((mods, tensors)).encode()).hexdigest()


def _to_json(r: ShapeRun) -> dict[str, Any]:
    return {"flops": r.flops, "activation_bytes": r.activation_bytes,
            "largest_activation_bytes": r.largest_activation_bytes,
            "outputs": [[list(shape), str(dtype).removeprefix("torch.")] for shape, dtype in r.outputs]}


def _from_json(d: Any) -> ShapeRun | None:
    try:
        outs = tuple((tuple(int(x) for x in shape), getattr(torch, dtype)) for shape, dtype in d["outputs"])
        if not all(isinstance(dt, torch.dtype) for _, dt in outs):
            return None
        return ShapeRun(int(d["flops"]), int(d["activation_bytes"]), int(d["largest_activation_bytes"]), outs)
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def pipeline_cost(pipeline: Pipeline) -> PipelineCost:
    return CostModel().pipeline_cost(pipeline)
