"""Pyramid-Flow's text conditioning (SD3 style): prompts -> T5 sequence, T5 mask, CLIP pooled.

Mirrors upstream ``SD3TextEncoderWithMask`` (``pyramid_dit/mmdit_modules/modeling_text_encoder.py``):
CLIP-L (``text_encoder``) and CLIP-G (``text_encoder_2``) ``CLIPTextModelWithProjection`` pooled
projections are concatenated (768 + 1280 = 2048) for the DiT's time/text embedding, and the T5-XXL
encoder (``text_encoder_3``) gives the 128-token sequence for ``context_embedder`` plus its attention
mask. Models are built from config dicts with transformers (nothing is downloaded), so the real size
builds on the meta device for planning, and the tiny preset runs the same code on a CPU. A checkpoint's
encoder configs are checked by type and range before transformers builds anything, and its weights
for dtype kind and finiteness once loaded (transformers would cast an integer weight silently).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from ndopt.errors import CheckpointError, NdoptError
from ndopt.frontends.pyramid_flow.checkpoint import find_weight_files, read_config, read_json_object
from ndopt.frontends.pyramid_flow.configs import check_text_config
from ndopt.io import atomic_dir
from ndopt.saved_weights import check_finite, dtype_mismatches

log = logging.getLogger(__name__)

# Upstream checkpoint layout: subdirectory -> what it must hold.
MODEL_SUBDIRS: dict[str, str] = {
    "text_encoder": "CLIP-L CLIPTextModelWithProjection",
    "text_encoder_2": "CLIP-G CLIPTextModelWithProjection",
    "text_encoder_3": "T5 T5EncoderModel",
}
TOKENIZER_SUBDIRS: dict[str, str] = {
    "tokenizer": "CLIP-L tokenizer",
    "tokenizer_2": "CLIP-G tokenizer",
    "tokenizer_3": "T5 tokenizer",
}
TINY_TOKENIZER = "assets/tiny_tokenizer"  # package data, relative to this package
# the kind of config each model subdirectory holds (configs.check_text_config)
CONFIG_KINDS: dict[str, str] = {"text_encoder": "clip", "text_encoder_2": "clip", "text_encoder_3": "t5"}


@dataclass(frozen=True)
class TextEncoderConfig:
    """Configs of the three encoders, as transformers config dicts, and the padded lengths."""

    t5: dict[str, Any]  # T5Config kwargs
    clip_l: dict[str, Any]  # CLIPTextConfig kwargs
    clip_g: dict[str, Any]  # CLIPTextConfig kwargs
    max_sequence_length: int = 128  # upstream _get_t5_prompt_embeds default
    clip_max_length: int = 77  # upstream: the CLIP tokenizer's model_max_length

    @property
    def context_dim(self) -> int:
        """Width of the T5 sequence fed to the DiT's ``context_embedder``."""
        return int(self.t5_config().d_model)

    @property
    def pooled_dim(self) -> int:
        """Width of the concatenated CLIP-L + CLIP-G pooled projections."""
        return int(self.clip_l_config().projection_dim + self.clip_g_config().projection_dim)

    def __hash__(self) -> int:
        # The dicts are not hashable; their JSON is (configs are JSON by construction).
        fields = (self.t5, self.clip_l, self.clip_g, self.max_sequence_length, self.clip_max_length)
        return hash(json.dumps(fields, sort_keys=True, default=str))

    def t5_config(self) -> T5Config:
        return T5Config(**copy.deepcopy(self.t5))

    def clip_l_config(self) -> CLIPTextConfig:
        return CLIPTextConfig(**copy.deepcopy(self.clip_l))

    def clip_g_config(self) -> CLIPTextConfig:
        return CLIPTextConfig(**copy.deepcopy(self.clip_g))


