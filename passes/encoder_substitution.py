"""Encoder substitution (Neodragon, "Text-Encoder Distillation"): T5-XXL -> DT5 + Context Adapter.

The 4.7B T5-XXL encoder becomes DT5 (~130M) and the DiT's `context_embedder` gives way to a
Context Adapter (variants of the seed's table: `replace`, `extend`, `lora`, `trainable_dt5`); the
model interface (`ndopt.model`) names the teacher's parts (`text_conditioning`) and builds the
student's (`text_student`) and the substituted encoder. CLIP-L/G stay. The text encoder's `prompt_embeds` become the
DiT's context directly, so the DiT (a shallow copy, sharing its blocks) gets `nn.Identity` as
`context_embedder` and both ends of the text_encoder -> dit edge change width together.

Training (run mode) through `ndopt.train.Trainer`, resumable under the pass's directory:
1. `dt5`: DT5 learns T5's output sequence on a prompt corpus (DistillT5's stage; Neodragon starts
   from its released DT5, which is this stage done at scale);
2. `adapter`: the variant's trainable part (the adapter for replace/extend, LoRA adapters on DT5
   for lora, all of DT5 for trainable_dt5) learns the teacher's context embeddings
   `context_embedder(T5(prompt))`, what the DiT's blocks actually see;
3. optionally `e2e`: the same part, through the frozen DiT: its velocity with the student's
   context matches its velocity with the teacher's (on random latents of the probe's size).
Each matches on real (unmasked) tokens only: the DiT's joint attention keeps padded text tokens
away from the image, so their values never reach the video. Loss: relative MSE plus 1 - cosine.
The corpus mixes in the sampler's negative prompt (`negative_prob`, 10%) when the pipeline samples
with guidance: CFG steers by the difference of the two contexts, and a student that never saw the
empty prompt gets the unconditional branch wrong (on the tiny teacher: 18.6 dB and 7/16 held-out
prompts followed without it, 30.2 dB and 15/16 with it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ndopt.errors import PassError
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.spec import Port, TensorSpec
from ndopt.model import ModelInterface, TextConditioning, TextStudent, interface_for
from ndopt.passmanager import Lossy, Pass, PassConfig, PassContext, PassResult, register
from passes.cfg_folding import guidance_free

log = logging.getLogger("ndopt")


# ---- data and objectives (ndopt.train's Objective protocol) ---------------------------------------
class PromptCorpus:
    """Captions only: lines of a prompt file, or procedural captions (the wide vocabulary).

    With `negative_prompt` and `negative_prob`, that share of the samples (drawn per index, the same
    in every process and run) is the sampler's negative prompt: classifier-free guidance steers by the
    difference of the conditional and unconditional contexts, so the student must reproduce the
    unconditional one too (a corpus of captions alone never shows it the empty prompt)."""

    def __init__(self, prompts: list[str] | None = None, *, seed: int = 0, held_out: bool = False,
                 length: int = 1 << 16, negative_prompt: str | None = None, negative_prob: float = 0.0) -> None:
        from ndopt.train.data import ProceduralConfig, ProceduralVideos

        self.prompts, self.seed = prompts, seed
        self.negative_prompt, self.negative_prob = negative_prompt, negative_prob if negative_prompt is not None else 0.0
        self.procedural = None if prompts else ProceduralVideos(ProceduralConfig.wide(), seed=seed,
                                                                held_out=held_out, length=length)

    def __len__(self) -> int:
        return len(self.prompts) if self.prompts else len(self.procedural)

    def __getitem__(self, index: int) -> Any:
        from ndopt.train.data import Example, sample_seed

        if self.negative_prob > 0:
            g = torch.Generator().manual_seed(sample_seed(self.seed, index, "negative"))
            if float(torch.rand((), generator=g)) < self.negative_prob:
                return Example(self.negative_prompt)
        if self.prompts:
            return Example(self.prompts[index])
        return Example(self.procedural.scene(index)[0].caption)


def context_loss(student: Tensor, teacher: Tensor, mask: Tensor, mse_weight: float, cosine_weight: float
                 ) -> tuple[Tensor, dict[str, float]]:
    """Relative MSE + (1 - cosine) over real tokens (mask != 0) of [B, L, D] sequences."""
    valid = mask.bool()
    s, t = student[valid].float(), teacher[valid].float()
    rel_mse = (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
    cos = F.cosine_similarity(s, t, dim=-1).mean()
    loss = mse_weight * rel_mse + cosine_weight * (1 - cos)
    return loss, {"loss": float(loss.detach()), "rel_mse": float(rel_mse.detach()), "cosine": float(cos.detach())}


class T5Sequence(nn.Module):
    """Teacher of the `dt5` stage: T5's output sequence; with `context_embedder`, the DiT's context."""

    def __init__(self, t5: nn.Module, context_embedder: nn.Module | None = None) -> None:
        super().__init__()
        self.t5, self.context_embedder = t5, context_embedder or nn.Identity()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.context_embedder(self.t5(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)


@dataclass
class ContextMatching:
    """Student chain (`dt5`, then `context_adapter` unless `dt5_only`) matches the frozen `teacher`."""

    tokenizer: Any
    max_length: int
    mse_weight: float = 1.0
    cosine_weight: float = 1.0
    dt5_only: bool = False
    uses: tuple[str, ...] = ("dt5", "context_adapter", "teacher")

    def tokens(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer(captions, padding="longest", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        return tok["input_ids"].to(device), tok["attention_mask"].to(device)

    def student(self, modules: Any, ids: Tensor, mask: Tensor) -> Tensor:
        out = modules["dt5"](ids, mask)
        return out if self.dt5_only else modules["context_adapter"](out)

    def __call__(self, modules: Any, batch: Any, info: Any) -> Any:
        from ndopt.train.objectives import LossOutput

        device = next(modules.raw("teacher").parameters()).device
        ids, mask = self.tokens(batch.captions, device)
        with torch.no_grad():
            target = modules["teacher"](ids, mask)
        loss, metrics = context_loss(self.student(modules, ids, mask), target, mask, self.mse_weight,
                                     self.cosine_weight)
        return LossOutput(loss, metrics)


@dataclass
class DiTContextMatching(ContextMatching):
    """End to end: the frozen DiT's velocity with the student's context matches the teacher's."""

    pooled: Any = None          # captions -> CLIP pooled projections (frozen, from the teacher encoder)
    schedule: Any = None
    latent_hw: tuple[int, int] = (8, 8)
    uses: tuple[str, ...] = ("dt5", "context_adapter", "teacher", "dit")

    def __call__(self, modules: Any, batch: Any, info: Any) -> Any:
        from ndopt.train.objectives import LossOutput, dit_kwargs, pyramid_flow_inputs

        device = next(modules.raw("teacher").parameters()).device
        ids, mask = self.tokens(batch.captions, device)
        with torch.no_grad():
            target = modules["teacher"](ids, mask)
            pooled = self.pooled(batch.captions).to(device)
        student = self.student(modules, ids, mask)
        latents = torch.stack([torch.randn(16, 1, *self.latent_hw, generator=g) for g in batch.generators()])
        losses = []
        for inp in pyramid_flow_inputs(latents.to(device), batch, self.schedule, info):
            with torch.no_grad():
                v_t = modules["dit"](**dit_kwargs(inp, (target, mask, pooled)))
            v_s = modules["dit"](**dit_kwargs(inp, (student, mask, pooled)))
            losses.append((v_s.float() - v_t.float()).pow(2).mean() / v_t.float().pow(2).mean().clamp_min(1e-12))
        loss = torch.stack(losses).mean()
        return LossOutput(loss, {"loss": float(loss.detach())})


