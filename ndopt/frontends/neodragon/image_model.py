"""Neodragon's first-frame image model: SSD-1B (an SDXL UNet with transformer blocks removed) + LCM.

In Neodragon's hybrid mode the first video frame comes from a text-to-image model, SSD-1B with the
LCM scheduler at 4 steps (timesteps 999/749/499/249) and no classifier-free guidance; the video DiT
then generates the other frames from it. Three modules, each one future `image_model` component
whose entry is one static graph per input shape (exportable with `torch.onnx.export(dynamo=False)`,
buildable on the meta device for costing), and the sampling loop outside them:

    ImageTextEncoder.encode_tokens(clip_l_ids, clip_g_ids) -> (prompt_embeds, pooled)
    ImageUNet(sample, timestep, encoder_hidden_states, text_embeds, time_ids) -> model_output
    ImageDecoder(latents) -> image in [-1, 1]

The modules are diffusers/transformers models built from config dicts (nothing is downloaded):
`"ssd-1b-lcm"` is SSD-1B's real configuration, `"image-model-tiny"` the same family at tiny widths
with shipped trained weights (`train_image_model.py`). `generate_image` follows diffusers'
StableDiffusionXLPipeline + LCMScheduler loop step for step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from ndopt.errors import CheckpointError, NdoptError
from ndopt.frontends.pyramid_flow.checkpoint import load_into
from ndopt.frontends.pyramid_flow.presets import build_device
from ndopt.frontends.pyramid_flow.text import tiny_tokenizers
from ndopt.io import shipped_weights

log = logging.getLogger("ndopt")

TINY = "image-model-tiny"
PARTS = ("text_encoder", "unet", "decoder")  # the shipped weights' key prefixes


@dataclass(frozen=True)
class ImageModelConfig:
    """The image model's architecture (diffusers/transformers config dicts) and sampling settings."""

    unet: dict[str, Any]  # UNet2DConditionModel config
    vae: dict[str, Any]  # AutoencoderKL config (only post_quant_conv + decoder are built into the model)
    clip_l: dict[str, Any]  # CLIPTextConfig kwargs of text_encoder (CLIPTextModel)
    clip_g: dict[str, Any]  # CLIPTextConfig kwargs of text_encoder_2 (CLIPTextModelWithProjection)
    scheduler: dict[str, Any]  # LCMScheduler config (prediction_type comes from the field below)
    height: int
    width: int
    timesteps: tuple[int, ...] = (999, 749, 499, 249)  # Neodragon's 4 LCM steps
    prediction_type: str = "epsilon"
    clip_max_length: int = 77  # SDXL tokenizers' model_max_length

    def __hash__(self) -> int:  # the dicts are not hashable; their JSON is
        return hash(json.dumps([self.unet, self.vae, self.clip_l, self.clip_g, self.scheduler, self.height,
                                self.width, self.timesteps, self.prediction_type], sort_keys=True))

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (diffusers: 2 ** (len(block_out_channels) - 1))."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * 2 ** (len(self.unet["block_out_channels"]) - 1)  # UNet downsamplings too
        if height % f or width % f:
            raise NdoptError(f"image size {height}x{width}: height and width must be multiples of {f} "
                             f"(VAE x{self.vae_scale_factor}, then the UNet's downsamplings)")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def make_scheduler(self) -> LCMScheduler:
        return LCMScheduler.from_config({**self.scheduler, "prediction_type": self.prediction_type})


# ---- presets -------------------------------------------------------------------------------------
# SDXL's scheduler/scheduler_config.json (EulerDiscreteScheduler), which segmind/SSD-1B ships unchanged;
# lcm-ssd-1b's model card and diffusers' LCM test build the sampler as
# `LCMScheduler.from_config(pipe.scheduler.config)` from it. Keys LCMScheduler does not know are left out;
# the ones it has and this config lacks keep LCMScheduler's defaults (original_inference_steps 50,
# timestep_scaling 10.0).
_SDXL_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "trained_betas": None, "clip_sample": False,
                   "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
                   "sample_max_value": 1.0}


