"""`python -m ndopt.train.dependents`: the teacher's students and tiny decoder rebuilt by their recipes,
at most `jobs` at once, and installed only when they were distilled from the bundled teacher."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ndopt.errors import NdoptError
from ndopt.frontends import load_model
from ndopt.train import dependents as D

# stands in for `ndopt run <recipe>`: writes the artifact with a fingerprint (numpy only: starts fast)
FAKE = """
import sys, time
from pathlib import Path
start = time.time()
import numpy as np
from safetensors.numpy import save_file
run, artifact, key, value, fail = sys.argv[1:6]
run = Path(run)
run.mkdir(parents=True, exist_ok=True)
(run / "start").write_text(repr(start))
if fail == "1":
    raise SystemExit(3)
(run / artifact).parent.mkdir(parents=True, exist_ok=True)
save_file({"w": np.zeros(2, np.float32)}, str(run / artifact), metadata={key: value})
(run / "end").write_text(repr(time.time()))
"""


@pytest.fixture(scope="module")
def teacher():
    return load_model("pyramid-flow-tiny")


def fake(tmp_path: Path, fingerprints: dict[str, str], fail: frozenset[str] = frozenset()):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    calls: list[tuple[str, int]] = []

    def command(dep, run_dir, threads):
        calls.append((dep.recipe, threads))
        return [sys.executable, str(script), str(run_dir), dep.artifact, dep.fingerprint[0],
                fingerprints[dep.recipe], "1" if dep.recipe in fail else "0"]

    return command, calls


def test_builds_at_most_jobs_at_once_longest_first_and_installs_what_fits(tmp_path, teacher):
    prints = {d.recipe: D.fingerprint(d, teacher) for d in D.DEPENDENTS}
    command, calls = fake(tmp_path, prints)
    built = D.build(D.DEPENDENTS, tmp_path / "runs", teacher, jobs=2, cores=8, command=command)
    assert set(built) == {d.recipe for d in D.DEPENDENTS}
    assert calls[0] == (max(D.DEPENDENTS, key=lambda d: d.minutes).recipe, 4)  # longest first, 8 cores / 2 jobs
    run = {d.recipe: D.run_dir(d, tmp_path / "runs", teacher) for d in D.DEPENDENTS}
    assert all(run[n].name.startswith(n + "-") and built[n].is_relative_to(run[n]) for n in built)
    # the third started only once one of the first two had ended
    first, second, third = (run[name] for name, _ in calls)
    started = float((third / "start").read_text())
    assert started >= min(float((first / "end").read_text()), float((second / "end").read_text()))
    weights = tmp_path / "weights"
    weights.mkdir()
    done = D.install(D.DEPENDENTS, built, weights_dir=weights)
    assert sorted(p.name for p in done) == sorted(d.weights for d in D.DEPENDENTS)
    assert all((weights / d.weights).read_bytes() == built[d.recipe].read_bytes() for d in D.DEPENDENTS)
    # one recipe alone gets every core
    command, calls = fake(tmp_path, prints)
    D.build(D.DEPENDENTS[2:], tmp_path / "runs", teacher, jobs=2, cores=8, command=command)
    assert calls == [(D.DEPENDENTS[2].recipe, 8)]


def test_a_stale_artifact_installs_nothing_and_a_failed_recipe_is_named(tmp_path, teacher):
    prints = {d.recipe: D.fingerprint(d, teacher) for d in D.DEPENDENTS}
    command, _ = fake(tmp_path, dict(prints, **{"tiny-decoder": "0" * 16}))
    built = D.build(D.DEPENDENTS, tmp_path / "runs", teacher, jobs=3, cores=2, command=command)
    weights = tmp_path / "weights"
    weights.mkdir()
    with pytest.raises(NdoptError, match="tiny-decoder.*another vae_encoder.*nothing was installed"):
        D.install(D.DEPENDENTS, built, weights_dir=weights)
    assert not list(weights.iterdir())

    command, _ = fake(tmp_path, prints, fail=frozenset({"tiny-student"}))
    with pytest.raises(NdoptError, match=r"tiny-student \(exit code 3.*tiny-student.log.*resume") as e:
        D.build(D.DEPENDENTS, tmp_path / "runs2", teacher, jobs=2, cores=2, command=command)
    assert "tiny-decoder" not in str(e.value)
    assert (D.run_dir(D.DEPENDENTS[2], tmp_path / "runs2", teacher) / D.DEPENDENTS[2].artifact).is_file()
    with pytest.raises(NdoptError, match="--jobs 0"):
        D.build(D.DEPENDENTS, tmp_path / "runs3", teacher, jobs=0, command=command)


def test_the_recipes_it_runs_are_shipped_and_write_what_it_installs():
    from ndopt.cli import main
    from ndopt.recipe import load_recipe

    for dep in D.DEPENDENTS:
        recipe = load_recipe(dep.recipe)
        assert recipe.passes[0].name == dep.artifact.split("/")[1].split("_", 1)[1], dep
        assert recipe.spec.model == "pyramid-flow-tiny"
        argv = D.run_command(dep, Path("r"), 3)
        ctx = main.make_context("ndopt", argv[argv.index("ndopt.cli") + 1:])
        assert ctx.params["threads"] == 3
        sub = main.get_command(ctx, "run").make_context("run", argv[argv.index("run") + 1:])
        assert (sub.params["recipe"], sub.params["out"]) == (dep.recipe, "r")
