"""The estimator: both front ends agree, the roofline behaves, per-video estimates of real-size (meta)
pipelines have a per-component breakdown, and `ndopt estimate` prints the two figures."""

from __future__ import annotations

import io
import json
import warnings

import onnx
import pytest
import torch
from click.testing import CliRunner

from ndopt.cli import main
from ndopt.errors import TargetError
from ndopt.ir.cost import CostModel
from targets import registry
from targets.estimator import GraphCost, OpCost, estimate_graph, memory_plan
from targets.lowering import npu_friendly, plan_graphs
from targets.onnx_costs import onnx_graph_cost
from targets.spec import Efficiency, specs
from targets.torch_costs import module_graph_cost, torch_graph_cost

S8, SX = specs()["snapdragon-8-elite"], specs()["snapdragon-x-elite"]


@pytest.fixture(scope="module")
def dit_graph(tiny):
    """The tiny DiT's largest graph as lowering makes it (from this process's lowering cache when a
    lowering test ran first)."""
    plan = next(p for p in plan_graphs(tiny) if p.name == "dit__unit1_stage2")
    comp = tiny["dit"]
    return comp, plan, registry()["snapdragon-8-elite"]._lower_graph(comp, plan).model


def test_onnx_and_torch_front_ends_agree(dit_graph):
    comp, plan, model = dit_graph
    o = onnx_graph_cost(model)
    with npu_friendly(comp.module):
        t = torch_graph_cost(comp, plan.signature, CostModel(disk=False))
        full = torch_graph_cost(comp, plan.signature, CostModel(memoize_blocks=False, disk=False))
    # the same MACs in every class, from an ONNX graph and from a shapes-only torch run
    assert o.macs_by_class() == t.macs_by_class() and t.macs_by_class()["attention"] > 0
    # skipped repeated blocks are replayed: the memoized run has the unmemoized run's nodes
    assert t.ops == full.ops and 2 * t.macs == pytest.approx(t.flops, rel=1e-3)
    lo, lt = estimate_graph(o, S8, "w8a16").latency_ms, estimate_graph(t, S8, "w8a16").latency_ms
    assert abs(lo / lt - 1) < 0.25  # node counts differ a little (the exporter decomposes GELU)
    assert estimate_graph(o, S8, "w8a16").weights_mb == pytest.approx(comp.params() / 2**20, rel=0.05)


def test_roofline_responds_to_work_precision_and_chip():
    mm = GraphCost((OpCost("matmul", macs=int(4e9), act_elems=int(2e6), weight_elems=int(16e6)),), int(16e6), 0,
                   int(2e6), 0)
    lat = {p: estimate_graph(mm, S8, p).latency_ms for p in S8.precisions}
    assert lat["w8a8"] < lat["w8a16"] < lat["fp16"]  # MAC rate and bytes by precision
    double = GraphCost(mm.ops * 2, mm.weight_elems, 0, mm.peak_act_elems, 0)
    once = S8.efficiency["w8a16"].graph_us / 1e3  # a per-graph cost, paid once
    assert estimate_graph(double, S8, "w8a16").latency_ms == pytest.approx(2 * lat["w8a16"] - once)
    assert estimate_graph(mm, SX, "w8a16").latency_ms > lat["w8a16"]  # the laptop NPU is slower per AI Hub
    est = estimate_graph(mm, S8, "w4a16")
    assert est.weights_mb == pytest.approx(16e6 * 0.5 / 2**20)
    with pytest.raises(TargetError, match="precision 'w4a8' is not supported.*snapdragon-8-elite.yaml"):
        estimate_graph(mm, S8, "w4a8")
    slow = Efficiency(conv=1, matmul=0.01, attention=1, weights=1, activations=1, node_us=0)
    assert estimate_graph(mm, S8, "w8a16", slow).latency_ms > 10 * lat["w8a16"]


def test_the_estimator_sees_graphs_not_names(dit_graph):
    _, _, model = dit_graph
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.name = "resnet50"
    for i, n in enumerate(renamed.graph.node):
        n.name = f"n{i}"
    a = estimate_graph(onnx_graph_cost(model), S8, "w8a16")
    b = estimate_graph(onnx_graph_cost(renamed), S8, "w8a16")
    assert a == b


