"""`targets/manifest.schema.json`: every manifest the program generator makes follows it, and a
broken one is refused with the JSON path of what is wrong (what `SnapdragonTarget.lower` calls
before writing `manifest.json`)."""

from __future__ import annotations

import copy
import json
import tomllib
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from ndopt.errors import LoweringError
from ndopt.passmanager import PassContext
from targets import bundle
from targets.lowering import plan_graphs

ROOT = Path(__file__).resolve().parents[2]


def _manifest(pipeline) -> dict:
    """The manifest lowering would write, with graph records made from the plan (no export)."""
    plans = plan_graphs(pipeline)
    graphs = {p.name: {"file": f"{p.name}.onnx", "sha256": "0" * 64, "component": p.component, "role": p.role,
                       "call_signatures": list(p.keys), "calls_per_video": p.calls_per_video,
                       "inputs": [io.to_json() for io in p.inputs], "outputs": []} for p in plans}
    consts = bundle.constants(pipeline)
    return bundle.manifest(target={"name": "snapdragon-8-elite"}, pipeline=pipeline, graphs=graphs,
                           prog=bundle.program(pipeline, plans), memory={"fits": True}, estimate={"latency_ms": 1.0},
                           constants={f: {"shape": list(c["array"].shape), "dtype": "float32"}
                                      for f, c in consts.items()})


@pytest.fixture(scope="module")
def forms(tiny, tmp_path_factory) -> dict[str, dict]:
    """Manifests of the program's forms: cfg, cfg_batched, folded (table), guidance-free."""
    from passes.cfg_folding import CfgFolding
    from passes.schedule_folding import ScheduleFolding

    ctx = PassContext(tmp_path_factory.mktemp("schema"))
    small = tiny.replace(schedule=tiny.schedule.with_steps((1, 2, 1), (1, 1, 1)))
    batched = CfgFolding().run(small, ctx).pipeline
    free = small.replace(schedule=small.schedule.with_guidance("none"))
    return {"cfg": _manifest(small), "cfg_batched": _manifest(batched),
            "folded": _manifest(ScheduleFolding().run(batched, ctx).pipeline), "none": _manifest(free)}


@pytest.mark.parametrize("form", ["cfg", "cfg_batched", "folded", "none"])
def test_every_program_form_follows_the_schema(forms, form):
    man = forms[form]
    bundle.validate_manifest(man)
    jsonschema.Draft202012Validator(bundle.schema()).validate(json.loads(json.dumps(man)))
    ops = {op["op"] for op in man["program"]}
    assert {"tokenize", "init_noise", "frame_start", "history", "stage_start", "denoise_step", "frame_end",
            "denormalize", "call", "postprocess"} <= ops


def _first(man: dict, op: str) -> int:
    return next(i for i, o in enumerate(man["program"]) if o["op"] == op)


@pytest.mark.parametrize("break_it, path", [
    (lambda m: m.pop("version"), r"\$: 'version' is a required property"),
    (lambda m: m["program"][_first(m, "denoise_step")].pop("dt"), r"\$\.program\[\d+\]: 'dt' is a required"),
    (lambda m: m["program"][_first(m, "denoise_step")].update(sigma="0.5"), r"\$\.program\[\d+\]\.sigma: '0.5' is not"),
    (lambda m: m["program"][_first(m, "init_noise")].update(shape=[1, 16, "2"]), r"\$\.program\[\d+\]\.shape\[2\]"),
    (lambda m: m["program"].insert(4, {"op": "sharpen", "amount": 2}), r"\$\.program\[4\]\.op: 'sharpen' is not one of"),
    (lambda m: m["program"][_first(m, "tokenize")]["encoders"][0].pop("pad_id"),
     r"\$\.program\[0\]\.encoders\[0\]: 'pad_id' is a required"),
    (lambda m: next(iter(m["graphs"].values())).update(sha256="abc"), r"\$\.graphs\.\S+\.sha256: 'abc' does not match"),
    (lambda m: m.update(format="ndopt-bundle/1"), r"\$\.format: 'ndopt-bundle/2' was expected"),
    # file names are relative to the bundle, without '..' segments (the runtime also resolves them)
    (lambda m: next(iter(m["graphs"].values())).update(file="../x.onnx"), r"\$\.graphs\.\S+\.file: '\.\./x\.onnx' does"),
    (lambda m: next(iter(m["graphs"].values())).update(file="/tmp/x.onnx"), r"\$\.graphs\.\S+\.file: '/tmp/x\.onnx' does"),
    (lambda m: next(iter(m["graphs"].values())).update(qdq="a/../../x.onnx"), r"\$\.graphs\.\S+\.qdq: 'a/\.\./\.\./x"),
    (lambda m: next(iter(m["graphs"].values())).update(external_data="C:\\w.bin"), r"\$\.graphs\.\S+\.external_data"),
    (lambda m: m["program"][0]["encoders"][0].update(tokenizer="/etc/passwd"),
     r"\$\.program\[0\]\.encoders\[0\]\.tokenizer: '/etc/passwd' does not match"),
    (lambda m: m.update(weights={"dit": {"file": "../dit.weights.bin", "sha256": None}}), r"\$\.weights\.dit\.file"),
    (lambda m: m["assets"].update({"../tokenizer.json": {"kind": "tokenizer", "sha256": "0" * 64}}), r"\$\.assets"),
])
def test_a_broken_manifest_is_refused_with_its_json_path(forms, break_it, path):
    man = copy.deepcopy(forms["cfg"])
    break_it(man)
    with pytest.raises(LoweringError, match=path):
        bundle.validate_manifest(man)


def test_constant_tables_may_carry_their_sha256(forms):
    """The lowering records each table's digest (the runtime verifies it); a malformed one is refused."""
    man = copy.deepcopy(forms["folded"])
    (record,) = man["constants"].values()
    record["sha256"] = "0" * 64
    bundle.validate_manifest(man)
    record["sha256"] = "abc"
    with pytest.raises(LoweringError, match=r"\$\.constants\['timestep_embedding\.npy'\]\.sha256: 'abc' does not"):
        bundle.validate_manifest(man)
    man["constants"] = {"../t.npy": {"shape": [1], "dtype": "float32"}}
    with pytest.raises(LoweringError, match=r"\$\.constants: '\.\./t\.npy' does not match"):
        bundle.validate_manifest(man)


def test_a_manifest_read_from_disk_names_its_file_and_the_fix(forms, tmp_path):
    man = copy.deepcopy(forms["cfg"])
    man.pop("version")
    with pytest.raises(LoweringError, match=rf"{tmp_path}/manifest.json at \$: .*lower the pipeline again rather"):
        bundle.validate_manifest(man, tmp_path / "manifest.json")


def test_the_schema_is_package_data_and_a_valid_2020_12_schema():
    text = (resources.files("targets") / bundle.SCHEMA).read_text()
    schema = json.loads(text)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "*.json" in pyproject["tool"]["setuptools"]["package-data"]["targets"]
    assert any(d.startswith("jsonschema") for d in pyproject["project"]["dependencies"])


def test_host_ops_schema_and_runtime_name_one_closed_set():
    from targets import runtime

    schema = bundle.schema()
    assert set(bundle.HOST_OPS) == set(schema["$defs"]["ops"]) == set(schema["$defs"]["op"]["properties"]["op"]["enum"])
    assert set(bundle.HOST_OPS) == set(runtime.HANDLERS)
    assert schema["properties"]["version"]["const"] == bundle.VERSION == runtime.VERSION
