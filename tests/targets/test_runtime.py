"""The bundle runs: `targets.runtime` on a lowered tiny bundle gives the torch sampler's video.

Both program forms are lowered once (module fixture): CFG with two DiT calls per step, and
cfg_folding + schedule_folding (one batched call, the timestep table). The runtime and ndopt's
sampler draw noise from `numpy.random.default_rng(seed)`, so their latents agree to float rounding.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ndopt.errors import LoweringError
from ndopt.eval.metrics import pixel_psnr
from ndopt.passmanager import PassContext
from ndopt.target import get_target
from targets import runtime
from targets.lowering import plan_graphs

PROMPT = "a red ball bouncing on grass"
FORMS = ("cfg", "folded")


@pytest.fixture(scope="module")
def lowered(tiny, tmp_path_factory, offline):
    """{form: (pipeline, bundle dir)} at a 2-2-2 / 1-1-1 schedule (both program forms)."""
    from passes.cfg_folding import CfgFolding
    from passes.dead_component_elimination import DeadComponentElimination
    from passes.schedule_folding import ScheduleFolding

    root = tmp_path_factory.mktemp("runtime")
    ctx = PassContext(root / "ctx")
    small = tiny.replace(schedule=tiny.schedule.with_steps((2, 2, 2), (1, 1, 1)))
    base = DeadComponentElimination().run(small, ctx).pipeline
    pipelines = {"cfg": base, "folded": ScheduleFolding().run(CfgFolding().run(base, ctx).pipeline, ctx).pipeline}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend on a shared 2-core machine
    try:
        out = {}
        for form, p in pipelines.items():
            get_target("snapdragon-8-elite").lower(p, root / form, ctx)
            out[form] = (p, root / form)
        yield out
    finally:
        torch.set_num_threads(threads)


def _torch_video(pipeline, seed: int) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        lat = pipeline.sampler.sample(pipeline, [PROMPT], generator=np.random.default_rng(seed))
        return lat.numpy(), pipeline.sampler.decode(pipeline, lat).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_bundle_gives_the_torch_samplers_video(lowered, form):
    pipeline, bundle = lowered[form]
    res = runtime.generate(bundle, PROMPT, seed=3, threads=1)
    lat, video = _torch_video(pipeline, 3)
    assert res.provider == "CPUExecutionProvider"  # no onnxruntime-qnn here
    assert res.latents.shape == lat.shape and res.video.shape == video.shape
    rel = np.linalg.norm(res.latents - lat) / np.linalg.norm(lat)
    assert rel <= 1e-4, rel
    assert pixel_psnr(torch.from_numpy(res.video), torch.as_tensor(video)) >= 45.0
    from ndopt.model import video_frames

    ref_frames = video_frames(torch.from_numpy(video))
    assert len(res.frames) == len(ref_frames) and res.frames[0].dtype == np.uint8
    assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(res.frames, ref_frames)) <= 1
    # the noise is the seed's: another seed is another video
    other = runtime.generate(bundle, PROMPT, seed=4, threads=1)
    assert np.linalg.norm(other.latents - lat) / np.linalg.norm(lat) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_runtime_calls_each_graph_as_often_as_the_call_plan(lowered, form, monkeypatch):
    pipeline, bundle = lowered[form]
    counts: dict[str, int] = {}
    run = runtime.State.run

    def counting(self, graph, feeds):
        counts[graph] = counts.get(graph, 0) + 1
        return run(self, graph, feeds)

    monkeypatch.setattr(runtime.State, "run", counting)
    runtime.generate(bundle, PROMPT, seed=0, threads=1)
    assert counts == {p.name: p.calls_per_video for p in plan_graphs(pipeline)}


@pytest.mark.slow
def test_written_manifests_follow_the_schema(lowered):
    import jsonschema

    schema = json.loads((Path(runtime.__file__).parent / "manifest.schema.json").read_text())
    for _, bundle in lowered.values():
        man = json.loads((bundle / "manifest.json").read_text())
        jsonschema.Draft202012Validator(schema).validate(man)
        assert man["version"] == 2 and man["format"] == "ndopt-bundle/2"
        tokenize = next(op for op in man["program"] if op["op"] == "tokenize")
        for enc in tokenize["encoders"]:  # the tokenizer files ship, recorded with their digest
            assert (bundle / enc["tokenizer"]).is_file() and enc["tokenizer"] in man["assets"]


@pytest.mark.slow
def test_runtime_does_not_import_torch(lowered):
    _, bundle = lowered["folded"]
    code = ("import sys; from pathlib import Path; from targets.runtime import generate; "
            f"r = generate(Path({str(bundle)!r}), 'a cat', seed=1, threads=1); "
            "assert r.video is not None and r.video.shape[1] == 3; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok', r.provider)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0 and "ok CPUExecutionProvider" in res.stdout, res.stderr[-2000:]


@pytest.fixture
def copy_of(lowered, tmp_path):
    def make(form: str = "folded") -> Path:
        return Path(shutil.copytree(lowered[form][1], tmp_path / form))
    return make


def _edit_manifest(bundle: Path, edit) -> None:
    man = json.loads((bundle / "manifest.json").read_text())
    edit(man)
    (bundle / "manifest.json").write_text(json.dumps(man))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["graph", "tokenizer"])
def test_a_tampered_file_is_refused_by_sha256(copy_of, which):
    bundle = copy_of()
    man = json.loads((bundle / "manifest.json").read_text())
    name = (next(g["file"] for g in man["graphs"].values() if g["role"] == "dit") if which == "graph"
            else next(iter(man["assets"])))
    data = bytearray((bundle / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / name).write_bytes(bytes(data))
    with pytest.raises(LoweringError, match=rf"{name}.*sha256"):
        runtime.generate(bundle, PROMPT, threads=1)


@pytest.mark.slow
def test_a_tampered_constant_table_is_refused_by_sha256(copy_of):
    from targets.bundle import TIMESTEP_TABLE

    bundle = copy_of("folded")
    table = bundle / TIMESTEP_TABLE

    def record_digest(man):  # what the lowering writes (targets/snapdragon.py); written here if it does not yet
        man["constants"][TIMESTEP_TABLE].setdefault("sha256", runtime.sha256(table))

    _edit_manifest(bundle, record_digest)
    data = bytearray(table.read_bytes())
    data[-3] ^= 0x01  # a table value, past the .npy header: np.load would still read it
    table.write_bytes(bytes(data))
    with pytest.raises(LoweringError, match=rf"constant {TIMESTEP_TABLE} \(constants\.{TIMESTEP_TABLE}\).*sha256"):
        runtime.generate(bundle, PROMPT, threads=1)
    _edit_manifest(bundle, lambda man: man["constants"].clear())  # unlisted: no digest to check against
    with pytest.raises(LoweringError, match=rf"reads table '{TIMESTEP_TABLE}', which the manifest's constants do not"):
        runtime.generate(bundle, PROMPT, threads=1)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_graph_outside_the_bundle_is_refused(copy_of, tmp_path, where):
    """A manifest naming a graph outside the bundle (`../x.onnx`, an absolute path) is refused before
    anything runs, even when the file there is a working graph with the recorded sha256."""
    bundle = copy_of()
    man = json.loads((bundle / "manifest.json").read_text())
    graph, entry = next((g, e) for g, e in man["graphs"].items() if e["role"] == "text_encoder")
    for f in (entry["file"], entry["external_data"]):  # a working copy beside the bundle
        shutil.copy(bundle / f, tmp_path / f)
    name = f"../{entry['file']}" if where == "parent" else str(tmp_path / entry["file"])
    _edit_manifest(bundle, lambda m: m["graphs"][graph].update(file=name))
    with pytest.raises(LoweringError, match=rf"\$\.graphs\.{graph}\.file: '{re.escape(name)}' does not match"):
        runtime.generate(bundle, PROMPT, threads=1)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["graph", "tokenizer"])
def test_a_symlink_out_of_the_bundle_is_refused(copy_of, tmp_path, which):
    """A name the schema accepts whose file is a symlink leading out of the bundle: refused when resolved."""
    bundle = copy_of()
    man = json.loads((bundle / "manifest.json").read_text())
    name = (next(g["file"] for g in man["graphs"].values() if g["role"] == "text_encoder") if which == "graph"
            else next(iter(man["assets"])))
    outside = tmp_path / "outside" / Path(name).name
    outside.parent.mkdir()
    shutil.move(bundle / name, outside)
    (bundle / name).symlink_to(outside)
    field = r"graphs\.\S+\.file" if which == "graph" else r"program\[0\]\.encoders\[\d\]\.tokenizer"
    with pytest.raises(LoweringError, match=rf"field {field} names '{re.escape(name)}', which resolves to "
                                            rf"{re.escape(str(outside.resolve()))}, outside the bundle"):
        runtime.generate(bundle, PROMPT, threads=1)


@pytest.mark.parametrize("name", ["../x.onnx", "a/../../x.onnx", "/etc/hostname"])
def test_names_resolving_outside_the_bundle_are_refused(tmp_path, name):
    """The runtime's own check, below the schema's pattern (a manifest the schema never saw)."""
    (tmp_path / "b" / "a").mkdir(parents=True)
    assert runtime.inside(tmp_path / "b", "a/../y.onnx", "graphs.g.file") == (tmp_path / "b" / "y.onnx").resolve()
    with pytest.raises(LoweringError, match=rf"field graphs\.g\.file names '{re.escape(name)}'.*outside the bundle"):
        runtime.inside(tmp_path / "b", name, "graphs.g.file")


@pytest.mark.slow
@pytest.mark.parametrize("edit, match", [
    (lambda m: m["program"].insert(1, {"op": "sharpen"}), r"manifest.json at \$\.program\[1\]\.op: 'sharpen' is not"),
    (lambda m: m.update(version=1), r"manifest version 1"),
    # checked against the schema before anything runs (not a KeyError halfway through the program)
    (lambda m: next(op for op in m["program"] if op["op"] == "denoise_step").pop("dt"),
     r"manifest.json at \$\.program\[\d+\]: 'dt' is a required property.*lower the pipeline again"),
])
def test_a_manifest_the_runtime_cannot_follow_is_refused(copy_of, edit, match):
    bundle = copy_of()
    _edit_manifest(bundle, edit)
    with pytest.raises(LoweringError, match=match):
        runtime.generate(bundle, PROMPT, threads=1)


def test_resize_follows_torch_interpolate():
    import torch.nn.functional as F

    x = np.random.default_rng(0).standard_normal((1, 2, 3, 8, 12), dtype=np.float32)
    flat = torch.from_numpy(x).permute(0, 2, 1, 3, 4).reshape(3, 2, 8, 12)
    for size, interp in [((4, 6), runtime_bilinear()), ((5, 7), runtime_bilinear()), ((16, 24), {"mode": "nearest"}),
                         ((11, 13), {"mode": "nearest"})]:
        ref = (F.interpolate(flat, size=size, mode="nearest") if interp["mode"] == "nearest" else
               F.interpolate(flat, size=size, mode="bilinear", align_corners=False))
        ref = ref.reshape(1, 3, 2, *size).permute(0, 2, 1, 3, 4).numpy()
        np.testing.assert_allclose(runtime.resize(x, list(size), interp), ref, atol=1e-6)


def runtime_bilinear() -> dict:
    return {"mode": "bilinear", "align_corners": False, "antialias": False}


@pytest.mark.slow
def test_constant_tables_carry_their_sha256(lowered):
    """A folded schedule's timestep-embedding table is written with np.save; the manifest records the
    file's sha256 (what the runtime checks before loading it) next to its shape and timesteps."""
    import hashlib

    from targets.bundle import TIMESTEP_TABLE, constants

    folded, bundle = lowered["folded"]
    man = json.loads((bundle / "manifest.json").read_text())
    (name,) = man["constants"]
    entry, path = man["constants"][name], bundle / name
    assert name == TIMESTEP_TABLE and [p.name for p in bundle.glob("*.npy")] == [name]
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    want = constants(folded)[TIMESTEP_TABLE]
    assert entry["shape"] == list(want["array"].shape) and entry["timesteps"] == want["timesteps"]
    np.testing.assert_array_equal(np.load(path), want["array"])
