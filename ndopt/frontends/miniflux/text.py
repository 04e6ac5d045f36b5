"""miniFLUX's text conditioning: prompts -> T5 sequence, T5 mask, CLIP-L pooled output.

Mirrors upstream ``FluxTextEncoderWithMask`` (``pyramid_dit/flux_modules/modeling_text_encoder.py``):
CLIP-L is a plain ``CLIPTextModel`` (``text_encoder``) whose ``pooler_output`` (the final-layer
state at the first end token, hidden width 768, no projection) feeds the DiT's pooled embedding, and
the T5-XXL encoder (``text_encoder_2``) gives the 128-token sequence plus its attention mask. As in
the SD3 variant (`pyramid_flow.text`, whose tokenizer asset, config checks and loaders are reused),
models are built from config dicts, so the real size builds on the meta device and the tiny preset
runs the same code on a CPU; a checkpoint's configs are checked before transformers reads them.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase, T5Config, T5EncoderModel

from ndopt.errors import CheckpointError, NdoptError
from ndopt.frontends.pyramid_flow import text as sd3_text
from ndopt.frontends.pyramid_flow.checkpoint import read_config, read_json_object
from ndopt.frontends.pyramid_flow.configs import check_text_config

__all__ = ["MODEL_SUBDIRS", "TOKENIZER_SUBDIRS", "FluxTextEncoderConfig", "FluxTokenizers", "MiniFluxTextEncoder",
           "config_from_dir", "real_config", "tiny_config", "tiny_tokenizers"]

log = logging.getLogger(__name__)

# Upstream checkpoint layout (rain1011/pyramid-flow-miniflux): subdirectory -> what it must hold.
MODEL_SUBDIRS: dict[str, str] = {"text_encoder": "CLIP-L CLIPTextModel", "text_encoder_2": "T5 T5EncoderModel"}
TOKENIZER_SUBDIRS: dict[str, str] = {"tokenizer": "CLIP-L tokenizer", "tokenizer_2": "T5 tokenizer"}
CONFIG_KINDS: dict[str, str] = {"text_encoder": "clip", "text_encoder_2": "t5"}


@dataclass(frozen=True)
class FluxTextEncoderConfig:
    """Configs of the two encoders, as transformers config dicts, and the padded lengths."""

    t5: dict[str, Any]  # T5Config kwargs
    clip_l: dict[str, Any]  # CLIPTextConfig kwargs
    max_sequence_length: int = 128  # upstream _get_t5_prompt_embeds default
    clip_max_length: int = 77  # upstream: the CLIP tokenizer's model_max_length

    @property
    def context_dim(self) -> int:
        """Width of the T5 sequence fed to the DiT's ``context_embedder``."""
        return int(self.t5_config().d_model)

    @property
    def pooled_dim(self) -> int:
        """Width of CLIP-L's pooled output (its hidden size: upstream uses no text projection)."""
        return int(self.clip_l_config().hidden_size)

    def __hash__(self) -> int:
        fields = (self.t5, self.clip_l, self.max_sequence_length, self.clip_max_length)
        return hash(json.dumps(fields, sort_keys=True, default=str))

    def t5_config(self) -> T5Config:
        return T5Config(**copy.deepcopy(self.t5))

    def clip_l_config(self) -> CLIPTextConfig:
        return CLIPTextConfig(**copy.deepcopy(self.clip_l))


@dataclass(frozen=True)
class FluxTokenizers:
    """The two tokenizers, named as upstream's subdirectories."""

    tokenizer: PreTrainedTokenizerBase  # CLIP-L
    tokenizer_2: PreTrainedTokenizerBase  # T5

    @classmethod
    def from_pretrained_dir(cls, model_dir: Path) -> FluxTokenizers:
        """Load ``model_dir/{tokenizer,tokenizer_2}`` offline."""
        _require_subdirs(Path(model_dir), TOKENIZER_SUBDIRS)
        return cls(*(sd3_text._load_tokenizer(Path(model_dir) / name) for name in TOKENIZER_SUBDIRS))

    def save_pretrained_dir(self, model_dir: Path) -> None:
        for name in TOKENIZER_SUBDIRS:
            sd3_text._write_subdir(Path(model_dir), name, getattr(self, name).save_pretrained)