@dataclass(frozen=True)
class Tokenizers:
    """The three tokenizers, named as upstream's subdirectories."""

    tokenizer: PreTrainedTokenizerBase  # CLIP-L
    tokenizer_2: PreTrainedTokenizerBase  # CLIP-G
    tokenizer_3: PreTrainedTokenizerBase  # T5

    @classmethod
    def shared(cls, tokenizer: PreTrainedTokenizerBase) -> Tokenizers:
        """One tokenizer for all three encoders (the tiny preset)."""
        return cls(tokenizer, tokenizer, tokenizer)

    @classmethod
    def from_pretrained_dir(cls, model_dir: Path) -> Tokenizers:
        """Load ``model_dir/{tokenizer,tokenizer_2,tokenizer_3}`` offline."""
        model_dir = Path(model_dir)
        _require_subdirs(model_dir, TOKENIZER_SUBDIRS)
        loaded = [_load_tokenizer(model_dir / name) for name in TOKENIZER_SUBDIRS]
        return cls(*loaded)

    def save_pretrained_dir(self, model_dir: Path) -> None:
        """Write ``model_dir/{tokenizer,tokenizer_2,tokenizer_3}`` (each subdirectory atomically)."""
        for name in TOKENIZER_SUBDIRS:
            _write_subdir(Path(model_dir), name, getattr(self, name).save_pretrained)


