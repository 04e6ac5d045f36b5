"""AI Hub, with a fake `qai_hub` module (no network): one compile (QNN context binary) and one
profile job per graph, measured latencies merged next to the estimates, the token never logged or
written; without credentials or without the package, one line says how to configure and we go on."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch

from targets import aihub, registry

TOKEN = "sk-3f9a8c7e6d5b4a39281706f5e4d3c2b1a0f9e8d7"


class FakeJob:
    def __init__(self, hub: FakeHub, kind: str, name: str, ok: bool = True) -> None:
        hub.counter += 1
        self.job_id, self.kind, self.name, self.ok, self.hub = f"j{hub.counter}", kind, name, ok, hub

    def wait(self):
        return types.SimpleNamespace(success=self.ok, message="" if self.ok else f"failed (api_token={TOKEN})")

    def get_target_model(self):
        return f"compiled:{self.name}"

    def download_profile(self):
        return {"execution_summary": {"estimated_inference_time": 1000.0 * (1 + len(self.name) % 7),
                                      "inference_memory_peak_range": [1 << 20, 3 << 20]}}


class FakeHub(types.ModuleType):
    def __init__(self, fail: set[str] = frozenset(), raise_on_device: bool = False) -> None:
        super().__init__("qai_hub")
        self.counter, self.fail, self.raise_on_device = 0, set(fail), raise_on_device
        self.compiles: list[dict] = []
        self.profiles: list[dict] = []

    def Device(self, name: str):
        if self.raise_on_device:
            raise RuntimeError(f"Failed to authenticate with api_token={TOKEN}")
        return types.SimpleNamespace(name=name)

    def submit_compile_job(self, model, device, name, input_specs, options):
        self.compiles.append({"model": model, "device": device.name, "name": name, "input_specs": input_specs,
                              "options": options})
        return FakeJob(self, "compile", name, ok=name.split(":")[1] not in self.fail)

    def submit_inference_job(self, model, device, name, profile):
        assert profile is True
        self.profiles.append({"model": model, "device": device.name, "name": name})
        return FakeJob(self, "profile", name)


@pytest.fixture
def credentials(tmp_path, monkeypatch):
    ini = tmp_path / "client.ini"
    ini.write_text(f"[api]\napi_token = {TOKEN}\napi_url = https://workbench.aihub.qualcomm.com\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    return ini


@pytest.fixture
def hub(monkeypatch, credentials):
    fake = FakeHub()
    monkeypatch.setitem(sys.modules, "qai_hub", fake)
    return fake


def small_graphs(tmp_path: Path, n: int = 2) -> list[aihub.GraphJob]:
    jobs = []
    for i in range(n):
        path = tmp_path / f"g{i}.onnx"
        torch.onnx.export(torch.nn.Linear(4, 4), (torch.zeros(1, 4),), str(path), input_names=["x"], opset_version=17,
                          dynamo=False)
        jobs.append(aihub.GraphJob(f"graph{i}", path, {"x": ((1, 4), "float32")}))
    return jobs


def test_jobs_per_graph_and_results_merged_without_the_token(hub, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="ndopt")
    jobs = small_graphs(tmp_path, 3)
    res = aihub.profile_bundle(jobs, "Snapdragon 8 Elite QRD", "--target_runtime qnn_context_binary")
    assert res["status"] == "ok" and set(res["graphs"]) == {"graph0", "graph1", "graph2"}
    assert [c["options"] for c in hub.compiles] == ["--target_runtime qnn_context_binary"] * 3
    assert {c["device"] for c in hub.compiles} == {"Snapdragon 8 Elite QRD"}
    assert hub.compiles[0]["input_specs"] == {"x": ((1, 4), "float32")}
    assert [p["model"] for p in hub.profiles] == ["compiled:ndopt:graph0", "compiled:ndopt:graph1", "compiled:ndopt:graph2"]
    for row in res["graphs"].values():
        assert row["status"] == "ok" and row["measured_latency_ms"] > 0 and row["measured_peak_memory_mb"] == 3.0
    merged = aihub.merge_measured({"graph0": {"latency_ms": 2.0}, "graph1": {"latency_ms": 1.0}}, res)
    assert merged["graph0"]["measured_latency_ms"] == res["graphs"]["graph0"]["measured_latency_ms"]
    assert merged["graph0"]["estimate_over_measured"] == pytest.approx(2.0 / merged["graph0"]["measured_latency_ms"], abs=1e-4)
    assert TOKEN not in caplog.text and TOKEN not in json.dumps(res)


def test_a_failed_compile_is_recorded_and_the_others_go_on(hub, tmp_path, caplog):
    hub.fail = {"graph0"}
    res = aihub.profile_bundle(small_graphs(tmp_path, 2), "Snapdragon X Elite CRD", "--target_runtime qnn_context_binary")
    assert res["graphs"]["graph0"]["status"] == "compile_failed" and res["graphs"]["graph1"]["status"] == "ok"
    assert "<redacted>" in res["graphs"]["graph0"]["message"]
    assert TOKEN not in caplog.text and TOKEN not in json.dumps(res)


def test_client_errors_end_the_session_with_one_redacted_line(monkeypatch, credentials, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "qai_hub", FakeHub(raise_on_device=True))
    res = aihub.profile_bundle(small_graphs(tmp_path, 1), "Snapdragon 8 Elite QRD", "")
    assert res["status"] == "failed" and "continuing offline" in res["reason"]
    assert TOKEN not in caplog.text and TOKEN not in json.dumps(res)


def test_without_credentials_one_line_says_how_and_we_go_on(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ndopt")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "missing.ini"))
    monkeypatch.setitem(sys.modules, "qai_hub", FakeHub())  # installed, but never called
    res = aihub.profile_bundle(small_graphs(tmp_path, 1), "Snapdragon 8 Elite QRD", "")
    assert res["status"] == "offline"
    lines = [r.getMessage() for r in caplog.records if "AI Hub" in r.getMessage()]
    assert len(lines) == 1 and "qai-hub configure --api_token" in lines[0] and "QAIHUB_CLIENT_INI" in lines[0]
    assert sys.modules["qai_hub"].compiles == []


def test_without_the_package_one_line_names_the_extra(monkeypatch, credentials, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ndopt")
    monkeypatch.setitem(sys.modules, "qai_hub", None)  # import qai_hub raises ImportError
    res = aihub.profile_bundle(small_graphs(tmp_path, 1), "Snapdragon 8 Elite QRD", "")
    assert res["status"] == "offline" and "ndopt[hub]" in res["reason"]
    assert [r.getMessage() for r in caplog.records] == [res["reason"]]


def test_lower_with_credentials_submits_every_graph_and_merges(hub, tiny, tmp_path, caplog):
    """Through SnapdragonTarget.lower: the bundle's graphs go to the target's device; the manifest
    and the summary carry the measurements, never the token."""
    caplog.set_level(logging.DEBUG, logger="ndopt")
    pipe = tiny.replace(remove=["vae_encoder"])
    out = tmp_path / "bundle"
    summary = registry()["snapdragon-x-elite"].lower(pipe, out)
    man = json.loads((out / "manifest.json").read_text())
    names = set(man["graphs"])
    assert {c["name"].split(":")[1] for c in hub.compiles} == names and len(hub.profiles) == len(names)
    assert {c["device"] for c in hub.compiles} == {"Snapdragon X Elite CRD"}
    assert all(c["options"] == "--target_runtime qnn_context_binary" for c in hub.compiles)
    dit = hub.compiles[[c["name"] for c in hub.compiles].index("ndopt:dit__unit0_stage0")]
    assert dit["input_specs"]["encoder_attention_mask"][1] == "int32" and Path(dit["model"]).suffix == ".onnx"
    assert man["aihub"]["status"] == "ok" and summary["aihub"]["status"] == "ok"
    for g in names:
        row = man["estimate"]["graphs"][g]
        assert row["measured_latency_ms"] > 0 and row["estimate_over_measured"] > 0
    blob = (out / "manifest.json").read_text() + json.dumps(summary) + caplog.text
    assert TOKEN not in blob
    assert onnx.load(str(out / "dit__unit0_stage0.onnx")).graph.input  # the bundle is intact


class LinkingHub(FakeHub):
    """A fake client that also links (compile to DLC, then one link job per component)."""

    def __init__(self, fail_link: set[str] = frozenset()) -> None:
        super().__init__()
        self.links: list[dict] = []
        self.fail_link = set(fail_link)

    def submit_link_job(self, models, device=None, name=None, options=""):
        self.links.append({"models": list(models), "device": device.name, "name": name})
        return FakeJob(self, "link", name, ok=name.split(":")[1] not in self.fail_link)


def test_link_job_per_component_from_its_dlc_graphs(monkeypatch, credentials, tmp_path):
    hub = LinkingHub(fail_link={"vae_decoder"})
    monkeypatch.setitem(sys.modules, "qai_hub", hub)
    jobs = [aihub.GraphJob(j.graph, j.model, j.input_specs, component=c)
            for j, c in zip(small_graphs(tmp_path, 3), ("dit", "dit", "vae_decoder"))]
    res = aihub.profile_bundle(jobs, "Snapdragon X Elite CRD", "--target_runtime qnn_context_binary", link=True)
    dlc = [c for c in hub.compiles if c["name"].endswith(":dlc")]
    assert [c["options"] for c in dlc] == ["--target_runtime qnn_dlc"] * 3
    assert [(lk["name"], lk["models"]) for lk in hub.links] == [
        ("ndopt:dit", ["compiled:ndopt:graph0:dlc", "compiled:ndopt:graph1:dlc"]),
        ("ndopt:vae_decoder", ["compiled:ndopt:graph2:dlc"])]
    assert res["links"]["dit"]["status"] == "ok" and res["links"]["dit"]["graphs"] == ["graph0", "graph1"]
    assert res["links"]["vae_decoder"]["status"] == "link_failed" and "<redacted>" in res["links"]["vae_decoder"]["message"]
    assert aihub.dlc_options("--target_runtime qnn_context_binary --quantize_io") == "--target_runtime qnn_dlc --quantize_io"


class RaisingLinkHub(LinkingHub):
    """A client whose link job raises (network, quota) after every graph was profiled."""

    def submit_link_job(self, models, device=None, name=None, options=""):
        raise ConnectionError(f"link service unavailable (api_token={TOKEN})\nTraceback line two")


def test_a_raising_link_job_keeps_the_measurements(monkeypatch, credentials, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "qai_hub", RaisingLinkHub())
    jobs = [aihub.GraphJob(j.graph, j.model, j.input_specs, component="dit") for j in small_graphs(tmp_path, 2)]
    res = aihub.profile_bundle(jobs, "Snapdragon X Elite CRD", "--target_runtime qnn_context_binary", link=True)
    assert res["status"] == "ok" and {r["status"] for r in res["graphs"].values()} == {"ok"}
    assert all(r["measured_latency_ms"] > 0 for r in res["graphs"].values())
    assert set(res["links"]) == {"status", "reason"} and res["links"]["status"] == "failed"
    reason = res["links"]["reason"]
    assert "ConnectionError" in reason and "<redacted>" in reason and "\n" not in reason
    merged = aihub.merge_measured({"graph0": {"latency_ms": 2.0}, "graph1": {"latency_ms": 1.0}}, res)
    assert all("measured_latency_ms" in row for row in merged.values())
    assert TOKEN not in caplog.text and TOKEN not in json.dumps(res)


# ---- redaction by value: the configured token, whatever its length or characters ----------------
# (as written in client.ini, as qai-hub reads it: configparser turns %% into %)
ODD_TOKENS = [("k3Y9", "k3Y9"), ("a.b*c+d?(e)[f]{2}|^$\\x", "a.b*c+d?(e)[f]{2}|^$\\x"), ("p%%ss$w(rd", "p%ss$w(rd")]


class EchoingHub(LinkingHub):
    """A client that echoes the token bare (no `token=` before it) in job ids, failure messages and
    exceptions: only redaction by value can catch it."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token, self.fail = token, {"graph0"}

    def submit_compile_job(self, model, device, name, input_specs, options):
        job = super().submit_compile_job(model, device, name, input_specs, options)
        job.job_id = f"{job.job_id}-{self.token}"
        if not job.ok:
            job.wait = lambda: types.SimpleNamespace(success=False, message=f"quota of {self.token} used up")
        return job

    def submit_link_job(self, models, device=None, name=None, options=""):
        raise PermissionError(f"user {self.token}: link not allowed")


