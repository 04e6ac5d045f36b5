"""A written bundle staged for Qualcomm AI Hub (`targets.aihub`): every graph in the form that carries
its precision (the QDQ graph of a quantized component, else the float graph with its component's
shared weights file), its input specs, and its component, whose graphs are linked into one
weight-sharing context binary. What `SnapdragonTarget.lower` calls once the bundle is on disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ndopt.progress import progress
from targets import aihub
from targets.bundle_files import graph_io
from targets.lowered import LoweredGraph
from targets.spec import TargetSpec


def profile_on_hub(spec: TargetSpec, out_dir: Path, lowered: Sequence[LoweredGraph],
                   graphs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Compile and profile every graph of the bundle in `out_dir` on the target's first AI Hub device,
    then link each component's graphs; `graphs` is the manifest's record of them."""
    with tempfile.TemporaryDirectory(prefix="ndopt-aihub-") as staging:
        jobs = []
        for lg in lowered:
            g = graphs[lg.plan.name]
            model = hub_model(out_dir, g.get("qdq") or g["file"], g.get("external_data"), Path(staging))
            jobs.append(aihub.GraphJob(lg.plan.name, model,
                                       {io.name: (tuple(io.shape), io.dtype) for io in graph_io(lg.model.graph.input)},
                                       component=lg.plan.component))
        device = spec.ai_hub_devices[0]
        with progress(f"AI Hub {device}", total=3 * len(jobs)) as advance:
            return aihub.profile_bundle(jobs, device, spec.aihub_options, advance, link=True)


def hub_model(out_dir: Path, file: str, data_file: str | None, staging: Path) -> Path:
    """The graph as AI Hub takes it: the .onnx file, or, with external data (its component's shared
    weights file), a directory named like the file holding both (hard links into a staging folder)."""
    onnx_path = out_dir / file
    data = out_dir / data_file if data_file else None
    if data is None or not data.exists():
        return onnx_path
    d = staging / file
    d.mkdir()
    for f in (onnx_path, data):
        try:
            os.link(f, d / f.name)
        except OSError:  # another file system, or links not allowed: a copy
            shutil.copy2(f, d / f.name)
    return d


__all__ = ["hub_model", "profile_on_hub"]