class SD3TextEncoder(nn.Module):
    """prompts -> (prompt_embeds [B, L, context_dim], attention_mask [B, L] int64, pooled [B, pooled_dim]).

    Submodule names are upstream's, so an upstream checkpoint directory maps 1:1. As upstream
    (``_freeze``), the encoders are frozen and in eval mode: they condition, they do not train.
    """

    def __init__(self, config: TextEncoderConfig, tokenizers: Tokenizers | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizers = tokenizers
        self.text_encoder = CLIPTextModelWithProjection(config.clip_l_config())
        self.text_encoder_2 = CLIPTextModelWithProjection(config.clip_g_config())
        self.text_encoder_3 = T5EncoderModel(config.t5_config())
        for name in ("text_encoder", "text_encoder_2"):
            positions = getattr(self, name).config.max_position_embeddings
            if config.clip_max_length > positions:
                raise NdoptError(
                    f"TextEncoderConfig.clip_max_length={config.clip_max_length} exceeds {name}'s "
                    f"max_position_embeddings={positions}; lower clip_max_length to at most {positions}"
                )
        self.requires_grad_(False)
        self.eval()

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """Token ids for each encoder and the T5 mask, padded to max length (T5 128, CLIP 77)."""
        if self.tokenizers is None:
            raise NdoptError(
                "SD3TextEncoder has no tokenizers: pass Tokenizers(...) (tiny_tokenizers() for the "
                "tiny preset) or load with SD3TextEncoder.from_pretrained_dir"
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        t5 = self._tokenize(self.tokenizers.tokenizer_3, prompts, self.config.max_sequence_length)
        clip_l = self._tokenize(self.tokenizers.tokenizer, prompts, self.config.clip_max_length)
        clip_g = self._tokenize(self.tokenizers.tokenizer_2, prompts, self.config.clip_max_length)
        return {
            "t5_ids": t5["input_ids"],
            "t5_mask": t5["attention_mask"],
            "clip_l_ids": clip_l["input_ids"],
            "clip_g_ids": clip_g["input_ids"],
        }

    @staticmethod
    def _tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], length: int) -> Any:
        # upstream: padding="max_length", truncation=True, add_special_tokens=True
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )

    def encode_tokens(
        self, t5_ids: Tensor, t5_mask: Tensor, clip_l_ids: Tensor, clip_g_ids: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Pure tensor function (what export and lowering trace): ids -> (embeds, mask, pooled)."""
        prompt_embeds = self.text_encoder_3(input_ids=t5_ids, attention_mask=t5_mask).last_hidden_state
        # CLIP pools at the first eos (config.eos_token_id) and projects; upstream passes no mask.
        pooled_l = self.text_encoder(input_ids=clip_l_ids).text_embeds
        pooled_g = self.text_encoder_2(input_ids=clip_g_ids).text_embeds
        return prompt_embeds, t5_mask, torch.cat([pooled_l, pooled_g], dim=-1)

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        device = self.text_encoder_3.shared.weight.device
        tokens = {k: v.to(device) for k, v in self.tokenize(prompts).items()}
        return self.encode_tokens(**tokens)

    @classmethod
    def from_pretrained_dir(
        cls,
        model_dir: Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_sequence_length: int = 128,
        clip_max_length: int = 77,
    ) -> SD3TextEncoder:
        """Load upstream's layout ``model_dir/{text_encoder,..._3,tokenizer,..._3}`` offline."""
        model_dir = Path(model_dir)
        check_configs(model_dir, clip_max_length)  # the layout, and the configs before transformers reads them
        clip_l = _load_model(CLIPTextModelWithProjection, model_dir / "text_encoder", dtype)
        clip_g = _load_model(CLIPTextModelWithProjection, model_dir / "text_encoder_2", dtype)
        t5 = _load_model(T5EncoderModel, model_dir / "text_encoder_3", dtype)
        config = TextEncoderConfig(
            t5=_config_dict(t5),
            clip_l=_config_dict(clip_l),
            clip_g=_config_dict(clip_g),
            max_sequence_length=max_sequence_length,
            clip_max_length=clip_max_length,
        )
        tokenizers = Tokenizers.from_pretrained_dir(model_dir)
        # Build the shell on meta (free at any size), then put the loaded encoders in it.
        with torch.device("meta"):
            encoder = cls(config, tokenizers)
        encoder.text_encoder, encoder.text_encoder_2, encoder.text_encoder_3 = clip_l, clip_g, t5
        encoder.requires_grad_(False)
        log.info("loaded SD3 text encoders from %s", model_dir)
        return encoder.to(device).eval()

    def save_pretrained_dir(self, model_dir: Path) -> None:
        """Write upstream's layout (config.json + safetensors per encoder, and the tokenizers)."""
        model_dir = Path(model_dir)
        if self.tokenizers is None:
            raise NdoptError(
                f"cannot save to {model_dir}: SD3TextEncoder has no tokenizers, and "
                "from_pretrained_dir needs tokenizer, tokenizer_2, tokenizer_3; pass Tokenizers(...)"
            )
        meta = [n for n, p in self.named_parameters() if p.is_meta]
        if meta:
            raise NdoptError(
                f"cannot save to {model_dir}: {len(meta)} parameters are on the meta device "
                f"(first: {meta[0]}); build or load the encoder with real weights first"
            )
        for name in MODEL_SUBDIRS:
            _write_subdir(model_dir, name, getattr(self, name).save_pretrained)
        self.tokenizers.save_pretrained_dir(model_dir)


def tiny_tokenizers() -> Tokenizers:
    """The shipped tiny tokenizer (package data), shared by all three encoders."""
    root = resources.files(__package__) / TINY_TOKENIZER
    with resources.as_file(root) as path:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    return Tokenizers.shared(tokenizer)


def tiny_config() -> TextEncoderConfig:
    """Tiny preset: T5 d_model 64 (2 layers), CLIP-L/G hidden 32/48, pooled 32 + 32 = 64."""
    tok = tiny_tokenizers().tokenizer
    # Special ids come from the shipped tokenizer: CLIP pools at the first eos_token_id.
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vocab = len(tok)
    clip = {"vocab_size": vocab, "num_hidden_layers": 2, "max_position_embeddings": 77, **ids}
    return TextEncoderConfig(
        t5={
            "vocab_size": vocab,
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 128,
            "num_layers": 2,
            "num_heads": 4,
            "feed_forward_proj": "gated-gelu",
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        clip_l={
            **clip,
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
        },
        clip_g={
            **clip,
            "hidden_size": 48,
            "intermediate_size": 192,
            "num_attention_heads": 4,
            "projection_dim": 32,
            "hidden_act": "gelu",
        },
    )


def real_config() -> TextEncoderConfig:
    """Pyramid-Flow SD3's encoders at full size: T5-XXL (v1.1) encoder, CLIP-L/14, OpenCLIP bigG/14."""
    return TextEncoderConfig(
        # google/t5-v1_1-xxl (SD3's text_encoder_3)
        t5={
            "vocab_size": 32128,
            "d_model": 4096,
            "d_kv": 64,
            "d_ff": 10240,
            "num_layers": 24,
            "num_heads": 64,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu",
            "layer_norm_epsilon": 1e-6,
            "tie_word_embeddings": False,
        },
        # CLIP ViT-L/14 text tower (SD3's text_encoder); <|startoftext|> 49406, <|endoftext|> 49407
        clip_l={
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "bos_token_id": 49406,
            "eos_token_id": 49407,
        },
        # OpenCLIP ViT-bigG/14 text tower (SD3's text_encoder_2)
        clip_g={
            "vocab_size": 49408,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "projection_dim": 1280,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "bos_token_id": 49406,
            "eos_token_id": 49407,
        },
    )


def _require_subdirs(model_dir: Path, expected: dict[str, str], *, weights: bool = True) -> None:
    """Name every missing subdirectory at once (model subdirectories also need config + weights)."""
    problems = []
    for name, what in expected.items():
        sub = model_dir / name
        needs_weights = name in MODEL_SUBDIRS
        if not sub.is_dir():
            problems.append(f"{sub} is missing (expected the {what})")
        elif needs_weights and not (sub / "config.json").is_file():
            problems.append(f"{sub}/config.json is missing (expected the {what}'s config)")
        elif needs_weights and weights and not any(sub.glob("*.safetensors")):
            problems.append(
                f"{sub} has no *.safetensors (expected the {what}'s weights, "
                "model.safetensors or shards with model.safetensors.index.json)"
            )
    if problems:
        raise CheckpointError(
            "; ".join(problems)
            + f". Point model_dir at a checkpoint in upstream's layout ({', '.join(expected)})."
        )


def check_configs(model_dir: Path, clip_max_length: int | None = None, *,
                  weights: bool = True) -> dict[str, dict[str, Any]]:
    """The subdirectories present (with weights unless `weights=False`: a saved pipeline's copied configs)
    and each encoder's ``config.json`` (a UTF-8 JSON object) checked by type and range, before
    transformers builds anything from it (its own errors are raw TypeErrors deep in the model); returns
    the configs by subdirectory."""
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
                    weights: bool = True) -> TextEncoderConfig:
    """The encoders' configuration from a checkpoint's ``config.json`` files (checked), without building them."""
    configs = check_configs(model_dir, clip_max_length, weights=weights)
    for cfg in configs.values():  # the architecture only (as _config_dict)
        for key in ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures"):
            cfg.pop(key, None)
    return TextEncoderConfig(t5=configs["text_encoder_3"], clip_l=configs["text_encoder"],
                             clip_g=configs["text_encoder_2"], max_sequence_length=max_sequence_length,
                             clip_max_length=clip_max_length)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No tqdm bar from transformers' loader and writer (library code does not print; STYLE rule 7)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# safetensors header dtypes, as torch names them; the float kind is F64, F32, F16, BF16 and F8_*
_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool}


