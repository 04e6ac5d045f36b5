"""Neodragon's small text path: a distilled T5 (DT5) plus a Context Adapter, replacing T5-XXL.

DT5 is a T5 encoder 768 wide with 12 layers (t5-v1.1-base's shape) whose output is projected to
T5-XXL's 4096 by `final_projection` (Linear, ReLU, Dropout, Linear; ~129.6M in all). Written from
Neodragon's `neodragon/distil_t5.py` (MIT, adapted there from LifuWang-66/DistillT5). The Context
Adapter maps DT5's 4096-wide sequence to the DiT's block width (1536) with a 5-layer MLP whose
hidden layers also see the adapter's input (`SkipMLP`, ~130M); written from Neodragon's
`neodragon/context_adapter.py` (BSD-3-Clause-Clear). It takes over the DiT's `context_embedder`.

`DistilledTextEncoder` keeps CLIP-L/G for the pooled projection (shared with the SD3 encoder it
replaces, as Neodragon's `TextEncoderBundle`), swaps T5 for DT5 + adapter, and exposes the same
`tokenize` / `encode_tokens` / `forward(prompts)` as `SD3TextEncoder`, so the sampler, the call
plan and lowering see one `text_encoder` whose `prompt_embeds` are already the DiT's context.

The four variants of the seed's table differ in the adapter (see `ADAPTERS`):
- `replace` (RM): a fresh SkipMLP replaces `context_embedder` (0.260B = DT5 + adapter).
- `extend` (EM): the pretrained `context_embedder` stays as the adapter's linear path and a
  SkipMLP is added beside it, its last layer zero-initialised so training starts from the
  original mapping (0.266B = DT5 + adapter + the 6.3M linear).
- `lora`, `trainable_dt5` (TDT5): no MLP; `context_embedder` itself is the adapter and DT5 is
  adapted to it by low-rank adapters (merged after training) or trained whole (0.136B).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ndopt.errors import NdoptError
from ndopt.frontends.pyramid_flow.text import SD3TextEncoder, TextEncoderConfig, Tokenizers

VARIANTS = ("replace", "extend", "lora", "trainable_dt5")

# DistillT5's encoder: t5-v1.1-base (google/t5-v1_1-base config), projected back to T5-XXL's width.
REAL_DT5 = {"d_model": 768, "d_kv": 64, "d_ff": 2048, "num_layers": 12, "num_heads": 12,
            "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False}
ADAPTER_DEPTH = 4  # Neodragon's ContextAdapter: layer_depths (4096,) * 4, each with an input skip


def dt5_config(teacher: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """T5Config kwargs of the DT5 that stands in for `teacher` (a T5Config dict).

    At T5-XXL's width DT5 is DistillT5's t5-v1.1-base shape; for smaller teachers (the tiny preset)
    it keeps the same ratios: half the width, half the layers. Vocabulary and special ids are the
    teacher's, so DT5 uses the teacher's tokenizer (offline, nothing new to download)."""
    base = {k: teacher[k] for k in ("vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id")
            if k in teacher}
    if int(teacher.get("d_model", 512)) >= 4096:
        cfg = {**REAL_DT5, **base}
    else:
        d_kv = int(teacher.get("d_kv", 64))
        width = max(d_kv, int(teacher["d_model"]) // 2)
        cfg = {**base, "d_model": width, "d_kv": d_kv, "num_heads": max(1, width // d_kv), "d_ff": 2 * width,
               "num_layers": max(1, int(teacher.get("num_layers", 2)) // 2),
               "feed_forward_proj": teacher.get("feed_forward_proj", "gated-gelu")}
    return {**cfg, **(overrides or {})}


class DistilledT5(nn.Module):
    """DT5: a T5 encoder and `final_projection` to the teacher's width: (ids, mask) -> [B, L, out]."""

    def __init__(self, config: dict[str, Any], out_dim: int) -> None:
        super().__init__()
        self.t5_config = dict(config)
        self.encoder = T5EncoderModel(T5Config(**copy.deepcopy(self.t5_config)))
        width = int(self.encoder.config.d_model)
        # Neodragon/DistillT5: no biases, ReLU between; dropout 0.1 (inactive in eval, as ndopt trains)
        self.final_projection = nn.Sequential(nn.Linear(width, out_dim, bias=False), nn.ReLU(), nn.Dropout(0.1),
                                              nn.Linear(out_dim, out_dim, bias=False))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.final_projection(hidden)


