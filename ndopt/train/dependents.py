"""Rebuild what ships with the tiny teacher after it is retrained: the step-distilled students and the
tiny decoder, each distilled from the bundled teacher by a shipped recipe.

    python -m ndopt.train.dependents [--out runs/dependents] [--jobs 2] [--only tiny-student ...] [--install]

Each recipe runs as its own `ndopt run` process (its log in `<out>/<recipe>.log`, its run in
`<out>/<recipe>-<teacher fingerprint>`), at most `--jobs` at once with the machine's cores split between
them, longest first; a rerun for the same teacher resumes each from its checkpoints. With `--install`, each artifact that was built is copied into the package's weights once
it loads against the bundled teacher (a student records the teacher DiT it was distilled from, the
tiny decoder the VAE encoder): a stale artifact is never installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ndopt.errors import NdoptError

log = logging.getLogger("ndopt")
TEACHER = "pyramid-flow-tiny"


@dataclass(frozen=True)
class Dependent:
    recipe: str  # a shipped recipe (recipes/<recipe>.yaml)
    artifact: str  # what its run writes, relative to the run directory
    weights: str  # the bundled file it becomes (ndopt/frontends/pyramid_flow/weights/)
    minutes: int  # rough time on 2 cores (longest first)
    # the metadata key holding the fingerprint of the teacher component it was distilled from
    fingerprint: tuple[str, str] = ("teacher", "dit")


DEPENDENTS = (
    Dependent("tiny-student-4-4-4", "passes/01_step_distillation/student.safetensors",
              "pyramid-flow-tiny-student-4-4-4.safetensors", 60),
    Dependent("tiny-student", "passes/01_step_distillation/student.safetensors",
              "pyramid-flow-tiny-student-1-1-1.safetensors", 25),
    Dependent("tiny-decoder", "passes/01_decoder_swap/decoder.safetensors",
              "pyramid-flow-tiny-decoder.safetensors", 25, ("encoder", "vae_encoder")),
)


def run_command(dep: Dependent, run_dir: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "ndopt.cli", "--threads", str(threads), "run", dep.recipe, "--out", str(run_dir)]


def fingerprint(dep: Dependent, teacher: Any) -> str:
    """The fingerprint of the teacher component `dep` is distilled from (what its metadata records)."""
    from ndopt.train.data import module_fingerprint

    return module_fingerprint(teacher.by_role(dep.fingerprint[1])[0].module)


def run_dir(dep: Dependent, out: Path, teacher: Any) -> Path:
    """`<out>/<recipe>-<teacher fingerprint>`: a rerun resumes only a run of the same teacher (a finished
    run of the previous teacher would otherwise be reloaded and saved with the new one's fingerprint)."""
    return out / f"{dep.recipe}-{fingerprint(dep, teacher)[:12]}"


def build(deps: tuple[Dependent, ...], out: Path, teacher: Any, *, jobs: int = 2, cores: int | None = None,
          command: Callable[[Dependent, Path, int], list[str]] = run_command) -> dict[str, Path]:
    """Run each dependent's recipe (at most `jobs` at once); returns {recipe: artifact} of those that built.
    Raises with every failed recipe and its log once all have ended; on an interrupt, stops them all."""
    if jobs < 1:
        raise NdoptError(f"dependents: --jobs {jobs}: at least 1")
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (cores or os.cpu_count() or 1) // max(1, min(jobs, len(deps))))
    queue = sorted(deps, key=lambda d: -d.minutes)
    running: dict[str, tuple[subprocess.Popen, Dependent, float]] = {}
    built: dict[str, Path] = {}
    failed: list[str] = []
    try:
        while queue or running:
            while queue and len(running) < jobs:
                dep = queue.pop(0)
                with open(out / f"{dep.recipe}.log", "ab") as logf:
                    proc = subprocess.Popen(command(dep, run_dir(dep, out, teacher), threads), stdout=logf,
                                            stderr=subprocess.STDOUT)
                running[dep.recipe] = (proc, dep, time.perf_counter())
                log.info("dependents: %s started (pid %d, %d thread(s)), log %s", dep.recipe, proc.pid, threads,
                         out / f"{dep.recipe}.log")
            time.sleep(0.2)
            for name, (proc, dep, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                artifact = run_dir(dep, out, teacher) / dep.artifact
                if proc.returncode == 0 and artifact.is_file():
                    built[name] = artifact
                    log.info("dependents: %s built in %.1f min: %s", name, (time.perf_counter() - t0) / 60, artifact)
                else:
                    missing = "" if artifact.is_file() else f", no {dep.artifact}"
                    failed.append(f"{name} (exit code {proc.returncode}{missing}; log {out / f'{name}.log'})")
    finally:
        for proc, _, _ in running.values():  # an interrupt: each stops at its next training step
            proc.terminate()
        for proc, _, _ in running.values():
            proc.wait()
    if failed:
        raise NdoptError("dependents failed: " + "; ".join(failed) + ". Rerun the same command: they resume.")
    return built


def install(deps: tuple[Dependent, ...], built: dict[str, Path], weights_dir: Path | None = None) -> list[Path]:
    """Copy each built artifact over its bundled file (atomically), after checking that every one was
    distilled from the bundled teacher's weights: nothing is installed if one is stale."""
    from ndopt.io import atomic_path
    from ndopt.model import frontend_of, load_model

    todo = [d for d in deps if d.recipe in built]
    teacher = load_model(TEACHER) if todo else None
    for dep in todo:  # every check first: nothing is installed if one is stale
        check_fits(dep, built[dep.recipe], teacher)
    done = []
    for dep in todo:
        target = (weights_dir or _weights_dir(frontend_of(TEACHER))) / dep.weights
        with atomic_path(target) as tmp:
            shutil.copyfile(built[dep.recipe], tmp)
        log.info("dependents: installed %s", target)
        done.append(target)
    return done


def _weights_dir(frontend: Any) -> Path:
    teacher = frontend.bundled_weights(TEACHER)
    if teacher is None:
        raise NdoptError(f"dependents: no bundled {TEACHER} weights: install a teacher first")
    return teacher.parent


def check_fits(dep: Dependent, path: Path, teacher: Any) -> None:
    """The artifact records the fingerprint of the teacher component it was distilled from (a student
    its DiT, the tiny decoder the VAE encoder): it must be the bundled teacher's."""
    from safetensors import safe_open

    key, role = dep.fingerprint
    with safe_open(str(path), framework="pt") as f:
        recorded = (f.metadata() or {}).get(key)
    have = fingerprint(dep, teacher)
    if recorded != have:
        raise NdoptError(f"dependents: {path} ({dep.recipe}) was distilled from another {role} (fingerprint "
                         f"{recorded}, the bundled teacher's is {have}); nothing was installed")


def main(argv: list[str] | None = None) -> int:
    from ndopt.progress import setup_logging

    ap = argparse.ArgumentParser(prog="python -m ndopt.train.dependents", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/dependents"), help="one run directory per recipe")
    ap.add_argument("--jobs", type=int, default=2, help="recipes at once (the cores are split between them)")
    ap.add_argument("--only", nargs="*", choices=[d.recipe for d in DEPENDENTS], help="these recipes only")
    ap.add_argument("--install", action="store_true", help="copy what was built into the package's weights")
    args = ap.parse_args(argv)
    setup_logging()
    from ndopt import interrupt
    from ndopt.model import load_model

    deps = tuple(d for d in DEPENDENTS if not args.only or d.recipe in args.only)
    try:
        with interrupt.handle_signals():
            built = build(deps, args.out, load_model(TEACHER), jobs=args.jobs)
        if args.install:
            install(deps, built)
    except NdoptError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
