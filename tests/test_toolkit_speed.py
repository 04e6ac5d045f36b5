"""The toolkit's speed machinery gives the same answers: thread policy, on-disk caches of plans and
shape runs, and the latents cache shared between runs (issue: a fast toolkit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ndopt import cache, threads
from ndopt.cli import main


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    monkeypatch.setenv("NDOPT_CACHE", "1")
    monkeypatch.setenv("NDOPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---- threads ---------------------------------------------------------------------------------------
def test_thread_policy_follows_size_load_and_override(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.0)
    assert threads.choose(None) == 4 and threads.choose(10) == threads.SMALL_MAX  # quiet
    monkeypatch.setattr(threads, "busy_cores", lambda: 1.0)
    assert threads.choose(None) == 3 and threads.choose(10) == 1  # a busy core: small work gets one
    monkeypatch.setattr(threads, "busy_cores", lambda: 9.0)
    assert threads.choose(None) == 1  # never zero
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.choose(10) == 3
    monkeypatch.setenv(threads.ENV, "lots")
    with pytest.raises(Exception, match="NDOPT_THREADS"):
        threads.choose(10)


def test_thread_context_restores_the_count():
    import torch

    before = torch.get_num_threads()
    with threads.for_work(n=1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_cli_threads_option_sets_the_override(monkeypatch):
    seen = []
    monkeypatch.setattr(threads, "set_override", seen.append)
    assert CliRunner().invoke(main, ["--threads", "1", "passes"]).exit_code == 0
    assert seen == [1]


# ---- plan cache ------------------------------------------------------------------------------------
def _plan_json(args: list[str]) -> dict:
    r = CliRunner().invoke(main, ["plan", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_repeated_plan_is_answered_from_the_cache_without_torch(cache_on, tmp_path, monkeypatch):
    """The cached answer equals the computed one (and one computed with every cache off); the warm
    plan runs in a process that never imports torch; other sizes or another recipe text miss."""
    args = ["--model", "pyramid-flow-tiny", "--frames", "9"]
    first = _plan_json(args)
    assert list((cache_on / "plans").iterdir()) and list((cache_on / "shapes").iterdir())
    env = {**os.environ, "NDOPT_CACHE": "1", "NDOPT_CACHE_DIR": str(cache_on)}
    code = ("import sys, json; from click.testing import CliRunner; from ndopt.cli import main; "
            f"r = CliRunner().invoke(main, ['plan', *{args!r}, '--json']); assert r.exit_code == 0, r.output; "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'out': json.loads(r.output)}))")
    warm = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)
    assert warm == {"torch": False, "out": first}
    monkeypatch.setenv("NDOPT_CACHE", "0")
    assert _plan_json(args) == first  # nothing cached: the same figures
    monkeypatch.setenv("NDOPT_CACHE", "1")
    other = _plan_json(["--model", "pyramid-flow-tiny", "--frames", "17"])
    assert other["latent_frames"] != first["latent_frames"]


def test_plan_key_follows_recipe_text_code_and_report_dir(cache_on, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: pyramid-flow-tiny\npasses:\n  - dead_component_elimination\n")
    args = {"recipe": str(recipe), "model": None, "target": None, "frames": None, "height": None, "width": None,
            "first_frame": None, "out_dir": None}
    k = cache.plan_key(args)
    assert cache.plan_key({**args, "out_dir": "elsewhere"}) == k  # where the report goes is not the plan
    recipe.write_text("name: r\nmodel: pyramid-flow-tiny\npasses:\n  - cfg_folding\n")
    assert cache.plan_key(args) != k
    k2 = cache.plan_key(args)
    monkeypatch.setattr(cache, "code_version", lambda: "another version")
    assert cache.plan_key(args) != k2


def test_cached_plan_report_files_land_in_the_report_dir(cache_on, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: pyramid-flow-tiny\npasses:\n  - dead_component_elimination\n")
    first = _plan_json([str(recipe), "--out", str(tmp_path / "a")])
    again = _plan_json([str(recipe), "--out", str(tmp_path / "b")])
    assert again["paths"]["json"] == str(tmp_path / "b" / "plan.json")
    assert (tmp_path / "b" / "plan.json").read_bytes() == (tmp_path / "a" / "plan.json").read_bytes()
    assert {k: v for k, v in again.items() if k != "paths"} == {k: v for k, v in first.items() if k != "paths"}


def test_a_corrupt_cache_entry_is_a_miss(cache_on):
    args = ["--model", "pyramid-flow-tiny"]
    first = _plan_json(args)
    for p in (cache_on / "plans").rglob("plan.json"):
        p.write_text("{not json")
    for p in (cache_on / "shapes").glob("*.json"):
        p.write_text('{"flops": "x"}')
    assert _plan_json(args) == first


# ---- shape-run cache -----------------------------------------------------------------------------------
def test_shape_cache_gives_the_same_costs_and_sees_structure(cache_on):
    from ndopt.frontends import load_model
    from ndopt.ir.cost import CostModel

    pipe = load_model("pyramid-flow-tiny", meta=True)
    computed = CostModel().pipeline_cost(pipe)
    n = len(list((cache_on / "shapes").glob("*.json")))
    assert n > 0
    cached = CostModel().pipeline_cost(load_model("pyramid-flow-tiny", meta=True))
    assert cached == computed and len(list((cache_on / "shapes").glob("*.json"))) == n  # all hits
    smaller = load_model("pyramid-flow-tiny", meta=True)
    dit = smaller["dit"].module
    dit.transformer_blocks = dit.transformer_blocks[:-1]  # another structure: its own entries
    fewer = CostModel().pipeline_cost(smaller)
    assert fewer.flops_per_video < computed.flops_per_video
    assert len(list((cache_on / "shapes").glob("*.json"))) > n


def test_estimates_with_a_warm_shape_cache_equal_the_cold_ones(cache_on, monkeypatch):
    """The estimator records every op of each call: a shape run answered from the disk cache records
    none, so the estimate must not read it (it once priced the text encoder and decoder at 0 ms)."""
    from ndopt.frontends import load_model
    from ndopt.ir.cost import CostModel
    from ndopt.target import get_target

    target = get_target("snapdragon-8-elite")
    CostModel().pipeline_cost(load_model("pyramid-flow-tiny", meta=True))  # warms the shape cache
    assert list((cache_on / "shapes").glob("*.json"))
    warm = target.estimate(load_model("pyramid-flow-tiny", meta=True))
    for name, row in warm["components"].items():
        assert row["latency_ms"] > 0, (name, row)
    monkeypatch.setenv("NDOPT_CACHE", "0")
    cold = target.estimate(load_model("pyramid-flow-tiny", meta=True))
    assert {k: r["latency_ms"] for k, r in warm["components"].items()} == \
        {k: r["latency_ms"] for k, r in cold["components"].items()}


# ---- prompt encodings ----------------------------------------------------------------------------------
def test_prompt_encodings_are_reused_until_the_text_encoder_changes(tiny):
    import copy

    import torch

    te = tiny["text_encoder"]
    pipe = tiny.replace(text_encoder=te.with_module(copy.deepcopy(te.module)))
    with torch.no_grad():
        a = pipe.sampler.encode_prompts(pipe, ["a red circle"])
        b = pipe.sampler.encode_prompts(pipe, ["a red circle"])
        assert all(x is y for x, y in zip(a, b))  # the cached tensors
        for p in pipe["text_encoder"].module.parameters():
            p.add_(0.01)  # in place: the same module object, other weights
        c = pipe.sampler.encode_prompts(pipe, ["a red circle"])
    assert c[0] is not a[0] and not torch.equal(c[0], a[0])
    d = pipe.sampler.encode_prompts(pipe, ["a red circle"])  # with autograd on: never cached
    assert d[0] is not c[0] and torch.equal(d[0].detach(), c[0])


def test_plan_key_follows_a_checkpoint_directory_the_recipe_names(cache_on, tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "diffusion_transformer_768p").mkdir(parents=True)
    cfg = ckpt / "diffusion_transformer_768p" / "config.json"
    cfg.write_text('{"num_layers": 24}')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {ckpt}\npasses:\n  - dead_component_elimination\n")
    args = {"recipe": str(recipe), "model": None, "target": None, "frames": None, "height": None, "width": None,
            "first_frame": None, "out_dir": None}
    k = cache.plan_key(args)
    cfg.write_text('{"num_layers": 18}')  # the same recipe text, another model
    assert cache.plan_key(args) != k


def test_the_code_version_sees_bundled_weights_headers(tmp_path):
    """A teacher reinstalled under the same file name with another architecture (its header's metadata)
    changes the code version, so plans cached for the old weights miss; the tensor data is not read."""
    import hashlib

    from safetensors.torch import save_file

    def digest(meta: dict[str, str]) -> str:
        root = tmp_path / meta["arch"]
        (root / "weights").mkdir(parents=True)
        (root / "code.py").write_text("x = 1\n")
        import torch

        save_file({"w": torch.zeros(4)}, str(root / "weights" / "tiny.safetensors"), metadata=meta)
        h = hashlib.sha256()
        cache._hash_files(h, root)
        return h.hexdigest()

    a, b = digest({"arch": "p2"}), digest({"arch": "p1"})
    assert a != b
    (tmp_path / "p1" / "weights" / "tiny.safetensors").write_bytes(b"\x00" * 3)  # not a safetensors file
    h = hashlib.sha256()
    cache._hash_files(h, tmp_path / "p1")
    assert h.hexdigest() != b
