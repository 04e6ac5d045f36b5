"""The target registry: targets are found through the `ndopt.targets` entry-point group.

The core knows no particular target. A target provider (the shipped `targets` package, or another
distribution) exposes a function returning `{name: target}`; a provider whose module also offers
`target_from_file(path)` makes a target file usable wherever a target name is (`--target chip.yaml`,
a recipe's `target:`): `get_target` asks it, and `available_targets()` answers `in` for such paths. A target has at least `name`,
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


class Targets(dict):
    """The registered targets by name; `in` is also true for a target file a provider can read."""

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (isinstance(key, str) and _file_target(key) is not None)


def _file_target(ref: str) -> Target | None:
    """The target a provider reads from the file `ref` (a path ending in .yaml/.yml), or None."""
    import sys
    from pathlib import Path

    if not ref.lower().endswith((".yaml", ".yml")) or not Path(ref).is_file():
        return None
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            provider = ep.load()
        except Exception:
            continue
        reader = getattr(sys.modules.get(getattr(provider, "__module__", ""), None), "target_from_file", None)
        if callable(reader):
            return reader(ref)
    return None


def available_targets() -> Targets:
    found: Targets = Targets()
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
    return Targets(sorted(found.items()))


def get_target(name: str) -> Target:
    """A registered target by name, or the target of a target file (`path/to/chip.yaml`)."""
    targets = available_targets()
    if not dict.__contains__(targets, name):
        from_file = _file_target(name)
        if from_file is not None:
            return from_file
        if name.lower().endswith((".yaml", ".yml")):
            raise TargetError(f"target file {name!r} does not exist (or no target provider reads target files)")
        raise TargetError(f"unknown target {name!r}; available: {', '.join(targets) or '(none)'}")
    return targets[name]
