"""miniFLUX's small text path: DT5 + Context Adapter in place of T5-XXL, CLIP-L kept for the pooled vector.

The student parts are the SD3 variant's (`pyramid_flow.dt5`: `DistilledT5`, the Context Adapter
variants, LoRA, `DistilledTextConfig`), since miniFLUX reads the same T5-XXL sequence through a
`context_embedder`. Only the encoder around them differs: miniFLUX pools with CLIP-L alone (its
`pooler_output`, no projection) and names T5 `text_encoder_2`, so `MiniFluxDistilledTextEncoder`
mirrors `DistilledTextEncoder` with DT5 in T5's slot and the same tokenize / encode_tokens /
forward(prompts) as `MiniFluxTextEncoder`; its `prompt_embeds` are already the DiT's context.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import CLIPTextModel

from ndopt.frontends.miniflux.text import FluxTokenizers, MiniFluxTextEncoder
from ndopt.frontends.pyramid_flow.dt5 import DistilledT5, DistilledTextConfig


class MiniFluxDistilledTextEncoder(nn.Module):
    """prompts -> (context [B, L, DiT width], T5 mask [B, L], CLIP-L pooled [B, 768]), DT5 + adapter.

    Same interface as `MiniFluxTextEncoder` (the tokenizers are the teacher's: DT5 shares T5's
    vocabulary); the DiT's `context_embedder` is dropped, the adapter took it over."""

    # the miniFLUX encoder's tokenization, unchanged (T5 ids padded to 128, CLIP-L ids to 77)
    tokenize = MiniFluxTextEncoder.tokenize
    # the bundle's tokenize op: (tokenizer attribute, ids input, mask input, config field of the length)
    tokenizer_inputs = MiniFluxTextEncoder.tokenizer_inputs

    def __init__(self, config: DistilledTextConfig, clip_l: CLIPTextModel, dt5: DistilledT5, adapter: nn.Module,
                 tokenizers: FluxTokenizers | None) -> None:
        super().__init__()
        self.config = config
        self.tokenizers = tokenizers
        self.text_encoder = clip_l  # upstream names, as MiniFluxTextEncoder (T5's slot holds DT5)
        self.text_encoder_2 = dt5
        self.context_adapter = adapter
        self.requires_grad_(False)
        self.eval()

    def encode_tokens(self, t5_ids: Tensor, t5_mask: Tensor, clip_l_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pure tensor function (what lowering traces): ids -> (context, mask, pooled)."""
        context = self.context_adapter(self.text_encoder_2(t5_ids, t5_mask))
        return context, t5_mask, self.text_encoder(input_ids=clip_l_ids).pooler_output

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        device = next(self.text_encoder_2.parameters()).device
        return self.encode_tokens(**{k: v.to(device) for k, v in self.tokenize(prompts).items()})

    def text_encoding_params(self) -> int:
        """DT5 + adapter: what the seed's table counts as `#Params (TE+CA)` (CLIP is not counted)."""
        return sum(p.numel() for m in (self.text_encoder_2, self.context_adapter) for p in m.parameters())
