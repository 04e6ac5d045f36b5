"""Bad values at the boundary: each is refused before work starts, in one line with exit 2, no
traceback, nothing written, inputs untouched (checkpoint configs: tests/frontends/test_checkpoint_validation.py;
estimate inputs: tests/targets/test_estimate_input.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ndopt.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = ["generate", "--prompt", "a red circle moving left on a blue background"]

# (id, argv after `ndopt`, words the one line must contain); {tmp} is the test's directory, {out} its output
CASES = [
    # generate: sizes, counts, seed, steps, formats and paths
    ("gen-frames-0", [*GEN, "--frames", "0", "--out", "{out}/v.mp4"], ["--frames 0", "1 + 8k"]),
    ("gen-frames-neg", [*GEN, "--frames", "-7", "--out", "{out}/v.mp4"], ["--frames -7"]),
    ("gen-frames-10", [*GEN, "--frames", "10", "--out", "{out}/v.mp4"], ["--frames 10", "1, 9, 17"]),
    ("gen-frames-huge", [*GEN, "--frames", "800001", "--out", "{out}/v.mp4"], ["GiB", "available"]),
    ("gen-frames-text", [*GEN, "--frames", "nine", "--out", "{out}/v.mp4"], ["--frames", "integer"]),
    ("gen-height-0", [*GEN, "--height", "0", "--out", "{out}/v.mp4"], ["--height 0", "positive"]),
    ("gen-height-neg", [*GEN, "--height", "-64", "--out", "{out}/v.mp4"], ["--height -64"]),
    ("gen-height-100", [*GEN, "--height", "100", "--out", "{out}/v.mp4"], ["--height 100", "multiple of 64"]),
    ("gen-width-huge", [*GEN, "--width", "1000000", "--out", "{out}/v.mp4"], ["--width", "at most"]),
    ("gen-seed-neg", [*GEN, "--seed", "-1", "--out", "{out}/v.mp4"], ["--seed"]),
    ("gen-steps-0", [*GEN, "--steps", "0", "--out", "{out}/v.mp4"], ["--steps", "positive"]),
    ("gen-steps-text", [*GEN, "--steps", "four", "--out", "{out}/v.mp4"], ["--steps", "integers"]),
    ("gen-steps-stages", [*GEN, "--steps", "1,2", "--out", "{out}/v.mp4"], ["--steps", "3 pyramid stages"]),
    ("gen-steps-neg", [*GEN, "--steps", "-1", "--out", "{out}/v.mp4"], ["--steps '-1'", "integers"]),
    ("gen-steps-huge", [*GEN, "--steps", "99999999", "--out", "{out}/v.mp4"], ["at most 1000"]),
    ("gen-seed-huge", [*GEN, "--seed", "99999999999999999999999", "--out", "{out}/v.mp4"], ["--seed"]),
    ("gen-bundle-frames", [*GEN, "--bundle", "{tmp}", "--frames", "17", "--out", "{out}/v.mp4"], ["--frames"]),
    ("gen-steps-student", [*GEN, "--model", "pyramid-flow-tiny-student-1-1-1", "--steps", "4",
                           "--out", "{out}/v.mp4"], ["step-distilled"]),
    ("gen-format", [*GEN, "--out", "{out}/v.avi"], ["'avi'", "mp4, gif, png"]),
    ("gen-format-flag", [*GEN, "--format", "webm", "--out", "{out}/v.mp4"], ["--format"]),
    ("gen-out-is-dir", [*GEN, "--out", "{tmp}"], ["is a directory"]),
    ("gen-out-under-file", [*GEN, "--out", "{tmp}/input.txt/v.mp4"], ["is not a directory"]),
    ("gen-prompt-utf8", ["generate", "--prompt", "caf\udce9", "--out", "{out}/v.mp4"], ["--prompt", "UTF-8"]),
    ("gen-model", [*GEN, "--model", "no-such-model", "--out", "{out}/v.mp4"], ["unknown model"]),
    ("gen-model-file", [*GEN, "--model", "{tmp}/input.txt", "--out", "{out}/v.mp4"], ["not a file"]),
    ("gen-bundle", [*GEN, "--bundle", "{tmp}/nothing", "--out", "{out}/v.mp4"], ["--bundle", "manifest.json"]),
    ("gen-bundle-height", [*GEN, "--bundle", "{tmp}", "--height", "64", "--out", "{out}/v.mp4"], ["--height"]),
    ("gen-provider", [*GEN, "--provider", "CPUExecutionProvider", "--out", "{out}/v.mp4"], ["--provider"]),
    ("gen-no-out", [*GEN], ["--out"]),
    # plan: the same units and rules as generate, and a bound on the plan's own work
    ("plan-frames-0", ["plan", "--model", "pyramid-flow-tiny", "--frames", "0"], ["--frames 0"]),
    ("plan-frames-10", ["plan", "--model", "pyramid-flow-tiny", "--frames", "10"], ["--frames 10", "1 + 8k"]),
    ("plan-frames-huge", ["plan", "--model", "pyramid-flow-tiny", "--frames", "100001"], ["more than ndopt plans"]),
    ("plan-width-0", ["plan", "--model", "pyramid-flow-sd3-768p", "--width", "0"], ["--width 0"]),
    ("plan-height-odd", ["plan", "--model", "pyramid-flow-sd3-768p", "--height", "770"], ["multiple of 64"]),
    ("plan-height-huge", ["plan", "--model", "pyramid-flow-sd3-768p", "--height", "65536"], ["at most"]),
    ("plan-target", ["plan", "exact", "--target", "snapdragon-9-imaginary"], ["unknown target"]),
    ("plan-model-target", ["plan", "--model", "pyramid-flow-tiny", "--target", "nope"], ["unknown target"]),
    ("plan-out-file", ["plan", "exact", "--out", "{tmp}/input.txt"], ["is a file"]),
    ("plan-first-frame", ["plan", "--model", "pyramid-flow-tiny", "--first-frame", "dream"], ["--first-frame"]),
    ("plan-nothing", ["plan"], ["RECIPE or --model"]),
    # run: the recipe, its overrides, its passes' values against the model, the probe, the output
    ("run-missing", ["run", "{tmp}/missing.yaml"], ["neither a file nor a shipped recipe"]),
    ("run-binary", ["run", "{tmp}/binary.yaml"], ["binary.yaml:2", "not a text recipe"]),
    ("run-nul", ["run", "{tmp}/nul.yaml"], ["nul.yaml:2", "NUL"]),
    ("run-dir", ["run", "{tmp}"], ["cannot read"]),
    ("run-dev-zero", ["run", "/dev/zero"], ["not a regular file"]),
    ("run-huge", ["run", "{tmp}/huge.yaml"], ["is not a recipe"]),
    ("run-alias-bomb", ["run", "{tmp}/bomb.yaml"], ["anchors and aliases"]),
    ("run-deep", ["run", "{tmp}/deep.yaml"], ["nests"]),
    ("run-seed", ["run", "{tmp}/seed.yaml"], ["seed"]),
    ("run-distill-steps", ["run", "{tmp}/distill.yaml"], ["steps[0]", "1000"]),
    ("run-target", ["run", "exact", "--target", "nope", "--out", "{out}"], ["--target 'nope'", "available"]),
    ("run-hexagon", ["run", "{tmp}/hexagon.yaml", "--target", "snapdragon-x-elite", "--out", "{out}"],
     ["--target 'snapdragon-x-elite'", "hexagon"]),
    ("run-model", ["run", "exact", "--model", "no-such-model", "--out", "{out}"], ["unknown model"]),
    ("run-out-file", ["run", "exact", "--out", "{tmp}/input.txt"], ["is a file"]),
    ("run-out-under-file", ["run", "exact", "--out", "{tmp}/input.txt/run"], ["is a file"]),
    ("run-remove", ["run", "{tmp}/remove.yaml", "--out", "{out}"], ["remove.yaml:4", "blocks 0..5"]),
    ("run-keep", ["run", "{tmp}/keep.yaml", "--out", "{out}"], ["keep.yaml:5", "keep=50"]),
    ("run-steps", ["run", "{tmp}/steps.yaml", "--out", "{out}"], ["steps.yaml:4", "3 pyramid stages"]),
    ("run-probe-size", ["run", "{tmp}/probe.yaml", "--out", "{out}"], ["probe", "GiB"]),
    ("run-probe-width", ["run", "{tmp}/probe_width.yaml", "--out", "{out}"], ["probe", "multiple of 64"]),
    # the command line itself
    ("unknown-command", ["optimise"], ["No such command"]),
    ("unknown-option", ["run", "exact", "--fast"], ["--fast"]),
]

RECIPES = {
    "remove.yaml": "name: r\nmodel: pyramid-flow-tiny\npasses:\n  - block_pruning: {remove: [0, 99], "
                   "reference_depth: null}\n",
    "keep.yaml": "name: k\nmodel: pyramid-flow-tiny\npasses:\n  - block_importance\n  - block_pruning: "
                 "{keep: 50, reference_depth: null}\n",
    "steps.yaml": "name: s\nmodel: pyramid-flow-tiny\npasses:\n  - step_distillation: {steps: [1, 1]}\n",
    "probe.yaml": "name: p\nmodel: pyramid-flow-tiny\nprobe: {latent_frames: 1000000}\npasses: [cfg_folding]\n",
    "probe_width.yaml": "name: p\nmodel: pyramid-flow-tiny\nprobe: {width: 64, height: 96}\npasses: [cfg_folding]\n",
    "bomb.yaml": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                 "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nname: x\nmodel: pyramid-flow-tiny\n",
    "deep.yaml": "name: x\nmodel: pyramid-flow-tiny\nextra: " + "[" * 5000 + "]" * 5000 + "\n",
    "seed.yaml": "name: x\nmodel: pyramid-flow-tiny\nseed: -5\n",
    "distill.yaml": "name: d\nmodel: pyramid-flow-tiny\npasses:\n  - step_distillation: {steps: [1000000, 1, 1]}\n",
    "hexagon.yaml": "name: h\nmodel: pyramid-flow-tiny\npasses:\n  - aimet_quantization: {hexagon: v79}\n"
                    "target: snapdragon-8-elite\n",
}


def _inputs(tmp: Path) -> None:
    (tmp / "input.txt").write_text("not a directory\n")
    (tmp / "binary.yaml").write_bytes(b"name: x\n\xff\xfe\x00\x01")
    (tmp / "nul.yaml").write_bytes(b"name: x\nmodel: pyramid-flow-tiny\x00\n")
    (tmp / "huge.yaml").write_text("name: x\n" + "# padding\n" * 200_000)
    for name, text in RECIPES.items():
        (tmp / name).write_text(text)


def _snapshot(tmp: Path) -> dict[str, str]:
    return {str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(tmp.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch):
    _id, argv, words = case
    tmp = tmp_path / "in"
    tmp.mkdir()
    _inputs(tmp)
    monkeypatch.chdir(tmp_path)  # a recipe's default output (runs/) would land here
    before = _snapshot(tmp_path)
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp)).replace("{out}", str(out)) for a in argv]
    res = CliRunner().invoke(main, args)
    err = res.stderr
    assert res.exit_code == 2, (res.exit_code, res.output, repr(res.exception))
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ndopt: error: "), err
    assert "Traceback" not in res.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert _snapshot(tmp_path) == before  # nothing written (no run dir, no video, no temp), inputs untouched


def test_an_unexpected_error_is_one_line_with_a_hint_and_exit_1(tmp_path, monkeypatch):
    import ndopt.runner

    def broken(*a, **k):
        raise RuntimeError("something ndopt did not expect\nsecond line")

    monkeypatch.setattr(ndopt.runner, "generate", broken)
    res = CliRunner().invoke(main, [*GEN, "--out", str(tmp_path / "v.mp4")])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert lines == ["ndopt: internal error: RuntimeError: something ndopt did not expect (rerun with --debug for "
                     "the traceback)"]
    res = CliRunner().invoke(main, ["--debug", *GEN, "--out", str(tmp_path / "v.mp4")])
    assert isinstance(res.exception, RuntimeError)  # --debug lets the traceback through


def test_an_os_error_is_an_expected_failure(tmp_path, monkeypatch):
    import ndopt.runner

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "v.mp4"))

    monkeypatch.setattr(ndopt.runner, "generate", full)
    res = CliRunner().invoke(main, [*GEN, "--out", str(tmp_path / "v.mp4")])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"ndopt: error: {tmp_path / 'v.mp4'}: No space left on device"


def test_frames_mean_video_frames_in_plan_as_in_generate():
    a = json.loads(CliRunner().invoke(main, ["plan", "--model", "pyramid-flow-tiny", "--frames", "17",
                                             "--json"]).stdout)
    assert a["latent_frames"] == 3  # 17 video frames = 1 + 8 x 2


def test_a_real_checkpoints_default_video_fits_a_large_host(monkeypatch):
    """The memory bound must not refuse what a big machine can do: Pyramid-Flow's 384p default
    (49 frames) on a 128 GiB host; and the estimate is measured, not a guess: the 768p decoder needs
    about 4x the 384p one (4x the pixels)."""
    from ndopt import validate as V
    from ndopt.frontends import load_model

    monkeypatch.setattr(V, "available_memory", lambda: 128 * 2**30)
    p384 = load_model("pyramid-flow-sd3-384p", meta=True)
    V.check_memory(p384, "generate")
    e384 = V.memory_estimate(p384)
    e768 = V.memory_estimate(load_model("pyramid-flow-sd3-768p", meta=True))
    assert 3.5 < e768["vae_decoder"] / e384["vae_decoder"] < 4.5
    assert e384["weights"] == sum(c.weight_bytes() for c in p384.components.values())


def test_zero_is_not_the_default(tiny):
    """`with_frames(h=0)` used to read 0 as 'the preset's height'."""
    sch = tiny.schedule.with_frames(1, 0, 0)
    assert (sch.height, sch.width) == (0, 0)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    from ndopt.frontends import load_model
    from ndopt.frontends.pyramid_flow.presets import save_checkpoint_dir

    return save_checkpoint_dir(load_model("pyramid-flow-tiny"), tmp_path_factory.mktemp("ckpt") / "my-checkpoint")


def test_a_checkpoint_directorys_sizes_are_checked_before_its_weights_load(ckpt_dir, tmp_path, monkeypatch):
    import ndopt.frontends.pyramid_flow.checkpoint as ckpt

    def no(*a, **k):
        raise AssertionError("weights were read before the sizes were checked")

    monkeypatch.setattr(ckpt, "load_state_dict", no)
    res = CliRunner().invoke(main, [*GEN, "--model", str(ckpt_dir), "--height", "100", "--out",
                                    str(tmp_path / "v.mp4")])
    assert res.exit_code == 2 and res.stderr.strip().startswith("ndopt: error: --height 100"), res.output
    # and the same meta-device build plans it: the tiny preset's figures, from the directory's configs
    plan = CliRunner().invoke(main, ["plan", "--model", str(ckpt_dir), "--json"])
    assert plan.exit_code == 0, plan.output
    got = json.loads(plan.stdout)
    want = json.loads(CliRunner().invoke(main, ["plan", "--model", "pyramid-flow-tiny", "--json"]).stdout)
    assert got["pipeline"] == "my-checkpoint"
    assert (got["params"], got["flops_per_video"]) == (want["params"], want["flops_per_video"])
