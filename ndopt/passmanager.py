"""Passes, their registry, and the PassManager that runs them with verification and instruments.

A pass is a small class with a `name`, a pydantic `Config`, the facts it `requires`, `provides`
and `invalidates`, a `fidelity` contract, and `run(pipeline, ctx) -> PassResult`. Passes never
mutate their input. The PassManager checks requirements before anything runs, then for each pass:
instruments before, run (or plan), verify, instruments after (timing, debug diff, artifacts, the
fidelity probe). Passes from other distributions register through the `ndopt.passes` entry points.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict

from ndopt import threads
from ndopt.errors import NdoptError, PassError
from ndopt.ir.cost import CostModel
from ndopt.ir.pipeline import AppliedPass, Pipeline
from ndopt.ir.verify import verify

log = logging.getLogger("ndopt")


class PassConfig(BaseModel):
    """Base of every pass config: typed, documented defaults, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Exact:
    """The pass must not change the pipeline's output beyond `tolerance` (relative L-inf)."""

    tolerance: float = 1e-5
    kind: ClassVar[str] = "exact"


@dataclass(frozen=True)
class Lossy:
    """The pass may change the output; `metric` (latent_psnr or pixel_psnr) must stay >= budget over the
    probe's videos, and, where `frame_budget_db` is set, on their worst frame (the same metric per latent
    or video frame): a pass that keeps the first frames and breaks the last fails."""

    metric: str = "latent_psnr"
    budget_db: float = 30.0
    frame_budget_db: float | None = None
    kind: ClassVar[str] = "lossy"

    @property
    def frame_metric(self) -> str:
        """The probe comparison's key of the worst frame's figure of `metric`."""
        return f"{self.metric}_worst_frame"


@dataclass(frozen=True)
class Analysis:
    """The pass only computes facts (e.g. importance scores); the output must not change at all."""

    kind: ClassVar[str] = "analysis"


Fidelity = Exact | Lossy | Analysis


@dataclass(frozen=True)
class TargetInfo:
    """What a pass may know of the target it optimizes for (read from the target's data; the core
    imports no target): its name, Hexagon arch, AIMET config name and supported precisions."""

    name: str
    hexagon_arch: str | None = None
    aimet_config: str | None = None
    precisions: tuple[str, ...] = ()

    @classmethod
    def of(cls, target: Any) -> TargetInfo:
        """From a registered target (`ndopt.target.get_target(name)`): its `spec` fields where it has them."""
        spec = getattr(target, "spec", None)
        return cls(str(getattr(target, "name", "?")), getattr(spec, "hexagon_arch", None),
                   getattr(spec, "aimet_config", None), tuple(getattr(spec, "precisions", ()) or ()))


def target_info(names: Sequence[str]) -> TargetInfo | None:
    """The context's target for a recipe's targets: the first one (recipe loading refuses targets
    whose data disagree where a pass reads it, e.g. two AIMET configs for one quantization pass)."""
    from ndopt.target import get_target

    return TargetInfo.of(get_target(names[0])) if names else None


@dataclass
class PassContext:
    """What a pass may use: where to write (`pass_dir`), which device/dtype, seeded randomness, plan
    mode, and the target the run is for (`target`: None when no target is known, e.g. a pass run by hand).

    The PassManager enters each pass (`enter_pass`) before calling it: `pass_index` is its position in
    the run (from 1; 0 outside a manager) and `pass_dir` its directory."""

    run_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    seed: int = 0
    plan: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    target: TargetInfo | None = None
    pass_index: int = 0
    pass_name: str = ""

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)  # a str from a script or notebook is fine
        self.device = torch.device(self.device)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh generator seeded from the run's seed (and an offset for independent streams)."""
        g = torch.Generator(device="cpu")
        g.manual_seed(self.seed + offset)
        return g

    def seed_for(self, offset: int) -> int:
        """An integer seed drawn from `generator(offset)` (for `torch.manual_seed` around module init)."""
        return int(torch.randint(0, 2**62, (1,), generator=self.generator(offset)))

    def enter_pass(self, index: int, name: str) -> None:
        """Make pass `index` (from 1), named `name`, the current one (what `pass_dir` names)."""
        self.pass_index, self.pass_name = index, name

    @property
    def pass_dir(self) -> Path:
        """The current pass's directory, created: `run_dir/passes/NN_name` for the pass the PassManager
        runs; `run_dir` itself for a pass run by hand, outside a manager."""
        d = self.run_dir / "passes" / f"{self.pass_index:02d}_{self.pass_name}" if self.pass_index else self.run_dir
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclass(frozen=True)
class PassResult:
    pipeline: Pipeline
    modified: bool
    metrics: Mapping[str, Any] = field(default_factory=dict)
    artifacts: Mapping[str, Path] = field(default_factory=dict)


