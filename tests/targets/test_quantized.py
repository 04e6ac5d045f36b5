"""Quantized graphs in Qualcomm's formats, through `ndopt.run` of a quantization-only recipe for the
X Elite: the pass takes the target's HTP config (htp_v73), every graph of a quantized component
ships as QDQ ONNX (checked against the sim) and as a float graph with AIMET encodings, precisions
are per component (the float text encoder is fp16), and another HTP version's encodings are refused."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ndopt.errors import LoweringError
from ndopt.eval.metrics import pixel_psnr
from targets import registry, runtime
from targets.quantized import ENCODING_VERSION, encodings_from_qdq


@pytest.mark.slow
def test_run_quantizes_with_the_targets_htp_config(quantized_run):
    step = next(s for s in quantized_run["report"]["steps"] if s["name"] == "aimet_quantization")
    assert step["metrics"]["aimet_config"] == "htp_v73"
    assert step["metrics"]["aimet_config_source"] == "target snapdragon-x-elite"
    assert "precision: w8a16 (htp_v73)" in quantized_run["report"]["final_summary"]


@pytest.mark.slow
def test_every_quantized_graph_ships_qdq_and_encodings(quantized_run):
    bundle, man = quantized_run["bundle"], quantized_run["manifest"]
    quantized = {n: g for n, g in man["graphs"].items() if g["component"] in ("dit", "vae_decoder")}
    assert len(quantized) == 4  # the recipe's one latent frame: three DiT layouts (one per stage) and the decoder
    for name, g in quantized.items():
        assert g["precision"] == "w8a16" and g["qdq"] == f"{name}.qdq.onnx" and g["encodings"] == f"{name}.encodings"
        assert g["qdq_numerics"]["ok"] and g["qdq_numerics"]["rel_err"] <= 1e-2, g["qdq_numerics"]
        qdq = onnx.load(str(bundle / g["qdq"]))
        ops = {n.op_type for n in qdq.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and qdq.opset_import[0].version == 21
        enc = json.loads((bundle / g["encodings"]).read_text())
        assert enc["version"] == ENCODING_VERSION and enc["activation_encodings"] and enc["param_encodings"]
        # the encodings key the tensors of the float graph shipped beside them
        float_graph = onnx.load(str(bundle / g["encodings_graph"]))
        names = {x for n in float_graph.graph.node for x in (*n.input, *n.output)}
        names |= {i.name for i in float_graph.graph.initializer} | {i.name for i in float_graph.graph.input}
        assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in float_graph.graph.node}
        keys = {e["name"] for e in (*enc["activation_encodings"], *enc["param_encodings"])}
        assert keys <= names, sorted(keys - names)[:5]
        assert {e["bw"] for e in enc["param_encodings"]} >= {8, 32} and {e["bw"] for e in enc["activation_encodings"]} == {16}
    text = man["graphs"]["text_encoder__prompt"]
    assert text["precision"] == "fp16" and "qdq" not in text and text["encodings"] is None


@pytest.mark.slow
def test_estimates_price_each_component_at_its_precision(quantized_run):
    man = quantized_run["manifest"]
    assert man["estimate"]["precision"] == "mixed" and man["target"]["precision"] == "mixed"
    assert man["estimate"]["precisions"] == {"text_encoder": "fp16", "dit": "w8a16", "vae_decoder": "w8a16"}
    assert man["weights"]["text_encoder"]["precision"] == "fp16"
    # the DiT's file holds its float and quantized-value weights; the runtime loads one form, at 8 bits
    dit = man["weights"]["dit"]
    assert len(dit["files"]) == 9 and man["memory_plan"]["weights_mb"]["dit"] < 0.3 * dit["bytes"] / 2**20
    low = quantized_run["report"]["lowering"]["snapdragon-x-elite"]
    assert low["precision"] == "mixed" and low["estimate"]["components"]["text_encoder"]["precision"] == "fp16"


def test_plan_of_neodragon_xelite_quantizes_with_htp_v73(tmp_path, monkeypatch):
    import ndopt

    # one latent frame: the HTP config comes from the recipe's target, whatever the video's length, and the
    # plan shape-runs half the DiT signatures; the report goes to tmp_path (not ./runs), without its plots
    for plot in ("plot_report", "_plot_estimates"):
        monkeypatch.setattr(f"ndopt.report.{plot}", lambda *a: {})
    res = ndopt.plan("neodragon-xelite", latent_frames=1, report_dir=tmp_path)
    step = next(p for p in res["passes"] if p["name"] == "aimet_quantization")
    assert step["metrics"]["aimet_config"] == "htp_v73"
    assert step["metrics"]["aimet_config_source"] == "target snapdragon-x-elite"
    assert "w8a16 (htp_v73)" in res["final_summary"]


def test_lowering_refuses_encodings_for_another_htp_version(tiny, tmp_path):
    """A component quantized for the 8 Elite (htp_v79) cannot lower for the X Elite (htp_v73)."""
    pipe = tiny.replace(dit=tiny["dit"].with_attrs(precision="w8a16", aimet_config="htp_v79",
                                                   aimet_config_source="recipe"))
    with pytest.raises(LoweringError, match=r"component 'dit' was quantized with htp_v79 \(from recipe\) but this "
                                            r"target runs htp_v73.*rerun aimet_quantization"):
        registry()["snapdragon-x-elite"].lower(pipe, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def _qdq_model() -> onnx.ModelProto:
    """y = DQ(Q(x)) @ DQ(Q(W)) + DQ(b_int32): an activation (uint16), a per-channel int8 weight, an int32 bias."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    inits = [numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(np.array(0.01, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(32768, np.uint16), "x_zp"),
             numpy_helper.from_array(np.array([0.01, 0.02, 0.03, 0.04], np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
             numpy_helper.from_array(np.array([1, 2, 3, 4], np.int32), "b_q"),
             numpy_helper.from_array(np.array(0.5, np.float32), "b_scale"),
             numpy_helper.from_array(np.array(0, np.int32), "b_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
             helper.make_node("QuantizeLinear", ["W", "w_scale", "w_zp"], ["W_q"], axis=1),
             helper.make_node("DequantizeLinear", ["W_q", "w_scale", "w_zp"], ["W_dq"], axis=1),
             helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"]),
             helper.make_node("MatMul", ["x_dq", "W_dq"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def test_encodings_from_a_qdq_graph():
    import onnxruntime as ort

    model = _qdq_model()
    stripped, enc = encodings_from_qdq(model)
    onnx.checker.check_model(stripped, full_check=True)
    assert [n.op_type for n in stripped.graph.node] == ["MatMul", "Add"]
    assert list(stripped.graph.node[0].input) == ["x", "W"]
    acts = {e["name"]: e for e in enc["activation_encodings"]}
    params = {e["name"]: e for e in enc["param_encodings"]}
    assert set(acts) == {"x"} and set(params) == {"W", "b"}
    assert acts["x"] | {} == {"name": "x", "dtype": "INT", "bw": 16, "is_sym": True, "scale": [pytest.approx(0.01)],
                              "offset": [-32768], "enc_type": "PER_TENSOR"}
    assert params["W"]["bw"] == 8 and params["W"]["enc_type"] == "PER_CHANNEL" and params["W"]["offset"] == [-128] * 4
    assert params["W"]["is_sym"] and params["b"]["bw"] == 32
    b = numpy_helper.to_array(next(i for i in stripped.graph.initializer if i.name == "b"))
    assert b.tolist() == [0.5, 1.0, 1.5, 2.0]  # the int32 bias, dequantized
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    got = ort.InferenceSession(stripped.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    np.testing.assert_allclose(got, x @ w + b, rtol=1e-5, atol=1e-5)  # the float model, no quantization


# ---- the bundle runtime on a quantized bundle (here, beside the session's quantized lowering) --------
PROMPT = "a red ball bouncing on grass"


def _opened(monkeypatch) -> list[str]:
    """The manifest fields of the files the runtime verifies and opens, in order."""
    fields: list[str] = []
    verified = runtime.verified

    def recording(bundle, name, expected, what, field):
        fields.append(field)
        return verified(bundle, name, expected, what, field)

    monkeypatch.setattr(runtime, "verified", recording)
    return fields


@pytest.fixture(scope="module")
def qdq_run(quantized_run):
    """The quantized bundle run once through its QDQ graphs (seed 3), with the manifest fields the runtime
    opened: the preference test and the comparison with the reloaded sims read this one run."""
    with pytest.MonkeyPatch.context() as mp:
        fields = _opened(mp)
        out = runtime.generate(quantized_run["bundle"], PROMPT, seed=3, provider="cpu", threads=1,
                               prefer_quantized=True)
    return out, fields


@pytest.mark.slow
def test_the_quantized_form_is_preferred(quantized_run, qdq_run, monkeypatch):
    """A quantized bundle (DiT and VAE decoder at W8A16): its QDQ graphs run unless prefer_quantized is
    False; the float text encoder has none, so its float graph runs either way."""
    bundle, man = quantized_run["bundle"], quantized_run["manifest"]
    qdq = {g for g, e in man["graphs"].items() if e.get("qdq")}
    assert qdq and {man["graphs"][g]["role"] for g in qdq} == {"dit", "vae_decoder"}
    runs, opened = {True: qdq_run[0]}, {True: qdq_run[1], False: _opened(monkeypatch)}
    runs[False] = runtime.generate(bundle, PROMPT, seed=3, provider="cpu", threads=1, prefer_quantized=False)
    for prefer, fields in opened.items():
        graphs = {f for f in fields if f.startswith("graphs.") and not f.endswith(".external_data")}
        assert graphs == {f"graphs.{g}.{'qdq' if prefer and g in qdq else 'file'}" for g in man["graphs"]}
        assert {f"weights.{c}.file" for c in man["weights"]} <= set(fields)  # shared weights, either form
    # the QDQ graphs' numbers are W8A16's, not the float graphs': the same noise gives other latents
    rel = np.linalg.norm(runs[True].latents - runs[False].latents) / np.linalg.norm(runs[False].latents)
    assert rel > 1e-3, rel


@pytest.mark.slow
def test_a_tampered_weights_file_is_refused_when_the_qdq_graphs_run(quantized_run, tmp_path):
    """QDQ graphs read the component's shared `<component>.weights.bin` too: it is verified whichever
    form runs."""
    bundle = Path(shutil.copytree(quantized_run["bundle"], tmp_path / "q"))
    record = quantized_run["manifest"]["weights"]["dit"]
    assert record["sha256"] and any(f.endswith(".qdq.onnx") for f in record["files"])
    path = bundle / record["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(LoweringError, match=rf"weights of dit {record['file']} \(weights\.dit\.file\).*sha256"):
        runtime.generate(bundle, PROMPT, provider="cpu", threads=1, prefer_quantized=True)


# ---- AI Hub: the quantized form is what gets compiled (fake client, see test_aihub.py) -------------
@pytest.fixture
def credentials(tmp_path, monkeypatch):
    from test_aihub import TOKEN

    ini = tmp_path / "client.ini"
    ini.write_text(f"[api]\napi_token = {TOKEN}\napi_url = https://workbench.aihub.qualcomm.com\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))


@pytest.mark.slow
def test_lower_submits_the_qdq_graph_of_quantized_components(monkeypatch, credentials, quantized_run, tmp_path):
    """A quantized component goes to AI Hub as its QDQ ONNX (compiled to a quantized QNN model), a float
    one as its graph directory with the shared weights file; each component is linked."""
    from test_aihub import LinkingHub

    from targets.hub_jobs import profile_on_hub
    from targets.snapdragon import SnapdragonTarget

    hub = LinkingHub()
    monkeypatch.setitem(sys.modules, "qai_hub", hub)
    bundle, man = quantized_run["bundle"], quantized_run["manifest"]

    class Lowered:  # what profile_on_hub reads of a lowered graph
        def __init__(self, name, g):
            self.plan = types.SimpleNamespace(name=name, component=g["component"])
            self.model = onnx.load(str(bundle / g["file"]), load_external_data=False)

    target = registry()["snapdragon-x-elite"]
    assert isinstance(target, SnapdragonTarget)
    res = profile_on_hub(target.spec, bundle, [Lowered(n, g) for n, g in man["graphs"].items()], man["graphs"])
    assert res["status"] == "ok"
    first = {c["name"]: c for c in hub.compiles if not c["name"].endswith(":dlc")}
    assert Path(first["ndopt:dit__unit0_stage0"]["model"]).name == "dit__unit0_stage0.qdq.onnx"
    text = Path(first["ndopt:text_encoder__prompt"]["model"])
    assert text.name == "text_encoder__prompt.onnx"
    assert {lk["name"] for lk in hub.links} == {"ndopt:text_encoder", "ndopt:dit", "ndopt:vae_decoder"}
    assert len(next(lk for lk in hub.links if lk["name"] == "ndopt:dit")["models"]) == 3  # one per DiT layout


@pytest.mark.slow
def test_quantized_bundle_follows_the_reloaded_aimet_sims(quantized_run, qdq_run):
    """`RUN/model` reloads the AIMET sims; the bundle runtime runs the QDQ graphs; same prompt and numpy
    seed: frames >= 35 dB apart and latents within 0.03 relative (measured 0.0146 on the 8 Elite
    variant of this recipe)."""
    import torch

    import ndopt

    pipe = ndopt.load_model(str(quantized_run["model"]))
    with torch.no_grad():
        lat = pipe.sampler.sample(pipe, [PROMPT], generator=np.random.default_rng(3)).float().numpy()
        video = pipe.sampler.decode(pipe, torch.from_numpy(lat)).float().numpy()
    out = qdq_run[0]  # runtime.generate(bundle, PROMPT, seed=3, provider="cpu", threads=1): its QDQ graphs
    assert out.provider == "CPUExecutionProvider" and out.latents.shape == lat.shape
    rel = float(np.linalg.norm(out.latents.astype(np.float64) - lat) / np.linalg.norm(lat))
    assert rel <= 0.03, rel
    assert pixel_psnr(torch.from_numpy(out.video), torch.from_numpy(video)) >= 35.0
