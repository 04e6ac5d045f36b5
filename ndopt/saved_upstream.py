"""The Pyramid-Flow side of a saved pipeline: the upstream DiT layout, and bases from checkpoint configs.

`write_upstream_dit` writes `upstream/diffusion_transformer_<variant>/` (upstream's key names and a
`config.json` with `num_layers=k`) when the final DiT is still upstream-shaped: a `PyramidMMDiT`,
possibly pruned, with upstream's timestep MLP and `context_embedder` (schedule_folding and
encoder_substitution replace those, a quantized DiT is a sim); otherwise it records why not.
`build_from_configs` rebuilds an upstream checkpoint's pipeline on the meta device from the
`config.json` files and tokenizers `save_pipeline` copied into `base/` (weights come from the file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ndopt.errors import CheckpointError
from ndopt.ir.pipeline import Pipeline

UPSTREAM_VARIANT = "768p"


def upstream_dit_reason(pipeline: Pipeline) -> str | None:
    """None when the pipeline's DiT can be written in upstream's layout; otherwise why not."""
    from ndopt.frontends.pyramid_flow.dit import PyramidMMDiT

    dits = pipeline.by_role("dit")
    if len(dits) != 1:
        return f"the pipeline has {len(dits)} DiT components"
    module = dits[0].module
    if type(module) is not PyramidMMDiT:
        return f"the DiT is a {type(module).__name__} (quantized or replaced), not upstream's PyramidMMDiT"
    with torch.device("meta"):
        fresh = PyramidMMDiT(module.config)
    for name in ("time_text_embed", "context_embedder"):
        if type(getattr(module, name, None)) is not type(getattr(fresh, name)):
            return (f"the DiT's {name} is not upstream's ({type(getattr(module, name, None)).__name__}: "
                    "schedule_folding or encoder_substitution rewrote it)")
    have, want = module.state_dict(), fresh.state_dict()
    if set(have) != set(want):
        extra = sorted(set(have) ^ set(want))
        return f"the DiT's keys differ from upstream's num_layers={module.config.num_layers} layout ({extra[:3]})"
    bad = [k for k in want if have[k].shape != want[k].shape]
    if bad:
        return f"the DiT's shapes differ from its config's ({bad[:3]})"
    return None


def write_upstream_dit(pipeline: Pipeline, directory: Path, variant: str = UPSTREAM_VARIANT) -> dict[str, Any]:
    """Write the DiT in upstream's layout under `directory` if it has upstream's structure; the record
    (`path` relative to the saved pipeline, or `reason`) goes into pipeline.json."""
    from ndopt.frontends.pyramid_flow import checkpoint as ckpt
    from ndopt.frontends.pyramid_flow.presets import dit_config_json

    reason = upstream_dit_reason(pipeline)
    if reason is not None:
        return {"written": False, "reason": reason}
    dit = pipeline.by_role("dit")[0].module
    sub = f"diffusion_transformer_{variant}"
    ckpt.save_component(directory / sub, dit, dit_config_json(dit.config))
    return {"written": True, "path": f"{directory.name}/{sub}", "num_layers": dit.config.num_layers}


def build_from_configs(base: Path, variants: list[str]) -> Pipeline:
    """An upstream checkpoint's pipeline on the meta device from its configs and tokenizers (no weights)."""
    from ndopt.frontends.pyramid_flow import checkpoint as ckpt
    from ndopt.frontends.pyramid_flow import dit as dit_mod
    from ndopt.frontends.pyramid_flow import text as text_mod
    from ndopt.frontends.pyramid_flow import vae as vae_mod
    from ndopt.frontends.pyramid_flow.presets import SAMPLER_SETTINGS, PresetSpec, assemble

    variant = UPSTREAM_VARIANT if UPSTREAM_VARIANT in variants else variants[0]
    dit_dir = base / f"diffusion_transformer_{variant}"
    if not dit_dir.is_dir():
        raise CheckpointError(f"{base}: no diffusion_transformer_{variant}/config.json; the saved base is incomplete")
    dcfg = dit_mod.MMDiTConfig.from_dict(ckpt.read_config(dit_dir))
    vcfg = vae_mod.CausalVAEConfig.from_dict(ckpt.read_config(base / "causal_video_vae"))

    def hf_config(sub: str) -> dict[str, Any]:
        cfg = ckpt.read_config(base / sub)
        for key in ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures"):
            cfg.pop(key, None)
        return cfg

    tcfg = text_mod.TextEncoderConfig(t5=hf_config("text_encoder_3"), clip_l=hf_config("text_encoder"),
                                      clip_g=hf_config("text_encoder_2"))
    tokenizers = text_mod.Tokenizers.from_pretrained_dir(base)
    with torch.device("meta"):
        text = text_mod.SD3TextEncoder(tcfg, tokenizers)
        dit = dit_mod.PyramidMMDiT(dcfg)
        vae = vae_mod.CausalVideoVAE(vcfg)
    h, w = (768, 1280) if variant == "768p" else (384, 640)
    settings: dict[str, Any] = {"height": h, "width": w, "latent_frames": 7}
    if (base / SAMPLER_SETTINGS).is_file():
        settings.update(json.loads((base / SAMPLER_SETTINGS).read_text()))
    spec = PresetSpec(base.parent.name, dcfg, vcfg, tcfg,
                      **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    for m in (text, dit, vae):
        m.eval().requires_grad_(False)
    return assemble(spec.name, text, dit, vae, spec)
