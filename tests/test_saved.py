"""ndopt.saved: a run's optimized pipeline saved to RUN/model and reloaded.

Round trips on the tiny preset after exact passes, after a structural lossy chain in a cheap form,
and after aimet_quantization: the reloaded pipeline samples the same latents as the one in memory
(seeded, one latent frame, 64x64, 1-1-1 steps). Error paths (missing and extra keys, format version,
summary mismatch, paths leaving the directory, crafted records, lost encodings), sharding, the
upstream DiT layout, the bundled students, `generate --model` and `--bundle`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ndopt.errors import CheckpointError, NdoptError
from ndopt.frontends import load_model, preset_names
from ndopt.ir.pipeline import Pipeline
from ndopt.passmanager import PassContext, PassManager, get_pass
from ndopt.saved import MANIFEST, WEIGHTS, is_saved_pipeline, load_saved, save_pipeline

PROMPT = "a red circle moving left on a blue background"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small(p: Pipeline) -> Pipeline:
    """One latent frame at 1-1-1 steps: what the round trips sample (the passes see the same schedule)."""
    return p.replace(schedule=p.schedule.with_frames(1).with_steps((1, 1, 1)))


def run(p: Pipeline, tmp_path, *passes: tuple[str, dict]) -> Pipeline:
    final, _ = PassManager([get_pass(n)(c) for n, c in passes]).run(p, PassContext(run_dir=tmp_path / "run"))
    return final


def latents(p: Pipeline, seed: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return p.sampler.sample(p, [PROMPT], generator=np.random.default_rng(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def round_trip(p: Pipeline, path, tol: float) -> Pipeline:
    save_pipeline(p, path)
    q = load_saved(path)
    assert q.summary() == p.summary()
    assert rel_err(latents(p), latents(q)) <= tol
    return q


@pytest.fixture(scope="module")
def exact(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("exact")
    final = run(small(tiny), d, ("dead_component_elimination", {}), ("cfg_folding", {}), ("schedule_folding", {}))
    save_pipeline(final, d / "model")
    return final, d / "model"


# ---- round trips ---------------------------------------------------------------------------------
def test_exact_passes_round_trip(exact):
    final, path = exact
    assert is_saved_pipeline(path) and (path / WEIGHTS).is_file()
    manifest = json.loads((path / MANIFEST).read_text())
    assert [p["name"] for p in manifest["provenance"]] == ["dead_component_elimination", "cfg_folding",
                                                           "schedule_folding"]
    assert manifest["base"] == {"kind": "preset", "name": "pyramid-flow-tiny"}
    assert manifest["schedule"]["fields"]["folded"] is True
    assert not manifest["upstream"]["written"] and "time_text_embed" in manifest["upstream"]["reason"]
    q = load_model(str(path))  # ndopt.load_model dispatches a saved directory to load_saved
    assert q.summary() == final.summary() == manifest["summary"]
    assert torch.equal(q.analyses["schedule_folding"].table, final.analyses["schedule_folding"].table)
    assert rel_err(latents(final), latents(q)) <= 1e-6


def test_save_pretrained_from_pretrained(exact, tmp_path):
    final, _ = exact
    final.save_pretrained(tmp_path / "m")
    q = Pipeline.from_pretrained(tmp_path / "m")
    assert q.summary() == final.summary()


def test_lossy_structural_chain_round_trip(tiny, tmp_path):
    """block_importance + block_pruning (placeholder replay), encoder_substitution and decoder_swap with
    a training step each (weights differ from a fresh init: they must come from the file)."""
    final = run(small(tiny), tmp_path,
                ("decoder_swap", {"steps": 1, "batch_size": 1, "frames": 1, "height": 32, "width": 32,
                                  "eval_videos": 1}),
                ("dead_component_elimination", {}),
                ("block_importance", {"prompts": [PROMPT], "steps": [1, 1, 1]}),
                ("block_pruning", {"keep": 16, "evaluate": False}),
                ("encoder_substitution", {"dt5_steps": 1, "adapter_steps": 1, "batch_size": 2, "probe": False,
                                          "eval_prompts": 2}),
                ("cfg_folding", {}))
    assert len(final["dit"].module.transformer_blocks) == 4
    q = round_trip(final, tmp_path / "model", 1e-6)
    assert type(q["text_encoder"].module) is type(final["text_encoder"].module)


def test_step_distilled_round_trip(tiny, tmp_path):
    """step_distillation with the bundled 1-1-1 student's weights, then cfg_folding drops the
    unconditional branch: replay sets the schedule and the fact, the student DiT comes from the file."""
    from ndopt.frontends.pyramid_flow.students import student_files

    student = student_files()["pyramid-flow-tiny-student-1-1-1"]
    final = run(tiny.replace(schedule=tiny.schedule.with_frames(1)), tmp_path,
                ("step_distillation", {"student_weights": str(student), "evaluate": False}),
                ("cfg_folding", {}))
    assert final.schedule.guidance.mode == "none" and "guidance_free" in final.facts
    q = round_trip(final, tmp_path / "model", 1e-6)
    assert q.schedule == final.schedule
    assert load_model("pyramid-flow-tiny-student-1-1-1")["dit"].module.proj_out.weight.equal(
        q["dit"].module.proj_out.weight)


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    """DiT and decoder quantized without a target or `hexagon` (the default HTP config, as a pass run
    by hand gets), saved with `save_pretrained`: no recipe in the file."""
    d = tmp_path_factory.mktemp("quantized")
    cfg = {"components": ["dit", "vae_decoder"], "evaluate": False, "export": "none",
           "calibration": {"prompts": [PROMPT], "latent_frames": 1, "steps": [1, 1, 1], "video_steps": [1, 1, 1]}}
    final = run(small(tiny), d, ("dead_component_elimination", {}), ("aimet_quantization", cfg))
    final.save_pretrained(d / "model")
    return final, d / "model"


@pytest.mark.slow
def test_quantized_round_trip(quantized, tmp_path, caplog):
    final, path = quantized
    assert (path / "quantization" / "dit" / "quantizers.safetensors").is_file()
    m = json.loads((path / MANIFEST).read_text())
    assert m["recipe"] is None and m["quantization"]["dit"]["aimet_config"] == "htp_v79"
    # relative to the saved directory (which may move), resolved on load
    assert m["components"]["dit"]["attrs"]["quantizers"] == "quantization/dit/quantizers.safetensors"
    assert m["components"]["dit"]["path_attrs"] == ["quantizers"]
    with caplog.at_level("WARNING", logger="ndopt"):
        q = load_saved(path)
    # no recipe target: the replay takes the recorded HTP config instead of warning that it guessed one
    assert not [r for r in caplog.records if "no target" in r.getMessage()]
    assert type(q["dit"].module).__name__ == "QuantizedComponent"
    assert q["dit"].attrs["quantizers"] == str((path / "quantization" / "dit" / "quantizers.safetensors").resolve())
    assert q["dit"].attrs["aimet_config"] == "htp_v79"
    assert q.summary() == final.summary()
    a, b = latents(final), latents(q)
    assert rel_err(a, b) <= 1e-5
    with torch.no_grad():
        assert float((final.sampler.decode(final, a) - q.sampler.decode(q, b)).abs().max()) <= 1e-4


def test_sharded_weights_reload(exact, tmp_path):
    final, _ = exact
    save_pipeline(final, tmp_path / "m", max_shard_size="2MB")
    files = sorted(p.name for p in (tmp_path / "m").glob("model-*.safetensors"))
    assert len(files) > 2 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "m" / WEIGHTS).exists()
    q = load_saved(tmp_path / "m")
    assert rel_err(latents(final), latents(q)) <= 1e-6


def test_checkpoint_dir_base_is_self_contained(tiny, tmp_path):
    """A model loaded from an upstream checkpoint directory: its configs and tokenizers are copied to
    base/, so the saved pipeline reloads (meta build, weights assigned) after the checkpoint is gone."""
    import shutil

    from ndopt.frontends.pyramid_flow.presets import save_checkpoint_dir

    save_checkpoint_dir(tiny, tmp_path / "ckpt")
    final = run(small(load_model(str(tmp_path / "ckpt"))), tmp_path, ("dead_component_elimination", {}),
                ("block_pruning", {"remove": [2], "evaluate": False}))
    save_pipeline(final, tmp_path / "model", base=tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt")
    assert (tmp_path / "model" / "base" / "tokenizer_3").is_dir()
    assert not list((tmp_path / "model" / "base").rglob("*.safetensors"))  # configs only, no weights
    q = load_saved(tmp_path / "model")
    assert q.summary() == final.summary()
    assert rel_err(latents(final), latents(q)) <= 1e-6
    # saved again with the saved pipeline as its base: the configs come from model/base (ckpt is gone)
    save_pipeline(q, tmp_path / "again", base=tmp_path / "model")
    m = json.loads((tmp_path / "again" / MANIFEST).read_text())
    assert m["base"]["source"] == str((tmp_path / "model" / "base").resolve())
    assert (tmp_path / "again" / "base" / "tokenizer_3").is_dir()
    assert load_saved(tmp_path / "again").summary() == final.summary()


def test_checkpoint_dir_base_loads_on_the_device(tiny, tmp_path, monkeypatch):
    """A checkpoint base is built on the meta device and takes the tensors as read: they are read on the
    requested device (spied here: the spy reads on the CPU; on a GPU the next test loads onto it)."""
    import ndopt.saved
    from ndopt.frontends.pyramid_flow.presets import save_checkpoint_dir

    save_checkpoint_dir(tiny, tmp_path / "ckpt")
    final = small(load_model(str(tmp_path / "ckpt")))
    save_pipeline(final, tmp_path / "model", base=tmp_path / "ckpt")
    devices = []
    real = ndopt.saved.read_weights

    def spy(directory, device="cpu"):
        devices.append(str(device))
        return real(directory)

    monkeypatch.setattr(ndopt.saved, "read_weights", spy)
    assert load_saved(tmp_path / "model", device="cuda:1").summary() == final.summary()
    assert devices == ["cuda:1"]
    load_saved(tmp_path / "model")
    assert devices == ["cuda:1", "cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_checkpoint_dir_base_on_cuda(tiny, tmp_path):
    from ndopt.frontends.pyramid_flow.presets import save_checkpoint_dir

    save_checkpoint_dir(tiny, tmp_path / "ckpt")
    save_pipeline(small(load_model(str(tmp_path / "ckpt"))), tmp_path / "model", base=tmp_path / "ckpt")
    q = load_saved(tmp_path / "model", device="cuda")
    assert {t.device.type for c in q.components.values() for t in c.module.state_dict().values()} == {"cuda"}
    assert {b.device.type for c in q.components.values() for b in c.module.buffers()} == {"cuda"}


# ---- errors --------------------------------------------------------------------------------------
def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_missing_and_extra_keys_are_listed(exact, tmp_path):
    path = _copy(exact[1], tmp_path)
    sd = load_file(str(path / WEIGHTS))
    del sd["dit.proj_out.weight"]
    sd["dit.extra_layer.weight"] = torch.zeros(2)
    save_file(sd, str(path / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing keys \(dit.proj_out.weight\).*unexpected keys "
                                              r"\(dit.extra_layer.weight\)"):
        load_saved(path)


def test_wrong_format_version(exact, tmp_path):
    path = _copy(exact[1], tmp_path)
    m = json.loads((path / MANIFEST).read_text())
    m["format_version"] = 99
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_saved(path)


def test_summary_mismatch_names_the_line(exact, tmp_path):
    path = _copy(exact[1], tmp_path)
    m = json.loads((path / MANIFEST).read_text())
    m["summary"] = m["summary"].replace("blocks=6", "blocks=7")
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"summary line \d+: rebuilt .*blocks=6.*saved .*blocks=7"):
        load_saved(path)


def test_paths_outside_the_directory_are_refused(exact, tmp_path):
    """base.path and shard names from the files are resolved and must stay inside the saved directory."""
    path = _copy(exact[1], tmp_path)
    m = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**m, "base": {"kind": "checkpoint", "path": "../ckpt", "variants": ["768p"]}}))
    with pytest.raises(CheckpointError, match=r"base.path is '../ckpt', which resolves to .*outside"):
        load_saved(path)
    (path / MANIFEST).write_text(json.dumps(m))
    keys = list(load_file(str(path / WEIGHTS)))
    (path / WEIGHTS).rename(tmp_path / WEIGHTS)  # beside the saved directory, where a crafted index points
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f"../{WEIGHTS}" for k in keys}}))
    with pytest.raises(CheckpointError, match=r"weight_map file is '../model.safetensors'.*outside"):
        load_saved(path)


def test_crafted_records_are_refused(exact, tmp_path):
    """A record naming a class that is not a dataclass (here reached through a module ndopt.saved
    imports), or a __dtype__ that is not a dtype, is refused before anything is called."""
    path = _copy(exact[1], tmp_path)
    m = json.loads((path / MANIFEST).read_text())
    attrs = m["components"]["dit"]["attrs"]
    for crafted, what in (({"__dataclass__": "ndopt.saved:tempfile.TemporaryDirectory",
                            "fields": {"dir": str(tmp_path), "prefix": "crafted-"}}, "not a dataclass"),
                          ({"__dataclass__": "ndopt.saved_codec:Refused", "fields": {}}, "not a dataclass"),
                          ({"__enum__": "ndopt.saved:Path", "value": str(tmp_path)}, "not an enum"),
                          ({"__dtype__": "load"}, "not a torch dtype")):
        attrs["crafted"] = crafted
        (path / MANIFEST).write_text(json.dumps(m))
        with pytest.raises(CheckpointError, match=f"components.dit.attrs.crafted: .*{what}"):
            load_saved(path)
    assert not list(tmp_path.glob("crafted-*"))


def test_sets_of_tuples_encode():
    from ndopt.saved_codec import decode, encode

    x = {"pairs": frozenset({(2, "b"), (1, "a"), (1, "b")}), "mixed": {3, "x", (0,)}}
    tensors: dict = {}
    enc = encode(x, tensors, "k")
    assert json.loads(json.dumps(enc)) == enc
    assert decode(enc, tensors.__getitem__) == {k: frozenset(v) for k, v in x.items()}


@pytest.mark.slow
def test_missing_encoding_is_refused(quantized, tmp_path):
    path = _copy(quantized[1], tmp_path)
    f = path / "quantization" / "dit" / "quantizers.safetensors"
    state = load_file(str(f))
    lost = sorted(k for k in state if k.endswith(".max"))[0]
    del state[lost]
    save_file(state, str(f))
    with pytest.raises(CheckpointError, match=r"1 quantizer encodings of the rebuilt sim are missing .*" + lost):
        load_saved(path)


@pytest.mark.slow
def test_pass_state_outside_the_directory_is_refused(quantized, tmp_path):
    path = _copy(quantized[1], tmp_path)
    m = json.loads((path / MANIFEST).read_text())
    m["pass_state"]["aimet_quantization"] = "../elsewhere"
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"pass_state.aimet_quantization is '../elsewhere'.*outside"):
        load_saved(path)


def test_not_a_saved_pipeline(tmp_path):
    assert not is_saved_pipeline(tmp_path)
    with pytest.raises(CheckpointError, match="no pipeline.json"):
        load_saved(tmp_path)


# ---- upstream layout -------------------------------------------------------------------------------
def test_upstream_layout_of_a_pruned_dit(tiny, tmp_path):
    from ndopt.frontends.pyramid_flow import checkpoint as ckpt
    from ndopt.frontends.pyramid_flow.dit import MMDiTConfig, PyramidMMDiT

    final = run(small(tiny), tmp_path, ("block_pruning", {"remove": [1, 2], "evaluate": False}))
    save_pipeline(final, tmp_path / "model")
    m = json.loads((tmp_path / "model" / MANIFEST).read_text())
    assert m["upstream"] == {"written": True, "path": "upstream/diffusion_transformer_768p", "num_layers": 4}
    d = tmp_path / "model" / "upstream" / "diffusion_transformer_768p"
    cfg = MMDiTConfig.from_dict(ckpt.read_config(d))
    assert cfg.num_layers == 4
    sd = ckpt.load_state_dict(d)
    with torch.device("meta"):
        fresh = PyramidMMDiT(cfg)  # upstream's layout for 4 blocks
    assert sorted(sd) == sorted(fresh.state_dict())
    dit = PyramidMMDiT(cfg)
    ckpt.load_into(dit, sd, source=str(d))
    ours = final["dit"].module
    g = torch.Generator().manual_seed(0)
    c = cfg
    x = dict(sample=[torch.randn(1, c.in_channels, 1, 8, 8, generator=g)],
             encoder_hidden_states=torch.randn(1, 16, c.joint_attention_dim, generator=g),
             encoder_attention_mask=torch.ones(1, 16, dtype=torch.int64),
             pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
             timestep_ratio=torch.tensor([500.0]))
    with torch.no_grad():
        assert torch.equal(dit.eval()(**x), ours(**x))


def test_fold_last_context_false_round_trip(tiny, tmp_path):
    """The last block removed without folding: the new last block keeps its (dead) text stream, and so
    does the rebuilt one; that layout is not upstream's, so upstream/ is not written."""
    final = run(small(tiny), tmp_path, ("block_pruning", {"remove": [4, 5], "fold_last_context": False,
                                                          "evaluate": False}))
    assert not final["dit"].module.transformer_blocks[-1].context_pre_only
    q = round_trip(final, tmp_path / "model", 1e-6)
    assert not q["dit"].module.transformer_blocks[-1].context_pre_only
    m = json.loads((tmp_path / "model" / MANIFEST).read_text())
    assert not m["upstream"]["written"] and "keys differ" in m["upstream"]["reason"]
    assert not (tmp_path / "model" / "upstream").exists()


