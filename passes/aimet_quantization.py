"""AIMET quantization (lossy): W8A16, or W4A16 with LPBQ, sims of the pipeline's components for Hexagon.

The last optimization before lowering. Each selected component (text encoder, context adapter, DiT,
VAE decoder) becomes an aimet-torch `QuantizationSimModel` built with the target's HTP config (the
pass context's target's `aimet_config`: `htp_v79` for the Snapdragon 8 Elite, `htp_v73` for the X
Elite; the config's `hexagon` pins one; metrics and attrs say which and where it came from, and
lowering refuses encodings made for another HTP version): int8 weights and int16
activations by default (the Hexagon standard for transformers, REFERENCE.md), or int4 weights by
low-power blockwise quantization (LPBQ: 4-bit weights in blocks along the input dimension, each
block's scale a 4-bit multiple of a per-channel float scale).

- Attention that quantizes: the DiT copy runs the explicit matmul-softmax attention and every
  functional op inside its blocks becomes an AIMET module (`passes._aimet.support`), so each matmul
  and softmax gets an encoding; the op census in the metrics lists any float op that remains
  (`passes._aimet.sim`). The attention mask fills masked scores with a finite value below every
  reachable score instead of finfo.min, which would stretch the scores' 16-bit encoding to 1e38.
- Calibration from the pipeline itself: the float pipeline samples the calibration prompts and
  forward hooks record every input of every component at every call (each stage, step, CFG
  branch and history layout), so encodings cover the activation ranges of all noise levels.
- The sim replaces the float component behind the float module's interface (`QuantizedComponent`),
  so the sampler, the fidelity probe and the verifier run the quantized pipeline unchanged.
- Artifacts for lowering under the pass directory: per component a QDQ ONNX graph (encodings in
  QuantizeLinear/DequantizeLinear pairs, opset 21 for int16/int4) of its first (or every) call
  signature, checked with onnxruntime against the sim, the quantizer state (safetensors), and
  `quantization.json`.
- Plan mode: weight bytes per component at each precision on the real-size meta pipeline.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ndopt.errors import PassError
from ndopt.eval.probe import DEFAULT_PROMPTS, FidelityProbe, ProbeOutput
from ndopt.io import atomic_dir, atomic_write_json
from ndopt.ir.component import QUANTIZED_BY_DEFAULT as ROLES
from ndopt.ir.component import QUANTIZED_WHEN_CALLED as OPTIONAL_ROLES
from ndopt.ir.component import Component
from ndopt.ir.pipeline import Pipeline
from ndopt.model import ModelInterface, interface_for
from ndopt.passmanager import Lossy, Pass, PassConfig, PassContext, PassResult, register
from ndopt.precision import PRECISION_BITS
from passes._aimet import state as aimet_state
from passes._aimet import support as aq
from passes._aimet.sim import (
    BLOCKWISE_WEIGHTS,
    EntryCall,
    QuantizedComponent,
    flat_tensors,
    inner_name,
    lpbq_eligible,
    onnx_matches_sim,
    quantized_op_counts,
    record_calls,
    same_shape_records,
    signature_key,
    unquantized_ops,
    weight_bytes,
)

log = logging.getLogger("ndopt")

DEFAULT_AIMET_CONFIG = "htp_v79"  # without a target: the Snapdragon 8 Elite's (the paper's first target)
# Captions of the tiny teacher's training distribution (ndopt/train/tiny_teacher.yaml; no held-out
# pair): whole-word tokens for the tiny preset, plain English for the real tokenizers. Calibration
# wants in-distribution prompts: on the teacher, 8 of these at 6-6-6 steps keep W8A16 at 37 dB and
# its prompt following, 1 out-of-distribution prompt at 1-1-1 gave 28.5 dB and 3/16.
CALIBRATION_PROMPTS = (
    "a large green triangle moving down on a dark background",
    "a large cyan triangle moving down on a dark background",
    "a white square on a dark background",
    "a large white square on a dark background",
    "a large pink ring moving down on a light background",
    "a large yellow ring moving left on a dark background",
    "a pink circle moving down on a dark background",
    "a large green ring moving left on a light background",
)


def attention_mask_fill(dit: nn.Module, margin: float = 24.0) -> float:
    """A masked-score value at least `margin` below every score the DiT can produce.

    With RMSNorm on q and k (qk_norm='rms_norm'), |q| <= sqrt(d) max|w_q| per head and RoPE keeps
    norms, so |q.k| / sqrt(d) <= sqrt(d) max|w_q| max|w_k|. A fill of -(bound + 24) gives masked
    tokens a softmax weight below e^-24 of any real one (zero at 16 bits), as finfo.min does, while
    the masked scores' 16-bit encoding keeps a fine step for the real ones."""
    bound = 0.0
    for m in dit.modules():
        norms = [getattr(m, a, None) for a in ("norm_q", "norm_k", "norm_add_q", "norm_add_k")]
        if hasattr(m, "head_dim") and any(n is not None for n in norms):
            if any(n is None for n in norms):
                return -1e4
            wq = max(float(norms[0].weight.abs().max()), float(norms[2].weight.abs().max()))
            wk = max(float(norms[1].weight.abs().max()), float(norms[3].weight.abs().max()))
            bound = max(bound, m.head_dim ** 0.5 * wq * wk)
    return -(bound + margin) if bound else -1e4


