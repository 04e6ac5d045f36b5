"""The manifest's program is the sampler's loop: same calls, constants from the frontend's schedule."""

from __future__ import annotations

import numpy as np
import pytest

from ndopt.frontends.pyramid_flow.sampler import count_dit_calls, unroll
from ndopt.frontends.pyramid_flow.schedule import renoise_coefficients
from ndopt.passmanager import PassContext
from targets.bundle import HOST_OPS, TIMESTEP_TABLE, constants, graph_calls, program
from targets.lowering import plan_graphs


def _dit_calls(prog):
    return sum(len(op["calls"]) for op in prog if op["op"] == "denoise_step")


def test_program_of_the_unfolded_sampler(tiny):
    plans = plan_graphs(tiny)
    prog = program(tiny, plans)
    assert graph_calls(prog) == {p.name: p.calls_per_video for p in plans}
    assert _dit_calls(prog) == tiny.schedule.dit_calls_per_video == 180
    assert {op["op"] for op in prog} <= set(HOST_OPS) | {"denoise_step", "call"}
    steps = [op for op in prog if op["op"] == "denoise_step"]
    assert [(s["timestep"], s["sigma"], s["sigma_next"]) for s in steps] == [
        (c["timestep"], c["sigma"], c["sigma_next"]) for c in unroll(tiny)]
    assert steps[0]["calls"][0]["prompt"] == "uncond" and steps[0]["guidance"]["scale"] == tiny.schedule.guidance.scale
    assert steps[-1]["guidance"]["scale"] == 5.0
    starts = [op for op in prog if op["op"] == "stage_start" and op["stage"] == 1]
    alpha, beta = renoise_coefficients(tiny.schedule.stages[1], tiny.schedule.gamma)
    renoise = starts[0]["renoise"]
    assert (renoise["alpha"], renoise["beta"], renoise["gamma"]) == (alpha, beta, tiny.schedule.gamma)
    chol = np.asarray(renoise["cholesky"])  # the block-noise covariance (1 + gamma) I - gamma 11^T
    assert np.allclose(chol @ chol.T, np.eye(4) * (1 + tiny.schedule.gamma) - tiny.schedule.gamma, atol=1e-6)
    assert starts[0]["resample"] == {"size": [4, 4], "mode": "nearest"}
    second = next(op for op in prog if op["op"] == "stage_start" and op["unit"] == 1 and op["stage"] == 2)
    # the previous frame at the current stage's resolution
    assert second["history"] == [{"first": 0, "frames": 1, "stage": 2}]
    assert constants(tiny) == {}


def test_program_counts_match_the_running_sampler(tiny):
    """The program's DiT calls equal what PyramidFlowSampler.sample actually does."""
    import torch

    small = tiny.replace(schedule=tiny.schedule.with_steps((1, 2, 1), (1, 1, 1)))
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend on a shared 2-core machine
    try:
        with torch.no_grad():
            ran = count_dit_calls(small, lambda: small.sampler.sample(small, ["a"], generator=g))
    finally:
        torch.set_num_threads(threads)
    assert _dit_calls(program(small, plan_graphs(small))) == ran


def test_program_of_a_folded_schedule_reads_the_table(tiny, tmp_path):
    pytest.importorskip("passes.schedule_folding")
    from passes.cfg_folding import CfgFolding
    from passes.schedule_folding import ScheduleFolding

    ctx = PassContext(tmp_path)
    folded = ScheduleFolding().run(CfgFolding().run(tiny, ctx).pipeline, ctx).pipeline
    plans = plan_graphs(folded)
    prog = program(folded, plans)
    assert graph_calls(prog) == {p.name: p.calls_per_video for p in plans}
    step = next(op for op in prog if op["op"] == "denoise_step")
    (call,) = step["calls"]
    assert call["prompt"] == "uncond+cond" and call["inputs"]["sample_0"] == {"concat": ["latents", "latents"]}
    assert call["inputs"]["timestep_embedding"] == {"table": TIMESTEP_TABLE, "row": 0}
    table = constants(folded)[TIMESTEP_TABLE]
    assert table["array"].shape == (84, 128) and len(table["timesteps"]) == 84
