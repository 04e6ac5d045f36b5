"""The Pyramid-Flow miniFLUX frontend behind ndopt's model interface (`ndopt.model.ModelInterface`).

Registered as `pyramid-flow-miniflux` in the `ndopt.frontends` entry-point group (pyproject.toml).
What the Neodragon chain asks of a miniFLUX model: presets and upstream checkpoint directories (those
whose DiT config names `PyramidFluxTransformer`); the DiT's two block kinds ("double" then "single",
indexed in execution order), a copy without some of them, its fx trace, the folded timestep MLP and
the attention switch; DT5 + Context Adapter for the T5 sequence with CLIP-L's pooled vector kept; the
alternative decoders, bundled decoder weights and step-distilled students in the SD3 variant's
formats (the same causal VAE, the same student file); and the pyramidal sampler's math with
miniFLUX's first-frame latent constants. What only the SD3 variant has (Neodragon's hybrid mode,
training the tiny teacher from scratch, saved pipelines over a checkpoint base, the upstream layout
of a saved DiT) stays unsupported: the base class's PassError names it. Imports stay inside the
methods, so finding the frontend loads no model code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ndopt.errors import NdoptError, PassError
from ndopt.ir.pipeline import Pipeline
from ndopt.model import Block, BlockIO, ModelInterface, SamplerMath, TextConditioning, TextStudent


def _sd3() -> ModelInterface:
    """The SD3 variant's interface: miniFLUX shares its VAE, decoders, weights and student formats."""
    from ndopt.frontends.pyramid_flow.interface import FRONTEND

    return FRONTEND


