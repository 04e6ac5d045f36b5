"""miniFLUX pipelines: the tiny preset, the real-size presets (meta), and upstream checkpoint directories.

Same Pipeline IR as the SD3 variant (`pyramid_flow.presets.assemble`): components `text_encoder`,
`dit`, `vae_encoder`, `vae_decoder` with the same roles and DiT/VAE ports, the same schedule and
sampler; the text encoder's inputs are miniFLUX's (t5_ids, t5_mask, clip_l_ids: no CLIP-G). The
upstream directory (HF `rain1011/pyramid-flow-miniflux`) holds `diffusion_transformer_{384p,768p}/`,
`causal_video_vae/`, `text_encoder/` (CLIP-L), `text_encoder_2/` (T5), `tokenizer/`, `tokenizer_2/`;
every config is checked, and checked to fit the others, before any module is built.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ndopt.errors import CheckpointError
from ndopt.frontends.miniflux import dit as dit_mod
from ndopt.frontends.miniflux import text as text_mod
from ndopt.frontends.miniflux.sampler import MiniFluxSampler
from ndopt.frontends.pyramid_flow import checkpoint as ckpt
from ndopt.frontends.pyramid_flow import configs
from ndopt.frontends.pyramid_flow import presets as sd3_presets
from ndopt.frontends.pyramid_flow import vae as vae_mod
from ndopt.frontends.pyramid_flow.dit import randomize_
from ndopt.io import atomic_write_json
from ndopt.ir.pipeline import Pipeline
from ndopt.ir.spec import Port, TensorSpec

log = logging.getLogger("ndopt")

FRONTEND = "pyramid-flow-miniflux"  # Pipeline.frontend: the ndopt.model interface passes ask
TINY = "pyramid-flow-miniflux-tiny"
SMOKE = "pyramid-flow-miniflux-smoke"
SD3_TINY = "pyramid-flow-tiny"  # its bundled, trained tiny VAE is reused when the VAE configs are equal


@dataclass(frozen=True)
class MiniFluxPresetSpec:
    name: str
    dit: dit_mod.FluxDiTConfig
    vae: vae_mod.CausalVAEConfig
    text: text_mod.FluxTextEncoderConfig
    height: int
    width: int
    latent_frames: int
    steps: tuple[int, ...] = (20, 20, 20)
    video_steps: tuple[int, ...] = (10, 10, 10)
    guidance_scale: float = 7.0
    video_guidance_scale: float = 5.0
    prompt_suffix: str = ", hyper quality, Ultra HD, 8K"
    negative_prompt: str | None = None  # None: upstream's default negative prompt


def _real_spec(name: str, height: int, width: int) -> MiniFluxPresetSpec:
    # upstream README (miniFLUX, 384p and 768p): 20-20-20 / 10-10-10, guidance 7 / video guidance 5.
    # Frames: 49 (7 latent frames) as the SD3 presets, Neodragon's setting.
    return MiniFluxPresetSpec(name, dit_mod.FluxDiTConfig(), vae_mod.CausalVAEConfig(), text_mod.real_config(),
                              height=height, width=width, latent_frames=7)


def _smoke_spec(name: str) -> MiniFluxPresetSpec:
    """miniFLUX at its real widths (DiT 30 x 64 heads, T5-XXL, CLIP-L, the VAE's channels, real
    vocabularies) but shallow and small, built with seeded random weights on a real device: the dtype,
    memory and shape paths of the real widths end to end on a CPU, as `pyramid-flow-sd3-smoke` does for
    SD3. Depths shrink (1 double + 1 single block, 2 layers per text encoder, 1 resnet per VAE block),
    and so do the resolution, frames and steps; every width stays. Special token ids are the bundled
    tiny tokenizer's (the real tokenizers are not shipped); its ids lie inside the real vocabularies."""
    real, tok = text_mod.real_config(), text_mod.tiny_tokenizers().tokenizer
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    text = dataclasses.replace(real, t5={**real.t5, "num_layers": 2, "pad_token_id": tok.pad_token_id,
                                         "eos_token_id": tok.eos_token_id},
                               clip_l={**real.clip_l, "num_hidden_layers": 2, **ids})
    vae = dataclasses.replace(vae_mod.CausalVAEConfig(), encoder_layers_per_block=(1,) * 4,
                              decoder_layers_per_block=(1,) * 4)
    return MiniFluxPresetSpec(name, dit_mod.FluxDiTConfig(num_layers=1, num_single_layers=1), vae, text,
                              height=64, width=64, latent_frames=2, steps=(2, 2, 2), video_steps=(1, 1, 1),
                              prompt_suffix="", negative_prompt="")


