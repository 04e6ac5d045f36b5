"""One weights file per component, shared by every graph of that component (ONNX external data).

A component lowers to one graph per call signature (the DiT: one per pyramid stage and temporal
history), and every one of them holds the same weights. Written one graph at a time, the bundle
carries a copy per graph and the runtime would load each. Here the initializers of all graphs of a
component are deduplicated by content (sha256 of the raw bytes: names differ after onnxsim and
legalization, bytes do not), each unique tensor is written once into `<component>.weights.bin` at
an aligned offset, and every graph's initializers point into it through ONNX's external-data fields
(`location`, `offset`, `length`). Tensors under `INLINE_BYTES` stay in the graph (shape constants,
scalars: not worth a file read). Since no large tensor stays in a graph's protobuf, protobuf's 2 GB
limit binds only the graph structure, so components past 2 GB need nothing more. A quantized
component's QDQ and encodings graphs point into the same file (identical tensors are stored once). A QNN link job
builds the same sharing on the device side (one context binary per component, `targets.aihub`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, numpy_helper

INLINE_BYTES = 1024  # tensors below this stay inside the graph
ALIGN = 64  # every tensor starts on a cache line (vector loads)
PAGE_ALIGN = 4096  # tensors of PAGE_ALIGN_FROM bytes or more start on a page (mmap-able)
PAGE_ALIGN_FROM = 1 << 20


def weights_file(component: str) -> str:
    return f"{component}.weights.bin"


@dataclass
class SharedWeights:
    """What was written for one component: the file, its unique tensors and who references them."""

    component: str
    file: str | None  # None: every tensor was small enough to stay inline
    bytes: int = 0  # file size (padding included)
    tensors: int = 0  # unique tensors in the file
    references: int = 0  # initializers (over all graphs) pointing into it
    unique_float_elems: int = 0  # unique float elements of the priced graphs (an estimator prices them at a width)
    unique_other_bytes: int = 0  # unique non-float bytes of the priced graphs
    bytes_per_graph: dict[str, int] = field(default_factory=dict)  # by graph file: bytes it would carry alone

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "bytes": self.bytes, "tensors": self.tensors, "references": self.references,
                "files": sorted(self.bytes_per_graph),
                "bytes_without_sharing": sum(self.bytes_per_graph.values())}


_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def raw_bytes(t: TensorProto) -> bytes:
    """The tensor's little-endian bytes (typed fields converted to raw form)."""
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(t)).raw_data


def _external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


@contextmanager
def shared_external_data(component: str, models: Sequence[tuple[str, onnx.ModelProto]], out_dir: Path,
                         priced: Collection[str] | None = None,
                         restore: Collection[str] | None = None) -> Iterator[SharedWeights]:
    """Write `<component>.weights.bin` into `out_dir` and, inside the block, have every model's large
    initializers point into it (save the models inside the block). The models are restored on exit:
    the lowering cache keeps its in-memory graphs; `restore` limits that to the models of those files
    (None: all): the copy kept to put back doubles a component's weights in memory, for graphs nothing
    reads again (a quantized component's QDQ graphs). `models` are (file name, model); the unique
    elements counted for the estimator are those of the `priced` files (None: all), since a runtime
    loads one form of a quantized component (its QDQ graph or its float graph), not both."""
    counted: set[str] = set()
    name = weights_file(component)
    info = SharedWeights(component, None)
    offsets: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
    saved: list[tuple[TensorProto, TensorProto]] = []
    try:
        with open(out_dir / name, "wb") as f:
            for graph, model in models:
                info.bytes_per_graph[graph] = 0
                for t in model.graph.initializer:
                    if _external(t) or t.data_type == TensorProto.STRING:
                        continue
                    data = raw_bytes(t)
                    if len(data) < INLINE_BYTES:
                        continue
                    info.bytes_per_graph[graph] += len(data)
                    key = hashlib.sha256(data).hexdigest()
                    if key not in offsets:
                        align = PAGE_ALIGN if len(data) >= PAGE_ALIGN_FROM else ALIGN
                        pad = -f.tell() % align
                        f.write(b"\0" * pad)
                        offsets[key] = (f.tell(), len(data))
                        f.write(data)
                        info.tensors += 1
                    if (priced is None or graph in priced) and key not in counted:
                        counted.add(key)
                        if t.data_type in _FLOATS:
                            info.unique_float_elems += len(data) // _width(t.data_type)
                        else:
                            info.unique_other_bytes += len(data)
                    if restore is None or graph in restore:
                        original = TensorProto()
                        original.CopyFrom(t)
                        saved.append((t, original))
                    _point_at(t, name, *offsets[key])
                    info.references += 1
            info.bytes = f.tell()
        if not info.tensors:
            (out_dir / name).unlink()
        else:
            info.file = name
        yield info
    finally:
        for t, original in saved:
            t.CopyFrom(original)


def _width(data_type: int) -> int:
    return {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8}[data_type]


def _point_at(t: TensorProto, location: str, offset: int, length: int) -> None:
    """ONNX external data: the tensor's bytes live at `offset` in `location` (beside the graph)."""
    for fname in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(fname)
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Write a graph whose large tensors already point into a shared file (nothing else is written)."""
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


__all__ = ["INLINE_BYTES", "SharedWeights", "raw_bytes", "save_graph", "shared_external_data", "weights_file"]