def tiny_tokenizers() -> FluxTokenizers:
    """The SD3 variant's shipped tiny tokenizer, for both encoders."""
    tok = sd3_text.tiny_tokenizers().tokenizer
    return FluxTokenizers(tok, tok)


class MiniFluxTextEncoder(nn.Module):
    """prompts -> (prompt_embeds [B, L, context_dim], attention_mask [B, L] int64, pooled [B, pooled_dim]).

    Submodule names are upstream's; the encoders are frozen and in eval mode (upstream ``_freeze``)."""

    # what the bundle's tokenize op makes (targets.bundle): (tokenizer attribute, ids input, mask input or
    # None, config field of the padded length), the SD3 table's T5 and CLIP-L rows under upstream's names
    tokenizer_inputs = (("tokenizer_2", "t5_ids", "t5_mask", "max_sequence_length"),
                        ("tokenizer", "clip_l_ids", None, "clip_max_length"))

    def __init__(self, config: FluxTextEncoderConfig, tokenizers: FluxTokenizers | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizers = tokenizers
        self.text_encoder = CLIPTextModel(config.clip_l_config())
        self.text_encoder_2 = T5EncoderModel(config.t5_config())
        positions = self.text_encoder.config.max_position_embeddings
        if config.clip_max_length > positions:
            raise NdoptError(f"FluxTextEncoderConfig.clip_max_length={config.clip_max_length} exceeds text_encoder's "
                             f"max_position_embeddings={positions}; lower clip_max_length to at most {positions}")
        self.requires_grad_(False)
        self.eval()

    def tokenize(self, prompts: list[str] | str) -> dict[str, Tensor]:
        """Token ids for each encoder and the T5 mask, padded to max length (T5 128, CLIP 77), as upstream
        (`padding="max_length"`, truncation, the tokenizers' special tokens)."""
        if self.tokenizers is None:
            raise NdoptError("MiniFluxTextEncoder has no tokenizers: pass FluxTokenizers(...) (tiny_tokenizers() "
                             "for the tiny preset) or load with MiniFluxTextEncoder.from_pretrained_dir")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        t5 = sd3_text.SD3TextEncoder._tokenize(self.tokenizers.tokenizer_2, prompts, self.config.max_sequence_length)
        clip = sd3_text.SD3TextEncoder._tokenize(self.tokenizers.tokenizer, prompts, self.config.clip_max_length)
        return {"t5_ids": t5["input_ids"], "t5_mask": t5["attention_mask"], "clip_l_ids": clip["input_ids"]}

    def encode_tokens(self, t5_ids: Tensor, t5_mask: Tensor, clip_l_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pure tensor function (what export and lowering trace): ids -> (embeds, mask, pooled)."""
        prompt_embeds = self.text_encoder_2(input_ids=t5_ids, attention_mask=t5_mask).last_hidden_state
        pooled = self.text_encoder(input_ids=clip_l_ids).pooler_output  # upstream passes no CLIP mask
        return prompt_embeds, t5_mask, pooled

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        device = self.text_encoder_2.shared.weight.device
        tokens = {k: v.to(device) for k, v in self.tokenize(prompts).items()}
        return self.encode_tokens(**tokens)

    @classmethod
    def from_pretrained_dir(cls, model_dir: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                            max_sequence_length: int = 128, clip_max_length: int = 77) -> MiniFluxTextEncoder:
        """Load upstream's layout ``model_dir/{text_encoder,text_encoder_2,tokenizer,tokenizer_2}`` offline."""
        model_dir = Path(model_dir)
        check_configs(model_dir, clip_max_length)
        clip = sd3_text._load_model(CLIPTextModel, model_dir / "text_encoder", dtype)
        t5 = sd3_text._load_model(T5EncoderModel, model_dir / "text_encoder_2", dtype)
        config = FluxTextEncoderConfig(t5=sd3_text._config_dict(t5), clip_l=sd3_text._config_dict(clip),
                                       max_sequence_length=max_sequence_length, clip_max_length=clip_max_length)
        tokenizers = FluxTokenizers.from_pretrained_dir(model_dir)
        with torch.device("meta"):  # the shell is free at any size; the loaded encoders go in it
            encoder = cls(config, tokenizers)
        encoder.text_encoder, encoder.text_encoder_2 = clip, t5
        encoder.requires_grad_(False)
        log.info("loaded miniFLUX text encoders from %s", model_dir)
        return encoder.to(device).eval()

    def save_pretrained_dir(self, model_dir: Path) -> None:
        """Write upstream's layout (config.json + safetensors per encoder, and the tokenizers)."""
        model_dir = Path(model_dir)
        if self.tokenizers is None:
            raise NdoptError(f"cannot save to {model_dir}: MiniFluxTextEncoder has no tokenizers, and "
                             "from_pretrained_dir needs tokenizer and tokenizer_2; pass FluxTokenizers(...)")
        meta = [n for n, p in self.named_parameters() if p.is_meta]
        if meta:
            raise NdoptError(f"cannot save to {model_dir}: {len(meta)} parameters are on the meta device "
                             f"(first: {meta[0]}); build or load the encoder with real weights first")
        for name in MODEL_SUBDIRS:
            sd3_text._write_subdir(model_dir, name, getattr(self, name).save_pretrained)
        self.tokenizers.save_pretrained_dir(model_dir)


def tiny_config() -> FluxTextEncoderConfig:
    """Tiny preset: the SD3 tiny preset's T5 (d_model 64) and CLIP-L (hidden 32, so pooled 32)."""
    sd3 = sd3_text.tiny_config()
    return FluxTextEncoderConfig(t5=sd3.t5, clip_l=sd3.clip_l)


def real_config() -> FluxTextEncoderConfig:
    """miniFLUX's encoders at full size: the T5-XXL (v1.1) encoder and the CLIP ViT-L/14 text tower,
    the same models as the SD3 variant's text_encoder_3 and text_encoder (CLIP-L read without projection)."""
    sd3 = sd3_text.real_config()
    return FluxTextEncoderConfig(t5=sd3.t5, clip_l=sd3.clip_l)


def _require_subdirs(model_dir: Path, expected: dict[str, str], *, weights: bool = True) -> None:
    """Name every missing subdirectory at once (model subdirectories also need config + weights)."""
    problems = []
    for name, what in expected.items():
        sub = model_dir / name
        if not sub.is_dir():
            problems.append(f"{sub} is missing (expected the {what})")
        elif name in MODEL_SUBDIRS and not (sub / "config.json").is_file():
            problems.append(f"{sub}/config.json is missing (expected the {what}'s config)")
        elif name in MODEL_SUBDIRS and weights and not any(sub.glob("*.safetensors")):
            problems.append(f"{sub} has no *.safetensors (expected the {what}'s weights, model.safetensors or "
                            "shards with model.safetensors.index.json)")
    if problems:
        raise CheckpointError("; ".join(problems) + f". Point model_dir at a miniFLUX checkpoint in upstream's "
                              f"layout ({', '.join(expected)}).")


def check_configs(model_dir: Path, clip_max_length: int | None = None, *,
                  weights: bool = True) -> dict[str, dict[str, Any]]:
    """The subdirectories present and each encoder's ``config.json`` checked by type and range before
    transformers builds anything from it; returns the configs by subdirectory."""
    _require_subdirs(Path(model_dir), {**MODEL_SUBDIRS, **TOKENIZER_SUBDIRS}, weights=weights)
    configs = {}
    for name, kind in CONFIG_KINDS.items():
        path = Path(model_dir) / name / "config.json"
        configs[name] = read_config(path.parent)
        check_text_config(configs[name], kind, path, clip_max_length if kind == "clip" else None)
    for name in TOKENIZER_SUBDIRS:  # transformers fails on a non-object with an AttributeError
        for path in sorted((Path(model_dir) / name).glob("*.json")):
            read_json_object(path, "tokenizer file")
    return configs


def config_from_dir(model_dir: Path, max_sequence_length: int = 128, clip_max_length: int = 77, *,
                    weights: bool = True) -> FluxTextEncoderConfig:
    """The encoders' configuration from a checkpoint's ``config.json`` files (checked), without building them."""
    configs = check_configs(model_dir, clip_max_length, weights=weights)
    for cfg in configs.values():  # the architecture only
        for key in ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures"):
            cfg.pop(key, None)
    return FluxTextEncoderConfig(t5=configs["text_encoder_2"], clip_l=configs["text_encoder"],
                                 max_sequence_length=max_sequence_length, clip_max_length=clip_max_length)
