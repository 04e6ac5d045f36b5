"""Calibration: the table is >= 40 AI Hub models across families with sources; the fit recovers known
efficiencies; the shipped ones are fitted (not the schema's placeholders), flag uncalibrated
precisions and carry their cross-validated error."""

from __future__ import annotations

import numpy as np
import pytest

from ndopt.errors import TargetError
from targets.calibration import BUILDERS, errors, fit, load_features, predict, read_tsv
from targets.estimator import GraphCost, OpCost
from targets.spec import Efficiency, specs


def test_the_table_lists_40_models_of_many_families_with_sources():
    rows = read_tsv()
    models = {r.model for r in rows}
    assert len(models) >= 40 and len({r.family for r in rows}) >= 10
    assert all(r.builder in BUILDERS and r.latency_ms > 0 and "qai-hub-models 0.65.0" in r.source for r in rows)
    assert {r.builder for r in rows} <= set(load_features())  # every graph's records are stored
    devices = {d for s in specs().values() for d in s.ai_hub_devices}
    assert {r.device for r in rows} <= devices and {r.precision for r in rows} == {"w8a16", "fp16"}
    for name, spec in specs().items():  # every chip is calibrated on the same models
        mine = {r.model for r in rows if r.device in spec.ai_hub_devices}
        assert mine == models, name


def test_a_bad_table_is_rejected_with_the_row():
    with pytest.raises(TargetError, match="header must be"):
        read_tsv("a\tb\n1\t2\n", "t.tsv")
    head = "model\tbuilder\tdevice\tprecision\tlatency_ms\tsource\n"
    with pytest.raises(TargetError, match="data row 2"):
        read_tsv(head + "m\tb\tSamsung Galaxy S25\tw8a16\tfast\ts\n", "t.tsv")


def synthetic(seed: int, n: int = 10) -> list[GraphCost]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ops = []
        for kind in ("conv", "matmul", "attention", "vector"):
            for _ in range(int(rng.integers(5, 60))):
                macs = int(10 ** rng.uniform(5, 9)) if kind != "vector" else 0
                ops.append(OpCost(kind, macs, int(10 ** rng.uniform(3, 7)), int(10 ** rng.uniform(2, 6)) if kind in
                                  ("conv", "matmul") else 0))
        out.append(GraphCost(tuple(ops), 0, 0, 0, 0))
    return out


def test_fit_recovers_known_efficiencies():
    pytest.importorskip("scipy")
    spec = specs()["snapdragon-8-elite"]
    truth = Efficiency(conv=0.5, matmul=0.4, attention=0.15, weights=0.7, activations=3.0, node_us=4.0)
    costs = synthetic(0)
    measured = predict(costs, spec, "w8a16", truth)
    got = fit(costs, measured, spec, "w8a16")
    e = errors(predict(costs, spec, "w8a16", got), measured)
    assert e["worst"] < 0.02
    held = synthetic(1, 5)
    assert errors(predict(held, spec, "w8a16", got), predict(held, spec, "w8a16", truth))["median"] < 0.05


def test_shipped_efficiencies_are_fitted_and_flag_derived_precisions():
    for spec in specs().values():
        assert spec.efficiency["w8a16"].calibrated and spec.efficiency["fp16"].calibrated
        assert not spec.efficiency["w8a8"].calibrated and not spec.efficiency["w4a16"].calibrated
        assert spec.efficiency["w8a16"] != spec.efficiency["fp16"]
        assert spec.calibration.calibrated and set(spec.calibration.error) == {"fp16", "w8a16"}
