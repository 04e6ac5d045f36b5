"""The model interface (ndopt/model.py): the seam between ndopt and its frontends.

Nothing outside the frontends imports one (checked on the source), frontends are found through the
`ndopt.frontends` entry points (a broken one is skipped and named), a pipeline knows its frontend
(also after a save and reload), and a pass on a frontend that lacks a capability says which.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
from importlib import metadata
from pathlib import Path

import pytest
import torch

import ndopt.model as model_mod
from ndopt.errors import CheckpointError, NdoptError, PassError
from ndopt.model import (
    Block,
    ModelInterface,
    frontend,
    frontends,
    interface_for,
    load_model,
    preset_names,
)
from ndopt.passmanager import PassContext

ROOT = Path(__file__).resolve().parents[1]
IMPORTERS = ("import_module", "__import__", "find_spec", "files", "resolve_name")


def frontend_imports(path: Path) -> list[str]:
    """Every way `path` reaches into ndopt.frontends: imports, and module-path strings (importlib,
    importlib.resources, entry-point-free lookups). The bare group name `ndopt.frontends` is allowed."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{path}:{node.lineno} import {a.name}" for a in node.names
                      if a.name == "ndopt.frontends" or a.name.startswith("ndopt.frontends.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                node.module == "ndopt.frontends" or node.module.startswith("ndopt.frontends.")):
            found.append(f"{path}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                node.value.startswith("ndopt.frontends."):
            found.append(f"{path}:{node.lineno} string {node.value!r}")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            arg = node.args[0].value
            if name in IMPORTERS and isinstance(arg, str) and arg.startswith("ndopt.frontends"):
                found.append(f"{path}:{node.lineno} {name}({arg!r})")
    return found


def test_nothing_outside_the_frontends_imports_one(tmp_path):
    files = [p for top in ("ndopt", "passes", "targets") for p in sorted((ROOT / top).rglob("*.py"))
             if not p.relative_to(ROOT).as_posix().startswith("ndopt/frontends/")]
    assert len(files) > 50
    bad = [hit for p in files for hit in frontend_imports(p)]
    assert not bad, "use ndopt.model (the frontend's interface) instead:\n" + "\n".join(bad)
    # the check itself catches each form
    probe = tmp_path / "probe.py"
    probe.write_text("import ndopt.frontends.pyramid_flow.dit\nfrom ndopt.frontends import load_model\n"
                     "import importlib\nimportlib.import_module('ndopt.frontends')\n"
                     "x = 'ndopt.frontends.pyramid_flow.vae'\nGROUP = 'ndopt.frontends'\n")
    assert [h.split(" ", 1)[1] for h in frontend_imports(probe)] == [
        "import ndopt.frontends.pyramid_flow.dit", "from ndopt.frontends import ...",
        "import_module('ndopt.frontends')", "string 'ndopt.frontends.pyramid_flow.vae'"]


# ---- the registry ------------------------------------------------------------------------------------
@pytest.fixture
def fresh_registry():
    model_mod._discover.cache_clear()
    yield
    model_mod._discover.cache_clear()


def test_the_pyramid_flow_frontend_is_an_entry_point():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="ndopt.frontends")}
    assert eps["pyramid-flow"] == "ndopt.frontends.pyramid_flow.interface:FRONTEND"
    pf = frontends()["pyramid-flow"]
    assert isinstance(pf, ModelInterface) and frontend("pyramid-flow") is pf
    assert {"pyramid-flow-tiny", "pyramid-flow-sd3-768p", "pyramid-flow-tiny-student-1-1-1"} <= set(preset_names())
    assert all(pf.supports(c) for c in ("blocks", "without_blocks", "trace", "fold_timestep_embedding", "sampler",
                                        "text_student", "build_decoder", "hybrid", "load_student"))


def test_a_broken_frontend_is_skipped_and_named(fresh_registry, monkeypatch, caplog):
    real = metadata.entry_points

    def with_broken(**kw):
        eps = list(real(**kw))
        if kw.get("group") == "ndopt.frontends":
            eps += [metadata.EntryPoint("broken", "ndopt_no_such_module:FRONTEND", "ndopt.frontends"),
                    metadata.EntryPoint("misnamed", "ndopt.frontends.pyramid_flow.interface:FRONTEND",
                                        "ndopt.frontends")]
        return eps

    monkeypatch.setattr(model_mod.metadata, "entry_points", with_broken)
    with caplog.at_level(logging.WARNING, logger="ndopt"):
        found = frontends()
    assert "pyramid-flow" in found and not {"broken", "misnamed"} & set(found)  # the others still load
    assert "model frontend broken (ndopt_no_such_module:FRONTEND) failed to load" in caplog.text
    assert "named 'pyramid-flow', its entry point 'misnamed'" in caplog.text
    with pytest.raises(NdoptError, match="model frontend 'broken' failed to load .*ModuleNotFoundError"):
        frontend("broken")
    with pytest.raises(NdoptError, match="unknown model frontend 'nope'; installed: .*pyramid-flow"):
        frontend("nope")


def test_load_model_keeps_its_errors(tmp_path):
    with pytest.raises(NdoptError, match=r"unknown model 'no-such-model': not a preset \(.*pyramid-flow-tiny"):
        load_model("no-such-model")
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a file"):
        load_model(str(tmp_path / "x.safetensors"))
    with pytest.raises(NdoptError, match="no bundled weights"):
        load_model("pyramid-flow-sd3-768p")