class SkipMLP(nn.Module):
    """Neodragon's Context Adapter: Linear+GELU layers; each after the first sees [input, previous]."""

    def __init__(self, in_dim: int, out_dim: int, hidden: tuple[int, ...], zero_last: bool = False) -> None:
        super().__init__()
        layers, width = [], in_dim
        for h in hidden:
            layers.append(nn.Sequential(nn.Linear(width, h), nn.GELU()))
            width = h + in_dim  # the next layer's input skip: concat(adapter input, this layer's output)
        layers.append(nn.Sequential(nn.Linear(width, out_dim)))
        self.network_layers = nn.ModuleList(layers)
        for m in self.modules():  # upstream: glorot-uniform weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_last:  # an added branch that starts as a no-op (the `extend` variant)
            nn.init.zeros_(self.network_layers[-1][0].weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.network_layers[0](x)
        for layer in self.network_layers[1:]:
            y = layer(torch.cat([x, y], dim=-1))  # concat order as upstream: [input, previous]
        return y


class ExtendedContextAdapter(nn.Module):
    """`extend` (EM): the pretrained `context_embedder` (linear path) plus a SkipMLP beside it."""

    def __init__(self, linear: nn.Linear, mlp: SkipMLP) -> None:
        super().__init__()
        self.linear = linear
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + self.mlp(x)


def context_adapter(variant: str, context_embedder: nn.Linear) -> nn.Module:
    """The adapter of a variant, sized from the DiT's `context_embedder` (in: T5 width, out: DiT width).

    `extend` copies the embedder (it trains); `lora` / `trainable_dt5` share it (it stays frozen)."""
    if variant not in VARIANTS:
        raise NdoptError(f"encoder substitution variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    d_in, d_out = context_embedder.in_features, context_embedder.out_features
    if variant == "replace":
        return SkipMLP(d_in, d_out, (d_in,) * ADAPTER_DEPTH)
    if variant == "extend":
        return ExtendedContextAdapter(copy.deepcopy(context_embedder), SkipMLP(d_in, d_out, (d_in,) * ADAPTER_DEPTH,
                                                                              zero_last=True))
    return context_embedder


# ---- low-rank adapters (the `lora` variant) ------------------------------------------------------
class LoRA(nn.Module):
    """Low-rank adapters for the Linear layers of a frozen module, attached with forward hooks.

    The adapters live here, not inside the adapted module, so a trainer can train them while the
    module stays frozen; `merge()` folds `scale * B @ A` into the weights and detaches the hooks,
    leaving plain Linear layers (nothing of LoRA remains to export). peft is not a dependency of
    ndopt and this is all the variant needs."""

    def __init__(self, module: nn.Module, rank: int, alpha: float | None = None,
                 targets: tuple[str, ...] = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")) -> None:
        super().__init__()
        self.rank, self.scale = rank, (alpha or rank) / rank
        self.down, self.up = nn.ModuleDict(), nn.ModuleDict()
        self._targets: dict[str, nn.Linear] = {}
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                key = name.replace(".", "__")
                self.down[key] = nn.Linear(sub.in_features, rank, bias=False, device=sub.weight.device)
                self.up[key] = nn.Linear(rank, sub.out_features, bias=False, device=sub.weight.device)
                nn.init.kaiming_uniform_(self.down[key].weight, a=math.sqrt(5))
                nn.init.zeros_(self.up[key].weight)  # starts as the unadapted module
                self._targets[key] = sub
        if not self._targets:
            raise NdoptError(f"LoRA: no Linear layer named one of {targets} in {type(module).__name__}")
        self._hooks = [sub.register_forward_hook(self._hook(key)) for key, sub in self._targets.items()]

    def _hook(self, key: str) -> Any:
        def add_low_rank(_m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
            return out + self.scale * self.up[key](self.down[key](inputs[0]))
        return add_low_rank

    @torch.no_grad()
    def merge(self) -> int:
        """Fold the adapters into the adapted weights; returns how many layers changed."""
        for key, lin in self._targets.items():
            lin.weight += (self.scale * self.up[key].weight @ self.down[key].weight).to(lin.weight.dtype)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return len(self._targets)


# ---- the text encoder ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistilledTextConfig:
    """What the sampler and call plan read (`max_sequence_length`, `clip_max_length`) plus DT5's shape."""

    teacher: TextEncoderConfig
    dt5: dict[str, Any] = field(hash=False)
    variant: str = "replace"
    context_dim: int = 1536  # width of prompt_embeds: the DiT's block width (the adapter's output)

    @property
    def max_sequence_length(self) -> int:
        return self.teacher.max_sequence_length

    @property
    def clip_max_length(self) -> int:
        return self.teacher.clip_max_length

    @property
    def pooled_dim(self) -> int:
        return self.teacher.pooled_dim


class DistilledTextEncoder(nn.Module):
    """prompts -> (context [B, L, dit width], T5 mask [B, L], CLIP pooled [B, pooled]), DT5 + adapter.

    Same interface as `SD3TextEncoder` (the tokenizers are the teacher's: DT5 shares T5's vocabulary).
    `prompt_embeds` are already in the DiT's block space: the DiT's `context_embedder` is dropped."""

    # the SD3 encoder's tokenization, unchanged (T5 ids padded to 128, CLIP ids to 77)
    tokenize = SD3TextEncoder.tokenize
    _tokenize = staticmethod(SD3TextEncoder._tokenize)

    def __init__(self, config: DistilledTextConfig, clip_l: CLIPTextModelWithProjection,
                 clip_g: CLIPTextModelWithProjection, dt5: DistilledT5, adapter: nn.Module,
                 tokenizers: Tokenizers | None) -> None:
        super().__init__()
        self.config = config
        self.tokenizers = tokenizers
        self.text_encoder = clip_l    # upstream names, as SD3TextEncoder (CLIP-L, CLIP-G)
        self.text_encoder_2 = clip_g
        self.text_encoder_3 = dt5
        self.context_adapter = adapter
        self.requires_grad_(False)
        self.eval()

    def encode_tokens(self, t5_ids: Tensor, t5_mask: Tensor, clip_l_ids: Tensor, clip_g_ids: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """Pure tensor function (what lowering traces): ids -> (context, mask, pooled)."""
        context = self.context_adapter(self.text_encoder_3(t5_ids, t5_mask))
        pooled_l = self.text_encoder(input_ids=clip_l_ids).text_embeds
        pooled_g = self.text_encoder_2(input_ids=clip_g_ids).text_embeds
        return context, t5_mask, torch.cat([pooled_l, pooled_g], dim=-1)

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        device = next(self.text_encoder_3.parameters()).device
        return self.encode_tokens(**{k: v.to(device) for k, v in self.tokenize(prompts).items()})

    def text_encoding_params(self) -> int:
        """DT5 + adapter: what the seed's table counts as `#Params (TE+CA)` (CLIP is not counted)."""
        return sum(p.numel() for m in (self.text_encoder_3, self.context_adapter) for p in m.parameters())
