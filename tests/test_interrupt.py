"""SIGINT and SIGTERM stop a run at the next safe point, leave nothing half-written, and a rerun goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from train.test_train_engine import _fit  # tests/ is on sys.path (conftest): the engine tests' trainer

from ndopt import interrupt
from ndopt.interrupt import Interrupted, handle_signals


class _SignalAt:
    """An objective wrapper that sends this process a signal during step `step` (as a user would)."""

    uses = ("net",)

    def __init__(self, inner, step: int, sig: int, times: int = 1) -> None:
        self.inner, self.step, self.sig, self.times = inner, step, sig, times

    def __call__(self, modules, batch, info):
        if info.step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.sig)
        return self.inner(modules, batch, info)


def test_a_signal_mid_training_saves_that_step_and_the_rerun_is_bit_identical(tmp_path):
    ref, tr = _fit(tmp_path, "ref", ema_decay=0.9)
    tr.fit()
    net, tr = _fit(tmp_path, "cut", ema_decay=0.9, checkpoint_every=100)
    tr.objective = _SignalAt(tr.objective, 6, signal.SIGTERM)
    with handle_signals(), pytest.raises(Interrupted) as err:
        tr.fit()
    assert err.value.signal_name == "SIGTERM" and err.value.exit_code == 143
    # the step the signal arrived in finished and was saved (no periodic checkpoint was due)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").glob("step-*.pt")] == ["step-0000007.pt"]
    assert not list((tmp_path / "cut").rglob(".ndopt-tmp-*"))
    net, tr = _fit(tmp_path, "cut", ema_decay=0.9, checkpoint_every=100)
    res = tr.fit()
    assert res.resumed_from == 7
    assert torch.equal(net.weight, ref.weight) and torch.equal(net.bias, ref.bias)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers are restored


def test_a_second_signal_stops_at_once(tmp_path):
    _net, tr = _fit(tmp_path, "twice", checkpoint_every=100)
    tr.objective = _SignalAt(tr.objective, 3, signal.SIGINT, times=2)
    with handle_signals(), pytest.raises(Interrupted):
        tr.fit()
    assert not list((tmp_path / "twice").rglob("step-*.pt"))  # stopped inside step 3, before any save
    assert not interrupt.pending()


RECIPE = """\
name: interrupt
model: pyramid-flow-tiny
passes:
  - block_pruning:
      remove: [5]
      reference_depth: null
      evaluate: false
      data: {clips: 8}
      stage1: {steps: 30, batch_size: 2, checkpoint_every: 100000}
probe: {enabled: false}
"""
# 30 steps: the trainer logs every 3 (ndopt.train.finetune._config), so the signal follows "distill step 3/30"
# and lands in step 4, with 26 more to go (0.1-0.5 s each on one core: seconds of margin); the rerun trains
# those 26


def _ndopt(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # a non-interactive shell starts background jobs with SIGINT ignored: the run must still stop on it
    return subprocess.Popen([sys.executable, "-m", "ndopt.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN), **kw)


def test_sigint_stops_ndopt_run_within_seconds_and_a_rerun_completes(tmp_path, monkeypatch):
    recipe = tmp_path / "interrupt.yaml"
    recipe.write_text(RECIPE)
    before = recipe.read_bytes()
    out = tmp_path / "run"
    proc = _ndopt(["run", str(recipe), "--out", str(out)])
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "distill step" in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen.wait(240), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    try:
        proc.wait(30)
    finally:
        proc.kill()
    stopped = time.monotonic() - t0
    reader.join(10)
    err = "".join(lines)
    assert proc.returncode == 130, err[-3000:]
    assert stopped < 15, f"took {stopped:.1f} s to stop"
    last = err.strip().splitlines()[-1]
    assert last.startswith("ndopt: interrupted by SIGINT during pass 1/1 (block_pruning)"), last
    assert "Traceback" not in err
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    assert report["interrupted"] == {"signal": "SIGINT", "during": "pass 1/1 (block_pruning)"}
    saved = list(out.rglob("step-*.pt"))
    assert len(saved) == 1, saved  # the step the signal arrived in (no periodic checkpoint was due)
    assert not [p for p in out.rglob("*") if p.name.startswith((".ndopt-tmp-", ".ndopt-old-"))]
    assert not (out / "model").exists()
    assert recipe.read_bytes() == before

    # the rerun (in this process: the subprocess above already showed the signal path)
    from click.testing import CliRunner

    from ndopt.cli import main

    monkeypatch.setattr("ndopt.report.plot_report", lambda run_dir, report: {})  # no plot is read here
    again = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out)])
    assert again.exit_code == 0, again.output[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and "interrupted" not in report
    step = int(saved[0].stem.split("-")[1])
    assert report["steps"][0]["metrics"]["stage1_resumed_from"] == step > 0
    assert (out / "model" / "pipeline.json").is_file()
    assert not [p for p in out.rglob("*") if p.name.startswith((".ndopt-tmp-", ".ndopt-old-"))]


def test_handlers_are_only_installed_in_the_main_thread():
    seen = []
    t = threading.Thread(target=lambda: seen.append(_enter()))
    t.start()
    t.join()
    assert seen == [signal.getsignal(signal.SIGINT)]


def _enter():
    with handle_signals():
        return signal.getsignal(signal.SIGINT)


@pytest.fixture(autouse=True)
def _no_pending():
    yield
    assert not interrupt.pending()

