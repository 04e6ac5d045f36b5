"""Targets as data: one YAML per chip, validated; a new chip is a new file; errors name file and field."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from ndopt.cli import main
from ndopt.errors import TargetError
from ndopt.target import available_targets, get_target
from targets import registry
from targets.snapdragon import SnapdragonTarget
from targets.spec import load_spec, specs


def test_both_chips_are_registered_through_the_entry_point():
    found = available_targets()
    assert {"snapdragon-8-elite", "snapdragon-x-elite"} <= set(found)
    t = get_target("snapdragon-8-elite")
    assert isinstance(t, SnapdragonTarget) and all(hasattr(t, m) for m in ("lower", "estimate", "estimate_onnx"))
    assert t.to_json()["hexagon_arch"] == "v79" and get_target("snapdragon-x-elite").spec.hexagon_arch == "v73"
    assert t.spec.default_precision == "w8a16" and t.spec.legality.forbidden_dtypes == ["int64", "double"]
    out = CliRunner().invoke(main, ["targets"]).output
    assert "snapdragon-8-elite" in out and "Hexagon v73" in out


def test_a_new_chip_is_a_new_file():
    text = (specs()["snapdragon-8-elite"].model_dump_json()
            .replace('"snapdragon-8-elite"', '"snapdragon-8-elite-gen5"').replace('"v79"', '"v81"'))
    spec = load_spec(text, "targets/snapdragon-8-elite-gen5.yaml")  # JSON is YAML
    t = SnapdragonTarget(spec)
    assert t.name == "snapdragon-8-elite-gen5" and t.spec.hexagon_arch == "v81"
    assert set(registry()) == set(specs())


@pytest.mark.parametrize("text, field", [
    ("name: x\n", "description"),
    ("[1, 2]\n", "a YAML mapping"),
    ("name: [unclosed\n", "invalid YAML"),
])
def test_bad_files_name_the_file_and_field(text, field):
    with pytest.raises(TargetError, match=rf"targets/bad.yaml: .*{field}"):
        load_spec(text, "targets/bad.yaml")


def test_every_precision_needs_an_efficiency():
    data = specs()["snapdragon-x-elite"].model_dump()
    del data["efficiency"]["w4a16"]
    import json

    with pytest.raises(TargetError, match="efficiency has no entry for precisions \\['w4a16'\\]"):
        load_spec(json.dumps(data), "targets/x.yaml")
    data = specs()["snapdragon-x-elite"].model_dump()
    data["default_precision"] = "w4a8"
    with pytest.raises(TargetError, match="default_precision"):
        load_spec(json.dumps(data), "targets/x.yaml")
