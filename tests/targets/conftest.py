"""Shared fixtures: `ndopt run` of a tiny recipe for each Snapdragon target (lowered once per session)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ndopt.cli import main

TARGETS = ("snapdragon-8-elite", "snapdragon-x-elite")


def recipe_text(target: str) -> str:
    return (f"name: lower-{target}\nmodel: pyramid-flow-tiny\npasses:\n  - dead_component_elimination\n"
            f"target: {target}\nprobe: {{enabled: false}}\nseed: 0\n")


@pytest.fixture(scope="session")
def offline():
    """No AI Hub credentials, whatever the machine has: QAIHUB_CLIENT_INI names a missing file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QAIHUB_CLIENT_INI", "/nonexistent/ndopt-tests/client.ini")
        yield


@pytest.fixture(scope="session")
def lowered_runs(tmp_path_factory, offline) -> dict[str, dict]:
    """`ndopt run` of a recipe per target; {target: {"out", "report", "manifest", "bundle", "output"}}."""
    root = tmp_path_factory.mktemp("lowered")
    runs = {}
    for target in TARGETS:
        recipe = root / f"{target}.yaml"
        recipe.write_text(recipe_text(target))
        out = root / target
        res = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out)])
        assert res.exit_code == 0, res.output
        bundle = out / "bundles" / target
        runs[target] = {"out": out, "bundle": bundle, "output": res.output,
                        "report": json.loads((out / "report.json").read_text()),
                        "manifest": json.loads((bundle / "manifest.json").read_text())}
    return runs


def bundle_files(bundle: Path) -> list[Path]:
    return sorted(bundle.glob("*.onnx"))