class MiniFluxInterface(ModelInterface):
    name = "pyramid-flow-miniflux"
    description = "Pyramid-Flow miniFLUX: FLUX DiT (double + single blocks), T5-XXL + CLIP-L, causal video VAE"

    # ---- models ------------------------------------------------------------------------------------
    def preset_names(self) -> list[str]:
        from ndopt.frontends.miniflux.presets import preset_specs

        return sorted(preset_specs())

    def load(self, ref: str, *, device: torch.device | str = "cpu", seed: int = 0, meta: bool = False,
             variant: str = "768p") -> Pipeline | None:
        from ndopt.frontends.miniflux.presets import (
            SMOKE,
            TINY,
            build_preset,
            load_checkpoint_dir,
            preset_specs,
        )
        from ndopt.frontends.pyramid_flow.checkpoint import FLUX_DIT_CLASS, dit_class_name

        if ref in preset_specs():
            if ref not in (TINY, SMOKE) and not meta:
                raise NdoptError(f"preset {ref!r} has no bundled weights (miniFLUX's 2B+ parameters): use `ndopt "
                                 "plan` (meta device), or pass the upstream checkpoint directory as the model")
            return build_preset(ref, "meta" if meta else device, seed)
        path = Path(ref)
        if not path.is_dir() or dit_class_name(path, variant) != FLUX_DIT_CLASS:
            return None  # not a miniFLUX checkpoint: another frontend's
        return load_checkpoint_dir(path, variant=variant, device="meta" if meta else str(device))

    # ---- the denoiser ------------------------------------------------------------------------------
    def blocks(self, dit: nn.Module) -> list[Block]:
        from ndopt.frontends.miniflux.blocks import flux_blocks

        return flux_blocks(dit)

    def block_io(self, kind: str) -> BlockIO:
        from ndopt.frontends.miniflux.blocks import block_io

        return block_io(kind)

    def without_blocks(self, dit: nn.Module, keep: list[int], *, fold_last_context: bool = True) -> nn.Module:
        from ndopt.frontends.miniflux.blocks import without_blocks

        return without_blocks(dit, keep)  # nothing to fold (miniflux/blocks.py)

    def trace(self, dit: nn.Module, layout: Any) -> torch.fx.GraphModule:
        from ndopt.frontends.miniflux.blocks import flux_dit
        from ndopt.frontends.miniflux.dit import trace_dit

        return trace_dit(flux_dit(dit), layout)

    def block_names(self, gm: torch.fx.GraphModule) -> list[str]:
        from ndopt.frontends.miniflux.dit import dit_block_names

        return dit_block_names(gm)

    def fold_timestep_embedding(self, dit: nn.Module, timesteps: list[float]) -> tuple[nn.Module, torch.Tensor]:
        from ndopt.frontends.miniflux.blocks import flux_dit
        from ndopt.frontends.miniflux.dit import fold_timestep_embedding

        return fold_timestep_embedding(flux_dit(dit), timesteps)

    def set_attention(self, dit: nn.Module, impl: str) -> nn.Module:
        from ndopt.frontends.miniflux.blocks import flux_dit

        return flux_dit(dit).set_attention_impl(impl)

    # ---- text conditioning (T5-XXL's sequence, CLIP-L pooled) ---------------------------------------
    def text_conditioning(self, text_encoder: nn.Module, dit: nn.Module) -> TextConditioning:
        from ndopt.frontends.miniflux.text import MiniFluxTextEncoder

        if not isinstance(getattr(dit, "context_embedder", None), nn.Linear):
            raise PassError("the DiT has no Linear context_embedder to take over")
        if not isinstance(text_encoder, MiniFluxTextEncoder):
            raise PassError(f"{type(text_encoder).__name__} is not a miniFLUX text encoder (T5 + CLIP-L)")
        te = text_encoder

        def pooled(captions: list[str]) -> torch.Tensor:  # CLIP-L's pooler_output (frozen, unchanged)
            ids = te.tokenize(list(captions))["clip_l_ids"]
            return te.text_encoder(input_ids=ids.to(next(te.text_encoder.parameters()).device)).pooler_output

        tokenizer = te.tokenizers.tokenizer_2 if te.tokenizers is not None else None  # none on meta (plans)
        return TextConditioning(te.text_encoder_2, tokenizer, int(te.config.max_sequence_length), te.config.t5,
                                pooled, dit.context_embedder)

    def distilled_text_variant(self, text_encoder: nn.Module) -> str | None:
        from ndopt.frontends.miniflux.dt5 import MiniFluxDistilledTextEncoder

        return text_encoder.config.variant if isinstance(text_encoder, MiniFluxDistilledTextEncoder) else None

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
        from ndopt.frontends.miniflux.dt5 import MiniFluxDistilledTextEncoder

        return MiniFluxDistilledTextEncoder(student.config, text_encoder.text_encoder, student.encoder,
                                            student.adapter, text_encoder.tokenizers)

    def without_context_embedder(self, dit: nn.Module) -> nn.Module:
        return _sd3().without_context_embedder(dit)  # the same shallow copy with an identity embedder

    # ---- decoders, quantization, weights: the SD3 variant's VAE and formats ---------------------------
    def build_decoder(self, kind: str, scale: str, latent_channels: int) -> nn.Module:
        return _sd3().build_decoder(kind, scale, latent_channels)

    def eager_modules(self) -> tuple[type, ...]:
        return _sd3().eager_modules()

    def bundled_weights(self, name: str) -> Path | None:
        return _sd3().bundled_weights(name)  # decoders trained on the shared VAE's latents apply as they are

    def load_into(self, module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
        _sd3().load_into(module, state_dict, source=source)

    def save_student(self, path: Path, student: nn.Module, teacher: nn.Module, target: Any,
                     config: Mapping[str, Any]) -> Path:
        from ndopt.frontends.pyramid_flow.students import save_student

        return save_student(path, student, teacher, target, config)

    def load_student(self, path: Path, teacher: nn.Module, target: Any) -> nn.Module:
        from ndopt.frontends.pyramid_flow.students import load_student

        return load_student(path, teacher, target)

    # ---- the pyramidal sampler's math ---------------------------------------------------------------
    @cached_property
    def sampler(self) -> SamplerMath:  # type: ignore[override]
        from ndopt.frontends.miniflux import sampler as smp

        # upstream's miniFLUX normalises the first latent frame with its own constants, later ones as SD3
        return dataclasses.replace(_sd3().sampler, image_scale=smp.IMAGE_SCALE, image_shift=smp.IMAGE_SHIFT,
                                   normalize_latents=smp.normalize_latents,
                                   denormalize_latents=smp.denormalize_latents)


FRONTEND = MiniFluxInterface()
