"""Pyramid-Flow pipelines: the tiny preset, the real-size presets (meta unless weights are given),
and pipelines loaded from an upstream checkpoint directory.

The pipeline is text_encoder -> dit -> vae_decoder -> video, plus the VAE encoder fed by the
`image` input (image-to-video conditioning), which text-to-video recipes eliminate. A checkpoint
directory's configs (each component's and `ndopt_sampler.json`) are all checked, and checked to fit
together, before any module is built.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ndopt.errors import CheckpointError
from ndopt.frontends.pyramid_flow import checkpoint as ckpt
from ndopt.frontends.pyramid_flow import configs
from ndopt.frontends.pyramid_flow import dit as dit_mod
from ndopt.frontends.pyramid_flow import text as text_mod
from ndopt.frontends.pyramid_flow import vae as vae_mod
from ndopt.frontends.pyramid_flow.sampler import VAE_SPATIAL, PyramidFlowSampler
from ndopt.frontends.pyramid_flow.schedule import STAGE_RANGE, pyramid_flow_schedule
from ndopt.io import atomic_write_json
from ndopt.ir.component import Component
from ndopt.ir.pipeline import SINK, Pipeline
from ndopt.ir.spec import Port, TensorSpec

log = logging.getLogger("ndopt")
SAMPLER_SETTINGS = "ndopt_sampler.json"  # ndopt's own addition to the upstream layout (optional)


@dataclass(frozen=True)
class PresetSpec:
    name: str
    dit: dit_mod.MMDiTConfig
    vae: vae_mod.CausalVAEConfig
    text: text_mod.TextEncoderConfig
    height: int
    width: int
    latent_frames: int
    steps: tuple[int, ...] = (20, 20, 20)
    video_steps: tuple[int, ...] = (10, 10, 10)
    guidance_scale: float = 7.0
    video_guidance_scale: float = 5.0
    prompt_suffix: str = ", hyper quality, Ultra HD, 8K"
    negative_prompt: str | None = None  # None: upstream's default negative prompt


def _real_spec(name: str, height: int, width: int) -> PresetSpec:
    # upstream README: 20-20-20 / 10-10-10, CFG 7 / 5. Frames: Neodragon's 49-frame videos (7 latent
    # frames, the paper's setting we compare against); upstream's README default is temp=16 (5 s),
    # available as `ndopt plan --frames 16`.
    return PresetSpec(name, dit_mod.MMDiTConfig(), vae_mod.CausalVAEConfig(), text_mod.real_config(),
                      height=height, width=width, latent_frames=7)


def _smoke_spec(name: str) -> PresetSpec:
    """Pyramid-Flow SD3 at its real widths (DiT 24 x 64 heads, T5-XXL, CLIP-L/G, the VAE's channels,
    real vocabularies) but shallow and small, built with seeded random weights on a real device: the
    dtype, memory and shape paths of the real widths, end to end on a CPU (tests/test_real_width_smoke.py).

    Depths shrink (2 DiT blocks, 2 layers per text encoder; the VAE is the real one), and so do the
    resolution, frames and steps; every width stays. Special token ids are the bundled tiny
    tokenizer's (the real tokenizers are not shipped); its ids lie inside the real vocabularies."""
    from dataclasses import replace as _replace

    real, tok = text_mod.real_config(), text_mod.tiny_tokenizers().tokenizer
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    text = _replace(real, t5={**real.t5, "num_layers": 2, "pad_token_id": tok.pad_token_id,
                              "eos_token_id": tok.eos_token_id},
                    clip_l={**real.clip_l, "num_hidden_layers": 2, **ids},
                    clip_g={**real.clip_g, "num_hidden_layers": 2, **ids})
    return PresetSpec(name, dit_mod.MMDiTConfig(num_layers=2), vae_mod.CausalVAEConfig(), text, height=64,
                      width=64, latent_frames=2, steps=(2, 2, 2), video_steps=(1, 1, 1), prompt_suffix="",
                      negative_prompt="")


def preset_specs() -> dict[str, PresetSpec]:
    return {
        "pyramid-flow-tiny": _trained_architecture(PresetSpec(
            "pyramid-flow-tiny", dit_mod.tiny_config(), vae_mod.tiny_config(), text_mod.tiny_config(),
            height=64, width=64, latent_frames=2, prompt_suffix="", negative_prompt="",
            # the trained tiny teacher follows prompts in 13/16 held-out samples at CFG 5 (12/16 at
            # upstream's 7, 11/16 at 10, where its latents are 2.3x wider than at 5): measured on the
            # bundled weights (`python -m ndopt.train.teacher`, then tests/train/test_tiny_teacher.py)
            guidance_scale=5.0)),
        "pyramid-flow-sd3-384p": _real_spec("pyramid-flow-sd3-384p", 384, 640),
        "pyramid-flow-sd3-768p": _real_spec("pyramid-flow-sd3-768p", 768, 1280),
        "pyramid-flow-sd3-smoke": _smoke_spec("pyramid-flow-sd3-smoke"),
    }


