"""`ndopt calibrate` and targets from a file: a new chip from a YAML path estimates with an
uncalibrated warning, and calibrating it from a directory of AI Hub profile JSONs (+ the ONNX each
was made from) writes a calibrated target file whose estimates reproduce the profiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from ndopt.cli import main
from ndopt.target import available_targets, get_target
from targets.estimator import estimate_graph
from targets.onnx_costs import load_static_graph, onnx_graph_cost
from targets.spec import specs


def _chip(tmp_path, calibrated: bool) -> str:
    data = specs()["snapdragon-8-elite"].model_dump(exclude={"path", "calibration"})
    data["name"] = "my-chip"
    if calibrated:
        data["calibration"] = {"calibrated": True, "source": "test"}
    path = tmp_path / "my-chip.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _graphs(tmp_path, n: int = 5) -> list:
    out = []
    for i in range(n):
        w = 16 * (i + 1)
        m = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.Flatten(),
                          nn.Linear(w * 16 * 16, 10 + i), nn.Softmax(-1)).eval()
        f = tmp_path / f"m{i}.onnx"
        torch.onnx.export(m, (torch.zeros(1, 3, 16, 16),), str(f), opset_version=17, dynamo=False)
        out.append(f)
    return out


def test_a_chip_from_a_file_estimates_and_says_it_is_uncalibrated(tmp_path):
    path = _chip(tmp_path, calibrated=False)
    t = get_target(path)
    assert t.name == "my-chip" and path in available_targets()  # wherever a target name is accepted
    f = _graphs(tmp_path, 1)[0]
    res = CliRunner().invoke(main, ["estimate", str(f), "--target", path, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.splitlines()[0])
    assert out["calibrated"] is False and "uncalibrated" in out["warning"]
    res = CliRunner().invoke(main, ["estimate", str(f), "--target", path])
    assert "warning: target my-chip is uncalibrated" in res.output
    shipped = CliRunner().invoke(main, ["estimate", str(f), "--target", "snapdragon-8-elite", "--json"])
    assert "warning" not in json.loads(shipped.output)
    assert "held-out error" in CliRunner().invoke(main, ["targets"]).output


def test_calibrate_fits_a_new_chip_from_profile_results(tmp_path):
    pytest.importorskip("scipy")
    prof = tmp_path / "profiles"
    prof.mkdir()
    spec = specs()["snapdragon-8-elite"]
    for f in _graphs(prof):  # profiles as AI Hub returns them: microseconds; here the shipped chip's figures
        ms = estimate_graph(onnx_graph_cost(load_static_graph(f)), spec, "w8a16").latency_ms
        (prof / f"{f.stem}.json").write_text(json.dumps({"execution_summary": {"estimated_inference_time": ms * 1e3}}))
    path, out = _chip(tmp_path, calibrated=False), tmp_path / "fitted.yaml"
    res = CliRunner().invoke(main, ["calibrate", "--target", path, "--profiles", str(prof), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "leave-one-model-out error" in res.output
    fitted = get_target(str(out))
    assert fitted.spec.calibration.calibrated and fitted.spec.efficiency["w8a16"].calibrated
    assert fitted.spec.calibration.error["w8a16"]["median"] < 0.05  # reproduces the profiles it was given
    assert not fitted.spec.efficiency["w8a8"].calibrated  # not profiled: derived, and says so


# Small calibration models whose AI Hub latencies are published (targets/calibration.tsv): fast to export.
PUBLISHED = ("torchvision:squeezenet1_1", "torchvision:mobilenet_v2", "torchvision:mnasnet0_5",
             "torchvision:shufflenet_v2_x1_0", "torchvision:regnet_y_800mf")


def test_calibrate_on_published_profiles_reproduces_the_shipped_error(tmp_path):
    """The must-show: a profiles directory of AI Hub's published fp16 latencies on the 8 Elite (the
    JSON a profile job returns) beside the ONNX of each model at the measured input shape; a fit of a
    bare chip on them cross-validates within a few points of the shipped constants' error there."""
    pytest.importorskip("scipy")
    from targets.calibration import export_graph, read_tsv

    spec = specs()["snapdragon-8-elite"]
    rows = {m.builder: m for m in read_tsv() if m.builder in PUBLISHED and m.precision == "fp16"
            and m.device in spec.ai_hub_devices}
    assert sorted(rows) == sorted(PUBLISHED)
    prof = tmp_path / "profiles"
    prof.mkdir()
    shipped = []
    for m in rows.values():
        f = export_graph(m.builder, prof / f"{m.model}.onnx", strip=False)
        (prof / f"{m.model}.json").write_text(json.dumps(
            {"execution_summary": {"estimated_inference_time": m.latency_ms * 1e3}, "precision": "fp16"}))
        shipped.append(estimate_graph(onnx_graph_cost(load_static_graph(f)), spec, "fp16").latency_ms / m.latency_ms)
    shipped_median = float(np.median(np.abs(np.array(shipped) - 1)))
    path, out = _chip(tmp_path, calibrated=False), tmp_path / "fitted.yaml"
    res = CliRunner().invoke(main, ["calibrate", "--target", path, "--profiles", str(prof), "--precision", "fp16",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    err = get_target(str(out)).spec.calibration.error["fp16"]
    assert err["n"] == len(PUBLISHED)
    assert abs(err["median"] - shipped_median) < 0.05, (err, shipped_median)  # within a few points


def test_a_chip_from_a_file_lowers_and_its_bundle_runs(tiny, tmp_path, offline):
    """`--target chip.yaml` lowers like a shipped target: the bundle is named after the chip, its
    manifest records the file (so `generate --bundle` finds the runtime) and its estimate says the
    chip is uncalibrated."""
    from ndopt.passmanager import PassContext
    from ndopt.runner import generate_bundle, lower_targets, with_steps

    path = _chip(tmp_path, calibrated=False)
    pipe = with_steps(tiny.replace(schedule=tiny.schedule.with_frames(1)), (1, 1, 1))  # few graphs
    out = lower_targets(pipe, [path], tmp_path / "run", PassContext(run_dir=tmp_path / "run"))
    low = out["my-chip"]
    assert low["status"] == "ok" and low["estimate"]["calibrated"] is False
    bundle = tmp_path / "run" / "bundles" / "my-chip"
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["target"]["name"] == "my-chip" and man["target"]["file"].endswith("my-chip.yaml")
    video, _ = generate_bundle(bundle, "a red circle moving left on a dark background", tmp_path / "v.png")
    assert video.is_file()
