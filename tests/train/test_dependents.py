"""`python -m ndopt.train.dependents`: the teacher's students and tiny decoder rebuilt by their recipes,
at most `jobs` at once, and installed only when they were distilled from the bundled teacher."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ndopt.errors import NdoptError
from ndopt.frontends import load_model
from ndopt.train import dependents as D
from ndopt.train.data import module_fingerprint

FAKE = """
import json, sys, time
from pathlib import Path
import torch
from safetensors.torch import save_file
run, artifact, key, value, fail = sys.argv[1:6]
run = Path(run)
run.mkdir(parents=True, exist_ok=True)
(run / "start").write_text(str(time.time()))
time.sleep(0.5)
if fail == "1":
    raise SystemExit(3)
(run / artifact).parent.mkdir(parents=True, exist_ok=True)
save_file({"w": torch.zeros(2)}, str(run / artifact), metadata={key: value})
(run / "end").write_text(str(time.time()))
"""


@pytest.fixture(scope="module")
def teacher():
    return load_model("pyramid-flow-tiny")


def fake(tmp_path: Path, fingerprints: dict[str, str], fail: set[str] = frozenset()):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    seen = {}

    def command(dep, run_dir, threads):
        seen[dep.recipe] = threads
        return [sys.executable, str(script), str(run_dir), dep.artifact, dep.fingerprint[0],
                fingerprints[dep.recipe], "1" if dep.recipe in fail else "0"]

    return command, seen


def test_builds_at_most_jobs_at_once_longest_first_and_installs_what_fits(tmp_path, teacher):
    prints = {d.recipe: module_fingerprint(teacher.by_role(d.fingerprint[1])[0].module) for d in D.DEPENDENTS}
    command, threads = fake(tmp_path, prints)
    built = D.build(D.DEPENDENTS, tmp_path / "runs", jobs=2, cores=2, command=command)
    assert set(built) == {d.recipe for d in D.DEPENDENTS} and set(threads.values()) == {1}
    spans = {n: (float((tmp_path / "runs" / n / "start").read_text()), float((tmp_path / "runs" / n / "end").read_text()))
             for n in built}
    # the longest started first, and the third only once one of the first two had ended
    order = sorted(spans, key=lambda n: spans[n][0])
    assert order[0] == max(D.DEPENDENTS, key=lambda d: d.minutes).recipe
    assert spans[order[2]][0] >= min(spans[order[0]][1], spans[order[1]][1])
    weights = tmp_path / "weights"
    weights.mkdir()
    done = D.install(D.DEPENDENTS, built, weights_dir=weights)
    assert sorted(p.name for p in done) == sorted(d.weights for d in D.DEPENDENTS)
    assert all((weights / d.weights).read_bytes() == built[d.recipe].read_bytes() for d in D.DEPENDENTS)


def test_a_stale_artifact_installs_nothing_and_a_failed_recipe_is_named(tmp_path, teacher):
    prints = {d.recipe: module_fingerprint(teacher.by_role(d.fingerprint[1])[0].module) for d in D.DEPENDENTS}
    stale = dict(prints, **{"tiny-decoder": "0" * 16})
    command, _ = fake(tmp_path, stale)
    built = D.build(D.DEPENDENTS, tmp_path / "runs", jobs=3, cores=2, command=command)
    weights = tmp_path / "weights"
    weights.mkdir()
    with pytest.raises(NdoptError, match="tiny-decoder.*another vae_encoder.*nothing was installed"):
        D.install(D.DEPENDENTS, built, weights_dir=weights)
    assert not list(weights.iterdir())

    command, _ = fake(tmp_path, prints, fail={"tiny-student"})
    with pytest.raises(NdoptError, match=r"tiny-student \(exit code 3.*tiny-student.log.*resume") as e:
        D.build(D.DEPENDENTS, tmp_path / "runs2", jobs=2, cores=2, command=command)
    assert "tiny-decoder" not in str(e.value) and (tmp_path / "runs2" / "tiny-decoder" / D.DEPENDENTS[2].artifact).is_file()


def test_the_recipes_it_runs_are_shipped_and_write_what_it_installs():
    from ndopt.recipe import load_recipe

    for dep in D.DEPENDENTS:
        recipe = load_recipe(dep.recipe)
        pass_name = dep.artifact.split("/")[1].split("_", 1)[1]
        assert recipe.passes[0].name == pass_name, dep
        assert recipe.spec.model == "pyramid-flow-tiny"
    assert json.dumps(D.run_command(D.DEPENDENTS[0], Path("r"), 1)).count("tiny-student-4-4-4") == 1