@contextlib.contextmanager
def build_device(device: torch.device | str, seed: int) -> Iterator[None]:
    """Build modules on `device`; on a real device with a fixed seed (deterministic init)."""
    if str(device) == "meta":
        with torch.device("meta"):
            yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            yield


def assemble(name: str, text: torch.nn.Module, dit: torch.nn.Module, vae: torch.nn.Module,
             spec: PresetSpec) -> Pipeline:
    """The Pipeline IR of a Pyramid-Flow SD3 model from its modules (T5 + CLIP-L + CLIP-G token inputs)."""
    clip = ("B", spec.text.clip_max_length)
    text_inputs = (Port("t5_ids", TensorSpec(("B", "L"), "int64")), Port("t5_mask", TensorSpec(("B", "L"), "int64")),
                   Port("clip_l_ids", TensorSpec(clip, "int64")), Port("clip_g_ids", TensorSpec(clip, "int64")))
    return pyramidal_pipeline(name, text, dit, vae, spec, text_inputs=text_inputs,
                              latent_channels=dit.config.in_channels, sampler_class=PyramidFlowSampler)


def pyramidal_pipeline(name: str, text: torch.nn.Module, dit: torch.nn.Module, vae: torch.nn.Module, spec: Any, *,
                       text_inputs: tuple[Port, ...], latent_channels: int, sampler_class: type,
                       frontend: str | None = None) -> Pipeline:
    """The Pipeline IR every pyramidal-flow frontend shares: text_encoder -> dit -> vae_decoder -> video,
    plus the VAE encoder fed by `image`. A frontend gives its text encoder's token inputs, the latent
    channels, its sampler class and its name; `spec` is a preset spec (text/vae configs, size, schedule)."""
    tcfg, dcfg = spec.text, dit.config
    ctx, pooled, lat = tcfg.context_dim, tcfg.pooled_dim, latent_channels
    text_ports_out = (Port("prompt_embeds", TensorSpec(("B", "L", ctx))),
                      Port("prompt_attention_mask", TensorSpec(("B", "L"), "int64")),
                      Port("pooled_projections", TensorSpec(("B", pooled))))
    latents = TensorSpec(("B", lat, "t", "h", "w"))
    video = TensorSpec(("B", 3, "F", "H", "W"))
    encoder, decoder = vae_mod.split_vae(vae)
    comps = [
        Component("text_encoder", "text_encoder", text, text_inputs, text_ports_out, entry="encode_tokens",
                  attrs={"config": tcfg}),
        Component("dit", "dit", dit,
                  (Port("sample", latents, optional=True),  # the sampler's noisy latents (history: the encoder in i2v)
                   Port("encoder_hidden_states", TensorSpec(("B", "L", ctx))),
                   Port("encoder_attention_mask", TensorSpec(("B", "L"), "int64")),
                   Port("pooled_projections", TensorSpec(("B", pooled))),
                   Port("timestep_ratio", TensorSpec(("B",)), optional=True)),  # the schedule's timesteps
                  (Port("latents", latents),), attrs={"config": dcfg, "context_dim": ctx,
                                                       "text_len": tcfg.max_sequence_length}),
        Component("vae_encoder", "vae_encoder", encoder, (Port("video", video),), (Port("latents", latents),),
                  attrs={"config": spec.vae, "latent_channels": lat}),
        Component("vae_decoder", "vae_decoder", decoder, (Port("z", latents),), (Port("video", video),),
                  attrs={"config": spec.vae, "latent_channels": lat}),
    ]
    edges = [
        ("prompt", "text_encoder", tuple((p.name, p.name) for p in text_inputs)),
        ("text_encoder", "dit", (("prompt_embeds", "encoder_hidden_states"),
                                 ("prompt_attention_mask", "encoder_attention_mask"),
                                 ("pooled_projections", "pooled_projections"))),
        ("image", "vae_encoder", (("video", "video"),)),
        ("vae_encoder", "dit", (("latents", "sample"),)),
        ("dit", "vae_decoder", (("latents", "z"),)),
        ("vae_decoder", SINK, (("video", "video"),)),
    ]
    schedule = pyramid_flow_schedule(latent_frames=spec.latent_frames, height=spec.height, width=spec.width,
                                     steps=spec.steps, video_steps=spec.video_steps,
                                     guidance_scale=spec.guidance_scale,
                                     video_guidance_scale=spec.video_guidance_scale)
    sampler = sampler_class(prompt_suffix=spec.prompt_suffix,
                            **({} if spec.negative_prompt is None else {"negative_prompt": spec.negative_prompt}))
    return Pipeline(
        name=name, components={c.name: c for c in comps},
        graph=Pipeline.build_graph(comps, ("prompt", "image"), edges), schedule=schedule, sampler=sampler,
        sources={"prompt": text_inputs, "image": (Port("video", video),)}, sink=(Port("video", video),),
        inputs=("prompt",), **({} if frontend is None else {"frontend": frontend}))


