"""The target registry: targets are found through the `ndopt.targets` entry-point group.

The core knows no particular target. A target provider (the shipped `targets` package, or another
distribution) exposes a function returning `{name: target}`. A target has at least `name`,
`description` and `to_json()`; the optional methods below are what `ndopt run`, `ndopt plan` and
`ndopt estimate` call when a target offers them (see `Target`).
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any, Protocol

from ndopt.errors import TargetError

log = logging.getLogger("ndopt")
ENTRY_POINT_GROUP = "ndopt.targets"


class Target(Protocol):
    """What the core calls on a target. Only `name`, `description`, `to_json` are required.

    Optional, looked up with `hasattr`:
      lower(pipeline, out_dir: Path, ctx: PassContext) -> dict
          export every component and call signature, check, write the bundle and manifest.json
          under out_dir (atomically), estimate, and (with credentials) compile and profile on
          AI Hub; returns a JSON-able summary merged into the run's report under lowering.<name>.
      estimate(pipeline) -> dict
          latency and memory estimates from the pipeline's cost analysis (works on meta
          pipelines: `ndopt plan` calls it); merged into the plan under estimates.<name>.
      estimate_onnx(path: Path, precision: str, input_shapes=None) -> dict  (plus "note" for a graph with no compute)
          {"latency_ms": ..., "peak_memory_mb": ...} for one ONNX graph (`ndopt estimate`).
      run_bundle(bundle: Path, prompt: str, *, seed: int, provider: str | None, progress) -> result
          run a bundle this target lowered (`ndopt generate --bundle`, found by the manifest's
          target name); the result has `.latents`, `.video` ([1, 3, F, H, W] in [-1, 1]) and `.provider`.
    """

    name: str
    description: str

    def to_json(self) -> dict[str, Any]: ...


def available_targets() -> dict[str, Target]:
    found: dict[str, Target] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            provider = ep.load()
            targets = provider()
        except Exception as e:  # one broken provider must not hide the others
            log.warning("target provider %s (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        for name, t in targets.items():
            if name in found:
                raise TargetError(f"two targets are named {name!r} (entry point {ep.name})")
            found[name] = t
    return dict(sorted(found.items()))


def get_target(name: str) -> Target:
    targets = available_targets()
    if name not in targets:
        raise TargetError(f"unknown target {name!r}; available: {', '.join(targets) or '(none)'}")
    return targets[name]
