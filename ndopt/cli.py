"""The `ndopt` command: thin click commands over the library (ndopt.run, ndopt.plan, ...).

An expected failure (an NdoptError, or an OSError such as a full disk) prints one line and exits 2;
anything else prints one line with a hint and exits 1; `--debug` shows the traceback. SIGINT and
SIGTERM stop a command at the next safe point (ndopt.interrupt) and exit 128 + the signal.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from ndopt.errors import NdoptError


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ndopt.interrupt import handle_signals

        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            with handle_signals():
                return fn(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt as e:  # ndopt.interrupt.Interrupted, or Ctrl-C outside its handlers
            name = getattr(e, "signal_name", "SIGINT")
            where = getattr(e, "during", None)  # set by `ndopt run`: rerunning it resumes its training
            again = ("rerun the same command to go on (training resumes from its last checkpoint)" if where
                     else "nothing was written")
            click.echo(f"ndopt: interrupted by {name}{f' during {where}' if where else ''}; nothing half-written "
                       f"is left behind: {again}", err=True)
            sys.exit(getattr(e, "exit_code", 130))
        except NdoptError as e:
            if debug:
                raise
            click.echo(f"ndopt: error: {_one_line(e)}", err=True)
            sys.exit(2)
        except OSError as e:  # the machine refused (disk full, permissions): expected, and the user's to fix
            if debug:
                raise
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"ndopt: error: {where}{e.strerror or _one_line(e)}", err=True)
            sys.exit(2)
        except Exception as e:
            if debug:
                raise
            first = next(iter(str(e).splitlines()), "")
            click.echo(f"ndopt: internal error: {type(e).__name__}: {first} (rerun with --debug for the "
                       "traceback)", err=True)
            sys.exit(1)

    return wrapper


class _Ndopt(click.Group):
    """click's own usage errors (a wrong type, a missing option) in ndopt's one-line form, exit 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            cmd = ctx.command_path if ctx is not None else "ndopt"
            click.echo(f"ndopt: error: {_one_line(e.format_message())} (see `{cmd} --help`)", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("ndopt: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Ndopt)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--threads", type=click.IntRange(1, 4096), envvar="NDOPT_THREADS",
              help="torch intra-op threads for all work (default: sized per piece of work by its size and "
                   "how busy the machine is; env NDOPT_THREADS).")
def main(debug: bool, quiet: bool, threads: int | None) -> None:
    """ndopt: optimize pyramidal-flow video diffusion pipelines for Snapdragon NPUs."""
    from ndopt.progress import setup_logging

    setup_logging(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    if threads is not None:
        from ndopt import threads as policy

        policy.set_override(threads)


@main.command()
@click.argument("recipe")
@click.option("--model", help="Override the recipe's model (preset name or checkpoint dir).")
@click.option("--target", help="Override the recipe's target.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default: <output>/<name>).")
@_errors
def run(recipe: str, model: str | None, target: str | None, out: str | None) -> None:
    """Run RECIPE (a path or a shipped recipe's name) end to end."""
    from ndopt.progress import progress
    from ndopt.recipe import load_recipe
    from ndopt.runner import run as run_recipe

    r = load_recipe(recipe)
    with progress(f"running {r.name}", len(r.passes)) as advance:
        report = run_recipe(r, model=model, target=target, out=out, progress=advance)
    click.echo(f"ok: {report['recipe']['name']}: {len(report['steps'])} passes; "
               f"report at {report['paths']['md']}")
    r = report.get("ratios") or {}
    if r:
        click.echo(f"params {r['params']}x fewer, FLOPs/video {r['flops_per_video']}x fewer, "
                   f"DiT calls/video {r['dit_calls_per_video']}x fewer")


@main.command()
@click.argument("recipe", required=False)
@click.option("--model", help="A preset (e.g. pyramid-flow-sd3-768p); with a recipe, overrides its model.")
@click.option("--target", help="Override the recipe's target.")
@click.option("--frames", type=int, help="Video frames: 1 + 8k, as for `ndopt generate` (default: the preset's).")
@click.option("--height", type=int, help="Video height the DiT generates (Neodragon: 320).")
@click.option("--width", type=int, help="Video width the DiT generates (Neodragon: 512).")
@click.option("--first-frame", type=click.Choice(["generate", "external", "image-model"]),
              help="image-model: Neodragon's hybrid pipeline (an image model's first frame, the DiT's frames "
                   "upscaled 2x by QuickSRNet: the video is twice --height x --width); external: the DiT's side "
                   "alone, its first frame from outside.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Report directory (default: <output>/<recipe>-plan).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--no-cache", is_flag=True, help="Compute everything again (default: a repeated plan is answered from "
                                                 "the on-disk cache, ~/.cache/ndopt or $NDOPT_CACHE_DIR).")
@_errors
def plan(recipe: str | None, model: str | None, target: str | None, frames: int | None, height: int | None,
         width: int | None, first_frame: str | None, out_dir: str | None, as_json: bool, no_cache: bool) -> None:
    """Show what RECIPE (or --model alone) costs on the real-size model, on the meta device."""
    from ndopt import cache as plan_cache

    if recipe is None and model is None:
        raise click.UsageError("give a RECIPE or --model")
    args = {"recipe": recipe, "model": model, "target": target, "frames": frames, "height": height, "width": width,
            "first_frame": first_frame, "out_dir": out_dir}
    key = None if no_cache or not plan_cache.enabled() else plan_cache.plan_key(args)
    result = plan_cache.load_plan(key, _plan_report_dir(recipe, out_dir)) if key else None
    if result is None:  # a miss: compute (this imports torch), then keep it for the next identical plan
        from ndopt.runner import plan as plan_recipe

        result = plan_recipe(recipe, model=model, target=target, frames=frames, height=height, width=width,
                             first_frame=first_frame, report_dir=out_dir)
        if key:
            plan_cache.store_plan(key, result)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "final_summary"}, indent=2))
        return
    from rich.table import Table

    from ndopt.progress import console

    t = Table(title=f"plan: {result.get('recipe', result['model'])} ({result['pipeline']})")
    for col in ("step", "params", "DiT calls/video", "FLOPs/video"):
        t.add_column(col, justify="right" if col != "step" else "left")
    t.add_row("baseline", f"{result['params_total'] / 1e9:.3f}B", str(result["dit_calls_per_video"]),
              f"{result['flops_per_video'] / 1e12:.1f}T")
    for s in result.get("passes", []):
        t.add_row(s["name"], f"{s['params_total'] / 1e9:.3f}B", str(s["dit_calls_per_video"]),
                  f"{s['flops_per_video'] / 1e12:.1f}T")
    console.print(t)
    final = result.get("final", result)
    total = sum(final["params"].values())
    console.print(f"  params: {total / 1e9:.3f}B" + (" after the passes" if "final" in result else ""))
    for name, p in final["params"].items():
        console.print(f"  {name}: {p / 1e6:.1f}M params, {final['calls_per_video'][name]} calls/video")
    for name, e in (result.get("estimates") or {}).items():
        if isinstance(e, dict) and "latency_s" in e:
            console.print(f"  {name}: ~{e['latency_s']:.2f} s per video, peak {e['peak_memory_mb'] / 1024:.2f} GB "
                          f"({e.get('precision', '-')})")
            _print_estimate(console, name, e)
    if result.get("paths"):
        console.print(f"  report: {result['paths'].get('md')}")


