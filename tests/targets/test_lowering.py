"""Lowering the tiny pipeline: `ndopt run` per target writes a bundle whose every graph passes
onnx.checker, the legality rules and onnxruntime-vs-torch numerics (1e-4); the bundle is atomic."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import TARGETS, bundle_files
from onnx import numpy_helper

from ndopt.errors import LoweringError
from targets import registry
from targets.bundle import graph_calls
from targets.legality import check
from targets.lowering import EXTERNAL_DATA_BYTES, example_inputs, plan_graphs, save_model
from targets.numerics import ATOL, RTOL, compare, onnxruntime_outputs, torch_reference
from targets.spec import specs


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_run_lowers_every_graph_checked(lowered_runs, tiny, target):
    run = lowered_runs[target]
    low = run["report"]["lowering"][target]
    assert run["report"]["status"] == "ok" and low["status"] == "ok"
    man = run["manifest"]
    expected = {p.name: p.calls_per_video for p in plan_graphs(tiny)}
    assert set(man["graphs"]) == set(expected) == {f.stem for f in bundle_files(run["bundle"])}
    # the runtime's program calls every graph exactly as often as the sampler's call plan
    assert graph_calls(man["program"]) == expected
    rules = specs()[target].legality
    for f in bundle_files(run["bundle"]):
        onnx.checker.check_model(str(f), full_check=True)
        model = onnx.load(str(f))
        report = check(model, rules, f.stem)
        assert report.ok, [str(v) for v in report.errors]
        g = man["graphs"][f.stem]
        assert g["numerics"]["ok"] and g["numerics"]["max_abs_err"] <= ATOL
        assert g["sha256"] and g["legality"]["ok"]
        # no int64 and no SDPA at the boundary or inside; rank 5 at most
        types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
        assert onnx.TensorProto.INT64 not in types.values()
        assert not {n.op_type for n in model.graph.node} & {"Einsum", "Attention", "MultiHeadAttention"}
    # the DiT's rank-6 unpatchify was legalized, its int64 mask lowered to int32
    dit = man["graphs"]["dit__unit1_stage2"]
    assert dit["legality"]["rewrites"].get("reduce_transpose_rank") and dit["legality"]["rewrites"].get("lower_int64")
    assert {i["name"]: i["dtype"] for i in dit["inputs"]}["encoder_attention_mask"] == "int32"
    # atomic: nothing half-written next to the bundle
    assert not [p for p in run["bundle"].parent.iterdir() if p.name.startswith(".ndopt-")]
    assert man["estimate"]["latency_ms"] > 0 and man["memory_plan"]["fits"]
    assert low["aihub"]["status"] == "offline"


@pytest.mark.slow
def test_graph_from_disk_matches_torch(lowered_runs, tiny):
    """Independent of the manifest's record: onnxruntime on the written file vs the torch component."""
    bundle = lowered_runs["snapdragon-8-elite"]["bundle"]
    plan = next(p for p in plan_graphs(tiny) if p.name == "dit__unit1_stage2")
    example = example_inputs(plan, seed=7)  # not the inputs lowering checked with
    feeds = {io.name: example[io.name].numpy().astype(np.int32 if io.dtype == "int32" else np.float32)
             for io in plan.inputs}
    got = onnxruntime_outputs(bundle / "dit__unit1_stage2.onnx", feeds)
    ref = torch_reference(tiny["dit"], plan, example)
    rep = compare(plan.name, ["latents"], ref, got, ATOL, RTOL)
    assert rep.ok, rep.to_json()
    assert rep.max_abs_err > 0  # a real comparison, not a copy


@pytest.mark.slow
def test_targets_agree_on_graphs_and_differ_in_estimates(lowered_runs):
    a, b = (lowered_runs[t]["manifest"] for t in TARGETS)
    assert {g: v["sha256"] for g, v in a["graphs"].items()} == {g: v["sha256"] for g, v in b["graphs"].items()}
    assert a["target"]["hexagon_arch"] == "v79" and b["target"]["hexagon_arch"] == "v73"
    assert a["estimate"]["latency_ms"] != b["estimate"]["latency_ms"]


