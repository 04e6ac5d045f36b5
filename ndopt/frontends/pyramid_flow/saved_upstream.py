"""The Pyramid-Flow side of a saved pipeline (`ndopt.saved`, through the frontend's interface): the
upstream DiT layout, and bases from checkpoint configs.

`write_upstream_dit` writes `upstream/diffusion_transformer_<variant>/` (upstream's key names and a
`config.json` with `num_layers=k`) when the final DiT is still upstream-shaped: a `PyramidMMDiT`,
possibly pruned, with upstream's timestep MLP and `context_embedder` (schedule_folding and
encoder_substitution replace those, a quantized DiT is a sim); otherwise it records why not.
`base_reference` says what a saved pipeline's base is (a preset, or an upstream checkpoint whose
`config.json` files and tokenizers `copy_base_configs` copies into `base/`; a saved pipeline's base
is its own base, copied from its `base/`), and `build_from_configs` rebuilds such a checkpoint's
pipeline on the meta device from those configs (weights come from the file).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ndopt.errors import CheckpointError
from ndopt.frontends.pyramid_flow import checkpoint as ckpt
from ndopt.frontends.pyramid_flow import dit as dit_mod
from ndopt.frontends.pyramid_flow import text as text_mod
from ndopt.frontends.pyramid_flow import vae as vae_mod
from ndopt.frontends.pyramid_flow.dit import UPSTREAM_OVERRIDES, PyramidMMDiT
from ndopt.frontends.pyramid_flow.presets import (
    PresetSpec,
    assemble,
    check_compatible,
    dit_config_json,
    read_sampler_settings,
)
from ndopt.ir.pipeline import Pipeline
from ndopt.saved import base_dir, is_saved_pipeline, read_manifest

UPSTREAM_VARIANT = "768p"


def upstream_dit_reason(pipeline: Pipeline) -> str | None:
    """None when the pipeline's DiT can be written in upstream's layout; otherwise why not."""
    dits = pipeline.by_role("dit")
    if len(dits) != 1:
        return f"the pipeline has {len(dits)} DiT components"
    module = dits[0].module
    if type(module) is not PyramidMMDiT:
        return f"the DiT is a {type(module).__name__} (quantized or replaced), not upstream's PyramidMMDiT"
    forced = [f"{k}={getattr(module.config, k)!r}" for k, v in UPSTREAM_OVERRIDES.items()
              if getattr(module.config, k, v) != v]
    if forced:
        return f"the DiT's config has {', '.join(forced)}, which upstream's loader overrides (a different model)"
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
    reason = upstream_dit_reason(pipeline)
    if reason is not None:
        return {"written": False, "reason": reason}
    dit = pipeline.by_role("dit")[0].module
    sub = f"diffusion_transformer_{variant}"
    ckpt.save_component(directory / sub, dit, dit_config_json(dit.config))
    return {"written": True, "path": f"{directory.name}/{sub}", "num_layers": dit.config.num_layers}


def base_reference(pipeline: Pipeline, presets: list[str], base: str | Path | None = None) -> dict[str, Any]:
    """What `load_saved` rebuilds before replaying the passes: one of `presets`, or an upstream checkpoint
    directory's configs (copied into `base/`)."""
    ref = str(base) if base is not None else pipeline.name
    if ref in presets:
        return {"kind": "preset", "name": ref}
    path = Path(ref)
    if is_saved_pipeline(path):
        saved = dict(read_manifest(path)["base"])
        if saved["kind"] == "checkpoint":  # the configs the saved pipeline copied: its upstream folder may be gone
            saved["source"] = str(base_dir(path, saved))
        return saved
    if path.is_dir():
        return {"kind": "checkpoint", "source": str(path.resolve()), "path": "base",
                "variants": sorted(p.name.removeprefix("diffusion_transformer_")
                                   for p in path.glob("diffusion_transformer_*"))}
    raise CheckpointError(f"save_pipeline: cannot tell the base model of pipeline {pipeline.name!r} (not a preset); "
                          "pass base=<preset name or upstream checkpoint directory>")


def copy_base_configs(source: Path, dest: Path) -> None:
    """config.json files and tokenizer folders of an upstream checkpoint: the structure, no weights."""
    for sub in sorted(p for p in source.iterdir() if p.is_dir()):
        if sub.name.startswith("tokenizer"):
            shutil.copytree(sub, dest / sub.name)
        elif (sub / "config.json").is_file():
            (dest / sub.name).mkdir(parents=True)
            shutil.copy2(sub / "config.json", dest / sub.name / "config.json")
    for extra in source.glob("*.json"):
        shutil.copy2(extra, dest / extra.name)


def build_from_configs(base: Path, variants: list[str], name: str | None = None) -> Pipeline:
    """An upstream checkpoint's pipeline on the meta device from its configs and tokenizers (no weights):
    a saved pipeline's base, or a checkpoint directory planned or checked before its weights load."""
    variant = UPSTREAM_VARIANT if UPSTREAM_VARIANT in variants else variants[0]
    dit_dir = base / f"diffusion_transformer_{variant}"
    if not dit_dir.is_dir():
        raise CheckpointError(f"{base}: no diffusion_transformer_{variant}/config.json; the saved base is incomplete")
    vae_dir = base / "causal_video_vae"
    dcfg = dit_mod.MMDiTConfig.from_dict(ckpt.read_config(dit_dir), source=dit_dir / ckpt.CONFIG_NAME)
    vcfg = vae_mod.CausalVAEConfig.from_dict(ckpt.read_config(vae_dir), source=vae_dir / ckpt.CONFIG_NAME)
    tcfg = text_mod.config_from_dir(base, weights=False)  # the copied configs: no weights beside them
    check_compatible(base, dcfg, vcfg, tcfg, variant)
    settings = read_sampler_settings(base, variant, dcfg)
    tokenizers = text_mod.Tokenizers.from_pretrained_dir(base)
    with torch.device("meta"):
        text = text_mod.SD3TextEncoder(tcfg, tokenizers)
        dit = dit_mod.PyramidMMDiT(dcfg)
        vae = vae_mod.CausalVideoVAE(vcfg)
    spec = PresetSpec(name or base.parent.name, dcfg, vcfg, tcfg, **settings)
    for m in (text, dit, vae):
        m.eval().requires_grad_(False)
    return assemble(spec.name, text, dit, vae, spec)
