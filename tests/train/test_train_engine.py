"""ndopt.train.engine: learning, checkpoints and bit-identical resume, accumulation, errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ndopt.errors import NdoptError
from ndopt.train import Example, LossOutput, TrainConfig, Trainer


class Regression:
    """y = x @ w_true + per-sample noise: a fast stand-in objective with per-sample randomness."""

    uses = ("net",)

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at

    def __call__(self, modules, batch, info):
        if self.fail_at is not None and info.step == self.fail_at:
            raise KeyboardInterrupt("killed")
        x = batch.latents
        noise = torch.stack([torch.randn(2, generator=g) for g in batch.generators()]) * 0.01
        y = x @ torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0], [1.0, 1.0]]) + noise
        err = (modules["net"](x) - y).pow(2).mean()
        return LossOutput(err, {"loss": float(err.detach())})


class Points:
    def __init__(self, n: int = 64) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Example:
        return Example("", latents=self.x[i])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def _fit(tmp_path, name, fail_at=None, **cfg):
    net = _net()
    config = TrainConfig(**{"steps": 12, "batch_size": 8, "lr": 5e-2, "log_every": 1, "checkpoint_every": 4,
                            "grad_clip": None, **cfg})
    tr = Trainer(trainable={"net": net}, objective=Regression(fail_at), data=Points(), config=config,
                 run_dir=tmp_path / name)
    return net, tr


def test_learns_and_writes_metrics(tmp_path):
    net, tr = _fit(tmp_path, "a", steps=40, lr=0.2, lr_schedule="cosine", warmup_steps=4)
    res = tr.fit()
    curve = res.loss_curve()
    assert curve[-1] < 0.05 * curve[0]
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert [h["step"] for h in saved["history"]] == list(range(1, 41))
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_killed_run_resumes_bit_identical(tmp_path):
    ref, tr = _fit(tmp_path, "ref", ema_decay=0.9)
    full = tr.fit()
    net, tr = _fit(tmp_path, "cut", fail_at=6, ema_decay=0.9)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("step-*.pt")) == ["step-0000004.pt"]
    net, tr = _fit(tmp_path, "cut", ema_decay=0.9)
    res = tr.fit()
    assert res.resumed_from == 4
    assert torch.equal(net.weight, ref.weight) and torch.equal(net.bias, ref.bias)
    assert res.loss_curve() == full.loss_curve()
    # a finished run loads its result instead of training again
    again, tr = _fit(tmp_path, "cut", ema_decay=0.9)
    assert tr.fit().resumed_from == 12 and torch.equal(again.weight, ref.weight)


def test_resume_into_other_trainables_is_refused(tmp_path):
    """A run directory whose checkpoint trains other modules (its config changed) is not half-loaded."""
    _fit(tmp_path, "r", steps=4)[1].fit()

    class Two(Regression):
        uses = ("net", "extra")

    tr = Trainer(trainable={"net": _net(), "extra": nn.Linear(1, 1)}, objective=Two(), data=Points(),
                 config=TrainConfig(steps=8, batch_size=8, checkpoint_every=4), run_dir=tmp_path / "r")
    with pytest.raises(NdoptError, match=r"trains \['net'\], this run \['extra', 'net'\].*new run directory"):
        tr.fit()


def test_accumulation_equals_the_whole_batch(tmp_path):
    a, tr = _fit(tmp_path, "whole", steps=5)
    tr.fit()
    b, tr = _fit(tmp_path, "accum", steps=5, grad_accum=4)
    tr.fit()
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


def test_errors(tmp_path):
    net, _ = _fit(tmp_path, "e")
    with pytest.raises(NdoptError, match="multiple of processes"):
        Trainer(trainable={"net": net}, objective=Regression(), data=Points(),
                config=TrainConfig(batch_size=6, grad_accum=4), run_dir=tmp_path / "e").fit()
    with pytest.raises(NdoptError, match="neither trainable nor frozen"):
        Trainer(trainable={"other": net}, objective=Regression(), data=Points(), config=TrainConfig(),
                run_dir=tmp_path / "e")
    with pytest.raises(NdoptError, match="lr"):
        TrainConfig(lr=0)

    class Diverge(Regression):
        def __call__(self, modules, batch, info):
            out = super().__call__(modules, batch, info)
            return LossOutput(out.loss * float("nan"), {})

    with pytest.raises(NdoptError, match="loss is nan"):
        Trainer(trainable={"net": net}, objective=Diverge(), data=Points(), config=TrainConfig(steps=2),
                run_dir=tmp_path / "nan").fit()
