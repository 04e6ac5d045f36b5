"""Export every component at every distinct call signature to ONNX for the NPU.

One graph per (component, distinct call signature): signatures with identical inputs (the same
DiT layout at two frames, say) share a graph. Static shapes come from the signature; integer
inputs are int32 at the graph boundary (the graph casts them; `legality.lower_int64` then removes
every int64 tensor inside); attention is exported in its explicit matmul form when the module
offers `set_attention_impl("matmul")`. The legacy TorchScript exporter (`dynamo=False`) is used:
it needs no onnxscript and produces plain opset-17 graphs that onnxsim and the NPU converter take.
In a bundle, every graph keeps its weights in its component's shared external-data file
(`targets.shared_weights`), which also keeps each graph under protobuf's 2 GB limit; `save_model`
writes a single graph on its own (`<graph>.onnx.data` past 2 GB).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ndopt.errors import LoweringError
from ndopt.ir.component import Component
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.spec import CallSignature, TensorSpec
from ndopt.precision import weight_bytes

log = logging.getLogger("ndopt")

EXTERNAL_DATA_BYTES = 2**31 - 2**27  # protobuf's 2 GB limit on one message, with headroom


@dataclass(frozen=True)
class TensorIO:
    """A graph input or output as exported: name, static shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphPlan:
    """One graph of the bundle: a component at a call signature, and every call-plan key using it."""

    name: str
    component: str
    role: str
    signature: CallSignature
    keys: tuple[str, ...]
    calls_per_video: int

    @property
    def input_specs(self) -> list[tuple[str, TensorSpec]]:
        """Flat graph inputs: a list-valued port `sample` becomes `sample_0`, `sample_1`, ..."""
        out = []
        for name, spec in self.signature.args:
            if isinstance(spec, tuple):
                out += [(f"{name}_{i}", s) for i, s in enumerate(spec)]
            else:
                out.append((name, spec))
        return out

    @property
    def inputs(self) -> tuple[TensorIO, ...]:
        return tuple(TensorIO(n, tuple(int(d) for d in s.shape), boundary_dtype(s.dtype))
                     for n, s in self.input_specs)


def boundary_dtype(dtype: str) -> str:
    """The dtype a graph input has on the NPU: int64 ids and masks cross as int32."""
    return "int32" if dtype == "int64" else dtype


def graph_name(component: str, key: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in key)
    return f"{component}__{safe}"


def plan_graphs(pipeline: Pipeline) -> list[GraphPlan]:
    """The graphs to export, in call-plan order, deduplicated by (component, inputs, static args)."""
    first: dict[tuple[str, Any, str], int] = {}
    plans: list[GraphPlan] = []
    for sig in pipeline.call_plan():
        if sig.count == 0:
            continue
        ident = (sig.component, sig.args, repr(sorted(sig.static_dict.items(), key=lambda kv: kv[0])))
        if ident in first:
            i = first[ident]
            p = plans[i]
            plans[i] = GraphPlan(p.name, p.component, p.role, p.signature, (*p.keys, sig.key),
                                 p.calls_per_video + sig.count)
            continue
        first[ident] = len(plans)
        comp = pipeline[sig.component]
        plans.append(GraphPlan(graph_name(sig.component, sig.key), sig.component, comp.role, sig, (sig.key,),
                               sig.count))
    return plans


