"""Typed, range-checked schemas of a Pyramid-Flow checkpoint's config files, checked before any build.

A config file is input from people (edited, truncated, mixed up): each schema here is a strict pydantic
model (no "6" for 6, no 6.0 for a count, no 1 for true) of the keys that shape a module: the DiT's and
the VAE's `config.json`, the three transformers text-encoder `config.json`s, and ndopt's own
`ndopt_sampler.json`. `check` returns the keys present, validated, or raises a ConfigError naming the
file, each bad field, its value and what is allowed, all problems in one message. Cross-field rules
(heads that must divide a width, equal lengths) stay with the dataclass each config builds; a text
encoder's are in `check_text_config`, which then lets transformers' own config class validate the rest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ndopt.errors import ConfigError

__all__ = [
    "CLIPTextConfigFile", "ConfigError", "DiTConfigFile", "SamplerSettingsFile", "T5ConfigFile",
    "VAEConfigFile", "check", "check_text_config",
]


# No size or count of a real model comes near this; past it a config is corrupt (and building it would hang).
_MAX_COUNT = 2**20


_MAX_DEPTH = 4096  # layers or heads: the largest real models have ~100


def _count(at_least: int = 1, at_most: int = _MAX_COUNT) -> Any:
    return Annotated[int, Field(ge=at_least, le=at_most, description=f"an integer >= {at_least} and <= {at_most}")]


def _counts(what: str, length: int | None = None) -> Any:
    text = f"a list of {length} integers >= 1{what}" if length else f"a non-empty list of integers >= 1{what}"
    return Annotated[list[Annotated[int, Field(ge=1, le=_MAX_COUNT)]],
                     Field(min_length=length or 1, max_length=length, description=text)]


def _flags(what: str) -> Any:
    return Annotated[list[bool], Field(min_length=1, description=f"a non-empty list of true/false{what}")]


def _names(what: str) -> Any:
    return Annotated[list[str], Field(min_length=1, description=f"a non-empty list of strings{what}")]


def _number(low: float, high: float | None = None, *, open_low: bool = False) -> Any:
    bound = {"gt": low} if open_low else {"ge": low}
    if high is not None:
        bound["le"] = high
    text = f"a number {'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
    return Annotated[float, Field(allow_inf_nan=False, description=text, **bound)]


_BOOL = Annotated[bool, Field(description="true or false")]
_STR = Annotated[str, Field(description="a string")]
_TOKEN_ID = Annotated[int | None, Field(ge=0, description="an integer >= 0 or null")]


class _Schema(BaseModel):
    # strict: JSON's types as they are; extra keys are refused by the DiT, VAE and sampler schemas
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class DiTConfigFile(_Schema):
    """The PyramidDiffusionMMDiT arguments ndopt builds from (dit.MMDiTConfig's fields)."""

    sample_size: _count(at_most=_MAX_DEPTH) = None
    patch_size: _count() = None
    in_channels: _count() = None
    num_layers: _count(at_most=_MAX_DEPTH) = None
    attention_head_dim: _count() = None
    num_attention_heads: _count(at_most=_MAX_DEPTH) = None
    caption_projection_dim: _count() = None
    pooled_projection_dim: _count() = None
    pos_embed_max_size: _count(at_most=_MAX_DEPTH) = None
    max_num_frames: _count() = None
    qk_norm: Annotated[Literal["rms_norm"] | None,
                       Field(description="\"rms_norm\" or null (the norms ndopt implements)")] = None
    joint_attention_dim: _count() = None


class VAEConfigFile(_Schema):
    """The CausalVideoVAE arguments that shape the network (vae.CausalVAEConfig's, in upstream's names)."""

    encoder_in_channels: _count() = None
    encoder_layers_per_block: _counts(", one per encoder block") = None
    encoder_down_block_types: _names(", one per encoder block") = None
    encoder_block_out_channels: _counts(", one per encoder block") = None
    encoder_spatial_down_sample: _flags(", one per encoder block") = None
    encoder_temporal_down_sample: _flags(", one per encoder block") = None
    encoder_act_fn: _STR = None
    encoder_norm_num_groups: _count() = None
    decoder_out_channels: _count() = None
    decoder_layers_per_block: _counts(", one per decoder block") = None
    decoder_up_block_types: _names(", one per decoder block") = None
    decoder_block_out_channels: _counts(", one per decoder block") = None
    decoder_spatial_up_sample: _flags(", one per decoder block") = None
    decoder_temporal_up_sample: _flags(", one per decoder block") = None
    decoder_act_fn: _STR = None
    decoder_norm_num_groups: _count() = None
    latent_channels: _count() = None
    encoder_out_channels: _count() = None
    decoder_in_channels: _count() = None
    interpolate: _BOOL = None


class SamplerSettingsFile(_Schema):
    """ndopt_sampler.json: the schedule and prompts ndopt saved with a checkpoint (presets.PresetSpec's)."""

    height: _count() = None
    width: _count() = None
    latent_frames: _count() = None
    steps: _counts(", one per pyramid stage", 3) = None
    video_steps: _counts(", one per pyramid stage", 3) = None
    guidance_scale: _number(0.0) = None
    video_guidance_scale: _number(0.0) = None
    prompt_suffix: _STR = None
    negative_prompt: Annotated[str | None, Field(description="a string or null (upstream's default)")] = None


def _activations() -> list[str]:
    from transformers.activations import ACT2FN

    return sorted(ACT2FN)


class _TextSchema(_Schema):
    # transformers configs carry many keys that do not shape the encoder: only the ones below are checked
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class T5ConfigFile(_TextSchema):
    """The T5Config keys that shape the T5 encoder (text_encoder_3)."""

    model_type: Annotated[Literal["t5"], Field(description="\"t5\" (a T5EncoderModel's config)")] = None
    vocab_size: _count() = None
    d_model: _count() = None
    d_kv: _count() = None
    d_ff: _count() = None
    num_layers: _count(at_most=_MAX_DEPTH) = None
    num_heads: _count(at_most=_MAX_DEPTH) = None
    relative_attention_num_buckets: _count() = None
    relative_attention_max_distance: _count() = None
    dropout_rate: _number(0.0, 1.0) = None
    layer_norm_epsilon: _number(0.0, open_low=True) = None
    feed_forward_proj: Annotated[str, Field(description="\"<act>\" or \"gated-<act>\" with a transformers "
                                                        "activation (e.g. \"relu\", \"gated-gelu\")")] = None
    pad_token_id: _TOKEN_ID = None
    eos_token_id: _TOKEN_ID = None
    decoder_start_token_id: _TOKEN_ID = None
    tie_word_embeddings: _BOOL = None


class CLIPTextConfigFile(_TextSchema):
    """The CLIPTextConfig keys that shape a CLIP text tower (text_encoder, text_encoder_2)."""

    model_type: Annotated[Literal["clip_text_model"],
                          Field(description="\"clip_text_model\" (a CLIPTextModelWithProjection's config)")] = None
    vocab_size: _count() = None
    hidden_size: _count() = None
    intermediate_size: _count() = None
    num_hidden_layers: _count(at_most=_MAX_DEPTH) = None
    num_attention_heads: _count(at_most=_MAX_DEPTH) = None
    projection_dim: _count() = None
    max_position_embeddings: _count() = None
    hidden_act: Annotated[str, Field(description="a transformers activation name (e.g. \"quick_gelu\", \"gelu\")")] = None
    layer_norm_eps: _number(0.0, open_low=True) = None
    attention_dropout: _number(0.0, 1.0) = None
    dropout: _number(0.0, 1.0) = None
    bos_token_id: _TOKEN_ID = None
    eos_token_id: _TOKEN_ID = None
    pad_token_id: _TOKEN_ID = None


# ------------------------------------------------------------------------------------------ checking


def _shown(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _problems(schema: type[BaseModel], data: dict[str, Any], errors: list[Any]) -> list[str]:
    """One line per bad field, in the words of the file: its (first bad item's) value, type, what is allowed."""
    by_field: dict[str, list[Any]] = {}
    for err in errors:
        by_field.setdefault(str(err["loc"][0]) if err["loc"] else "", []).append(err)
    out = []
    for field, errs in by_field.items():
        if errs[0]["type"] == "extra_forbidden":
            out.append(f"unknown key {field!r} (known: {', '.join(schema.model_fields)})")
            continue
        # list items are named by index; a union's member tags (one error per member) are dropped
        items = sorted({p for e in errs for p in e["loc"][1:2] if isinstance(p, int)})
        value: Any = data.get(field)
        name = field
        if items and isinstance(value, list | tuple) and items[0] < len(value):
            name, value = f"{field}[{items[0]}]", value[items[0]]
        more = f" and {len(items) - 1} more item{'s' if len(items) > 2 else ''}" if len(items) > 1 else ""
        info = schema.model_fields.get(field)
        allowed = info.description if info is not None and info.description else errs[0]["msg"]
        out.append(f"{name} = {_shown(value)} ({_kind(value)}){more}: expected {allowed}")
    return out


def check(schema: type[BaseModel], data: dict[str, Any], source: str | Path, what: str,
          error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The keys of `data` that `schema` knows, validated (lists as lists); `error` listing every bad one."""
    known = {k: v for k, v in data.items() if k in schema.model_fields or schema.model_config.get("extra") != "allow"}
    try:
        model = schema.model_validate(known)
    except ValidationError as e:
        raise error(f"{source}: invalid {what}: {'; '.join(_problems(schema, known, e.errors()))}. Fix the file "
                    "(or download it again): these values would build a different or broken model") from None
    return {k: getattr(model, k) for k in model.model_fields_set if k in schema.model_fields}


_FEED_FORWARD = re.compile(r"^(gated-)?([A-Za-z0-9_]+)$")


def check_text_config(config: dict[str, Any], kind: Literal["t5", "clip"], source: str | Path,
                      clip_max_length: int | None = None) -> None:
    """A text encoder's transformers config, checked by type and range before transformers builds it."""
    schema: type[BaseModel] = T5ConfigFile if kind == "t5" else CLIPTextConfigFile
    what = "T5 encoder config" if kind == "t5" else "CLIP text encoder config"
    values = check(schema, config, source, what)
    problems = []
    acts = _activations()
    if kind == "t5":
        proj = values.get("feed_forward_proj")
        m = _FEED_FORWARD.match(proj) if proj is not None else None
        if proj is not None and (m is None or m.group(2) not in acts):
            problems.append(f"feed_forward_proj = {_shown(proj)}: expected \"<act>\" or \"gated-<act>\" with <act> "
                            f"one of {', '.join(acts)}")
    else:
        act = values.get("hidden_act")
        if act is not None and act not in acts:
            problems.append(f"hidden_act = {_shown(act)}: expected one of {', '.join(acts)}")
        hidden, heads = values.get("hidden_size"), values.get("num_attention_heads")
        if hidden is not None and heads is not None and hidden % heads:
            problems.append(f"num_attention_heads = {heads} does not divide hidden_size = {hidden}: CLIP's "
                            "attention splits the width into equal heads")
        positions = values.get("max_position_embeddings")
        if clip_max_length is not None and positions is not None and positions < clip_max_length:
            problems.append(f"max_position_embeddings = {positions} is below the prompt length {clip_max_length} "
                            "ndopt pads CLIP prompts to")
    if problems:
        raise ConfigError(f"{source}: invalid {what}: {'; '.join(problems)}. Fix the file (or download it again)")
    # transformers validates the rest of its config class's fields (types, architecture rules) itself; its
    # errors are of several types (TypeError, ValueError, huggingface_hub's strict-dataclass errors)
    from transformers import CLIPTextConfig, T5Config

    config_cls = T5Config if kind == "t5" else CLIPTextConfig
    try:
        config_cls(**{k: v for k, v in config.items() if k != "model_type"})
    except Exception as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"{source}: invalid {what}: transformers' {config_cls.__name__} refuses it: {detail}. "
                          "Fix the file (or download it again)") from None
