"""Snapdragon targets: the `ndopt.targets` entry point (`registry`) and target files given by path.

A new chip is a new YAML file in this folder and nothing else: `registry()` builds one
`SnapdragonTarget` per file, from the records `targets.spec` reads and validates. The code that
lowers, checks, estimates and profiles lives beside this file (lowering, legality, numerics, bundle,
estimator, aihub) and reads only those records.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from targets.spec import spec_from_file, specs

if TYPE_CHECKING:
    from targets.snapdragon import SnapdragonTarget


def target_from_file(path: str | Path) -> SnapdragonTarget:
    """The target of a YAML file path: what `ndopt.target.get_target` returns for a path."""
    from targets.snapdragon import SnapdragonTarget

    return SnapdragonTarget(spec_from_file(path))


def registry() -> dict[str, SnapdragonTarget]:
    """Entry point of the `ndopt.targets` group: one target per `targets/*.yaml`."""
    from targets.snapdragon import SnapdragonTarget

    return {name: SnapdragonTarget(spec) for name, spec in specs().items()}