def _check_weights(model: nn.Module, path: Path) -> None:
    """The safetensors' dtypes against the built model's (transformers casts an int32 weight into a float
    parameter silently), and every loaded floating tensor finite; errors name the key and the file."""
    from safetensors import safe_open

    state = model.state_dict()
    origin: dict[str, Path] = {}
    stored: dict[str, torch.Tensor] = {}  # meta stand-ins with the stored dtypes, from the headers only
    for f in find_weight_files(path):
        with safe_open(f, framework="pt") as handle:  # the header only: no tensor is read
            for k in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                origin[k], code = f, handle.get_slice(k).get_dtype()
                if code in _HEADER_DTYPES:
                    stored[k] = torch.empty(0, dtype=_HEADER_DTYPES[code], device="meta")
    bad = dtype_mismatches(state, stored)
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} dtype mismatch{'es' if len(bad) > 1 else ''} "
                              f"({', '.join(bad[:20])}{', ...' if len(bad) > 20 else ''}): a float weight stored "
                              "as integers or bools is a bad export or a corrupt file; export it again as float")
    for k, t in state.items():
        check_finite(k, t, origin.get(k, path))


def _load_model(model_cls: type[PreTrainedModel], path: Path, dtype: torch.dtype) -> PreTrainedModel:
    try:
        with _quiet_transformers():
            model, info = model_cls.from_pretrained(
                str(path), dtype=dtype, local_files_only=True, output_loading_info=True
            )
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot load {model_cls.__name__}: {exc}") from exc
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        listing = "; ".join(f"{k}: {sorted(map(str, v))[:8]}" for k, v in bad.items())
        raise CheckpointError(
            f"{path}: {model_cls.__name__} weights do not match its config.json ({listing})"
        )
    if info.get("unexpected_keys"):
        log.warning("%s: ignored unexpected keys %s", path, sorted(info["unexpected_keys"])[:8])
    _check_weights(model, path)
    return model


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # a malformed file, however it fails
        raise CheckpointError(f"{path}: cannot load a tokenizer: {exc}") from exc


def _config_dict(model: PreTrainedModel) -> dict[str, Any]:
    config = model.config.to_diff_dict()
    # The architecture only: dtype is chosen at load time (from_pretrained_dir's dtype argument).
    for key in ("transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    return config


def _write_subdir(model_dir: Path, name: str, save: Any) -> None:
    """Write ``model_dir/name`` with ``save(dir)`` atomically: a failed save keeps the old one."""
    with atomic_dir(Path(model_dir) / name) as tmp, _quiet_transformers():
        save(str(tmp))