def _ssd_1b() -> ImageModelConfig:
    """segmind/SSD-1B (UNet as in latent-consistency/lcm-ssd-1b, an LCM fine-tune of the same architecture)."""
    unet = {
        # SDXL's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json) ...
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
        "flip_sin_to_cos": True, "freq_shift": 0, "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32,
        "norm_eps": 1e-5, "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],  # = heads (diffusers' naming)
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816, "time_cond_proj_dim": None,  # LCM-SDXL: no w-embedding
        # ... with SSD-1B's removals. Source: the per-block transformer depths ComfyUI matches SSD-1B's diffusers
        # state dict with (comfy/model_detection.py, SSD_1B: transformer_depth [0,0,2,2,4,4], transformer_depth_output
        # [0,0,0,1,1,2,10,4,4] consumed from the end, transformer_depth_middle -1 = a mid block of one resnet), the
        # model card ("a 1.3B parameter model which has several layers removed from the base SDXL"), and diffusers'
        # `reverse_transformer_layers_per_block` and num_layers=0 `UNetMidBlock2D`, which exist for such asymmetric
        # UNets. The parameter count this gives is the test's check against the card's 1.3B.
        "transformer_layers_per_block": [1, 2, 4],  # SDXL: [1, 2, 10]
        "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], [1, 1, 1]],  # SDXL: [[10]*3, [2]*3, [1]*3]
        "mid_block_type": "UNetMidBlock2D",  # SDXL: UNetMidBlock2DCrossAttn with 10 transformer layers
    }
    vae = {  # SDXL VAE (SSD-1B's vae/config.json)
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "sample_size": 1024,
        "scaling_factor": 0.13025, "force_upcast": True,
    }
    # SDXL's text_encoder (openai/clip-vit-large-patch14's text tower) and text_encoder_2 (OpenCLIP ViT-bigG/14's);
    # their configs keep the pre-2023 eos_token_id 2, with which transformers pools at argmax(input_ids) (the
    # tokenizer's <|endoftext|> 49407 is the largest id): as SDXL ran.
    clip = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "bos_token_id": 0,
            "eos_token_id": 2, "pad_token_id": 1}
    clip_l = {**clip, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}
    clip_g = {**clip, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
              "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}
    # Neodragon generates 640 x 1024 (height x width: landscape, as Pyramid-Flow's 768 x 1280)
    return ImageModelConfig(unet=unet, vae=vae, clip_l=clip_l, clip_g=clip_g, scheduler=dict(_SDXL_SCHEDULER),
                            height=640, width=1024, prediction_type="epsilon")


def _tiny() -> ImageModelConfig:
    """SSD-1B's family at tiny widths: CLIPs 32/48 wide (as the tiny SD3 text encoder), a 2-level UNet with
    cross-attention at the lower level and a resnet-only mid block, and a 4-level AutoencoderKL that
    downsamples x8 as SDXL's (128 x 128 images, 4 x 16 x 16 latents). A 2-level (x2) or 3-level (x4) VAE
    gives 64 x 64 or 32 x 32 latents: measured 4x and 16x the UNet's training cost per step on one CPU
    thread, more than the training budget of `train_image_model.py` allows."""
    tok = tiny_tokenizers().tokenizer  # special ids from the shipped tokenizer: CLIP pools at the first eos
    clip = {"vocab_size": len(tok), "max_position_embeddings": 77, "num_hidden_layers": 2,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    clip_l = {**clip, "hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 2, "projection_dim": 32,
              "hidden_act": "quick_gelu"}
    clip_g = {**clip, "hidden_size": 48, "intermediate_size": 192, "num_attention_heads": 4, "projection_dim": 48,
              "hidden_act": "gelu"}
    unet = {
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
        "block_out_channels": [32, 64], "layers_per_block": 1,  # SDXL: 2 (measured 2x the cost per step)
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2D", "transformer_layers_per_block": [1, 2],
        "reverse_transformer_layers_per_block": [[2, 1], [1, 1]],  # asymmetric, as SSD-1B's
        "norm_num_groups": 8, "cross_attention_dim": 32 + 48, "attention_head_dim": [2, 4],  # heads (16 wide)
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 48,  # 6 time ids x 8 + CLIP-G's projection
    }
    vae = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "act_fn": "silu",
           "block_out_channels": [8, 16, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 4,
           # 2 groups: with one channel per group GroupNorm is an instance norm, which removes every channel's
           # spatial mean, i.e. a plain background's colour (measured: 4x slower to learn)
           "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 2, "sample_size": 128,
           # SDXL's factor: training reparametrises the tiny VAE (exactly) so that latents x 0.13025 have
           # zero mean and unit variance per channel, as SDXL's latents roughly do
           "scaling_factor": 0.13025}
    # trained at exactly these 4 timesteps (x0 prediction, train_image_model.py): its "distillation grid" is
    # the 4-step one, on which 249/499/749/999 lie (LCMScheduler checks custom timesteps against it)
    scheduler = {**_SDXL_SCHEDULER, "original_inference_steps": 4}
    return ImageModelConfig(unet=unet, vae=vae, clip_l=clip_l, clip_g=clip_g, scheduler=scheduler,
                            height=128, width=128, prediction_type="sample")


PRESETS = {"ssd-1b-lcm": _ssd_1b, TINY: _tiny}


def preset_config(name: str) -> ImageModelConfig:
    if name not in PRESETS:
        raise NdoptError(f"unknown image model preset {name!r}; one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ---- modules -------------------------------------------------------------------------------------
class ImageTextEncoder(nn.Module):
    """SDXL's two CLIP text encoders: ids -> (prompt_embeds [B, 77, L + G], pooled [B, G_proj]).

    As diffusers' StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate hidden states
    concatenated on the feature axis, and CLIP-G's projected pooled output. Submodule names are
    SDXL's (`text_encoder`, `text_encoder_2`), so its checkpoints map 1:1.
    """

    def __init__(self, config: ImageModelConfig,
                 tokenizers: tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase] | None = None) -> None:
        super().__init__()
        self.max_length = config.clip_max_length
        self.tokenizers = tokenizers  # (CLIP-L's, CLIP-G's), for `encode`; None on meta / without files
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**config.clip_l))
        self.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config.clip_g))

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Ids padded to max length, truncated, with special tokens (encode_prompt's tokenizer call)."""
        if self.tokenizers is None:
            raise NdoptError("ImageTextEncoder has no tokenizers: build the tiny preset, or set "
                             "`encoder.tokenizers = (CLIP-L tokenizer, CLIP-G tokenizer)`")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = [tok(texts, padding="max_length", max_length=self.max_length, truncation=True,
                   return_tensors="pt").input_ids for tok in self.tokenizers]
        return {"clip_l_ids": ids[0], "clip_g_ids": ids[1]}

    def encode_tokens(self, clip_l_ids: Tensor, clip_g_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The traced entry: token ids -> (prompt_embeds, pooled)."""
        out_l = self.text_encoder(input_ids=clip_l_ids, output_hidden_states=True)
        out_g = self.text_encoder_2(input_ids=clip_g_ids, output_hidden_states=True)
        prompt_embeds = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)  # clip_skip None
        return prompt_embeds, out_g.text_embeds

    forward = encode_tokens  # hooks on __call__ see the entry too

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        device = self.text_encoder.get_input_embeddings().weight.device
        return self.encode_tokens(**{k: v.to(device) for k, v in self.tokenize(texts).items()})


class ImageUNet(nn.Module):
    """SDXL-style UNet: (noisy latents, timestep, text states, pooled text, time ids) -> model output."""

    def __init__(self, config: ImageModelConfig) -> None:
        super().__init__()
        self.unet = UNet2DConditionModel.from_config(config.unet)

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, text_embeds: Tensor,
                time_ids: Tensor) -> Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]


class ImageDecoder(nn.Module):
    """AutoencoderKL's post_quant_conv + decoder (inference needs no encoder): scaled latents -> image in [-1, 1]."""

    def __init__(self, config: ImageModelConfig, autoencoder: AutoencoderKL | None = None) -> None:
        super().__init__()
        vae = autoencoder if autoencoder is not None else AutoencoderKL.from_config(config.vae)
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder  # shared with `autoencoder`
        self.scaling_factor = float(config.vae["scaling_factor"])

    def forward(self, latents: Tensor) -> Tensor:
        # diffusers: vae.decode(latents / scaling_factor); the image processor clamps to [-1, 1]
        return self.decoder(self.post_quant_conv(latents / self.scaling_factor)).clamp(-1, 1)


@dataclass(frozen=True)
class ImageModel:
    text_encoder: ImageTextEncoder
    unet: ImageUNet
    decoder: ImageDecoder
    config: ImageModelConfig
    scheduler: LCMScheduler = field(repr=False)

    def parts(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "unet": self.unet, "decoder": self.decoder}


def bundled_weights(name: str = TINY) -> Path | None:
    """The shipped weights `weights/<name>.safetensors` of this package, if installed."""
    return shipped_weights(__package__, f"{name}.safetensors")



def build_image_model(preset: str, device: torch.device | str = "cpu", seed: int = 0, *,
                      weights: bool | Path | str = True) -> ImageModel:
    """The preset's three modules (eval mode, frozen) and its LCM scheduler.

    On "meta" nothing is allocated or loaded. Otherwise `weights=True` loads the shipped weights of the
    preset when the package has them (the tiny preset), a path loads that file (keys prefixed
    `text_encoder.`, `unet.`, `decoder.`), and False keeps the seeded random initialisation."""
    config = preset_config(preset)
    tokenizers = None
    if preset == TINY:  # one shipped tokenizer for both encoders (the real ones need SDXL's tokenizer files)
        tok = tiny_tokenizers().tokenizer
        tokenizers = (tok, tok)
    with build_device(device, seed):
        text = ImageTextEncoder(config, tokenizers)
        unet = ImageUNet(config)
        decoder = ImageDecoder(config)
    model = ImageModel(text, unet, decoder, config, config.make_scheduler())
    if str(device) != "meta" and weights is not False:
        path = bundled_weights(preset) if weights is True else Path(weights)
        if path is not None:
            load_weights(model, path)
    for m in model.parts().values():
        m.eval().requires_grad_(False)
    return model


def load_weights(model: ImageModel, path: Path) -> None:
    """Load one safetensors file with `text_encoder.`, `unet.` and `decoder.` prefixed keys (checked)."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types (missing or corrupt file)
        raise CheckpointError(f"{path}: cannot read image model weights ({e})") from None
    stray = sorted(k for k in sd if k.split(".", 1)[0] not in PARTS)
    if stray:
        raise CheckpointError(f"{path}: {len(stray)} keys outside {', '.join(p + '.' for p in PARTS)} "
                              f"({', '.join(stray[:20])}): not an image model weights file")
    for prefix, module in model.parts().items():
        part = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
        load_into(module, part, source=f"{path} [{prefix}]")


def state_dict(model: ImageModel) -> dict[str, Tensor]:
    """The weights in the shipped format (what `load_weights` reads)."""
    return {f"{p}.{k}": v.detach().cpu().contiguous().clone()
            for p, m in model.parts().items() for k, v in m.state_dict().items()}


def image_model_params(model: ImageModel) -> dict[str, int]:
    """Parameters per part (clip_l + clip_g = text_encoder), counted on the modules (meta works)."""
    def n(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    te = model.text_encoder
    return {"clip_l": n(te.text_encoder), "clip_g": n(te.text_encoder_2), "text_encoder": n(te),
            "unet": n(model.unet), "decoder": n(model.decoder)}


# ---- sampling ------------------------------------------------------------------------------------
def standard_normal(generator: torch.Generator | np.random.Generator, shape: tuple[int, ...],
                    device: torch.device | str = "cpu") -> Tensor:
    """float32 N(0, 1) noise from a torch generator (as diffusers' randn_tensor) or a numpy one (what an
    ONNX runtime driver draws, so both give the same image)."""
    if isinstance(generator, np.random.Generator):
        return torch.from_numpy(generator.standard_normal(shape, dtype=np.float32)).to(device)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def time_ids(height: int, width: int, batch: int) -> Tensor:
    """SDXL's micro-conditioning: original size, crop top-left (0, 0), target size (_get_add_time_ids)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)


@torch.no_grad()
def generate_image(model: ImageModel, prompts: list[str], *, generator: torch.Generator | np.random.Generator,
                   height: int | None = None, width: int | None = None) -> Tensor:
    """LCM multistep sampling, no guidance: [B, 3, H, W] in [-1, 1].

    As StableDiffusionXLPipeline with LCMScheduler (and LatentConsistencyModelPipeline): latents
    = noise x init_noise_sigma; per timestep the UNet's output goes through `scheduler.step`, whose
    `denoised` applies LCM's boundary-condition scalings (c_skip x sample + c_out x x0); between steps
    the denoised latents are noised to the next timestep with fresh noise from `generator` (the
    step's own formula, sqrt(a_prev) x denoised + sqrt(1 - a_prev) x noise, through `add_noise`, so a
    numpy generator works too; with a torch generator the draws are diffusers' in the same order);
    the last step's denoised latents are decoded.
    """
    cfg = model.config
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    height, width = height or cfg.height, width or cfg.width
    lh, lw = cfg.latent_size(height, width)
    unet = model.unet
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    prompt_embeds, pooled = model.text_encoder.encode(prompts)
    prompt_embeds, pooled = prompt_embeds.to(device, dtype), pooled.to(device, dtype)
    ids = time_ids(height, width, len(prompts)).to(device, dtype)

    scheduler = LCMScheduler.from_config(model.scheduler.config)  # fresh: set_timesteps/step keep state
    scheduler.set_timesteps(timesteps=list(cfg.timesteps), device=device)
    shape = (len(prompts), cfg.unet["in_channels"], lh, lw)
    latents = standard_normal(generator, shape, device).to(dtype) * scheduler.init_noise_sigma
    steps = scheduler.timesteps
    denoised = latents
    for i, t in enumerate(steps):
        out = unet(latents, t.expand(len(prompts)).to(dtype), prompt_embeds, pooled, ids)
        # step's own noise draw is replaced below (it cannot take a numpy generator): a throwaway stream
        _, denoised = scheduler.step(out, t, latents, generator=torch.Generator(device).manual_seed(0),
                                     return_dict=False)
        if i + 1 < len(steps):
            noise = standard_normal(generator, shape, device).to(dtype)
            latents = scheduler.add_noise(denoised, noise, steps[i + 1:i + 2])
    return model.decoder(denoised)