@main.command()
@click.argument("onnx_model", type=click.Path(exists=True, dir_okay=False))
@click.option("--target", required=True, help="A target name (see `ndopt targets`) or a target file (chip.yaml).")
@click.option("--precision", default="w8a16", show_default=True, help="One of the target's precisions.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=1x3x224x224",
              help="Static dims for an input with unknown (symbolic) dims; repeat per input.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def estimate(onnx_model: str, target: str, precision: str, input_shapes: tuple[str, ...], as_json: bool) -> None:
    """Estimate latency and peak memory of ONNX_MODEL on a target (no device needed)."""
    from pathlib import Path

    from ndopt.errors import TargetError
    from ndopt.target import get_target

    t = get_target(target)
    if not hasattr(t, "estimate_onnx"):
        raise TargetError(f"target {target!r} offers no estimator")
    shapes = {"input_shapes": input_shapes} if input_shapes else {}  # targets without the option still estimate
    result = t.estimate_onnx(Path(onnx_model), precision, **shapes)
    if as_json:
        click.echo(json.dumps(result))
    else:
        note = f" ({result['note']})" if result.get("note") else ""
        click.echo(f"{target} {precision}: {result['latency_ms']:.2f} ms, peak {result['peak_memory_mb']:.1f} MB{note}")
        if result.get("warning"):
            click.echo(f"warning: {result['warning']}", err=True)


@main.command()
@click.argument("name", required=False)
@_errors
def passes(name: str | None) -> None:
    """List the registered passes (built-in and from installed plugins); with NAME, that pass's
    documentation: its contract, the facts it requires, provides and invalidates, and every config
    key with its type, default and description."""
    from ndopt.passinfo import describe, summary
    from ndopt.passmanager import available_passes

    if name is not None:
        click.echo(describe(name), nl=False)
        return
    for n, cls in available_passes().items():
        click.echo(f"{n:28s} {cls.fidelity.kind:8s} {summary(cls)}  [{cls.__module__}]")
    click.echo("\n`ndopt passes NAME` shows a pass's config keys, defaults and requirements.")


@main.command()
@_errors
def targets() -> None:
    """List the known targets."""
    from ndopt.target import available_targets

    for name, t in available_targets().items():
        cal = getattr(getattr(t, "spec", None), "calibration", None)
        if cal is None:
            click.echo(f"{name:24s} {t.description}")
            continue
        errs = ", ".join(f"{p} {e['median']:.0%} median / {e['worst']:.0%} worst (n={int(e['n'])})"
                         for p, e in cal.error.items())
        state = f"calibrated, held-out error {errs}" if cal.calibrated and errs else \
            ("calibrated" if cal.calibrated else "UNCALIBRATED")
        click.echo(f"{name:24s} {t.description}\n{'':24s} {state}")


@main.command()
@click.option("--target", required=True, help="The target to calibrate: a name or a target file (chip.yaml).")
@click.option("--profiles", "profiles_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A directory of AI Hub profile results (NAME.json) with the ONNX each was made from (NAME.onnx).")
@click.option("--precision", default="w8a16", show_default=True,
              help="What the profiled models ran at (a profile's own \"precision\" key wins).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write a new target file here instead of updating the target's.")
@_errors
def calibrate(target: str, profiles_dir: str, precision: str, out: str | None) -> None:
    """Fit a target's efficiencies to AI Hub profiles of your own models; print the held-out error."""
    from pathlib import Path

    from ndopt.errors import TargetError
    from ndopt.target import get_target

    t = get_target(target)
    spec = getattr(t, "spec", None)
    if spec is None:
        raise TargetError(f"target {target!r} has no target file to calibrate")
    from targets.profiles import calibrate as fit_profiles
    from targets.profiles import read_profiles, write_spec

    profiles = read_profiles(Path(profiles_dir), precision)
    new, errs, rows = fit_profiles(spec, profiles)
    for r in rows:
        click.echo(f"  {r['model']:28s} {r['precision']:6s} measured {r['measured_ms']:9.3f} ms  fitted "
                   f"{r['estimated_ms']:9.3f}  held out {r['held_out_ms']:9.3f}")
    for p, e in errs.items():
        click.echo(f"{new.name} {p}: leave-one-model-out error median {e['median']:.1%}, worst {e['worst']:.1%} "
                   f"({int(e['n'])} profiles)")
    dest = Path(out) if out else Path(spec.path) if spec.path else None
    if dest is None:
        raise TargetError(f"target {target!r}: no file to write; give --out chip.yaml")
    write_spec(new, dest)
    click.echo(f"wrote {dest}")


@main.command()
@click.option("--model", help="A preset, a bundled student (pyramid-flow-tiny-student-1-1-1), a saved pipeline "
              "(RUN/model of `ndopt run`) or an upstream checkpoint directory.  [default: pyramid-flow-tiny]")
@click.option("--bundle", type=click.Path(file_okay=False),
              help="A lowered bundle (RUN/bundles/<target>) run by the bundle runtime instead of torch.")
@click.option("--provider", help="With --bundle: the onnxruntime execution provider (default: the runtime's choice).")
@click.option("--prompt", required=True)
@click.option("--frames", type=int, help="Video frames: 1 + 8k.  [default: 9; a bundle's are fixed]")
@click.option("--height", type=int)
@click.option("--width", type=int)
@click.option("--steps", help="Steps per pyramid stage, e.g. 4,4,4 (or 4 for every stage); not for folded "
              "schedules or step-distilled students, whose steps are fixed.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1), help="Noise seed (numpy's default_rng: the same noise "
              "for --model and --bundle).")
@click.option("--first-frame", type=click.Choice(["generate", "image-model"]), default="generate", show_default=True,
              help="image-model: Neodragon's hybrid pipeline: an image model makes the first frame, the DiT the "
                   "rest, QuickSRNet upscales every frame 2x (the video is twice --height x --width).")
@click.option("--format", "fmt", type=click.Choice(["mp4", "gif", "png"]), help="Default: from --out's suffix.")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@_errors
def generate(model: str | None, bundle: str | None, provider: str | None, prompt: str, frames: int | None,
             height: int | None, width: int | None, steps: str | None, seed: int, first_frame: str, fmt: str | None,
             out: str) -> None:
    """Generate a video from a prompt, with a model (torch) or a lowered bundle (its runtime)."""
    from ndopt.progress import progress
    from ndopt.runner import generate as gen
    from ndopt.runner import generate_bundle, generation_pipeline

    if bundle is not None:
        if model is not None:
            raise click.UsageError("--model and --bundle exclude each other: give one")
        fixed = [f"--{n}" for n, v in (("frames", frames), ("height", height), ("width", width), ("steps", steps))
                 if v is not None]
        if first_frame != "generate":
            fixed.append("--first-frame")
        if fixed:
            raise click.UsageError(f"{', '.join(fixed)}: a bundle's shapes and steps are fixed when it is lowered")
        with progress("generating (bundle)", None) as advance:
            path, used = generate_bundle(bundle, prompt, out, seed=seed, provider=provider, fmt=fmt, progress=advance)
        click.echo(f"wrote {path} (provider {used})")
        return
    if provider is not None:
        raise click.UsageError("--provider applies to --bundle only")
    model = model or "pyramid-flow-tiny"
    frames = 9 if frames is None else frames
    total = None
    if model in _preset_names():  # the bar's length from the meta-device schedule (no weights built)
        total = generation_pipeline(model, frames=frames, height=height, width=width, steps=steps,
                                    meta=True, first_frame=first_frame).schedule.steps_per_video
        total += first_frame != "generate"  # the image model's frame
    with progress("generating", total) as advance:
        path = gen(model, prompt, out, frames=frames, height=height, width=width, seed=seed, fmt=fmt, steps=steps,
                   first_frame=first_frame, progress=advance)
    click.echo(f"wrote {path}")


def _print_estimate(console: Any, target: str, e: dict[str, Any]) -> None:
    """Latency per component and the memory plan's phases of one target's estimate."""
    from rich.table import Table

    t = Table(title=f"{target}: latency per component", title_justify="left")
    for col in ("component", "precision", "calls", "ms", "share", "weights MB", "activations MB"):
        t.add_column(col, justify="left" if col in ("component", "precision") else "right")
    for name, r in e.get("components", {}).items():
        t.add_row(name, r["precision"], str(r["calls_per_video"]), f"{r['latency_ms']:.1f}", f"{r['share']:.1%}",
                  f"{r['weights_mb']:.1f}", f"{r['peak_activations_mb']:.1f}")
    console.print(t)
    mp = e.get("memory_plan") or {}
    if mp.get("phases"):
        m = Table(title=f"{target}: memory plan ({mp['policy']}), peak {mp['peak_mb'] / 1024:.2f} GB of "
                        f"{mp['budget_mb'] / 1024:.1f} GB", title_justify="left")
        for col in ("phase", "weights MB", "activations MB", "resident GB"):
            m.add_column(col, justify="left" if col == "phase" else "right")
        for ph in mp["phases"]:
            m.add_row(ph["phase"], f"{ph['weights_mb']:.1f}", f"{ph['activations_mb']:.1f}",
                      f"{ph['resident_mb'] / 1024:.2f}")
        console.print(m)


def _plan_report_dir(recipe: str | None, out_dir: str | None) -> Any:
    """Where a cached plan's report files go: --out, or the recipe's <output>/<name>-plan (read from the
    recipe without importing torch); None when that cannot be known cheaply (the plan is computed)."""
    from pathlib import Path

    if out_dir:
        return Path(out_dir)
    if recipe is None:
        return None
    import yaml

    from ndopt.cache import recipe_text

    try:
        data = yaml.safe_load(recipe_text(recipe))
        return Path(str(data.get("output", "runs"))) / f"{data['name']}-plan"
    except Exception:  # the full path reports any problem with the recipe
        return None


def _preset_names() -> list[str]:
    from ndopt.model import preset_names

    return preset_names()


if __name__ == "__main__":
    main()