def bundled_weights(name: str) -> Path | None:
    """The shipped weights of a preset (`weights/<name>.safetensors` in this package), if any."""
    from ndopt.io import shipped_weights

    return shipped_weights(__package__, f"{name}.safetensors")


def _load_bundled(path: Path, text: torch.nn.Module, dit: torch.nn.Module, vae: torch.nn.Module) -> None:
    """One safetensors file with `text_encoder.`, `dit.` and `vae.` prefixed upstream keys."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read the bundled weights ({e}); reinstall ndopt") from None
    for prefix, module in (("text_encoder.", text), ("dit.", dit), ("vae.", vae)):
        part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        on_meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
        if on_meta:  # own, aligned storage (views into the file buffer round differently in some kernels)
            part = {k: v.clone() for k, v in part.items()}
        ckpt.load_into(module, part, source=f"{path} [{prefix.rstrip('.')}]", assign=on_meta)
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if left:
            raise CheckpointError(f"{path} [{prefix.rstrip('.')}]: no values for {left[:20]}; reinstall ndopt")


def _trained_architecture(spec: PresetSpec) -> PresetSpec:
    """A preset with bundled weights takes the VAE / DiT configs recorded in them (a retrained teacher may
    be wider than the code's defaults); read once per file version."""
    path = bundled_weights(spec.name)
    if path is None:
        return spec
    return with_architecture(spec, _cached_architecture(str(path), path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _cached_architecture(path: str, mtime_ns: int) -> dict[str, Any]:
    return weights_architecture(Path(path))


ARCH_KEYS = {"vae": "ndopt.vae_config", "dit": "ndopt.dit_config"}  # safetensors metadata of bundled weights


def architecture_json(part: str, config: Any) -> dict[str, Any]:
    """A VAE or DiT config as its upstream `config.json` dict (what `<Config>.from_dict` reads back, checked)."""
    return config.to_dict() if part == "vae" else dit_config_json(config)


ARCH_CLASSES = {"vae": vae_mod.CausalVAEConfig, "dit": dit_mod.MMDiTConfig}


def weights_architecture(path: Path) -> dict[str, Any]:
    """The VAE and DiT configs a bundled weights file was trained with (its metadata); {} for older files,
    which hold the preset's own architecture."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: cannot read the bundled weights ({e}); reinstall ndopt") from None
    out: dict[str, Any] = {}
    for part, cls in ARCH_CLASSES.items():
        if ARCH_KEYS[part] in meta:
            try:
                raw = json.loads(meta[ARCH_KEYS[part]])
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: metadata {ARCH_KEYS[part]} is not JSON ({e})") from None
            out[part] = cls.from_dict(raw, f"{path}: {cls.__name__} metadata")  # type and range checked
    return out


def with_architecture(spec: PresetSpec, arch: dict[str, Any]) -> PresetSpec:
    """The preset with the VAE / DiT configs its weights were trained with."""
    from dataclasses import replace

    return replace(spec, **{k: v for k, v in arch.items() if k in ("vae", "dit")})


def save_bundled(path: Path, pipeline: Pipeline) -> None:
    """Write a pipeline's weights in the bundled-weights format (used by the teacher's training), with
    the VAE and DiT configs in the metadata, so a preset whose teacher was retrained wider loads."""
    from safetensors.torch import save_file

    from ndopt.io import atomic_path

    enc, dec = pipeline.components.get("vae_encoder"), pipeline.by_role("vae_decoder")[0]
    if enc is None:
        raise CheckpointError("bundled weights hold the whole VAE; this pipeline has no vae_encoder")
    sd = {}
    for prefix, module in (("text_encoder.", pipeline.by_role("text_encoder")[0].module),
                           ("dit.", pipeline.by_role("dit")[0].module), ("vae.", enc.module), ("vae.", dec.module)):
        sd.update({prefix + k: v.detach().contiguous().clone() for k, v in module.state_dict().items()})
    import json

    configs_ = {"vae": enc.module.config, "dit": pipeline.by_role("dit")[0].module.config}
    meta = {ARCH_KEYS[k]: json.dumps(architecture_json(k, c)) for k, c in configs_.items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)


def build_preset(name: str, device: torch.device | str = "cpu", seed: int = 0) -> Pipeline:
    specs = preset_specs()
    if name not in specs:
        raise KeyError(name)
    spec = specs[name]
    weights = bundled_weights(name) if str(device) != "meta" else None
    with build_device(device, seed):
        tokenizers = text_mod.tiny_tokenizers() if name.endswith(("tiny", "smoke")) else None
        text = text_mod.SD3TextEncoder(spec.text, tokenizers)
    # with bundled weights the DiT and VAE are built on the meta device and take the file's tensors:
    # no init to overwrite, and no sincos table (its import costs a second of every `ndopt generate`)
    with build_device("meta" if weights is not None else device, seed):
        dit = dit_mod.PyramidMMDiT(spec.dit)
        vae = vae_mod.CausalVideoVAE(spec.vae)
    if weights is not None:  # the trained tiny teacher (issue: training engine and tiny teacher)
        _load_bundled(weights, text, dit, vae)
        dit, vae = dit.to(device), vae.to(device)
    elif str(device) != "meta":
        g = torch.Generator().manual_seed(seed)
        dit_mod.randomize_(dit, g)  # upstream init zeroes the output layers; a random preset must say something
    for m in (text, dit, vae):
        m.eval().requires_grad_(False)
    return assemble(name, text, dit, vae, spec)


def read_sampler_settings(path: Path, variant: str, dit: dit_mod.MMDiTConfig) -> dict:
    """PresetSpec's schedule and prompt fields for a checkpoint directory: upstream's defaults for the
    variant, updated by `ndopt_sampler.json` when ndopt wrote one (each value checked by type and range)."""
    h, w = (768, 1280) if variant == "768p" else (384, 640)
    # upstream checkpoints carry no sampler settings: upstream's defaults, unless ndopt wrote the dir
    settings: dict = {"height": h, "width": w, "latent_frames": 7}
    extra = Path(path) / SAMPLER_SETTINGS
    where = f"the {variant} default"
    if extra.exists():
        raw = ckpt.read_json_object(extra, "sampler settings")
        settings.update(configs.check(configs.SamplerSettingsFile, raw, extra, "sampler settings"))
        where = str(extra)
    # every pyramid stage's latent grid must be a whole number of DiT patches (sampler.check_resolution)
    need = VAE_SPATIAL * dit.patch_size * 2 ** (len(STAGE_RANGE) - 2)
    bad = [f"{k} = {settings[k]}" for k in ("height", "width") if settings[k] % need]
    if bad:
        raise configs.ConfigError(f"{where}: invalid sampler settings: {', '.join(bad)}: with {len(STAGE_RANGE) - 1} "
                                  f"pyramid stages, the 8x VAE and DiT patch {dit.patch_size}, height and width must "
                                  f"be multiples of {need}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}


def check_compatible(path: Path, dit: dit_mod.MMDiTConfig, vae: vae_mod.CausalVAEConfig,
                     text: text_mod.TextEncoderConfig, variant: str) -> None:
    """The components' configs fit together: the DiT reads the VAE's latents and the encoders' outputs."""
    dit_file = f"diffusion_transformer_{variant}/config.json"
    pairs = [
        ("in_channels", dit.in_channels, "causal_video_vae/config.json latent channels", vae.latent_channels),
        ("joint_attention_dim", dit.joint_attention_dim, "text_encoder_3/config.json d_model", text.context_dim),
        ("pooled_projection_dim", dit.pooled_projection_dim,
         "text_encoder/config.json + text_encoder_2/config.json projection_dim", text.pooled_dim),
    ]
    bad = [f"{dit_file} {key} = {a} but {other} = {b}" for key, a, other, b in pairs if a != b]
    if bad:
        raise configs.ConfigError(f"{path}: the components do not fit together: {'; '.join(bad)}; the configs "
                                  "come from different checkpoints: download the directory again")


def load_checkpoint_dir(path: Path, variant: str = "768p", dtype: torch.dtype = torch.float32,
                        device: str = "cpu") -> Pipeline:
    """A pipeline from an upstream Pyramid-Flow directory (see checkpoint.py for the layout).

    Every config (DiT, VAE, the three text encoders, `ndopt_sampler.json`) is read, checked by type and
    range and checked to fit the others before any module is built; then the DiT's and the VAE's weights
    load (checked finite and of the right dtype kind), then the text encoders (the largest)."""
    path = Path(path)
    dit_dir = path / f"diffusion_transformer_{variant}"
    if not dit_dir.is_dir():
        found = sorted(p.name for p in path.glob("diffusion_transformer_*"))
        raise CheckpointError(f"{path}: no diffusion_transformer_{variant}/ (found: {found or 'none'}); "
                              "pass the variant that exists")
    vae_dir = path / "causal_video_vae"
    dcfg = dit_mod.MMDiTConfig.from_dict(ckpt.read_config(dit_dir), source=dit_dir / ckpt.CONFIG_NAME)
    vcfg = vae_mod.CausalVAEConfig.from_dict(ckpt.read_config(vae_dir), source=vae_dir / ckpt.CONFIG_NAME)
    check_compatible(path, dcfg, vcfg, text_mod.config_from_dir(path), variant)
    settings = read_sampler_settings(path, variant, dcfg)
    with torch.device("meta"):
        dit = dit_mod.PyramidMMDiT(dcfg)
        vae = vae_mod.CausalVideoVAE(vcfg)
    ckpt.load_into(dit, ckpt.load_state_dict(dit_dir, dtype=dtype, device=device), source=str(dit_dir), assign=True)
    ckpt.load_into(vae, ckpt.load_state_dict(vae_dir, dtype=dtype, device=device), source=str(vae_dir), assign=True)
    text = text_mod.SD3TextEncoder.from_pretrained_dir(path, dtype=dtype, device=device)
    for m in (text, dit, vae):
        m.eval().requires_grad_(False)
    spec = PresetSpec(path.name, dcfg, vcfg, text.config, **settings)
    return assemble(spec.name, text, dit, vae, spec)


def dit_config_json(cfg: dit_mod.MMDiTConfig) -> dict:
    """The upstream `config.json` of a DiT (PyramidDiffusionMMDiT keys, with the inference path fixed).

    The flags upstream's loader forces (`dit.UPSTREAM_OVERRIDES`) are written with its values, so the
    file reads back as `cfg` with no override warning; a config upstream would load differently is
    refused."""
    from dataclasses import asdict

    values = asdict(cfg)
    forced = {k: (values[k], v) for k, v in dit_mod.UPSTREAM_OVERRIDES.items() if k in values and values[k] != v}
    if forced:
        listing = ", ".join(f"{k}={have!r}" for k, (have, _) in forced.items())
        raise CheckpointError(f"cannot write this DiT in upstream's layout: {listing}, but upstream's "
                              f"build_pyramid_dit loads every SD3 DiT with "
                              f"{', '.join(f'{k}={v!r}' for k, (_, v) in forced.items())}, a different model")
    return {"_class_name": "PyramidDiffusionMMDiT", **values, **dit_mod._REQUIRED_VALUES,
            **dit_mod.UPSTREAM_OVERRIDES, "use_flash_attn": False, "use_gradient_checkpointing": False}


def save_checkpoint_dir(pipeline: Pipeline, path: Path, variant: str = "768p") -> Path:
    """Write a Pyramid-Flow pipeline in the upstream directory layout (loadable by upstream and by ndopt)."""
    dit = pipeline.by_role("dit")[0].module
    dec = pipeline.by_role("vae_decoder")[0]
    enc = pipeline.components.get("vae_encoder")
    if enc is None:
        raise CheckpointError("the upstream layout stores the whole causal VAE: this pipeline has no vae_encoder "
                              "(save before dead_component_elimination)")
    vae = torch.nn.Module()  # upstream keys: encoder.*, quant_conv.*, post_quant_conv.*, decoder.*
    for name, sub in (*enc.module.named_children(), *dec.module.named_children()):
        vae.add_module(name, sub)
    path.mkdir(parents=True, exist_ok=True)
    ckpt.save_component(path / f"diffusion_transformer_{variant}", dit, dit_config_json(dit.config))
    ckpt.save_component(path / "causal_video_vae", vae, dec.attrs["config"].to_dict())
    pipeline.by_role("text_encoder")[0].module.save_pretrained_dir(path)
    sch, smp = pipeline.schedule, pipeline.sampler
    settings = {"height": sch.height, "width": sch.width, "latent_frames": sch.latent_frames,
                "steps": [st.steps for st in sch.stages], "video_steps": [st.video_steps for st in sch.stages],
                "guidance_scale": sch.guidance.scale, "video_guidance_scale": sch.guidance.video_scale,
                "prompt_suffix": smp.prompt_suffix, "negative_prompt": smp.negative_prompt}
    atomic_write_json(path / SAMPLER_SETTINGS, settings)
    return path
