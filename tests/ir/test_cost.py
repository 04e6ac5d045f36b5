"""Cost analysis on the meta device: FLOPs per call signature, calls and FLOPs per video."""

from __future__ import annotations

import torch

from ndopt.frontends import load_model
from ndopt.ir import Component, CostModel, Port, TensorSpec
from ndopt.ir.spec import CallSignature


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(32, 64)
        self.b = torch.nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_flops_of_a_known_module_on_meta():
    with torch.device("meta"):
        m = _MLP()
    comp = Component("dit", "dit", m, (Port("x", TensorSpec(("B", 32))),), (Port("y", TensorSpec(("B", 8))),))
    sig = CallSignature("dit", "k", (("x", TensorSpec((5, 32))),), count=3)
    cost = CostModel().signature_cost(comp, sig)
    assert cost.flops == 2 * 5 * (32 * 64 + 64 * 8)  # matmuls only: 2 * m * n * k each
    assert cost.count == 3 and cost.input_bytes == 5 * 32 * 4
    assert cost.activation_bytes >= 5 * 64 * 4 + 5 * 8 * 4


def test_meta_and_real_tiny_cost_agree(tiny):
    meta = load_model("pyramid-flow-tiny", meta=True)
    a = CostModel().pipeline_cost(meta)
    b = CostModel().pipeline_cost(tiny)
    assert a.params == b.params == sum(c.params() for c in tiny.components.values())
    assert a.flops_per_video == b.flops_per_video > 0
    assert all(p.device.type == "meta" for p in meta["dit"].module.parameters())


def test_per_video_totals_are_sums_of_signatures(tiny):
    cost = CostModel().pipeline_cost(tiny)
    dit = next(c for c in cost.components if c.name == "dit")
    sigs = [s for s in cost.signatures if s.component == "dit"]
    assert dit.flops_per_video == sum(s.flops * s.count for s in sigs)
    assert dit.calls_per_video == tiny.schedule.dit_calls_per_video
    # a later frame's full-resolution call attends over its history: costlier than the first frame's
    by_key = {s.key: s.flops for s in sigs}
    assert by_key["unit1/stage2"] > by_key["unit0/stage2"] > by_key["unit0/stage0"]


def test_block_memoization_changes_nothing(tiny):
    """Memoized repeated blocks give exactly the FLOPs and bytes of a plain run."""
    plain = CostModel(memoize_blocks=False).pipeline_cost(tiny)
    memo = CostModel(memoize_blocks=True).pipeline_cost(tiny)
    assert [(s.key, s.flops, s.activation_bytes) for s in plain.signatures] == \
        [(s.key, s.flops, s.activation_bytes) for s in memo.signatures]


def test_real_shape_runs_of_small_real_components_equal_fake_ones(tiny):
    """The cheap path (a real call of a small real-weight component) costs exactly what a fake-tensor
    run does, leaves torch's RNG alone, and is taken for every tiny component but the transformers one."""
    from ndopt.ir.cost import real_run_ok

    cheap = {n for n, c in tiny.components.items() if real_run_ok(c)}
    assert cheap == {"dit", "vae_encoder", "vae_decoder"}  # the text encoder branches on values (transformers)
    model = CostModel()
    for sig in tiny.call_plan():
        comp = tiny[sig.component]
        if sig.component not in cheap:
            continue
        state = torch.random.get_rng_state()
        real = model._run(comp, sig, fake=False)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert real == model._run(comp, sig, fake=True), (sig.component, sig.key)