# ---- config -------------------------------------------------------------------------------------
class Override(PassConfig):
    """Precision of the modules matching `pattern` (fnmatch on `<component>.<module path>`, e.g.
    `dit.proj_out`, `dit.transformer_blocks.*.norm1*`, `vae_decoder.*`; the modules the pass
    creates for functional ops are named `module_<op>`, e.g. `dit.*.attn.module_softmax`)."""

    pattern: str = Field(description="fnmatch pattern on `<component>.<module path>`, e.g. `dit.proj_out`")
    weights: Literal[4, 8, 16] | None = Field(None, description="weight bits of the matching modules")
    activations: Literal[8, 16] | None = Field(None, description="activation bits of the matching modules")
    float: bool = Field(False, description="no quantizers at all (the NPU runs the modules in float, slowly)")

    @model_validator(mode="after")
    def _something(self) -> Override:
        if self.weights is None and self.activations is None and not self.float:
            raise ValueError(f"override {self.pattern!r} sets nothing: give weights, activations or float: true")
        return self


class Calibration(PassConfig):
    """What the float pipeline samples to record calibration inputs (None: the pipeline's own)."""

    prompts: list[str] = Field(default_factory=lambda: list(CALIBRATION_PROMPTS), min_length=1,
                               description="prompts the float pipeline samples (the teacher's caption distribution)")
    latent_frames: int | None = Field(default=None, ge=1, description="latent frames sampled (null: the pipeline's)")
    steps: list[int] | None = Field(None, description="sampling steps per pyramid stage, first frame (null: the "
                                                      "pipeline's)")
    video_steps: list[int] | None = Field(None, description="sampling steps per pyramid stage, later frames (null: "
                                                            "as steps)")


@dataclass
class _Built:
    """A component's sim before calibration."""

    comp: Component
    sim: Any
    report: aq.PrepareReport
    mask_fill: float | None
    lpbq: dict[str, Any]
    overrides: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)