@pytest.mark.parametrize(("written", "token"), ODD_TOKENS, ids=["4-chars", "regex-metacharacters", "percent"])
def test_redact_removes_the_configured_token_by_value(monkeypatch, tmp_path, written, token):
    ini = tmp_path / "client.ini"
    ini.write_text(f"[api]\napi_token = {written}\napi_url = https://workbench.aihub.qualcomm.com\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    text = f"Authorization: Bearer {token}; url=https://x/?k={token}&v=1 ({token})"
    out = aihub.redact(text)
    assert token not in out and out.count("<redacted>") == 3 and "https://x/?k=" in out
    assert aihub.redact("nothing secret here") == "nothing secret here"
    # the shape rule stays: a long opaque string that is not the configured token goes too
    assert TOKEN not in aihub.redact(f"other key {TOKEN}")
    assert aihub.redact(f"x {token} y", secrets=[]) == f"x {token} y"  # by value: the configured one only


@pytest.mark.parametrize(("written", "token"), ODD_TOKENS[:2], ids=["4-chars", "regex-metacharacters"])
def test_a_token_echoed_bare_never_reaches_a_log_or_the_result(monkeypatch, tmp_path, caplog, written, token):
    caplog.set_level(logging.DEBUG, logger="ndopt")
    ini = tmp_path / "client.ini"
    ini.write_text(f"[api]\napi_token = {written}\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    hub = EchoingHub(token)
    monkeypatch.setitem(sys.modules, "qai_hub", hub)
    jobs = [aihub.GraphJob(j.graph, j.model, j.input_specs, component=c)
            for j, c in zip(small_graphs(tmp_path, 2), ("vae_decoder", "dit"))]
    res = aihub.profile_bundle(jobs, "Snapdragon X Elite CRD", "--target_runtime qnn_context_binary", link=True)
    # the client echoed it: in job ids (logged and recorded), a failure message, a raised link error
    assert res["graphs"]["graph0"]["status"] == "compile_failed" and res["graphs"]["graph1"]["status"] == "ok"
    assert res["links"]["status"] == "failed"
    assert "<redacted>" in res["graphs"]["graph0"]["message"] and "<redacted>" in res["graphs"]["graph1"]["compile_job"]
    assert "PermissionError" in res["links"]["reason"] and "<redacted>" in res["links"]["reason"]
    assert "submitted" in caplog.text and "<redacted>" in caplog.text
    assert token not in caplog.text and token not in json.dumps(res) and token not in str(res)
