"""ndopt.estimate_plots: the estimates plot of a plan or run report."""

from __future__ import annotations

from ndopt.estimate_plots import plot_estimates


def test_plot_estimates_writes_a_png(tmp_path):
    est = {t: {"precision": "w8a16", "peak_memory_mb": 3000.0 * k, "components": {
        "text_encoder": {"latency_ms": 100.0, "weights_mb": 130.0},
        "dit": {"latency_ms": 5000.0 * k, "weights_mb": 1500.0}}} for k, t in ((1, "snapdragon-8-elite"),
                                                                                (2, "snapdragon-x-elite"))}
    out = plot_estimates(tmp_path, est)
    assert out == {"estimates": tmp_path / "estimates.png"}
    assert (tmp_path / "estimates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_estimates(tmp_path, {}) == {} and plot_estimates(tmp_path, {"x": {"status": "skipped"}}) == {}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ndopt-")]