def test_peak_memory_counts_live_activations():
    class Chain(torch.nn.Module):
        def forward(self, x):
            a = x * 2          # 1M floats
            b = a + 1          # a dies after this
            c = torch.cat([b, b], 1)  # 2M floats, b dies after
            return c.sum(1)

    x = torch.empty(1000, 1000, device="meta")
    cost = module_graph_cost(Chain(), x)
    # x + b + c live together (4M floats); never a, b, c and x at once (5M)
    assert 3e6 <= cost.peak_act_elems <= 4.01e6
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Chain(), (torch.zeros(1000, 1000),), buf, opset_version=17, dynamo=False)
    assert onnx_graph_cost(onnx.load_from_string(buf.getvalue())).peak_act_elems == cost.peak_act_elems


def test_memory_plan_keeps_everything_resident_when_it_fits():
    w, a = {"t": 100.0, "d": 200.0}, {"t": 10.0, "d": 50.0}
    fits = memory_plan([("t", ["t"]), ("d", ["d"])], w, a, 5.0, budget=1000.0)
    assert fits["policy"] == "all_resident" and fits["peak_mb"] == pytest.approx(355 / 2**20, abs=1e-3)
    tight = memory_plan([("t", ["t"]), ("d", ["d"])], w, a, 5.0, budget=300.0)
    assert tight["policy"] == "sequential" and tight["peak_mb"] == pytest.approx(255 / 2**20, abs=1e-3)


@pytest.mark.slow
def test_estimate_of_a_real_size_pipeline():
    """The 768p model on the meta device (what `ndopt plan` estimates): end-to-end latency and peak
    memory with a per-component breakdown from the pipeline's cost analysis."""
    from ndopt.frontends import load_model

    pipe = load_model("pyramid-flow-sd3-768p", meta=True)
    float_est = registry()["snapdragon-8-elite"].estimate(pipe)  # unquantized: the NPU's float path
    assert float_est["precision"] == "fp16" and set(float_est["precisions"].values()) == {"fp16"}
    est = registry()["snapdragon-8-elite"].estimate(pipe, "w8a16")  # what-if: every component at w8a16
    assert est["precision"] == "w8a16" and est["calibrated"]
    assert float_est["components"]["dit"]["weights_mb"] == pytest.approx(2 * est["components"]["dit"]["weights_mb"])
    assert float_est["latency_ms"] > est["latency_ms"]
    comps = est["components"]
    assert set(comps) == {"text_encoder", "dit", "vae_decoder"}
    assert est["latency_ms"] == pytest.approx(sum(c["latency_ms"] for c in comps.values()), rel=1e-6)
    cost = CostModel().pipeline_cost(pipe)
    assert {c.name: c.calls_per_video for c in cost.components if c.calls_per_video} == {
        k: c["calls_per_video"] for k, c in comps.items()}  # 480 DiT calls: 20-20-20 / 10-10-10 with CFG
    assert comps["dit"]["flops_per_video"] == pytest.approx(cost.flops_per_video - sum(
        c.flops_per_video for c in cost.components if c.name != "dit"), rel=1e-6)
    assert comps["dit"]["latency_ms"] > comps["vae_decoder"]["latency_ms"] > comps["text_encoder"]["latency_ms"]
    # 2B DiT at w8a16: ~2 GB of weights; T5-XXL + CLIPs ~5 GB
    assert 1.8e3 < comps["dit"]["weights_mb"] < 2.1e3 and 4.4e3 < comps["text_encoder"]["weights_mb"] < 5.6e3
    assert est["peak_memory_mb"] == est["memory_plan"]["peak_mb"] > comps["dit"]["weights_mb"]
    assert not est["memory_plan"]["fits"]  # a monolithic 768p decode does not fit a phone: say so


def test_plan_command_carries_the_estimates():
    res = CliRunner().invoke(main, ["plan", "--model", "pyramid-flow-tiny", "--target", "snapdragon-x-elite", "--json"])
    assert res.exit_code == 0, res.output
    est = json.loads(res.stdout)["estimates"]["snapdragon-x-elite"]
    assert est["latency_ms"] > 0 and est["components"]["dit"]["calls_per_video"] == 180


