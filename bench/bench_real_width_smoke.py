"""Wall time and peak memory of the real-width smoke (issue 23): for each smoke preset, the smoke recipe
end to end (`ndopt run`), one training pass under FSDP on two gloo processes (torchrun), and the same
pass in one process at fp32 and under bf16 autocast (`python -m ndopt.train.smoke`).

    python bench/bench_real_width_smoke.py --model pyramid-flow-sd3-smoke [other smoke presets ...]

Each run is a subprocess; its peak memory is sampled (psutil, the RSS summed over the process and
its children: both torchrun workers) and also taken from `getrusage(RUSAGE_CHILDREN)` (the largest
single process). Figures land in a table on stdout and in `--out/bench.json`; the bf16 and FSDP
rows show their first training loss beside fp32's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

RECIPE = "smoke-real-width"
PASSES = "block_importance,block_pruning"  # block pruning's stage-1 fine-tune trains the DiT


def measure(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, float | int]:
    """Run `cmd` to completion: wall seconds, exit code, peak RSS of its process tree (sampled)."""
    peak = 0
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = [root, *root.children(recursive=True)]
                    peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
                except psutil.Error:
                    pass
                done.wait(0.2)

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        rc = proc.wait()
        done.set()
        watcher.join()
    return {"seconds": time.perf_counter() - t0, "rc": rc, "peak_rss_gb": peak / 2**30}


def largest_child_gb() -> float:
    """getrusage's peak RSS over every child waited for so far (Linux: KiB), in GiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def first_loss(out: Path) -> float | None:
    path = out / "smoke.json"
    if not path.is_file():
        return None
    curves = [c for c in json.loads(path.read_text())["losses"].values() if c]
    return curves[0][0] if curves else None


def runs(model: str, out: Path) -> list[tuple[str, list[str]]]:
    py = sys.executable
    # one global batch of 2 everywhere: two FSDP processes take one sample each
    smoke = ["-m", "ndopt.train.smoke", RECIPE, "--model", model, "--passes", PASSES, "--train", "batch_size=2"]
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return [
        ("recipe", [py, "-m", "ndopt.cli", "run", RECIPE, "--model", model, "--out", str(out / "recipe")]),
        ("fsdp x2", [*torchrun, *smoke, "--train", "strategy=fsdp", "--out", str(out / "fsdp")]),
        ("fp32", [py, *smoke, "--out", str(out / "fp32")]),
        ("bf16", [py, *smoke, "--train", "precision=bf16", "--out", str(out / "bf16")]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["pyramid-flow-sd3-smoke"], help="smoke presets to run")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary directory)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these rows (recipe, 'fsdp x2', fp32, bf16)")
    ap.add_argument("--keep", action="store_true",
                    help="keep each run's directory (gigabytes: checkpoints, the saved model, the bundle); "
                         "by default only the logs and bench.json stay")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="ndopt-smoke-bench-"))
    env = {**os.environ, "NDOPT_THREADS": "1", "OMP_NUM_THREADS": "1"}
    rows = []
    for model in args.model:
        out = root / model
        out.mkdir(parents=True, exist_ok=True)
        for name, cmd in runs(model, out):
            if args.only is not None and name not in args.only:
                continue
            before = largest_child_gb()
            row = {"model": model, "run": name, **measure(cmd, out / f"{name.replace(' ', '_')}.log", env)}
            after = largest_child_gb()
            row["largest_process_gb"] = after if after > before else None  # None: not above an earlier run's
            run_dir = out / name.replace(" x2", "")
            if name != "recipe":
                row["first_loss"] = first_loss(run_dir)
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)
            rows.append(row)
            print(f"  {model} {name}: {row['seconds']:.0f} s, rc {row['rc']}", flush=True)
    print(f"\n{'model':<28} {'run':<8} {'rc':>3} {'wall s':>8} {'peak RSS GB':>12} {'largest GB':>11} {'loss':>8}")
    for r in rows:
        largest = f"{r['largest_process_gb']:.2f}" if r["largest_process_gb"] else "-"
        loss = f"{r['first_loss']:.4f}" if r.get("first_loss") is not None else ""
        print(f"{r['model']:<28} {r['run']:<8} {r['rc']:>3} {r['seconds']:>8.1f} {r['peak_rss_gb']:>12.2f} "
              f"{largest:>11} {loss:>8}")
    (root / "bench.json").write_text(json.dumps(rows, indent=1))
    print(f"\nruns and logs: {root}")


if __name__ == "__main__":
    main()