def test_plan_graphs_dedupes_identical_signatures(tiny):
    base = tiny.sampler

    @dataclasses.dataclass(frozen=True)
    class Twice(type(base)):  # the same DiT layout called from two places of the schedule
        def call_plan(self, pipeline):
            plan = base.call_plan(pipeline)
            extra = next(s for s in plan if s.key == "unit1/stage2")
            return [*plan, dataclasses.replace(extra, key="unit9/stage2", count=3)]

    pipe = dataclasses.replace(tiny, sampler=Twice(**dataclasses.asdict(base)))
    plans = plan_graphs(pipe)
    dup = next(p for p in plans if p.name == "dit__unit1_stage2")
    assert dup.keys == ("unit1/stage2", "unit9/stage2") and dup.calls_per_video == 20 + 3
    assert len(plans) == len(plan_graphs(tiny))


def test_failed_lowering_leaves_previous_bundle(tiny, tmp_path, monkeypatch, offline):
    """A failure while the bundle is written leaves the old bundle exactly as it was."""
    import targets.snapdragon as sd

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text('{"previous": true}\n')
    monkeypatch.setattr(sd, "plan_graphs", lambda p: plan_graphs(p)[:1])  # the text encoder only: fast
    with pytest.raises(LoweringError, match="needs a graph for"):
        registry()["snapdragon-8-elite"].lower(tiny.replace(remove=["vae_encoder"]), out)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert json.loads((out / "manifest.json").read_text()) == {"previous": True}


def test_meta_pipeline_is_refused_with_what_to_do(tmp_path):
    from ndopt.frontends import load_model

    meta = load_model("pyramid-flow-sd3-384p", meta=True)
    with pytest.raises(LoweringError, match="meta device.*ndopt plan"):
        registry()["snapdragon-8-elite"].lower(meta, tmp_path / "b")


