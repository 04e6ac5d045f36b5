"""Regenerate the tiny preset's tokenizer (``tiny_tokenizer/``) deterministically.

The tiny preset needs a tokenizer that ships with the package (no download) and covers the
procedural-caption vocabulary of ndopt's tests and training runs with one id per word. It is a
WordPiece model: every caption word is a whole-word entry, and lower-case ASCII letters, digits and
a little punctuation are fallback pieces, so an unseen word splits into pieces and only characters
outside that alphabet become ``<unk>``. The same tokenizer stands in for CLIP-L, CLIP-G and T5.

Special ids follow T5's convention (pad 0, eos 1, unk 2) so T5Config's defaults hold; eos is not 2
because transformers' CLIPTextTransformer treats ``eos_token_id == 2`` as a legacy config and pools
at ``argmax(input_ids)`` instead of the first eos.

Run: ``python ndopt/frontends/pyramid_flow/assets/make_tiny_tokenizer.py`` (needs ``tokenizers``
and ``transformers``); it rewrites the files in place and running it twice changes nothing.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

OUT = Path(__file__).resolve().parent / "tiny_tokenizer"

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
SPECIALS = [PAD, EOS, UNK, BOS]  # ids 0..3
# The procedural-caption vocabulary (colours, shapes, motions, scene words).
COLOURS = "red green blue yellow orange purple white black pink cyan magenta gray brown"
SHAPES = "circle square triangle star ring ball box cube"
MOTIONS = "moving left right up down bouncing spinning growing shrinking still slowly quickly"
SCENE = (
    "a an the on in with and of background over under dark light scene video frame camera "
    "small large big tiny two three"
)
PUNCTUATION = ",.-'!?:;"
# Longest model input the tiny preset uses (T5's 128); callers pass max_length explicitly.
MODEL_MAX_LENGTH = 128


def vocabulary() -> dict[str, int]:
    """Token -> id, in a fixed order: specials, caption words, single characters, continuations."""
    words = " ".join([COLOURS, SHAPES, MOTIONS, SCENE]).split()
    chars = list(string.ascii_lowercase + string.digits + PUNCTUATION)
    tokens = SPECIALS + words + [c for c in chars if c not in words] + [f"##{c}" for c in chars]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def build() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocabulary(), unk_token=UNK, max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace, and each punctuation mark
    tok.decoder = decoders.WordPiece()
    vocab = tok.get_vocab()
    # CLIP-style framing for all three encoders: <s> words </s>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return tok


def main() -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build(),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (OUT / name).write_bytes((Path(tmp) / name).read_bytes())
    # transformers 5 no longer writes special_tokens_map.json; older readers still look for it.
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    (OUT / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


if __name__ == "__main__":
    main()