def test_importance_pruned_last_block_unfolded_round_trip(tiny, tmp_path):
    """Blocks chosen by importance, the original last block among them, not folded: the replay removes the
    blocks the run removed (its metrics), not the plan's placeholder, so the unfolded last block matches."""
    from passes.block_importance import ANALYSIS_KEY, BlockImportance, BlockImportanceScores

    scores = BlockImportanceScores("cosine", 6, (0.9, 0.8, 0.7, 0.6, 0.5, 0.01))  # block 5 matters least
    p = small(tiny).replace(analyses={ANALYSIS_KEY: scores}, facts_add=BlockImportance.provides)
    final = run(p, tmp_path, ("block_pruning", {"keep": 20, "fold_last_context": False, "evaluate": False}))
    prov = final.provenance[-1].metrics
    assert prov["removed_blocks"] == [5] and prov["selection"].startswith("lowest")
    q = round_trip(final, tmp_path / "model", 1e-6)
    assert not q["dit"].module.transformer_blocks[-1].context_pre_only


# ---- students and generate -------------------------------------------------------------------------
def test_bundled_students(tiny):
    assert {"pyramid-flow-tiny-student-1-1-1", "pyramid-flow-tiny-student-4-4-4"} <= set(preset_names())
    s = load_model("pyramid-flow-tiny-student-1-1-1")
    assert [st.steps for st in s.schedule.stages] == [1, 1, 1]
    assert (s.schedule.guidance.scale, s.schedule.guidance.video_scale) == (1.0, 1.0)
    assert "guidance_free" in s.facts
    assert s["text_encoder"].module is not tiny["text_encoder"].module
    assert not torch.equal(s["dit"].module.proj_out.weight, tiny["dit"].module.proj_out.weight)
    from ndopt.runner import generation_pipeline

    with pytest.raises(NdoptError, match="step-distilled student: its steps are fixed at 1-1-1"):
        generation_pipeline("pyramid-flow-tiny-student-1-1-1", steps="4")