# ---- a pipeline's frontend -----------------------------------------------------------------------------
class TwoKinds(ModelInterface):
    """A fake frontend over the SD3 DiT: blocks 0-2 are "double", 3-5 "single"; no schedule folding."""

    name = "fake"

    def __init__(self) -> None:
        self.pf = frontend("pyramid-flow")
        self.sampler = self.pf.sampler

    def preset_names(self) -> list[str]:
        return []

    def load(self, ref, **kw):
        return None

    def blocks(self, dit):
        return [Block(b.index, "double" if b.index < 3 else "single", b.name) for b in self.pf.blocks(dit)]

    def block_io(self, kind):
        return self.pf.block_io("joint")

    def without_blocks(self, dit, keep, *, fold_last_context=True):
        return self.pf.without_blocks(dit, keep, fold_last_context=fold_last_context)

    def trace(self, dit, layout):
        return self.pf.trace(dit, layout)


@pytest.fixture
def fake(tiny, monkeypatch):
    fake = TwoKinds()
    monkeypatch.setattr(model_mod, "frontends", lambda: {"pyramid-flow": fake.pf, "fake": fake})
    monkeypatch.setattr(model_mod, "_discover", lambda: ({"pyramid-flow": fake.pf, "fake": fake}, {}))
    return dataclasses.replace(tiny, frontend="fake")


def test_interface_for_is_the_pipelines_frontend(tiny, fake):
    assert tiny.frontend == "pyramid-flow" and interface_for(tiny) is frontend("pyramid-flow")
    assert interface_for(fake).name == "fake"
    assert fake.replace(schedule=fake.schedule.with_steps((1, 1, 1))).frontend == "fake"  # replace carries it
    assert fake.by_role("dit")[0].module is tiny.by_role("dit")[0].module


def test_a_missing_capability_is_a_pass_error_naming_it(fake, tmp_path):
    from passes.block_pruning import BlockPruning
    from passes.schedule_folding import ScheduleFolding

    ctx = PassContext(run_dir=tmp_path)
    iface = interface_for(fake)
    assert iface.supports("blocks") and not iface.supports("fold_timestep_embedding")
    with pytest.raises(PassError, match="schedule_folding: the model frontend 'fake' does not offer "
                                        "'fold_timestep_embedding'"):
        ScheduleFolding().run(fake, ctx)
    with pytest.raises(PassError, match="does not offer 'text_conditioning'"):
        iface.text_conditioning(None, None)
    with pytest.raises(ValueError, match="unknown capability 'foldings'"):
        iface.supports("foldings")
    # what the fake offers is enough for block pruning, by kind
    p = fake.replace(analyses={"block_importance": _plan_scores(6)})
    res = BlockPruning({"keep": 12, "kinds": ["double"]}).plan(p, PassContext(run_dir=tmp_path, plan=True))
    assert res.metrics["removed_blocks"] == [2] and res.metrics["blocks"] == [6, 5]  # 12/24 of 3 doubles kept


def test_block_kinds_are_checked_against_the_dit(tiny, fake, tmp_path):
    from passes.block_pruning import BlockPruning

    ctx = PassContext(run_dir=tmp_path, plan=True)
    with pytest.raises(PassError, match=r"kinds=\['joint'\]: the DiT has no 'joint' blocks \(its block kinds: "
                                        r"double, single\)"):
        BlockPruning({"remove": [1], "kinds": ["joint"]}).plan(fake, ctx)
    with pytest.raises(PassError, match=r"blocks \[4\] are single blocks, outside kinds=\['double'\]"):
        BlockPruning({"remove": [1, 4], "kinds": ["double"]}).plan(fake, ctx)
    with pytest.raises(PassError, match="no 'double' blocks"):
        BlockPruning({"remove": [1], "kinds": ["double"]}).plan(tiny, ctx)
    with pytest.raises(ValueError, match="name each block kind once"):
        BlockPruning({"kinds": []})
    assert "kinds" not in BlockPruning({}).config.model_dump()  # provenance reads as before when unset


def _plan_scores(n: int):
    from passes.block_importance import BlockImportanceScores

    return BlockImportanceScores("cosine", n, None)


# ---- saved pipelines carry the frontend -----------------------------------------------------------------
def test_saved_pipelines_round_trip_the_frontend(tiny, tmp_path):
    from ndopt.saved import load_saved, save_pipeline

    d = save_pipeline(tiny, tmp_path / "model", upstream=False)
    manifest = json.loads((d / "pipeline.json").read_text())
    assert manifest["frontend"] == "pyramid-flow"
    back = load_saved(d)
    assert back.frontend == "pyramid-flow" and back.summary() == tiny.summary()
    x = {k: v for k, v in back["dit"].module.state_dict().items()}
    assert all(torch.equal(x[k], v) for k, v in tiny["dit"].module.state_dict().items())
    del manifest["frontend"]  # written before the field existed: a Pyramid-Flow pipeline
    (d / "pipeline.json").write_text(json.dumps(manifest))
    assert load_saved(d).frontend == "pyramid-flow"
    manifest["frontend"] = "no-such-frontend"
    (d / "pipeline.json").write_text(json.dumps(manifest))
    with pytest.raises(NdoptError, match="unknown model frontend 'no-such-frontend'"):
        load_saved(d)