def test_graphs_past_protobufs_limit_are_checked_from_a_file(monkeypatch):
    """A graph past 2 GB (a real-width text encoder) cannot be serialized whole: onnx.checker and
    onnxruntime get it as a file with external data, and the in-memory model keeps its tensors."""
    from targets import lowering, numerics

    lin = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    buf = io.BytesIO()
    torch.onnx.export(lin, (torch.randn(2, 64),), buf, input_names=["x"], opset_version=17, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    seen = []
    real_check = onnx.checker.check_model
    monkeypatch.setattr(lowering, "EXTERNAL_DATA_BYTES", 1024)
    monkeypatch.setattr(numerics.onnx.checker, "check_model", lambda src, **kw: (seen.append(src), real_check(src, **kw)))
    numerics.check_model(model, "g")
    got = numerics.onnxruntime_outputs(model, {"x": np.ones((2, 64), np.float32)})[0]
    np.testing.assert_allclose(got, lin(torch.ones(2, 64)).detach().numpy(), atol=1e-5)
    assert isinstance(seen[0], str) and seen[0].endswith(".onnx")  # checked from a file, not the proto
    # the tensors are back in memory, nothing left pointing at the deleted file
    assert all(t.data_location == onnx.TensorProto.DEFAULT and not t.external_data for t in model.graph.initializer)
    assert all(np.array_equal(numpy_helper.to_array(t), before[t.name]) for t in model.graph.initializer)
    # shape inference (legality, costs) reads the graph only: past the limit it runs on a weightless copy
    from targets import onnx_costs

    want = {v.name: v.type for v in onnx_costs.infer_shapes(onnx.ModelProto.FromString(model.SerializeToString())).graph.value_info}
    monkeypatch.setattr(onnx_costs, "PROTOBUF_LIMIT", 1024)
    got = {v.name: v.type for v in onnx_costs.infer_shapes(model).graph.value_info}
    assert got == want and want and model.graph.initializer[0].raw_data  # weights untouched


def test_onnxsim_runs_past_protobufs_limit(monkeypatch):
    """Past 2 GB onnxsim goes file to file (weights as external data) and folds the same shape arithmetic
    as in memory: skipping it left int64 shape ops that fail legality (a real-width text encoder)."""
    from targets import lowering

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.lin(x).reshape(x.shape[0], x.shape[1] // 2, -1).sum(-1)

    buf = io.BytesIO()
    torch.onnx.export(Flat(), (torch.randn(2, 64),), buf, input_names=["x"], opset_version=17, dynamo=False,
                      do_constant_folding=False)
    model = onnx.load_from_string(buf.getvalue())
    want, how = lowering.simplify(onnx.load_from_string(buf.getvalue()), "g")
    monkeypatch.setattr(lowering, "EXTERNAL_DATA_BYTES", 1024)
    got, how_big = lowering.simplify(model, "g")
    assert how == how_big == "ok" and [n.op_type for n in got.graph.node] == [n.op_type for n in want.graph.node]
    assert "Shape" not in {n.op_type for n in got.graph.node} and len(got.graph.node) < len(model.graph.node)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in got.graph.initializer)
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(onnxruntime_outputs(got, {"x": x})[0], onnxruntime_outputs(model, {"x": x})[0], rtol=1e-6)


def test_external_data_past_the_threshold(tmp_path):
    """Weights go to <graph>.onnx.data past the threshold (2 GB by default); the graph still loads,
    checks and estimates (the estimator reads shapes only)."""
    from targets.snapdragon import SnapdragonTarget

    lin = torch.nn.Linear(64, 64)
    buf = tmp_path / "m.onnx"
    torch.onnx.export(lin, (torch.randn(2, 64),), str(buf), input_names=["x"], opset_version=17, dynamo=False)
    model = onnx.load(str(buf))
    files = save_model(model, tmp_path / "g.onnx", external_threshold=1024)
    assert files == ["g.onnx", "g.onnx.data"] and (tmp_path / "g.onnx.data").stat().st_size >= 64 * 64 * 4
    assert (tmp_path / "g.onnx").stat().st_size < 4096
    onnx.checker.check_model(str(tmp_path / "g.onnx"), full_check=True)
    got = onnxruntime_outputs(tmp_path / "g.onnx", {"x": np.ones((2, 64), np.float32)})[0]
    np.testing.assert_allclose(got, lin(torch.ones(2, 64)).detach().numpy(), atol=1e-5)
    est = SnapdragonTarget(specs()["snapdragon-8-elite"]).estimate_onnx(tmp_path / "g.onnx", "w8a16")
    assert set(est) == {"latency_ms", "peak_memory_mb"} and est["latency_ms"] > 0
    assert save_model(model, tmp_path / "h.onnx") == ["h.onnx"] and EXTERNAL_DATA_BYTES > 2**30


@pytest.mark.slow
def test_bundle_graphs_share_one_file_per_component(lowered_runs, tiny):
    """The tiny bundle: six DiT graphs point into dit.weights.bin (targets.shared_weights), written once;
    each graph runs in onnxruntime from the bundle directory and matches torch as the manifest says.
    (Here, beside the other tests of `lowered_runs`: one xdist worker lowers it once.)"""
    run = lowered_runs["snapdragon-8-elite"]
    bundle, man = run["bundle"], run["manifest"]
    for g in man["graphs"].values():
        assert g["external_data"] == f"{g['component']}.weights.bin" and (bundle / g["external_data"]).is_file()
    assert not list(bundle.glob("*.onnx.data"))
    dit = man["weights"]["dit"]
    assert len(dit["files"]) == 6 and dit["bytes"] == (bundle / "dit.weights.bin").stat().st_size
    assert dit["sha256"] == hashlib.sha256((bundle / "dit.weights.bin").read_bytes()).hexdigest()
    assert dit["bytes_without_sharing"] > 5 * dit["bytes"]  # six graphs, one copy
    assert dit["bytes"] >= sum(p.numel() * 4 for p in tiny["dit"].module.parameters()) * 0.9
    # the memory plan loads each component's weights once
    assert man["memory_plan"]["weights_mb"]["dit"] < 1.1 * dit["bytes"] / 2**20
    for p in plan_graphs(tiny):
        example = example_inputs(p, seed=3)
        feeds = {io.name: example[io.name].numpy().astype(np.int32 if io.dtype == "int32" else np.float32)
                 for io in p.inputs}
        got = onnxruntime_outputs(bundle / f"{p.name}.onnx", feeds)
        rep = compare(p.name, [o.name for o in tiny[p.component].outputs],
                      torch_reference(tiny[p.component], p, example), got, ATOL, RTOL)
        assert rep.ok, rep.to_json()


def test_release_memory_collects_only_for_large_components(monkeypatch):
    """The full collection costs ~0.5 s in a loaded process: small graphs' weights are left to the heap."""
    import gc

    from targets.lowering import RELEASE_ABOVE, release_memory

    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or 0)
    release_memory(RELEASE_ABOVE - 1)
    assert calls == []
    release_memory(RELEASE_ABOVE)
    release_memory()
    assert len(calls) == 2
