"""The files `SnapdragonTarget.lower` writes into a bundle being built, and the manifest's records of
them: each component's graphs over its one shared weights file (`targets.shared_weights`), the
encodings file a component brings itself, the program's constant tables (`targets.bundle.constants`),
each with the sha256 the runtime checks before it loads the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ndopt.errors import LoweringError
from ndopt.ir.component import Component
from targets.lowering import GraphPlan, TensorIO
from targets.quantized import is_quantized
from targets.runtime import sha256 as sha256_file  # one definition: what the runtime verifies with
from targets.shared_weights import SharedWeights

_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT32: "int32",
           onnx.TensorProto.INT64: "int64", onnx.TensorProto.BOOL: "bool"}


def graph_io(values: Iterable[onnx.ValueInfoProto]) -> list[TensorIO]:
    """A graph's inputs or outputs as the manifest records them (name, static shape, dtype name)."""
    out = []
    for v in values:
        t = v.type.tensor_type
        out.append(TensorIO(v.name, tuple(d.dim_value for d in t.shape.dim), _DTYPES.get(t.elem_type, str(t.elem_type))))
    return out


def weights_record(sw: SharedWeights, out_dir: Path, precision: str) -> dict[str, Any]:
    """The manifest's `weights` record of one component's shared weights file (written by a
    `SharedWeightsWriter` into `out_dir`): its sharing figures, precision and sha256."""
    return {**sw.to_json(), "precision": precision, "sha256": sha256_file(out_dir / sw.file) if sw.file else None}


def copy_encodings(component: Component, out_dir: Path, plan: GraphPlan) -> str | None:
    """An encodings file a component brings itself (`attrs["encodings"]`, AIMET JSON for its own export),
    copied beside the graph. The quantization pass's sims get theirs from `targets.quantized` instead."""
    if not component.attrs.get("encodings") or is_quantized(component):
        return None
    src = Path(str(component.attrs["encodings"]))
    if not src.is_file():
        raise LoweringError(f"component {component.name!r}: its encodings file {src} does not exist; rerun the "
                            "quantization pass or remove the `encodings` attr")
    dst = out_dir / f"{plan.name}.encodings"
    dst.write_bytes(src.read_bytes())
    return dst.name


def write_constants(consts: dict[str, dict[str, Any]], out_dir: Path) -> dict[str, dict[str, Any]]:
    """Save each table of `targets.bundle.constants` as .npy under its file name; returns the manifest's
    `constants` record: shape, dtype, the timesteps of its rows and the file's sha256."""
    out: dict[str, dict[str, Any]] = {}
    for fname, c in consts.items():
        array = np.asarray(c["array"], dtype=np.float32)
        with open(out_dir / fname, "wb") as f:  # a file object: np.save appends no second ".npy"
            np.save(f, array)
        out[fname] = {"shape": list(array.shape), "dtype": "float32", "timesteps": c["timesteps"],
                      "sha256": sha256_file(out_dir / fname)}
    return out


__all__ = ["copy_encodings", "graph_io", "sha256_file", "weights_record", "write_constants"]