def test_generate_refuses_steps_on_a_folded_schedule(exact):
    from ndopt.runner import generation_pipeline

    with pytest.raises(NdoptError, match="folded schedule"):
        generation_pipeline(str(exact[1]), frames=1, steps="2,2,2")
    assert generation_pipeline(str(exact[1]), frames=1, steps="1").schedule.folded


def test_generate_from_a_saved_model_cli(exact, tmp_path):
    from ndopt.cli import main

    out = tmp_path / "v.png"
    res = CliRunner().invoke(main, ["generate", "--model", str(exact[1]), "--prompt", PROMPT, "--frames", "1",
                                    "--seed", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "wrote" in res.output
    res = CliRunner().invoke(main, ["generate", "--model", str(exact[1]), "--bundle", str(tmp_path), "--prompt", "x",
                                    "--out", str(out)])
    assert res.exit_code != 0 and "exclude each other" in res.output


def test_steps_parse():
    from ndopt.runner import parse_steps

    assert parse_steps("4", 3) == (4, 4, 4)
    assert parse_steps("1,2,3", 3) == (1, 2, 3)
    with pytest.raises(NdoptError, match="3 pyramid stages"):
        parse_steps("1,2", 3)


def test_runner_writes_run_model(tmp_path):
    """`ndopt run` saves RUN/model and reports it; the reloaded model matches the report's summary."""
    from ndopt.recipe import load_recipe
    from ndopt.runner import run as run_recipe

    yaml = tmp_path / "r.yaml"
    yaml.write_text("name: saved\nmodel: pyramid-flow-tiny\n"
                    "probe: {enabled: false}\n"
                    "passes:\n  - dead_component_elimination: {}\n  - cfg_folding: {}\n")
    r = load_recipe(yaml)
    report = run_recipe(r, out=tmp_path / "run")
    model = report["model"]
    assert model["path"] == str(tmp_path / "run" / "model") and model["bytes"] > 0
    q = load_model(model["path"])
    assert q.summary() == report["final_summary"]


def test_save_model_records_any_failure(exact, tmp_path, monkeypatch):
    """A failure that is not an NdoptError (a full disk) is the report's error, not the run's end."""
    import ndopt.saved
    from ndopt.recipe import load_recipe
    from ndopt.runner import save_model

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ndopt.saved, "save_pipeline", full_disk)
    yaml = tmp_path / "r.yaml"
    yaml.write_text("name: saved\nmodel: pyramid-flow-tiny\npasses: []\n")
    out = save_model(exact[0], tmp_path / "run", load_recipe(yaml), {"recipe": {}, "steps": []})
    assert out == {"path": None, "error": "OSError: [Errno 28] No space left on device"}


def test_generate_bundle_calls_the_runtime(tmp_path, monkeypatch):
    """--bundle goes to the runtime of the manifest's target (found in the registry: snapdragon's
    `run_bundle`, targets.runtime.generate) with the seed; its video is written, its provider printed."""
    import types

    import targets.runtime
    from ndopt.cli import main

    calls = {}

    def fake_generate(bundle_dir, prompt, *, seed, provider=None, progress=None):
        calls.update(bundle=bundle_dir, prompt=prompt, seed=seed, provider=provider)
        video = np.linspace(-1, 1, 1 * 3 * 1 * 16 * 16, dtype=np.float32).reshape(1, 3, 1, 16, 16)
        return types.SimpleNamespace(latents=np.zeros((1, 16, 1, 2, 2), np.float32), video=video,
                                     provider="CPUExecutionProvider")

    monkeypatch.setattr(targets.runtime, "generate", fake_generate)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({"target": {"name": "snapdragon-8-elite"}}))
    out = tmp_path / "v.png"
    res = CliRunner().invoke(main, ["generate", "--bundle", str(tmp_path / "b"), "--prompt", PROMPT, "--seed", "5",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert calls["seed"] == 5 and calls["prompt"] == PROMPT and calls["bundle"] == tmp_path / "b"
    assert out.is_file() and "CPUExecutionProvider" in res.output
    res = CliRunner().invoke(main, ["generate", "--bundle", str(tmp_path / "b"), "--steps", "4", "--prompt", "x",
                                    "--out", str(out)])
    assert res.exit_code != 0 and "fixed when it is lowered" in res.output


def test_generate_bundle_needs_a_known_target(tmp_path):
    from ndopt.runner import generate_bundle

    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(NdoptError, match="no target.name"):
        generate_bundle(tmp_path, PROMPT, tmp_path / "v.png")
    (tmp_path / "manifest.json").write_text(json.dumps({"target": {"name": "no-such-chip"}}))
    with pytest.raises(NdoptError, match="unknown target 'no-such-chip'"):
        generate_bundle(tmp_path, PROMPT, tmp_path / "v.png")
