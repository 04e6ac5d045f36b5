"""The fidelity probe: fixed prompts and seeds at a small resolution, run through a pipeline.

The PassManager's FidelityInstrument runs the probe after every pass and compares the latents and
decoded frames with those of the pipeline before the pass (the pass's own effect, checked against
its contract) and with the unoptimized pipeline (the cumulative effect, reported).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ndopt import threads
from ndopt.errors import FidelityError
from ndopt.eval.metrics import latent_metrics, pixel_psnr
from ndopt.eval.video import caption_direction, motion_direction, video_metrics
from ndopt.ir.fingerprint import sampled_identity
from ndopt.ir.pipeline import Pipeline

log = logging.getLogger("ndopt")

DEFAULT_PROMPTS = (  # the tiny teacher's backgrounds (dark, light); (yellow, square) is a held-out pair
    "a red circle moving left on a dark background",
    "a yellow square moving up on a light background",
)


@dataclass(frozen=True)
class ProbeSettings:
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seed: int = 0
    latent_frames: int = 2  # 9 video frames
    height: int = 64
    width: int = 64


@dataclass(frozen=True)
class ProbeOutput:
    latents: torch.Tensor
    video: torch.Tensor


class FidelityProbe:
    """Runs a pipeline on the probe settings; compares outputs."""

    def __init__(self, settings: ProbeSettings = ProbeSettings()) -> None:
        self.settings = settings

    def outputs(self, pipeline: Pipeline, progress: Any = None) -> ProbeOutput:
        s = self.settings
        probe_pipe = pipeline.replace(schedule=pipeline.schedule.with_frames(s.latent_frames, s.height, s.width))
        g = torch.Generator(device="cpu")
        g.manual_seed(s.seed)
        with torch.no_grad(), threads.for_pipeline(probe_pipe):
            latents = probe_pipe.sampler.sample(probe_pipe, list(s.prompts), generator=g, progress=progress)
            video = probe_pipe.sampler.decode(probe_pipe, latents)
        return ProbeOutput(latents.detach().cpu().float(), video.detach().cpu().float())

    @staticmethod
    def compare(out: ProbeOutput, ref: ProbeOutput) -> dict[str, float]:
        if out.latents.shape != ref.latents.shape:
            raise FidelityError(f"probe latents changed shape: {tuple(out.latents.shape)} vs "
                                f"{tuple(ref.latents.shape)}")
        m: dict[str, Any] = latent_metrics(out.latents, ref.latents)
        if out.video.shape != ref.video.shape:
            m["pixel_psnr"] = -math.inf
            return m
        m["pixel_psnr"] = pixel_psnr(out.video, ref.video)
        m.update(video_metrics(out.latents, ref.latents, out.video, ref.video))
        return m

    def motion(self, out: ProbeOutput) -> dict[str, Any]:
        """Motion following of the probe's videos: each prompt's detected direction vs its caption's."""
        wanted = [caption_direction(p) for p in self.settings.prompts]
        found = [motion_direction(v) for v in out.video]
        return {"rate": sum(w == f for w, f in zip(wanted, found)) / max(1, len(wanted)),
                "wanted": wanted, "found": found}


@dataclass
class FidelityInstrument:
    """PassManager instrument: probe after each pass; enforce exact tolerances and lossy budgets.

    policy `stop` raises FidelityError when a lossy pass leaves its budget; `warn` logs and goes on.
    Exact and analysis passes always stop on a violation: that is a bug, not a trade-off."""

    probe: FidelityProbe
    policy: str = "stop"
    budgets: dict[str, float] = field(default_factory=dict)  # per-pass overrides of budget_db
    frame_budgets: dict[str, float] = field(default_factory=dict)  # per-pass overrides of frame_budget_db
    reference: ProbeOutput | None = None
    _previous: ProbeOutput | None = None
    _sampled: tuple[Pipeline, tuple] | None = None  # the pipeline behind _previous (kept alive) and its fingerprint
    reused: int = 0  # samplings skipped because the sampled pipeline was unchanged
    _reference_motion: dict[str, Any] | None = None  # the unoptimized pipeline's motion following (read once)

    def before(self, index, p, pipeline, ctx) -> None:
        if ctx.plan:
            return
        if self.reference is None:
            self.reference = self.probe.outputs(pipeline)
            self._reference_motion = self.probe.motion(self.reference)
            self._previous = self.reference
            self._sampled = (pipeline, sampled_identity(pipeline))

    def after(self, index, p, before, result, ctx, record) -> None:
        if ctx.plan:
            return
        kind = p.fidelity.kind
        if not result.modified:
            record["fidelity"] = {"contract": kind, "skipped": "pass did not modify the pipeline"}
            return
        fp = sampled_identity(result.pipeline)
        same = self._sampled is not None and self._sampled[1] == fp
        out = self._previous if same else self.probe.outputs(result.pipeline)
        self.reused += same
        step = self.compare_checked(out, self._previous, p, kind)
        total = self.probe.compare(out, self.reference)
        record["fidelity"] = {"contract": kind, "vs_previous": step, "vs_original": total, **self.contract(p),
                              "motion": self.probe.motion(out), "motion_original": self._reference_motion}
        if same:  # the components it samples, their weights and the schedule are the ones sampled last time
            record["fidelity"]["reused"] = "sampled pipeline unchanged: the previous probe outputs stand"
        self._previous = out
        self._sampled = (result.pipeline, fp)

    def contract(self, p) -> dict[str, Any]:
        """What the pass promised: an exact tolerance, or a lossy metric and its budget (recipe overrides win)."""
        kind = p.fidelity.kind
        if kind == "exact":
            return {"tolerance": p.fidelity.tolerance}
        if kind == "lossy":
            out = {"metric": p.fidelity.metric, "budget_db": self.budgets.get(p.name, p.fidelity.budget_db)}
            frame = self.frame_budgets.get(p.name, p.fidelity.frame_budget_db)
            if frame is not None:
                out.update(frame_metric=p.fidelity.frame_metric, frame_budget_db=frame)
            return out
        return {}

    @property
    def latest(self) -> ProbeOutput | None:
        """The probe's outputs of the newest pipeline (the unoptimized one before any pass ran)."""
        return self._previous

    def compare_checked(self, out: ProbeOutput, prev: ProbeOutput, p, kind: str) -> dict[str, float]:
        step = self.probe.compare(out, prev)
        if kind == "exact":
            tol = p.fidelity.tolerance
            if step["latent_rel_err"] > tol:
                raise FidelityError(f"exact pass {p.name!r} changed the probe latents by "
                                    f"{step['latent_rel_err']:.3g} (relative), tolerance {tol:g}")
        elif kind == "analysis":
            if step["latent_rel_err"] != 0.0:
                raise FidelityError(f"analysis pass {p.name!r} changed the pipeline output")
        else:
            c = self.contract(p)
            checks = [(c["metric"], c["budget_db"], step[c["metric"]], "")]  # (metric, budget, value, where)
            if "frame_budget_db" in c:
                # no per-frame figures when the videos changed shape: that frame budget is missed too
                where = f" (frame {step['worst_frame']})" if c["metric"] == "pixel_psnr" and "worst_frame" in step else ""
                checks.append((c["frame_metric"], c["frame_budget_db"], step.get(c["frame_metric"], -math.inf), where))
            for metric, budget, value, where in checks:
                if value < budget:
                    msg = f"lossy pass {p.name!r}: {metric} {value:.2f} dB{where} is below its budget {budget:.2f} dB"
                    if self.policy == "stop":
                        raise FidelityError(msg + " (set fidelity.policy: warn in the recipe to go on)")
                    log.warning(msg)
        return step