def test_estimate_command_prints_latency_and_peak_memory(dit_graph, tmp_path):
    _, _, model = dit_graph
    path = tmp_path / "dit.onnx"
    onnx.save_model(model, str(path))
    res = CliRunner().invoke(main, ["estimate", str(path), "--target", "snapdragon-8-elite", "--precision", "w8a16",
                                    "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) == {"latency_ms", "peak_memory_mb"} and out["latency_ms"] > 0 and out["peak_memory_mb"] > 3
    bad = CliRunner().invoke(main, ["estimate", str(path), "--target", "snapdragon-8-elite", "--precision", "int2"])
    assert bad.exit_code == 2 and "not supported" in bad.output
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    res = CliRunner().invoke(main, ["estimate", str(junk), "--target", "snapdragon-x-elite"])
    assert res.exit_code == 2 and "cannot read it as an ONNX model" in res.output


def test_component_precision_attr_is_priced():
    from ndopt.frontends import load_model

    t = registry()["snapdragon-8-elite"]
    tiny = load_model("pyramid-flow-tiny", meta=True)
    small = tiny.replace(schedule=tiny.schedule.with_frames(1), remove=["text_encoder", "vae_encoder"])
    a = t.estimate(small)
    b = t.estimate(small.replace(dit=small["dit"].with_attrs(precision="w4a16")))
    assert b["components"]["dit"]["precision"] == "w4a16" and a["components"]["dit"]["precision"] == "fp16"
    assert b["components"]["dit"]["weights_mb"] == pytest.approx(a["components"]["dit"]["weights_mb"] / 4)
    assert a["precision"] == "fp16" and b["precision"] == "mixed"  # the decoder stays float


def test_unquantized_components_are_float_and_the_mix_is_reported():
    """Only what the quantization pass recorded is priced quantized; the rest run the NPU's float path,
    and a pipeline with both says "mixed" with the precision of each component."""
    from ndopt.frontends import load_model

    t = registry()["snapdragon-x-elite"]
    tiny = load_model("pyramid-flow-tiny", meta=True)
    small = tiny.replace(schedule=tiny.schedule.with_frames(1), remove=["vae_encoder"])
    est = t.estimate(small.replace(dit=small["dit"].with_attrs(precision="w8a16")))
    assert est["precision"] == "mixed"
    assert est["precisions"] == {"text_encoder": "fp16", "dit": "w8a16", "vae_decoder": "fp16"}
    assert {n: c["precision"] for n, c in est["components"].items()} == est["precisions"]
    fp = t.estimate(small)["components"]
    assert est["components"]["dit"]["latency_ms"] < fp["dit"]["latency_ms"]  # int8 weights, faster MACs
    assert est["components"]["vae_decoder"]["latency_ms"] == fp["vae_decoder"]["latency_ms"]


def test_activations_past_the_on_chip_memory_stream_at_dram_rates():
    from targets.estimator import SPILL_BYTES

    eff = Efficiency(conv=1, matmul=1, attention=1, weights=0.5, activations=5.0, node_us=0)
    def ms(elems: int) -> float:
        return estimate_graph(GraphCost((OpCost("vector", act_elems=elems),), 0, 0, elems, 0), S8, "fp16",
                              eff).latency_ms
    fits, spills = SPILL_BYTES // 4, SPILL_BYTES  # fp16: half the threshold, and twice it
    assert ms(spills) / ms(fits) == pytest.approx(4 * 5.0 / 0.5)  # 4x the bytes at a tenth of the rate


def test_onnx_front_end_fuses_folds_and_pads_as_the_npu_converter_does():
    from onnx import TensorProto, helper, numpy_helper

    from targets.onnx_costs import vector_padded

    w = numpy_helper.from_array(torch.zeros(64, 64, 3, 3).numpy(), "w")
    g = helper.make_graph([
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["y", "x"], ["r"]),  # a residual add: two activations, priced
        helper.make_node("Relu", ["r"], ["a"]),  # after an elementwise op: the same pass
        helper.make_node("Shape", ["a"], ["s"]),  # shape arithmetic on static shapes: folded
        helper.make_node("Mul", ["s", "s"], ["dims"]),
        helper.make_node("GlobalAveragePool", ["a"], ["p"]),  # a reduction
        helper.make_node("LayerNormalization", ["t", "g", "b"], ["n"]),  # rows of 96: padded to the vector
    ], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 56, 56]),
             helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 100, 96])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("p", "n")]
        + [helper.make_tensor_value_info("dims", TensorProto.INT64, None)],
        [w, numpy_helper.from_array(torch.ones(96).numpy(), "g"), numpy_helper.from_array(torch.zeros(96).numpy(), "b")])
    cost = onnx_graph_cost(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert [o.kind for o in cost.ops] == ["conv", "vector", "norm", "norm"]
    assert cost.ops[-1].act_elems == 2 * 100 * vector_padded(96) and vector_padded(96) > 96
