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


class SharedWeightsWriter:
    """Writes `<component>.weights.bin` one graph at a time: `add` points a model's large initializers
    into the file (appending the tensors it has not seen), saves the graph file, and puts the model's
    tensors back only when asked, so a caller can drop each graph once it is written. At real widths a
    quantized component's QDQ and encodings graphs weigh gigabytes each; collected for one write, they
    did not fit in memory. `close` (or leaving the `with` block) returns what was written."""

    def __init__(self, component: str, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.name = weights_file(component)
        self.info = SharedWeights(component, None)
        self._offsets: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
        self._counted: set[str] = set()
        self._file = open(self.out_dir / self.name, "wb")  # noqa: SIM115 (held across add calls; close() closes it)

    def __enter__(self) -> SharedWeightsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, graph: str, model: onnx.ModelProto, *, priced: bool = True, restore: bool = True) -> None:
        """Save `model` as `out_dir/graph` pointing into the shared file. `priced`: its unique float
        elements count for the estimator (a runtime loads one form of a quantized component, its QDQ or
        its float graph, not both); `restore`: the in-memory model gets its tensors back afterwards
        (the lowering cache keeps float graphs), else it is left pointing into the file."""
        f, info = self._file, self.info
        info.bytes_per_graph[graph] = 0
        saved: list[tuple[TensorProto, TensorProto]] = []
        try:
            for t in model.graph.initializer:
                if _external(t) or t.data_type == TensorProto.STRING:
                    continue
                data = raw_bytes(t)
                if len(data) < INLINE_BYTES:
                    continue
                info.bytes_per_graph[graph] += len(data)
                key = hashlib.sha256(data).hexdigest()
                if key not in self._offsets:
                    align = PAGE_ALIGN if len(data) >= PAGE_ALIGN_FROM else ALIGN
                    f.write(b"\0" * (-f.tell() % align))
                    self._offsets[key] = (f.tell(), len(data))
                    f.write(data)
                    info.tensors += 1
                if priced and key not in self._counted:
                    self._counted.add(key)
                    if t.data_type in _FLOATS:
                        info.unique_float_elems += len(data) // _width(t.data_type)
                    else:
                        info.unique_other_bytes += len(data)
                if restore:
                    original = TensorProto()
                    original.CopyFrom(t)
                    saved.append((t, original))
                _point_at(t, self.name, *self._offsets[key])
                info.references += 1
            save_graph(model, self.out_dir / graph)
        finally:
            for t, original in saved:
                t.CopyFrom(original)

    def close(self) -> SharedWeights:
        if not self._file.closed:
            self.info.bytes = self._file.tell()
            self._file.close()
            if self.info.tensors:
                self.info.file = self.name
            else:
                (self.out_dir / self.name).unlink()
        return self.info


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


__all__ = ["INLINE_BYTES", "SharedWeights", "SharedWeightsWriter", "raw_bytes", "save_graph", "weights_file"]