def preset_specs() -> dict[str, MiniFluxPresetSpec]:
    return {
        # the SD3 tiny preset's VAE, at the widths its bundled weights record: build_preset reuses them
        TINY: MiniFluxPresetSpec(TINY, dit_mod.tiny_config(), sd3_presets.preset_specs()[SD3_TINY].vae,
                                 text_mod.tiny_config(),
                                 height=64, width=64, latent_frames=2, prompt_suffix="", negative_prompt=""),
        "pyramid-flow-miniflux-384p": _real_spec("pyramid-flow-miniflux-384p", 384, 640),
        "pyramid-flow-miniflux-768p": _real_spec("pyramid-flow-miniflux-768p", 768, 1280),
        SMOKE: _smoke_spec(SMOKE),
    }


def assemble(name: str, text: torch.nn.Module, dit: dit_mod.PyramidFluxDiT, vae: torch.nn.Module,
             spec: MiniFluxPresetSpec) -> Pipeline:
    """The Pipeline IR of a miniFLUX model from its modules (T5 + CLIP-L token inputs, no CLIP-G)."""
    text_inputs = (Port("t5_ids", TensorSpec(("B", "L"), "int64")), Port("t5_mask", TensorSpec(("B", "L"), "int64")),
                   Port("clip_l_ids", TensorSpec(("B", spec.text.clip_max_length), "int64")))
    return sd3_presets.pyramidal_pipeline(name, text, dit, vae, spec, text_inputs=text_inputs,
                                          latent_channels=dit.config.latent_channels,
                                          sampler_class=MiniFluxSampler, frontend=FRONTEND)


def _load_sd3_tiny_vae(vae: torch.nn.Module, config: vae_mod.CausalVAEConfig) -> bool:
    """The SD3 tiny preset's trained VAE weights, when its VAE is this one (the same causal VAE upstream)."""
    if sd3_presets.preset_specs()[SD3_TINY].vae != config:
        return False
    path = sd3_presets.bundled_weights(SD3_TINY)
    if path is None:
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            part = {k[len("vae."):]: f.get_tensor(k) for k in f.keys() if k.startswith("vae.")}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read the bundled weights ({e}); reinstall ndopt") from None
    ckpt.load_into(vae, part, source=f"{path} [vae]")
    return True


def build_preset(name: str, device: torch.device | str = "cpu", seed: int = 0) -> Pipeline:
    """A preset on `device` (real sizes: use "meta"); off meta, deterministic for a seed: a seeded-random
    DiT (`randomize_`, so its zero-initialised adaLN and output say something), seeded text encoders, and
    for the tiny preset the SD3 tiny preset's trained VAE."""
    specs = preset_specs()
    if name not in specs:
        raise KeyError(name)
    spec = specs[name]
    with sd3_presets.build_device(device, seed):
        text = text_mod.MiniFluxTextEncoder(spec.text, text_mod.tiny_tokenizers() if name in (TINY, SMOKE) else None)
        dit = dit_mod.PyramidFluxDiT(spec.dit)
        vae = vae_mod.CausalVideoVAE(spec.vae)
    if str(device) != "meta":
        randomize_(dit, torch.Generator().manual_seed(seed))
        if name == TINY and not _load_sd3_tiny_vae(vae, spec.vae):
            log.warning("%s: no bundled tiny VAE matches this VAE config; the VAE is seeded-random", name)
    for m in (text, dit, vae):
        m.eval().requires_grad_(False)
    return assemble(name, text, dit, vae, spec)


def check_compatible(path: Path, dit: dit_mod.FluxDiTConfig, vae: vae_mod.CausalVAEConfig,
                     text: text_mod.FluxTextEncoderConfig, variant: str) -> None:
    """The components' configs fit together: the DiT reads the VAE's latents and the encoders' outputs."""
    dit_file = f"diffusion_transformer_{variant}/config.json"
    pairs = [
        ("in_channels / 4", dit.latent_channels, "causal_video_vae/config.json latent channels", vae.latent_channels),
        ("joint_attention_dim", dit.joint_attention_dim, "text_encoder_2/config.json d_model", text.context_dim),
        ("pooled_projection_dim", dit.pooled_projection_dim, "text_encoder/config.json hidden_size", text.pooled_dim),
    ]
    bad = [f"{dit_file} {key} = {a} but {other} = {b}" for key, a, other, b in pairs if a != b]
    if bad:
        raise configs.ConfigError(f"{path}: the components do not fit together: {'; '.join(bad)}; the configs "
                                  "come from different checkpoints: download the directory again")