# ---- the pass -----------------------------------------------------------------------------------
@register
class AimetQuantization(Pass):
    """Replace components by AIMET W8A16 / W4A16-LPBQ sims calibrated on the pipeline's own calls."""

    name = "aimet_quantization"
    # The probe's budget: the tiny preset at W8A16 measures ~36 dB (12 steps, bench); W4A16 ~25 dB.
    fidelity = Lossy(metric="latent_psnr", budget_db=20.0, frame_budget_db=18.0)
    provides = ("quantized",)

    class Config(PassConfig):
        precision: Literal["w8a16", "w4a16"] = Field(  # REFERENCE.md: W8A16 is the Hexagon standard
            "w8a16", description="int8 weights and int16 activations, or int4 LPBQ weights and int16 activations")
        # None: the target's (`aimet_config` in its YAML: 8 Elite htp_v79, X Elite htp_v73); set it only
        # to pin a version (recipe loading refuses one that disagrees with the recipe's target)
        hexagon: Literal["v68", "v69", "v73", "v75", "v79", "v81"] | None = Field(
            None, description="pin the HTP version of AIMET's config (null: the target's `aimet_config`)")
        components: list[str] | None = Field(
            None, description="roles to quantize (null: every role the pipeline has; the VAE encoder where the "
                              "call plan calls it)")
        quant_scheme: Literal["min_max", "tf_enhanced"] = Field("min_max", description="AIMET's encoding "
                                                                "analysis for activations and weights")
        per_channel: bool = Field(True, description="weight encodings per output channel (false: AIMET's HTP "
                                                    "default, per tensor)")
        block_size: int = Field(default=64, ge=4, description="LPBQ block along the input dimension (w4a16 only)")
        overrides: list[Override] = Field(default_factory=list, description="precisions of the modules matching "
                                                                            "a pattern, in order (the last match wins)")
        calibration: Calibration = Field(default_factory=Calibration, description="what the float pipeline "
                                                                                  "samples for calibration")
        attention_mask_fill: float | None = Field(None, description="masked attention scores' value (null: "
                                                                    "below every reachable score, from q/k RMSNorm)")
        seq_mse: bool = Field(False, description="AIMET's sequential MSE weight encodings (for 4 bits; slow)")
        seq_mse_candidates: int = Field(default=20, ge=2, description="candidate scales sequential MSE tries")
        export: Literal["first", "all", "none"] = Field("first", description="call signatures exported as QDQ "
                                                                             "ONNX under the pass directory")
        evaluate: bool = Field(True, description="latent and pixel PSNR vs the float pipeline in the metrics")
        eval_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1,
                                        description="prompts of that evaluation")

        @model_validator(mode="after")
        def _roles(self) -> AimetQuantization.Config:
            bad = [r for r in self.components or () if r not in ROLES + OPTIONAL_ROLES]
            if bad:
                raise ValueError(f"components {bad} are not quantizable roles; choose from {list(ROLES + OPTIONAL_ROLES)}")
            return self

    # ---- selection and bookkeeping --------------------------------------------------------------
    def _selected(self, pipeline: Pipeline) -> list[Component]:
        roles = self.config.components
        if roles is not None:
            missing = [r for r in roles if not pipeline.by_role(r)]
            if missing:
                raise PassError(f"aimet_quantization: components {missing} are not in pipeline {pipeline.name!r} "
                                f"(it has roles {sorted({c.role for c in pipeline.components.values()})}); "
                                "remove them from `components`")
        chosen = [c for c in pipeline.components.values() if c.role in (roles or ROLES)]
        if roles is None:  # the VAE encoder too where the pipeline calls it (hybrid mode's first frame)
            called = {s.component for s in pipeline.call_plan()}
            chosen += [c for c in pipeline.by_role("vae_encoder") if c.name in called]
        if not chosen:
            raise PassError(f"aimet_quantization: pipeline {pipeline.name!r} has none of the roles {list(roles or ROLES)}")
        order = pipeline.topo_order()
        return sorted(chosen, key=lambda c: order.index(c.name) if c.name in order else len(order))

    def _pending(self, pipeline: Pipeline) -> list[Component]:
        """Selected components still in float; raises if one was quantized at another precision."""
        out = []
        for c in self._selected(pipeline):
            have = c.attrs.get("precision")
            if have is None:
                out.append(c)
            elif have != self.config.precision:
                raise PassError(f"aimet_quantization: component {c.name!r} is already quantized at {have}; "
                                f"quantizing a quantized sim again at {self.config.precision} is not supported: "
                                "run the pass once, on the float pipeline")
        return out

    # ---- which HTP config ----------------------------------------------------------------------
    def aimet_config(self, ctx: PassContext | None) -> tuple[str, str]:
        """(AIMET config name, where it came from): the recipe's `hexagon`, else the context's target's
        `aimet_config`, else htp_v79 (the 8 Elite) with a warning."""
        if self.config.hexagon is not None:
            return f"htp_{self.config.hexagon}", "recipe"
        target = getattr(ctx, "target", None)
        if target is not None and target.aimet_config:
            return target.aimet_config, f"target {target.name}"
        log.warning("aimet_quantization: no target in the pass context and no `hexagon` in the config; using "
                    "%s (Snapdragon 8 Elite): give the recipe a target or set hexagon", DEFAULT_AIMET_CONFIG)
        return DEFAULT_AIMET_CONFIG, "default (no target)"

    def check_targets(self, targets: list[Any]) -> list[tuple[str | None, str]]:
        """Recipe-load check (ndopt.recipe calls it with the recipe's targets' `TargetInfo`s): the
        (config field, reason) of each way this config and the targets disagree on the HTP config."""
        configs = {t.name: t.aimet_config for t in targets if t.aimet_config}
        if self.config.hexagon is None:
            if len(set(configs.values())) > 1:
                return [(None, f"the targets need different AIMET configs ({', '.join(f'{n}: {c}' for n, c in configs.items())}) "
                               "and one quantization pass calibrates encodings for one HTP version: split the recipe "
                               "into one recipe per target")]
            return []
        mine = f"htp_{self.config.hexagon}"
        bad = {n: c for n, c in configs.items() if c != mine}
        if bad:
            return [("hexagon", f"hexagon {self.config.hexagon} ({mine}) disagrees with "
                                f"{', '.join(f'target {n} ({c})' for n, c in bad.items())}; lowering would refuse "
                                "these encodings: remove `hexagon` (the pass takes the target's) or change the target")]
        return []

    def _attrs(self, aimet_config: str, source: str, extra: Mapping[str, Any] = ()) -> dict[str, Any]:
        p = self.config.precision
        return {"precision": p, "aimet_config": aimet_config, "aimet_config_source": source,
                "summary.precision": f"{p} ({aimet_config})", **dict(extra)}

    def _check_overrides(self, comps: list[Component], sims: Mapping[str, Any] | None = None) -> None:
        """Every override pattern must match a module: of the float components (before any work;
        patterns on the pass's own `module_*` modules wait for the sims), then of the sims."""
        names = [f"{c.name}.{n}" if n else c.name for c in comps for n, _ in c.module.named_modules()]
        if sims is not None:
            names += [f"{c}.{inner_name(n)}" for c, sim in sims.items() for n, _ in sim.model.named_modules()]
        dead = [o.pattern for o in self.config.overrides if not any(fnmatch.fnmatchcase(n, o.pattern) for n in names)
                and (sims is not None or "module_" not in o.pattern.rsplit(".", 1)[-1])]
        if dead:
            raise PassError(f"aimet_quantization: overrides {dead} match no module of {[c.name for c in comps]} "
                            "(patterns match `<component>.<module path>`, e.g. `dit.proj_out`)")

    def _weight_bytes(self, comp: Component) -> dict[str, int]:
        ws = [(o.pattern, o.weights) for o in self.config.overrides if o.weights]
        return {"float32": comp.weight_bytes(),
                "w8": weight_bytes(comp.module, comp.name, 8, overrides=ws),
                "w4": weight_bytes(comp.module, comp.name, 4, block_size=self.config.block_size, overrides=ws)}

    # ---- plan ------------------------------------------------------------------------------------
    def plan(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        pending = self._pending(pipeline)
        self._check_overrides(self._selected(pipeline))
        if not pending:
            return PassResult(pipeline, modified=False, metrics={"already_quantized": True})
        bytes_ = {c.name: self._weight_bytes(c) for c in pending}
        key = "w8" if self.config.precision == "w8a16" else "w4"
        aimet_config, source = self.aimet_config(ctx)
        new = {c.name: c.with_attrs(**self._attrs(aimet_config, source)) for c in pending}
        return PassResult(pipeline.replace(**new), modified=True, metrics={
            "precision": self.config.precision, "aimet_config": aimet_config, "aimet_config_source": source,
            "weight_bytes": bytes_, "weight_bytes_total": sum(b[key] for b in bytes_.values()),
            "weight_bytes_float32_total": sum(b["float32"] for b in bytes_.values())})

    # ---- run -------------------------------------------------------------------------------------
    def run(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        if pipeline.is_meta or ctx.plan:
            return self.plan(pipeline, ctx)
        pending = self._pending(pipeline)
        self._check_overrides(self._selected(pipeline))
        if not pending:
            return PassResult(pipeline, modified=False, metrics={"already_quantized": True})
        self._model = interface_for(pipeline)
        cfg = self.config
        aimet_config, source = self.aimet_config(ctx)
        calib = self._calibration_pipeline(pipeline)
        t0 = time.perf_counter()
        records = record_calls(calib, [c.name for c in pending], cfg.calibration.prompts, ctx.generator(1))
        for c in pending:
            if not records[c.name]:
                raise PassError(f"aimet_quantization: calibration never called {c.name!r}, so it cannot be "
                                "calibrated; is it on the path from the prompt to the video?")
        metrics: dict[str, Any] = {"precision": cfg.precision, "aimet_config": aimet_config,
                                   "aimet_config_source": source,
                                   "calibration": {"prompts": len(cfg.calibration.prompts),
                                                   "calls": {n: len(r) for n, r in records.items()},
                                                   "seconds": round(time.perf_counter() - t0, 2)},
                                   "components": {}}
        d = ctx.pass_dir
        with aq.quiet_aimet(d / aq.AIMET_LOG):  # AIMET's thousands of warnings: a file and a count
            built = [self._build(c, records[c.name], aimet_config) for c in pending]
            self._check_overrides(pending, {b.comp.name: b.sim for b in built})
            new: dict[str, Component] = {}
            for b in built:
                qc, m = self._calibrate(b, records[b.comp.name], aimet_config)
                metrics["components"][b.comp.name] = m
                new[b.comp.name] = b.comp.with_module(qc, **self._attrs(
                    aimet_config, source, {"summary.quantized_ops": sum(m["quantized_ops"].values())}))
            out = pipeline.replace(**new)
            if cfg.evaluate:
                metrics["fidelity"] = self._evaluate(pipeline, out, ctx)
            artifacts = self._export(new, records, calib, d, metrics)
        # lowering ships the float graph with these quantizer encodings beside it (targets/snapdragon.py)
        out = out.replace(**{n: out[n].with_module(out[n].module, quantizers=str(d / n / "quantizers.safetensors"))
                             for n in new})
        atomic_write_json(d / "quantization.json", metrics)
        artifacts["quantization"] = d / "quantization.json"
        return PassResult(out, modified=True, metrics=metrics, artifacts=artifacts)

    def _calibration_pipeline(self, pipeline: Pipeline) -> Pipeline:
        c, sch = self.config.calibration, pipeline.schedule
        if c.latent_frames is not None:
            sch = sch.with_frames(c.latent_frames)
        if c.steps is not None or c.video_steps is not None:
            if sch.folded:
                raise PassError("aimet_quantization: calibration.steps cannot change a folded schedule (its "
                                "timestep table is fixed); calibrate with the pipeline's steps (omit steps)")
            try:
                sch = sch.with_steps(tuple(c.steps or [s.steps for s in sch.stages]),
                                     tuple(c.video_steps or c.steps or [s.video_steps for s in sch.stages]))
            except ValueError as e:
                raise PassError(f"aimet_quantization: calibration steps: {e}") from None
        return pipeline.replace(schedule=sch)

    _model: ModelInterface | None = None  # the pipeline's model interface: `run` and `restore` set it

    def _build(self, comp: Component, records: list[dict[str, Any]], aimet_config: str) -> _Built:
        """Copy, make quantizable, wrap in a QuantizationSimModel; LPBQ and overrides applied."""
        from aimet_torch.common.defs import QuantScheme
        from aimet_torch.quantsim import QuantizationSimModel

        cfg = self.config
        wbits, abits = PRECISION_BITS[cfg.precision]
        t = time.perf_counter()
        module = copy.deepcopy(comp.module)  # the input pipeline's module is never touched
        mask_fill = None
        if comp.role == "dit":
            self._model.require("set_attention", user=self.name).set_attention(module, "matmul")
            mask_fill = cfg.attention_mask_fill if cfg.attention_mask_fill is not None else attention_mask_fill(module)
        names = tuple(records[0])
        call = EntryCall(module, comp.entry, names)
        # the model's streaming modules (Pyramid-Flow: CausalConv3d, MemBlock) keep their state (chunked
        # decode) in Python attributes: tracing would freeze it
        report = aq.make_quantizable(module, lambda _: call(**records[0]), eager=self._model.eager_modules(),
                                     mask_fill=mask_fill)
        seconds = {"prepare": time.perf_counter() - t}
        t = time.perf_counter()
        scheme = QuantScheme.min_max if cfg.quant_scheme == "min_max" else QuantScheme.post_training_tf_enhanced
        with self._htp_config(aimet_config) as config_file:
            sim = QuantizationSimModel(call, tuple(records[0][n] for n in names), quant_scheme=scheme,
                                       default_output_bw=abits, default_param_bw=8, in_place=True,
                                       config_file=config_file)
        sim.model.eval()  # AIMET builds its quantized modules in training mode (T5's dropout would fire)
        lpbq = self._apply_lpbq(sim) if wbits == 4 else {}
        overrides = self._apply_overrides(sim, comp.name)
        seconds["sim"] = time.perf_counter() - t
        return _Built(comp, sim, report, mask_fill, lpbq, overrides, seconds)

    @contextlib.contextmanager
    def _htp_config(self, name: str) -> Iterator[str]:
        """AIMET's HTP config `name` (`htp_v73`: AIMET's htp_quantsim_config_v73.json); with `per_channel`,
        its weights per output channel (HTP runs per-channel weights for conv and linear; AIMET's HTP
        files default to per-tensor, which costs the trained tiny teacher 3 dB and its colours at W8A16)."""
        from aimet_torch.common.quantsim_config.config_utils import get_path_for_target_config

        version = name.removeprefix("htp_")
        path = Path(get_path_for_target_config(f"htp_quantsim_config_{version}"))
        if not path.is_file():
            raise PassError(f"aimet_quantization: AIMET has no HTP config {name!r} (no {path.name} in aimet_torch); "
                            "set the target's `aimet_config` (targets/<chip>.yaml) or the pass's `hexagon` to a "
                            "version AIMET ships (htp_v68 ... htp_v81)")
        if not self.config.per_channel:
            yield name
            return
        cfg = json.loads(path.read_text())
        cfg["defaults"]["per_channel_quantization"] = "True"
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"{name}_per_channel.json"
            path.write_text(json.dumps(cfg))
            yield str(path)

    def _calibrate(self, b: _Built, records: list[dict[str, Any]],
                   aimet_config: str) -> tuple[QuantizedComponent, dict[str, Any]]:
        """Encodings from every recorded call; the census; weights folded for fast inference."""
        cfg, sim = self.config, b.sim
        t = time.perf_counter()
        seq = None
        if cfg.seq_mse:
            from aimet_torch.seq_mse import apply_seq_mse

            seq = same_shape_records(records)  # AIMET stacks each layer's inputs: one call shape only
            apply_seq_mse(sim, seq, num_candidates=cfg.seq_mse_candidates,
                          forward_fn=lambda model, batch: model(**batch))
        with aq.frozen_weight_encodings(sim.model):
            sim.compute_encodings(lambda model: [model(**r) for r in records])
        b.seconds["calibrate"] = time.perf_counter() - t
        remaining = unquantized_ops(sim.model, lambda model: model(**records[0]), rename=inner_name)
        counts = quantized_op_counts(sim.model)
        state = flat_tensors(sim.quantizer_state_dict())
        sim.fold_param_quantizers()  # weights quantized once, not at every call (same numbers, ~3x faster)
        m: dict[str, Any] = {"quantized_ops": counts, "unquantized_ops": remaining, "prepare": b.report.to_json(),
                             "seconds": {k: round(v, 2) for k, v in b.seconds.items()}, "calls": len(records),
                             "weight_bytes": self._weight_bytes(b.comp)}
        for key, value in (("attention_mask_fill", b.mask_fill), ("lpbq", b.lpbq), ("overrides", b.overrides),
                           ("seq_mse", seq and {"calls": len(seq), "candidates": cfg.seq_mse_candidates})):
            if value:
                m[key] = round(value, 3) if isinstance(value, float) else value
        if b.comp.role == "dit" and remaining["matmul_softmax"]:
            log.warning("aimet_quantization: %s still runs unquantized %s", b.comp.name, remaining["matmul_softmax"])
        qc = QuantizedComponent(b.comp.module, sim, b.comp.entry, cfg.precision, aimet_config, state)
        qc.__dict__["example_inputs"] = records[0]  # one real calibration call: what a reload rebuilds the sim from
        return qc, m

    def _apply_lpbq(self, sim: Any) -> dict[str, Any]:
        """4-bit LPBQ weights where the input dim splits into blocks; the rest stay 8-bit (reported)."""
        from aimet_torch.quantsim.config_utils import set_grouped_blockwise_quantization_for_weights

        bs = self.config.block_size
        fits, kept = [], []
        for name, m in sim.model.named_modules():
            if isinstance(m, BLOCKWISE_WEIGHTS) and aq.weight_quantizer(m) is not None:
                (fits if lpbq_eligible(m, bs) else kept).append((name, m))
        if fits:
            # decompressed_bw 8: the 4-bit block scales expand into an 8-bit per-channel grid (HTP's LPBQ)
            set_grouped_blockwise_quantization_for_weights(sim, [m for _, m in fits], bitwidth=4, symmetric=True,
                                                           decompressed_bw=8, block_size=bs, block_grouping=-1)
        return {"block_size": bs, "layers_w4": len(fits), "layers_kept_w8": sorted(inner_name(n) for n, _ in kept)}

    def _apply_overrides(self, sim: Any, component: str) -> dict[str, int]:
        from aimet_torch.quantization.affine import QuantizeDequantize

        hits: dict[str, int] = {}
        for o in self.config.overrides:
            for name, m in aq.quantized_modules(sim.model):
                if not fnmatch.fnmatchcase(f"{component}.{inner_name(name)}".rstrip("."), o.pattern):
                    continue
                hits[o.pattern] = hits.get(o.pattern, 0) + 1
                if o.float:
                    for lst in aq.QUANTIZER_LISTS:
                        qs = getattr(m, lst)
                        for i in range(len(qs)):
                            qs[i] = None
                    for k in list(m.param_quantizers):
                        m.param_quantizers[k] = None
                    continue
                if o.weights is not None and aq.weight_quantizer(m) is not None:
                    per_channel = (m.weight.shape[0],) + (1,) * (m.weight.dim() - 1)  # LPBQ's shape is blockwise
                    m.param_quantizers["weight"] = QuantizeDequantize(per_channel, o.weights, True).to(m.weight.device)
                if o.activations is not None:
                    for lst in aq.QUANTIZER_LISTS:
                        for q in getattr(m, lst):
                            if q is not None:
                                q.bitwidth = o.activations
        return hits

    # ---- fidelity and export --------------------------------------------------------------------
    def _evaluate(self, before: Pipeline, after: Pipeline, ctx: PassContext) -> dict[str, float]:
        """Latent and pixel PSNR of the quantized pipeline vs the float one (calibration schedule,
        evaluation prompts, the same seed for both)."""
        outs = []
        t = time.perf_counter()
        for p in (before, after):
            pipe = self._calibration_pipeline(p)
            with torch.no_grad():
                lat = pipe.sampler.sample(pipe, list(self.config.eval_prompts), generator=ctx.generator(2))
                vid = pipe.sampler.decode(pipe, lat)
            outs.append(ProbeOutput(lat.float(), vid.float()))
        m = FidelityProbe.compare(outs[1], outs[0])
        out = {k: round(v, 3) for k, v in m.items() if k in ("latent_psnr", "pixel_psnr", "latent_rel_err")}
        return {**out, "prompts": len(self.config.eval_prompts), "seconds": round(time.perf_counter() - t, 2)}

    def _export(self, new: Mapping[str, Component], records: Mapping[str, list], calib: Pipeline, d: Path,
                metrics: dict[str, Any]) -> dict[str, Path]:
        """Per component: quantizers.safetensors and QDQ ONNX of the first (or every) call signature,
        each checked in onnxruntime; one directory per component, written atomically."""
        from safetensors.torch import save_file

        artifacts: dict[str, Path] = {}
        plan = calib.call_plan()
        for name, comp in new.items():
            qc: QuantizedComponent = comp.module
            exported: dict[str, Any] = {}
            with atomic_dir(d / name) as tmp:
                save_file(qc.quantizer_state, str(tmp / "quantizers.safetensors"))
                first: dict[str, int] = {}
                for i, r in enumerate(records[name]):
                    first.setdefault(signature_key(plan, name, r, i), i)
                chosen = {"none": [], "first": list(first.items())[:1], "all": list(first.items())}[self.config.export]
                for key, i in chosen:
                    t = time.perf_counter()
                    fname = key.replace("/", "-") + ".onnx"
                    qc.export_onnx(records[name][i], tmp / fname, [p.name for p in comp.outputs])
                    exported[key] = {"file": f"{name}/{fname}", **onnx_matches_sim(qc, records[name][i], tmp / fname),
                                     "seconds": round(time.perf_counter() - t, 2)}
            metrics["components"][name]["export"] = exported
            artifacts[f"{name}_encodings"] = d / name / "quantizers.safetensors"
            for key, e in exported.items():
                artifacts[f"{name}_{key}_onnx"] = d / e["file"]
        return artifacts

    # ---- a saved pipeline (ndopt.saved: RUN/model/quantization/<component>/; passes._aimet.state) ----
    state_subdir = "quantization"

    def save_state(self, pipeline: Pipeline, directory: Path) -> dict[str, dict[str, str]]:
        """Per quantized component its quantizer state and one example call (`aimet_state`)."""
        return aimet_state.save_quantizer_state(self, pipeline, directory)

    def restore(self, pipeline: Pipeline, ctx: PassContext, state: Path) -> Pipeline:
        """The sims `save_state` described, rebuilt over the replayed float components (`aimet_state`)."""
        self._model = interface_for(pipeline)
        return aimet_state.restore_sims(self, pipeline, ctx, state)
