"""Benchmark: the toolkit's own commands, end to end in fresh processes (imports included).

    .venv/bin/python bench/bench_toolkit.py [--skip-run] [--repeats 1] [--busy 0]
    PYTHONPATH=/path/to/other/ndopt/tree .venv/bin/python bench/bench_toolkit.py   # another version

Times `import torch`, `ndopt plan --model pyramid-flow-sd3-768p` (cold: an empty cache; shapes
cached: a new plan on a known preset; warm: the same plan again), `ndopt generate` of the README's
prompt, `ndopt estimate` of one ONNX graph, and `ndopt run default` (an empty cache, then again with
the latents cached). Each figure is printed with its ratio to the previous release's, recorded
below. `--busy N` starts N CPU-bound processes first, to time the commands on a busy machine
(as on a shared CI or laptop). Every command runs with a fresh cache directory unless said.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red circle moving left on a dark background"

# The previous release (main at 7c18b2e, before issue 26): this bench with PYTHONPATH at that tree, on
# the same quiet 2-core machine, 2026-12-07. It has no caches: its "shapes cached" plan is a cold
# plan of the other size, and its second `run default` is the same work as the first. `run default`
# is a separate quiet run of that tree (140.9 s; single runs vary by about 10% here).
PREVIOUS = {
    "import_torch": 2.55,
    "plan_768p_cold": 12.34,
    "plan_768p_shapes_cached": 10.56,
    "plan_768p_warm": 12.65,
    "generate": 14.23,
    "estimate": 5.65,
    "run_default": 140.9,
    "run_default_latents_cached": 140.9,
}


def _spin(stop: float) -> None:
    while time.time() < stop:
        pass


def timed(label: str, cmd: list[str], env: dict[str, str], repeats: int) -> float:
    """Median wall time of `cmd`. It runs in a scratch directory: `python -m` puts its working directory
    first on sys.path, so running it here would shadow a PYTHONPATH that names another ndopt tree."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, cwd=env["NDOPT_BENCH_CWD"], capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"{label}: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1, help="runs per figure (median); run default runs once")
    ap.add_argument("--skip-run", action="store_true", help="leave out `ndopt run default` (minutes)")
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound processes to start first")
    args = ap.parse_args()
    hogs = [mp.Process(target=_spin, args=(time.time() + 3600,), daemon=True) for _ in range(args.busy)]
    for h in hogs:
        h.start()
    py = sys.executable
    ndopt = [py, "-m", "ndopt.cli"]
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ndopt-bench-") as d:
        d = Path(d)
        (d / "cwd").mkdir()
        env = {**os.environ, "NDOPT_CACHE_DIR": str(d / "cache"), "NDOPT_BENCH_CWD": str(d / "cwd")}
        rows["import_torch"] = timed("import torch", [py, "-c", "import torch"], env, args.repeats)

        plan = [*ndopt, "plan", "--model", "pyramid-flow-sd3-768p", "--json"]
        cold = []
        for i in range(args.repeats):
            e = {**env, "NDOPT_CACHE_DIR": str(d / f"cold{i}")}
            cold.append(timed("plan cold", plan, e, 1))
        rows["plan_768p_cold"] = statistics.median(cold)
        # a new plan on a known preset: other sizes, so only the shape runs it shares are cached
        e = {**env, "NDOPT_CACHE_DIR": str(d / "cold0")}
        rows["plan_768p_shapes_cached"] = timed("plan shapes cached", [*plan, "--frames", "25"], e, 1)
        rows["plan_768p_warm"] = timed("plan warm", plan, e, args.repeats)

        rows["generate"] = timed("generate", [*ndopt, "generate", "--model", "pyramid-flow-tiny", "--prompt", PROMPT,
                                              "--frames", "9", "--out", str(d / "v.mp4")], env, args.repeats)
        if not args.skip_run:
            run_dir = d / "run"
            rows["run_default"] = timed("run default", [*ndopt, "run", "default", "--out", str(run_dir)], env, 1)
            rows["run_default_latents_cached"] = timed("run default again", [*ndopt, "run", "default", "--out",
                                                                             str(d / "run2")], env, 1)
        graph = d / "resnet18.onnx"  # a model `ndopt estimate` users bring: torchvision's, random weights
        subprocess.run([py, "-c", "import torch, torchvision; m = torchvision.models.resnet18().eval(); "
                        f"torch.onnx.export(m, (torch.zeros(1, 3, 224, 224),), {str(graph)!r}, dynamo=False)"],
                       check=True, capture_output=True)
        rows["estimate"] = timed("estimate", [*ndopt, "estimate", str(graph), "--target", "snapdragon-8-elite"],
                                 env, args.repeats)
    for h in hogs:
        h.terminate()
    print(f"ndopt toolkit, {os.cpu_count()} cores, {args.busy} busy process(es), median of {args.repeats}")
    print(f"{'command':30s} {'seconds':>9s} {'previous':>9s} {'speed-up':>9s}")
    for k, v in rows.items():
        prev = PREVIOUS.get(k)
        ratio = f"{prev / v:8.2f}x" if prev else "-"
        print(f"{k:30s} {v:9.2f} {prev if prev is not None else '-':>9} {ratio:>9s}")


if __name__ == "__main__":
    main()