def example_inputs(plan: GraphPlan, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs for a graph, in the component's own dtypes (flat names).

    Floats ~ N(0, 1); masks (names containing `mask`) are ones over the first half then zeros, as a
    short padded prompt gives; other integers (token ids) uniform in [0, 8)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, spec in plan.input_specs:
        shape = tuple(int(d) for d in spec.shape)
        if spec.torch_dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=g).to(spec.torch_dtype)
        elif spec.torch_dtype == torch.bool:
            out[name] = torch.ones(shape, dtype=torch.bool)
        elif "mask" in name:
            t = torch.zeros(shape, dtype=spec.torch_dtype)
            t[..., : max(1, shape[-1] // 2)] = 1
            out[name] = t
        else:
            out[name] = torch.randint(0, 8, shape, generator=g, dtype=spec.torch_dtype)
    return out


def call_kwargs(plan: GraphPlan, flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The component entry's keyword arguments from flat graph inputs (lists regrouped, static added)."""
    kwargs: dict[str, Any] = {}
    for name, spec in plan.signature.args:
        kwargs[name] = [flat[f"{name}_{i}"] for i in range(len(spec))] if isinstance(spec, tuple) else flat[name]
    kwargs.update(plan.signature.static_dict)
    return kwargs


class _Entry(nn.Module):
    """The component's entry point as a positional forward over the flat graph inputs."""

    def __init__(self, component: Component, plan: GraphPlan) -> None:
        super().__init__()
        self.inner = component.module  # registered: its parameters become the graph's initializers
        self.component = component
        self.plan = plan
        self.dtypes = [s.torch_dtype for _, s in plan.input_specs]

    def forward(self, *flat: torch.Tensor) -> Any:
        named = {n: x.to(dt) if x.dtype != dt else x
                 for (n, _), x, dt in zip(self.plan.input_specs, flat, self.dtypes)}
        return self.component.call(**call_kwargs(self.plan, named))


@contextlib.contextmanager
def npu_friendly(module: nn.Module) -> Iterator[None]:
    """Explicit matmul attention while exporting (SDPA decomposed), restored afterwards."""
    impl = getattr(module, "attention_impl", None)
    if impl is None or not hasattr(module, "set_attention_impl"):
        yield
        return
    module.set_attention_impl("matmul")
    try:
        yield
    finally:
        module.set_attention_impl(impl)


def export_graph(component: Component, plan: GraphPlan, example: dict[str, torch.Tensor], opset: int) -> onnx.ModelProto:
    """The component at one signature as an ONNX model (weights in memory)."""
    entry = _Entry(component, plan)
    args = tuple(example[n].to(_torch_boundary(s.dtype)) for n, s in plan.input_specs)
    names_in = [n for n, _ in plan.input_specs]
    names_out = [p.name for p in component.outputs]
    big = weight_bytes(component.module) > EXTERNAL_DATA_BYTES
    # the exporter restores the wrapper's train/eval mode recursively afterwards: keep every
    # submodule's own mode (a fresh wrapper is in training mode, which would turn dropout on)
    modes = [(m, m.training) for m in component.module.modules()]
    entry.eval()
    try:
        with npu_friendly(component.module), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python values: shapes are static here
            if not big:
                buf = io.BytesIO()
                torch.onnx.export(entry, args, buf, input_names=names_in, output_names=names_out,
                                  opset_version=opset, dynamo=False, do_constant_folding=True)
                return onnx.load_from_string(buf.getvalue())
            with tempfile.TemporaryDirectory(prefix="ndopt-export-") as d:
                path = Path(d) / f"{plan.name}.onnx"
                torch.onnx.export(entry, args, str(path), input_names=names_in, output_names=names_out,
                                  opset_version=opset, dynamo=False, do_constant_folding=True, external_data=True)
                return onnx.load(str(path), load_external_data=True)
    except LoweringError:
        raise
    except Exception as e:
        raise LoweringError(
            f"export of component {component.name!r} at call signature {plan.keys[0]!r} "
            f"({', '.join(f'{io.name}{list(io.shape)}' for io in plan.inputs)}) failed: {type(e).__name__}: {e}; "
            "the entry point must trace with static shapes (no data-dependent Python control flow)") from e
    finally:
        for m, training in modes:
            m.training = training


RELEASE_ABOVE = 64 * 2**20  # weights under this are freed into a heap the next graph reuses as it is


def release_memory(nbytes: int | None = None) -> None:
    """Give freed memory back to the OS between graphs of `nbytes` of weights (None: whatever the size).
    Exporting, simplifying and checking a graph allocates and frees its weights several times over
    (torch's exporter, protobuf, onnxsim, onnxruntime); glibc keeps what was freed in its heap,
    fragmented, and the next graph's allocations do not fit in it, so at real widths a bundle's lowering
    grew by a gigabyte or more per graph. Small graphs skip it: the full garbage collection it needs
    costs ~0.5 s in a process holding torch, transformers and AIMET (20 s of a tiny quantized bundle)."""
    import ctypes
    import gc
    import sys

    if nbytes is not None and nbytes < RELEASE_ABOVE:
        return
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _torch_boundary(dtype: str) -> torch.dtype:
    return {"int32": torch.int32, "float32": torch.float32, "float16": torch.float16, "bool": torch.bool,
            "bfloat16": torch.bfloat16}[boundary_dtype(dtype)]


def model_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the weights held in the model (what decides external data)."""
    return sum(len(i.raw_data) or (int(np.prod(i.dims)) * 4 if i.dims else 4) for i in model.graph.initializer)


def simplify(model: onnx.ModelProto, name: str) -> tuple[onnx.ModelProto, str]:
    """onnxsim (before any quantization encodings are attached: it renames tensors).

    Returns the model and what happened ("ok", or why it was skipped)."""
    import onnxsim

    # constant folding and shape inference only: onnxsim 0.8.1's graph optimizers rewrite the causal VAE
    # decoder's GroupNorm reshapes into an invalid shape (onnxruntime rejects the result); fusing is the
    # NPU converter's job anyway
    options = {"check_n": 0, "perform_optimization": False}
    try:
        with _quiet_fds():
            if not needs_file(model):
                simplified, _ = onnxsim.simplify(model, **options)
            else:  # past protobuf's 2 GB (a real-width text encoder): file to file, weights as external data
                simplified = _simplify_file(model, onnxsim, options)
    except Exception as e:  # onnxsim fails on some valid graphs; the unsimplified graph is still correct
        log.warning("%s: onnxsim failed (%s); keeping the exported graph", name, e)
        return model, f"failed: {type(e).__name__}"
    return simplified, "ok"


def _simplify_file(model: onnx.ModelProto, onnxsim: Any, options: dict[str, Any]) -> onnx.ModelProto:
    """onnxsim on a model too large to serialize: simplified from a file (`on_disk`) into another, read
    back. Without this the exporter's shape arithmetic stays (int64, dynamic shapes) and the graph fails
    legality. `model` keeps its tensors whatever happens."""
    with on_disk(model) as src:
        dst = src.with_name("simplified.onnx")
        onnxsim.simplify(str(src), output_path=str(dst), **options)
        return onnx.load(str(dst), load_external_data=True)


def needs_file(model: onnx.ModelProto) -> bool:
    """Whether `model`'s weights pass protobuf's 2 GB limit: it cannot be serialized whole, so onnxsim,
    onnx.checker and onnxruntime must take it from a file (`on_disk`)."""
    return model_bytes(model) > EXTERNAL_DATA_BYTES


@contextlib.contextmanager
def on_disk(model: onnx.ModelProto) -> Iterator[Path]:
    """`model` written into a temporary directory with its tensors as external data; the in-memory model
    gets its tensors back when the block ends (onnx moves them out while saving)."""
    with tempfile.TemporaryDirectory(prefix="ndopt-graph-") as d:
        path = Path(d) / "graph.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="graph.onnx.data", size_threshold=1024)
        try:
            yield path
        finally:
            onnx.load_external_data_for_model(model, d)


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """onnxsim's C++ core prints to the process's stdout/stderr (warnings about ops it could not fold:
    harmless, and our checks follow); keep them out of the CLI's output. Errors still raise."""
    import os
    import sys

    fds = []
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
            fds.append(stream.fileno())
        except (AttributeError, io.UnsupportedOperation, ValueError):
            continue
    saved = [os.dup(fd) for fd in fds]
    try:
        with open(os.devnull, "w") as null:
            for fd in fds:
                os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
            os.close(copy)


def save_model(model: onnx.ModelProto, path: Path, external_threshold: int = EXTERNAL_DATA_BYTES) -> list[str]:
    """Write a graph into (a temporary bundle) directory; returns the file names written.

    Weights go to `<name>.data` beside it when they pass `external_threshold` (2 GB by default)."""
    path = Path(path)
    if model_bytes(model) > external_threshold:
        data = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return [path.name, data]
    onnx.save_model(model, str(path))
    return [path.name]