class Pass:
    """Base class of passes. Subclasses set the class attributes and implement `run`."""

    name: ClassVar[str]
    fidelity: ClassVar[Fidelity] = Exact()
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    invalidates: ClassVar[tuple[str, ...]] = ()

    class Config(PassConfig):
        pass

    def __init__(self, config: PassConfig | Mapping[str, Any] | None = None) -> None:
        if config is None:
            config = {}
        self.config = config if isinstance(config, PassConfig) else self.Config(**dict(config))

    def run(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def plan(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        """The structural effect only (meta-device pipeline; no training, no calibration).

        Passes whose `run` is already purely structural inherit this default.

        A saved pipeline (ndopt.saved) is rebuilt by replaying every applied pass's `plan` on the base
        model, then loading the saved weights. Two optional hooks serve passes whose result is more than
        structure plus weights (an AIMET sim): `save_state(self, pipeline, directory: Path)` writes the
        pass's own state under `RUN/model/<state_subdir>/` (class attribute; default: the pass name)
        when the pipeline is saved and may return `{component: {attr: path}}`, component attrs that
        point into that directory (stored relative to the saved model, resolved again on load); and `restore(self, pipeline, ctx, state: Path) -> Pipeline`
        is called with that directory after the weights are loaded, to rebuild what the pass wraps."""
        return self.run(pipeline, ctx)

    def __repr__(self) -> str:
        return f"{self.name}({self.config.model_dump()})"


# ---- registry --------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Pass]] = {}
_ENTRY_POINTS_LOADED = False
ENTRY_POINT_GROUP = "ndopt.passes"


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its name."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__qualname__} must set a string `name` to be registered")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise PassError(f"two passes are named {name!r}: {existing.__module__} and {cls.__module__}")
    _REGISTRY[name] = cls
    return cls


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as e:  # a broken plugin must not hide the others; say which one and why
            log.warning("pass plugin %s (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        if isinstance(cls, type) and issubclass(cls, Pass):
            register(cls)


def available_passes() -> dict[str, type[Pass]]:
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = available_passes()
    if name not in passes:
        raise PassError(f"unknown pass {name!r}; available: {', '.join(passes) or '(none)'}")
    return passes[name]


def providers_of(fact: str) -> list[str]:
    return [n for n, c in available_passes().items() if fact in c.provides]


def check_requirements(passes: Sequence[Pass], facts: Iterable[str] = ()) -> None:
    """Walk the pass list with the facts each provides and invalidates; fail before any work."""
    have = set(facts)
    for i, p in enumerate(passes):
        missing = [f for f in p.requires if f not in have]
        if missing:
            hints = "; ".join(
                f"{f!r} is provided by {', '.join(repr(x) for x in providers_of(f)) or 'no registered pass'}"
                for f in missing)
            raise PassError(f"pass #{i + 1} {p.name!r} requires {', '.join(map(repr, missing))}: {hints}; "
                            "add that pass before it")
        have -= set(p.invalidates)
        have |= set(p.provides)


# ---- instruments -----------------------------------------------------------------------------
class Instrument(Protocol):
    def before(self, index: int, p: Pass, pipeline: Pipeline, ctx: PassContext) -> None: ...

    def after(self, index: int, p: Pass, before: Pipeline, result: PassResult, ctx: PassContext,
              record: dict[str, Any]) -> None: ...


class Timing:
    """Wall time of each pass into its record."""

    def before(self, index: int, p: Pass, pipeline: Pipeline, ctx: PassContext) -> None:
        self._t0 = time.perf_counter()

    def after(self, index, p, before, result, ctx, record) -> None:
        record["seconds"] = round(time.perf_counter() - self._t0, 4)


class DebugDiff:
    """With NDOPT_DEBUG=1, log each pass's unified diff of the pipeline summary."""

    def before(self, index: int, p: Pass, pipeline: Pipeline, ctx: PassContext) -> None:
        pass

    def after(self, index, p, before, result, ctx, record) -> None:
        if os.environ.get("NDOPT_DEBUG", "0") in ("", "0"):
            return
        import difflib

        diff = difflib.unified_diff(before.summary().splitlines(), result.pipeline.summary().splitlines(),
                                    f"before {p.name}", f"after {p.name}", lineterm="")
        log.info("pass %s changed the pipeline:\n%s", p.name, "\n".join(diff) or "(no change)")


class SummaryArtifacts:
    """Writes the pipeline summary after each pass into the pass's directory (atomically)."""

    def before(self, index: int, p: Pass, pipeline: Pipeline, ctx: PassContext) -> None:
        pass

    def after(self, index, p, before, result, ctx, record) -> None:
        from ndopt.io import atomic_write_text

        path = ctx.pass_dir / "pipeline.txt"
        atomic_write_text(path, result.pipeline.summary())
        record.setdefault("artifacts", {})["summary"] = str(path)


# ---- the manager -----------------------------------------------------------------------------
@dataclass
class PassRecord:
    index: int
    name: str
    config: dict[str, Any]
    record: dict[str, Any]


class PassManager:
    """Runs passes in order; verifies after each; instruments observe without touching passes."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Any] = (), *,
                 verify_calls: bool = True, costs: CostModel | None = None) -> None:
        self.passes = list(passes)
        self.instruments = [Timing(), DebugDiff(), SummaryArtifacts(), *instruments]
        self.verify_calls = verify_calls
        self.costs = costs or CostModel()

    def run(self, pipeline: Pipeline, ctx: PassContext, *,
            on_pass_done: Any = None) -> tuple[Pipeline, list[PassRecord]]:
        check_requirements(self.passes, pipeline.facts)
        records: list[PassRecord] = []
        for index, p in enumerate(self.passes, 1):
            missing = [f for f in p.requires if f not in pipeline.facts]
            if missing:  # facts can vanish at run time (a pass invalidated them)
                raise PassError(f"pass {p.name!r} requires {missing}, which the pipeline no longer has")
            ctx.enter_pass(index, p.name)  # ctx.pass_dir: this pass's directory
            for inst in self.instruments:
                inst.before(index, p, pipeline, ctx)
            log.info("pass %d/%d: %s", index, len(self.passes), p.name)
            try:
                if ctx.plan:
                    result = p.plan(pipeline, ctx)
                else:
                    with threads.for_pipeline(pipeline):
                        result = p.run(pipeline, ctx)
            except NdoptError:
                raise
            except Exception as e:
                raise PassError(f"pass {p.name!r} failed: {type(e).__name__}: {e}") from e
            if result.pipeline is pipeline and result.modified:
                raise PassError(f"pass {p.name!r} says it modified the pipeline but returned its input")
            new = result.pipeline.replace(facts_add=p.provides, facts_remove=p.invalidates) \
                if result.modified or p.provides else result.pipeline
            new = new.with_provenance(AppliedPass(p.name, p.config.model_dump(mode="json"), result.modified,
                                                  dict(result.metrics)))
            result = PassResult(new, result.modified, result.metrics, result.artifacts)
            verify(new, calls=self.verify_calls, costs=self.costs)
            record: dict[str, Any] = {"modified": result.modified, "metrics": dict(result.metrics),
                                      "artifacts": {k: str(v) for k, v in result.artifacts.items()}}
            for inst in self.instruments:
                inst.after(index, p, pipeline, result, ctx, record)
            rec = PassRecord(index, p.name, p.config.model_dump(mode="json"), record)
            records.append(rec)
            pipeline = new
            if on_pass_done is not None:
                on_pass_done(pipeline, rec)
        return pipeline, records