def load_checkpoint_dir(path: Path, variant: str = "768p", dtype: torch.dtype = torch.float32,
                        device: str = "cpu") -> Pipeline:
    """A pipeline from an upstream miniFLUX directory. Every config (DiT, VAE, both text encoders,
    `ndopt_sampler.json`) is read, checked and checked to fit the others before any module is built;
    then the DiT's and the VAE's weights load (names, shapes, dtype kinds, finiteness), then the encoders.
    On `device="meta"` no weights are read (`ndopt plan --model DIR`): the configs and tokenizers only."""
    path = Path(path)
    dit_dir = path / f"diffusion_transformer_{variant}"
    if not dit_dir.is_dir():
        found = sorted(p.name for p in path.glob("diffusion_transformer_*"))
        raise CheckpointError(f"{path}: no diffusion_transformer_{variant}/ (found: {found or 'none'}); "
                              "pass the variant that exists")
    vae_dir = path / "causal_video_vae"
    dcfg = dit_mod.FluxDiTConfig.from_dict(ckpt.read_config(dit_dir), source=dit_dir / ckpt.CONFIG_NAME)
    vcfg = vae_mod.CausalVAEConfig.from_dict(ckpt.read_config(vae_dir), source=vae_dir / ckpt.CONFIG_NAME)
    meta = str(device) == "meta"
    tcfg = text_mod.config_from_dir(path, weights=not meta)
    check_compatible(path, dcfg, vcfg, tcfg, variant)
    settings = sd3_presets.read_sampler_settings(path, variant, dcfg)  # type: ignore[arg-type]
    with torch.device("meta"):
        dit = dit_mod.PyramidFluxDiT(dcfg)
        vae = vae_mod.CausalVideoVAE(vcfg)
    if meta:
        tokenizers = text_mod.FluxTokenizers.from_pretrained_dir(path)
        with torch.device("meta"):
            text = text_mod.MiniFluxTextEncoder(tcfg, tokenizers)
    else:
        ckpt.load_into(dit, ckpt.load_state_dict(dit_dir, dtype=dtype, device=device), source=str(dit_dir),
                       assign=True)
        ckpt.load_into(vae, ckpt.load_state_dict(vae_dir, dtype=dtype, device=device), source=str(vae_dir),
                       assign=True)
        text = text_mod.MiniFluxTextEncoder.from_pretrained_dir(path, dtype=dtype, device=device)
    for m in (text, dit, vae):
        m.eval().requires_grad_(False)
    spec = MiniFluxPresetSpec(path.name, dcfg, vcfg, text.config, **settings)
    return assemble(spec.name, text, dit, vae, spec)


def save_checkpoint_dir(pipeline: Pipeline, path: Path, variant: str = "768p") -> Path:
    """Write a miniFLUX pipeline in upstream's directory layout (plus ndopt's `ndopt_sampler.json`)."""
    path = Path(path)
    dit = pipeline.by_role("dit")[0].module
    if not isinstance(dit, dit_mod.PyramidFluxDiT):
        raise CheckpointError(f"save_checkpoint_dir writes a miniFLUX DiT; this pipeline's dit is {type(dit).__name__}")
    dec = pipeline.by_role("vae_decoder")[0]
    enc = pipeline.components.get("vae_encoder")
    if enc is None:
        raise CheckpointError("the upstream layout stores the whole causal VAE: this pipeline has no vae_encoder "
                              "(save before dead_component_elimination)")
    try:
        dit_config = dit.config.to_config_json()
    except dit_mod.DiTConfigError as e:
        raise CheckpointError(str(e)) from None
    vae = torch.nn.Module()  # upstream keys: encoder.*, quant_conv.*, post_quant_conv.*, decoder.*
    for name, sub in (*enc.module.named_children(), *dec.module.named_children()):
        vae.add_module(name, sub)
    path.mkdir(parents=True, exist_ok=True)
    ckpt.save_component(path / f"diffusion_transformer_{variant}", dit, dit_config)
    ckpt.save_component(path / "causal_video_vae", vae, dec.attrs["config"].to_dict())
    pipeline.by_role("text_encoder")[0].module.save_pretrained_dir(path)
    sch, smp = pipeline.schedule, pipeline.sampler
    settings = {"height": sch.height, "width": sch.width, "latent_frames": sch.latent_frames,
                "steps": [st.steps for st in sch.stages], "video_steps": [st.video_steps for st in sch.stages],
                "guidance_scale": sch.guidance.scale, "video_guidance_scale": sch.guidance.video_scale,
                "prompt_suffix": smp.prompt_suffix, "negative_prompt": smp.negative_prompt}
    atomic_write_json(path / sd3_presets.SAMPLER_SETTINGS, settings)
    return path
