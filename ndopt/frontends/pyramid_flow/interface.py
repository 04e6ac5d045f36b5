"""The Pyramid-Flow SD3 frontend behind ndopt's model interface (`ndopt.model.ModelInterface`).

Registered as `pyramid-flow` in the `ndopt.frontends` entry-point group (pyproject.toml). Everything
passes, targets, training and the runner ask of a Pyramid-Flow model goes through here: presets,
bundled students and checkpoint directories; the MMDiT's blocks (one kind, "joint"), a copy without
some of them, its fx trace, the folded timestep MLP and the attention switch; DT5 + Context Adapter
for encoder substitution; the alternative decoders; bundled weights and students; saved pipelines'
bases; Neodragon's hybrid mode; and the pyramidal sampler's schedule math. Imports stay inside the
methods, so finding the frontend (`ndopt.model.frontends`) loads no model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ndopt.errors import CheckpointError, NdoptError, PassError
from ndopt.ir.pipeline import Pipeline
from ndopt.model import HYBRID, Block, BlockIO, ModelInterface, SamplerMath, TextConditioning, TextStudent

PACKAGE = "ndopt.frontends.pyramid_flow"


class PyramidFlowInterface(ModelInterface):
    name = "pyramid-flow"
    description = "Pyramid-Flow SD3: MMDiT, SD3 text encoders (T5-XXL, CLIP-L/G), causal video VAE"

    @property
    def image_components(self) -> tuple[str, ...]:  # type: ignore[override]
        from ndopt.frontends.neodragon.hybrid import IMAGE_COMPONENTS

        return IMAGE_COMPONENTS

    # ---- models ------------------------------------------------------------------------------------
    def preset_names(self) -> list[str]:
        from ndopt.frontends.pyramid_flow.presets import preset_specs
        from ndopt.frontends.pyramid_flow.students import student_files

        return sorted([*preset_specs(), *student_files()])

    def load(self, ref: str, *, device: torch.device | str = "cpu", seed: int = 0, meta: bool = False,
             variant: str = "768p") -> Pipeline | None:
        from ndopt.frontends.pyramid_flow.presets import build_preset, load_checkpoint_dir, preset_specs
        from ndopt.frontends.pyramid_flow.students import build_student, student_files

        if ref in student_files():
            return build_student(ref, device, seed, meta=meta)
        if ref in preset_specs():
            real = not ref.endswith(("tiny", "smoke"))  # smoke: real widths, random weights, small depths
            if real and not meta:
                raise NdoptError(f"preset {ref!r} has no bundled weights (2B+ parameters): use `ndopt plan` "
                                 "(meta device), or pass the upstream checkpoint directory as the model")
            return build_preset(ref, "meta" if meta else device, seed)
        path = Path(ref)
        if not path.is_dir():
            return None
        from ndopt.frontends.pyramid_flow.checkpoint import FLUX_DIT_CLASS, dit_class_name

        if dit_class_name(path, variant) == FLUX_DIT_CLASS:  # a miniFLUX checkpoint: its own frontend's
            return None
        if meta:  # its configs only: `ndopt plan --model DIR`, and every size checked before the weights load
            if not (path / f"diffusion_transformer_{variant}").is_dir():
                found = sorted(p.name for p in path.glob("diffusion_transformer_*"))
                raise CheckpointError(f"{path}: no diffusion_transformer_{variant}/ (found: {found or 'none'}); "
                                      "pass the variant that exists")
            return self.build_from_configs(path, [variant], name=path.name)
        return load_checkpoint_dir(path, variant=variant, device=str(device))

    # ---- the denoiser ------------------------------------------------------------------------------
    def blocks(self, dit: nn.Module) -> list[Block]:
        from ndopt.frontends.pyramid_flow.blocks import mmdit_blocks

        return mmdit_blocks(dit)

    def block_io(self, kind: str) -> BlockIO:
        from ndopt.frontends.pyramid_flow.blocks import JOINT, JOINT_IO

        if kind != JOINT:
            raise PassError(f"the MMDiT has only {JOINT!r} blocks, not {kind!r}")
        return JOINT_IO

    def without_blocks(self, dit: nn.Module, keep: list[int], *, fold_last_context: bool = True) -> nn.Module:
        from ndopt.frontends.pyramid_flow.blocks import without_blocks

        return without_blocks(dit, keep, fold_last_context)

    def trace(self, dit: nn.Module, layout: Any) -> torch.fx.GraphModule:
        from ndopt.frontends.pyramid_flow.blocks import mmdit
        from ndopt.frontends.pyramid_flow.dit import trace_dit

        return trace_dit(mmdit(dit), layout)

    def block_names(self, gm: torch.fx.GraphModule) -> list[str]:
        from ndopt.frontends.pyramid_flow.dit import dit_block_names

        return dit_block_names(gm)

    def fold_timestep_embedding(self, dit: nn.Module, timesteps: list[float]) -> tuple[nn.Module, torch.Tensor]:
        from ndopt.frontends.pyramid_flow.blocks import mmdit
        from ndopt.frontends.pyramid_flow.dit import fold_timestep_embedding

        return fold_timestep_embedding(mmdit(dit), timesteps)

    def set_attention(self, dit: nn.Module, impl: str) -> nn.Module:
        from ndopt.frontends.pyramid_flow.blocks import mmdit

        return mmdit(dit).set_attention_impl(impl)

    # ---- text conditioning (SD3: T5-XXL's sequence, CLIP-L/G pooled) -------------------------------
    def text_conditioning(self, text_encoder: nn.Module, dit: nn.Module) -> TextConditioning:
        if not isinstance(getattr(dit, "context_embedder", None), nn.Linear):
            raise PassError("the DiT has no Linear context_embedder to take over")
        if not hasattr(text_encoder, "text_encoder_3") or not hasattr(text_encoder, "tokenizers"):
            raise PassError(f"{type(text_encoder).__name__} is not an SD3 text encoder")
        te = text_encoder

        def pooled(captions: list[str]) -> torch.Tensor:  # CLIP-L/G pooled projections (frozen, unchanged)
            tok = te.tokenize(list(captions))
            device = next(te.text_encoder.parameters()).device
            return torch.cat([te.text_encoder(input_ids=tok["clip_l_ids"].to(device)).text_embeds,
                              te.text_encoder_2(input_ids=tok["clip_g_ids"].to(device)).text_embeds], dim=-1)

        tokenizer = te.tokenizers.tokenizer_3 if te.tokenizers is not None else None  # none on meta (plans)
        return TextConditioning(te.text_encoder_3, tokenizer, int(te.config.max_sequence_length), te.config.t5,
                                pooled, dit.context_embedder)

    def distilled_text_variant(self, text_encoder: nn.Module) -> str | None:
        from ndopt.frontends.pyramid_flow.dt5 import DistilledTextEncoder

        return text_encoder.config.variant if isinstance(text_encoder, DistilledTextEncoder) else None

    def text_student(self, text_encoder: nn.Module, dit: nn.Module, variant: str,
                     overrides: Mapping[str, Any]) -> TextStudent:
        from ndopt.frontends.pyramid_flow.dt5 import (
            DistilledT5,
            DistilledTextConfig,
            LoRA,
            context_adapter,
            dt5_config,
        )

        cond = self.text_conditioning(text_encoder, dit)
        t5 = cond.config
        cfg = DistilledTextConfig(text_encoder.config, dt5_config(t5, dict(overrides)), variant,
                                  int(cond.context_embedder.out_features))
        dt5 = DistilledT5(cfg.dt5, int(t5["d_model"]))
        adapter = context_adapter(variant, cond.context_embedder)
        return TextStudent(dt5, adapter, cfg, lambda rank: LoRA(dt5.encoder, rank))

    def substituted_text_encoder(self, text_encoder: nn.Module, student: TextStudent) -> nn.Module:
        from ndopt.frontends.pyramid_flow.dt5 import DistilledTextEncoder

        te = text_encoder
        return DistilledTextEncoder(student.config, te.text_encoder, te.text_encoder_2, student.encoder,
                                    student.adapter, te.tokenizers)

    def without_context_embedder(self, dit: nn.Module) -> nn.Module:
        import copy

        new = copy.copy(dit)  # shallow: new module dicts, every other module shared
        new._modules, new._parameters, new._buffers = dict(dit._modules), dict(dit._parameters), dict(dit._buffers)
        new.context_embedder = nn.Identity()
        return new

    # ---- decoders, quantization, weights -----------------------------------------------------------
    def build_decoder(self, kind: str, scale: str, latent_channels: int) -> nn.Module:
        if kind == "tiny":  # TAEHV-style, what Neodragon ships
            from ndopt.frontends.pyramid_flow.tiny_decoder import (
                TinyDecoderConfig,
                TinyVideoDecoder,
                tiny_preset_config,
            )

            cfg = TinyDecoderConfig(latent_channels=latent_channels) if scale == "real" else \
                tiny_preset_config(latent_channels)
            return TinyVideoDecoder(cfg)
        from ndopt.frontends.pyramid_flow.decoders import DiffusersVideoDecoder

        return DiffusersVideoDecoder(kind, scale, latent_channels)

    def eager_modules(self) -> tuple[type, ...]:
        from ndopt.frontends.pyramid_flow.tiny_decoder import MemBlock
        from ndopt.frontends.pyramid_flow.vae_layers import CausalConv3d

        return (CausalConv3d, MemBlock)  # the causal VAE's and the tiny decoder's streaming caches

    def bundled_weights(self, name: str) -> Path | None:
        from ndopt.frontends.pyramid_flow.presets import bundled_weights

        return bundled_weights(name)

    def load_into(self, module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
        from ndopt.frontends.pyramid_flow.checkpoint import load_into

        load_into(module, dict(state_dict), source=source)

    def save_student(self, path: Path, student: nn.Module, teacher: nn.Module, target: Any,
                     config: Mapping[str, Any]) -> Path:
        from ndopt.frontends.pyramid_flow.students import save_student

        return save_student(path, student, teacher, target, config)

    def load_student(self, path: Path, teacher: nn.Module, target: Any) -> nn.Module:
        from ndopt.frontends.pyramid_flow.students import load_student

        return load_student(path, teacher, target)

    # ---- saved pipelines ---------------------------------------------------------------------------
    def base_reference(self, pipeline: Pipeline, base: str | Path | None = None) -> dict[str, Any]:
        from ndopt.frontends.pyramid_flow.saved_upstream import base_reference

        return base_reference(pipeline, self.preset_names(), base)

    def copy_base_configs(self, source: Path, dest: Path) -> None:
        from ndopt.frontends.pyramid_flow.saved_upstream import copy_base_configs

        copy_base_configs(source, dest)

    def build_from_configs(self, base: Path, variants: list[str], name: str | None = None) -> Pipeline:
        from ndopt.frontends.pyramid_flow.saved_upstream import build_from_configs

        return build_from_configs(base, variants, name=name)

    def write_upstream(self, pipeline: Pipeline, directory: Path) -> dict[str, Any]:
        from ndopt.frontends.pyramid_flow.saved_upstream import write_upstream_dit

        return write_upstream_dit(pipeline, directory)

    # ---- hybrid mode and training ------------------------------------------------------------------
    def hybrid(self, pipeline: Pipeline, **kwargs: Any) -> Pipeline:
        from ndopt.frontends.neodragon.hybrid import attach

        return attach(pipeline, **kwargs)

    def hybrid_base(self, pipeline: Pipeline) -> str:
        from ndopt.frontends.neodragon.hybrid import SUFFIX

        return pipeline.name.removesuffix(SUFFIX) if pipeline.schedule.first_frame == HYBRID else pipeline.name

    def untrained(self, preset: str, seed: int, architecture: Mapping[str, Mapping[str, Any]] | None = None) -> Pipeline:
        import dataclasses

        from ndopt.frontends.pyramid_flow import dit as dit_mod
        from ndopt.frontends.pyramid_flow import text as text_mod
        from ndopt.frontends.pyramid_flow import vae as vae_mod
        from ndopt.frontends.pyramid_flow.presets import (
            ARCH_CLASSES,
            architecture_json,
            assemble,
            preset_specs,
        )

        specs = preset_specs()
        if preset not in specs:
            raise NdoptError(f"unknown preset {preset!r}; {self.name} presets: {', '.join(specs)}")
        spec = specs[preset]
        for part, fields in (architecture or {}).items():
            if part not in ARCH_CLASSES:
                raise NdoptError(f"architecture: unknown part {part!r}; give vae and/or dit")
            # the preset's config with the overrides, read back as a config.json is (type and range checked)
            raw = {**architecture_json(part, getattr(spec, part)), **fields}
            spec = dataclasses.replace(spec, **{part: ARCH_CLASSES[part].from_dict(raw, f"architecture.{part}")})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text = text_mod.SD3TextEncoder(spec.text, text_mod.tiny_tokenizers()
                                           if preset.endswith(("tiny", "smoke")) else None)
            dit = dit_mod.PyramidMMDiT(spec.dit)
            vae = vae_mod.CausalVideoVAE(spec.vae)
        for m in (text, dit, vae):
            m.eval().requires_grad_(False)
        return assemble(preset, text, dit, vae, spec)

    def save_weights(self, pipeline: Pipeline, path: Path | None = None) -> Path:
        from ndopt.frontends.pyramid_flow.presets import save_bundled
        from ndopt.io import package_weights

        target = Path(path) if path is not None else package_weights(PACKAGE, f"{pipeline.name}.safetensors")
        save_bundled(target, pipeline)
        return target

    # ---- the pyramidal sampler's math --------------------------------------------------------------
    @cached_property
    def sampler(self) -> SamplerMath:  # type: ignore[override]
        from ndopt.frontends.pyramid_flow import sampler as smp
        from ndopt.frontends.pyramid_flow import schedule as sch
        from ndopt.frontends.pyramid_flow import vae

        return SamplerMath(
            is_sampler=lambda s: isinstance(s, smp.PyramidFlowSampler), stage_hw=smp.stage_hw,
            history_clips=smp.history_clips, stage_timesteps=sch.stage_timesteps,
            stage_local_sigmas=sch.stage_local_sigmas, unroll=smp.unroll, FOLDED=smp.FOLDED,
            FoldedSchedule=smp.FoldedSchedule, folded_time=smp.folded_time, folded_schedule=smp.folded_schedule,
            block_noise_cholesky=smp.block_noise_cholesky, frame_count=smp.frame_count,
            spatial_factor=smp.VAE_SPATIAL, image_scale=vae.IMAGE_SCALE, image_shift=vae.IMAGE_SHIFT,
            video_scale=vae.VIDEO_SCALE, video_shift=vae.VIDEO_SHIFT, normalize_latents=vae.normalize_latents,
            denormalize_latents=vae.denormalize_latents)


FRONTEND = PyramidFlowInterface()