# ---- the pass ------------------------------------------------------------------------------------
@register
class EncoderSubstitution(Pass):
    """Replace T5-XXL by a distilled T5 and a Context Adapter that takes over `context_embedder`."""

    name = "encoder_substitution"
    # End-to-end latents of the probe vs the T5 pipeline. Tiny preset (seeded, 200 + 200 steps): the
    # four variants give 29.5-30.4 dB (one frame, 4-4-4 steps; 29.2 dB on the full schedule) where a
    # DiT that ignores the text gives 23.6 dB: the budget sits between the two.
    fidelity = Lossy(metric="latent_psnr", budget_db=26.0, frame_budget_db=24.0)

    class Config(PassConfig):
        variant: Literal["replace", "extend", "lora", "trainable_dt5"] = Field(  # seed: RM is what ships
            "replace", description="what learns the DiT's context: a Context Adapter replacing "
                                   "`context_embedder` (replace) or beside it (extend), LoRA on DT5, or all of DT5")
        dt5: dict[str, Any] = Field(default_factory=dict, description="T5Config overrides of DT5 (default: half "
                                                                      "the teacher's width and layers)")
        lora_rank: int = Field(8, ge=1, description="rank of the LoRA adapters (variant lora)")
        dt5_steps: int = Field(400, ge=0, description="stage 1 steps: DT5 learns T5's output sequence")
        adapter_steps: int = Field(400, ge=0, description="stage 2 steps: the variant's part learns the DiT's "
                                                          "context")
        e2e_steps: int = Field(0, ge=0, description="stage 3 steps (optional): the same part, through the frozen "
                                                    "DiT's velocity")
        batch_size: int = Field(16, ge=1, description="prompts per step")
        lr: float = Field(2e-3, gt=0, description="peak learning rate (the tiny preset's; DT5 and the adapter at "
                                                  "real size want ~1e-4)")
        mse_weight: float = Field(1.0, ge=0, description="weight of the relative MSE on real (unmasked) tokens")
        cosine_weight: float = Field(1.0, ge=0, description="weight of 1 - cosine on real (unmasked) tokens")
        prompts: str | None = Field(None, description="a prompt file, one per line (null: procedural captions)")
        negative_prob: float = Field(0.1, ge=0, lt=1, description="share of the sampler's negative prompt in the "
                                                                  "corpus (under CFG)")
        eval_prompts: int = Field(32, ge=1, description="held-out captions of the context figures in the metrics")
        probe_steps: list[int] | None = Field(None, description="the end-to-end probe's steps per pyramid stage "
                                                                "(null: the schedule's)")
        probe: bool = Field(True, description="end-to-end latent PSNR vs the T5 pipeline in the metrics")

    def _check(self, pipeline: Pipeline) -> tuple[ModelInterface, Any, Any, TextConditioning]:
        te, dits = pipeline.by_role("text_encoder"), pipeline.by_role("dit")
        if len(te) != 1 or len(dits) != 1:
            raise PassError(f"encoder_substitution needs one text_encoder and one dit; the pipeline has "
                            f"{len(te)} and {len(dits)}")
        te, dit = te[0], dits[0]
        model = interface_for(pipeline).require("text_conditioning", "text_student", user=self.name)
        variant = model.distilled_text_variant(te.module)
        if variant is not None:
            raise PassError(f"encoder_substitution: the text encoder is already DT5 + adapter (variant "
                            f"{variant!r}); the T5 teacher is gone: run the pass once, on the original pipeline")
        try:
            cond = model.text_conditioning(te.module, dit.module)
        except PassError as e:
            raise PassError(f"encoder_substitution: {e}") from None
        return model, te, dit, cond

    def build_student(self, model: ModelInterface, te: Any, dit: Any, ctx: PassContext) -> TextStudent:
        """The variant's fresh student parts, seeded from the run, on the DiT's device."""
        device = next(dit.module.parameters()).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed_for(601))
            with torch.device(device):
                return model.text_student(te.module, dit.module, self.config.variant, self.config.dt5)

    def substitute(self, model: ModelInterface, pipeline: Pipeline, te: Any, dit: Any,
                   student: TextStudent) -> Pipeline:
        """The structural swap: new text_encoder and DiT components whose edge widths agree."""
        module = model.substituted_text_encoder(te.module, student)
        cfg = student.config
        width = cfg.context_dim
        outs = tuple(Port(p.name, TensorSpec(("B", "L", width), p.spec.dtype)) if p.name == "prompt_embeds" else p
                     for p in te.outputs)
        new_te = replace(te.with_module(module, config=cfg, **{"summary.variant": cfg.variant}), outputs=outs)
        ins = tuple(Port(p.name, TensorSpec(("B", "L", width), p.spec.dtype), p.optional)
                    if p.name == "encoder_hidden_states" else p for p in dit.inputs)
        new_dit = replace(dit.with_module(model.without_context_embedder(dit.module), context_dim=width,
                                          **{"summary.context_embedder": "in the text encoder's context adapter"}),
                          inputs=ins)
        return pipeline.replace(**{te.name: new_te, dit.name: new_dit})

    def _metrics(self, cond: TextConditioning, module_params: int) -> dict[str, Any]:
        t5 = sum(p.numel() for p in cond.encoder.parameters())
        return {"variant": self.config.variant, "text_encoding_params_before": t5,
                "text_encoding_params": module_params,
                "dit_params_removed": sum(p.numel() for p in cond.context_embedder.parameters())}

    def plan(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        model, te, dit, cond = self._check(pipeline)
        student = self.build_student(model, te, dit, ctx)
        out = self.substitute(model, pipeline, te, dit, student)
        params = out[te.name].module.text_encoding_params()
        return PassResult(out, modified=True, metrics=self._metrics(cond, params))

    def run(self, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        model, te, dit, cond = self._check(pipeline)
        student = self.build_student(model, te, dit, ctx)
        key = hashlib.blake2b(json.dumps(self.config.model_dump(), sort_keys=True).encode(), digest_size=6)
        work = ctx.pass_dir / f"train-{key.hexdigest()}"
        history = distill(self.config, model, cond, dit.module, student, pipeline, ctx, work)
        out = self.substitute(model, pipeline, te, dit, student)
        metrics = self._metrics(cond, out[te.name].module.text_encoding_params())
        metrics.update(history)
        metrics.update(context_fidelity(self.config, cond, student, ctx, negative_prompt(pipeline)))
        if self.config.probe:
            metrics["latent_psnr"] = probe_latent_psnr(pipeline, out, self.config.probe_steps)
        log.info("encoder_substitution (%s): context cosine %.4f, latent PSNR %s dB", self.config.variant,
                 metrics["context_cosine"], metrics.get("latent_psnr"))
        return PassResult(out, modified=True, metrics=metrics, artifacts={"training": work})


# ---- training and fidelity -------------------------------------------------------------------------
def _prompts(config: Any) -> list[str] | None:
    if config.prompts is None:
        return None
    path = Path(config.prompts)
    if not path.is_file():
        raise PassError(f"encoder_substitution.prompts: {path} is not a file (one prompt per line)")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise PassError(f"encoder_substitution.prompts: {path} has no prompts")
    return lines


def distill(config: Any, model: ModelInterface, cond: TextConditioning, dit: nn.Module, student: TextStudent,
            pipeline: Pipeline, ctx: PassContext, work: Path) -> dict[str, Any]:
    """The three stages of the module docstring, in place on the student's parts; returns final losses."""
    from ndopt.train import TrainConfig, Trainer

    dt5, adapter = student.encoder, student.adapter
    data = PromptCorpus(_prompts(config), seed=ctx.seed, negative_prompt=negative_prompt(pipeline),
                        negative_prob=config.negative_prob)
    objective = dict(tokenizer=cond.tokenizer, max_length=cond.max_length, mse_weight=config.mse_weight,
                     cosine_weight=config.cosine_weight)
    context_teacher = T5Sequence(cond.encoder, cond.context_embedder)
    variant = config.variant
    lora = student.lora(config.lora_rank) if variant == "lora" else None
    part = {"replace": ("context_adapter", adapter), "extend": ("context_adapter", adapter),
            "lora": ("lora", lora), "trainable_dt5": ("dt5", dt5)}[variant]
    rest = {n: m for n, m in (("dt5", dt5), ("context_adapter", adapter)) if n != part[0]}
    stages = [("dt5", config.dt5_steps, {"dt5": dt5}, {"teacher": T5Sequence(cond.encoder)},
               ContextMatching(**objective, dt5_only=True, uses=("dt5", "teacher"))),
              ("adapter", config.adapter_steps, dict([part]), {**rest, "teacher": context_teacher},
               ContextMatching(**objective))]
    if config.e2e_steps:
        sch = pipeline.schedule
        stages.append(("e2e", config.e2e_steps, dict([part]),
                       {**rest, "teacher": context_teacher, "dit": model.without_context_embedder(dit)},
                       DiTContextMatching(**objective, pooled=cond.pooled, schedule=sch,
                                          latent_hw=(sch.height // 8, sch.width // 8))))
    final: dict[str, Any] = {}
    for i, (stage, steps, trainable, frozen, obj) in enumerate(stages):
        if steps == 0:
            continue
        tc = TrainConfig(steps=steps, batch_size=config.batch_size, lr=config.lr, seed=ctx.seed + i,
                         lr_schedule="cosine", warmup_steps=min(20, steps // 10), checkpoint_every=max(50, steps // 4),
                         log_every=max(1, steps // 10))
        result = Trainer(trainable=trainable, frozen=frozen, objective=obj, data=data, config=tc,
                         run_dir=work / stage, device=ctx.device, name=f"encoder_substitution/{stage}").fit()
        final[f"{stage}_loss"] = round(float(result.final.get("loss", float("nan"))), 6)
        final[f"{stage}_steps"] = result.steps
        final[f"{stage}_resumed_from"] = result.resumed_from
    if lora is not None:
        final["lora_layers_merged"] = lora.merge()
    return final


def negative_prompt(pipeline: Pipeline) -> str | None:
    """The prompt of the unconditional branch when the pipeline samples with guidance, else None."""
    if pipeline.schedule.guidance.mode == "none" or guidance_free(pipeline):
        return None
    return getattr(pipeline.sampler, "negative_prompt", None)


@torch.no_grad()
def context_fidelity(config: Any, cond: TextConditioning, student: TextStudent, ctx: PassContext,
                     negative: str | None = None) -> dict[str, float]:
    """Context-embedding cosine and relative MSE vs the teacher on held-out captions (real tokens),
    and the cosine on the negative prompt (the unconditional branch of guidance) when there is one."""
    corpus = PromptCorpus(None, seed=ctx.seed + 1, held_out=True)
    captions = [corpus[i].caption for i in range(config.eval_prompts)]
    obj = ContextMatching(cond.tokenizer, cond.max_length)
    teacher = T5Sequence(cond.encoder, cond.context_embedder)
    device = next(student.encoder.parameters()).device

    def score(texts: list[str]) -> dict[str, float]:
        ids, mask = obj.tokens(texts, device)
        return context_loss(student.adapter(student.encoder(ids, mask)), teacher(ids, mask), mask, 1.0, 1.0)[1]

    m = score(captions)
    out = {"context_cosine": round(m["cosine"], 6), "context_rel_mse": round(m["rel_mse"], 6)}
    if negative is not None:
        out["negative_context_cosine"] = round(score([negative])["cosine"], 6)
    return out


def probe_latent_psnr(before: Pipeline, after: Pipeline, steps: list[int] | None) -> float:
    """End-to-end latent PSNR of one latent frame of the probe's prompts, after vs before."""
    from ndopt.eval.probe import FidelityProbe, ProbeSettings

    def short(p: Pipeline) -> Pipeline:
        if steps is None or p.schedule.folded:
            return p
        return p.replace(schedule=p.schedule.with_steps(tuple(steps)))

    probe = FidelityProbe(ProbeSettings(latent_frames=1))
    ref, out = probe.outputs(short(before)), probe.outputs(short(after))
    return round(FidelityProbe.compare(out, ref)["latent_psnr"], 3)
