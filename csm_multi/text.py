"""Text tokenizers: text -> ids with Llama 3's <|begin_of_text|> / <|end_of_text|> around every
encoded string (the reference's post-processor), and an offline byte-level stand-in.

Knows nothing about frames, speakers or models.
"""

from __future__ import annotations

from typing import Protocol

LLAMA3_BOS_ID = 128_000
LLAMA3_EOS_ID = 128_001


class TextTokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """Offline stand-in for the gated Llama 3.2 tokenizer: BOS, UTF-8 bytes (ids 0..255), EOS.

    Only for the random-weight `tiny` preset: ids fit the real text vocabulary, so the model and
    frames are exercised exactly as with the real tokenizer, but the ids mean nothing to csm-1b.
    """

    name = "bytes (offline stand-in)"

    def encode(self, text: str) -> list[int]:
        return [LLAMA3_BOS_ID, *text.encode("utf-8"), LLAMA3_EOS_ID]


class HFTextTokenizer:
    """A `tokenizers`/`transformers` tokenizer whose post-processor wraps text in BOS ... EOS."""

    def __init__(self, tokenizer, name: str):
        self._tok = tokenizer
        self.name = name

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))


def add_bos_eos(tokenizer) -> None:
    """Install the reference's post-processor on a fast Llama 3 tokenizer (in place).

    Llama 3's own template adds only BOS; CSM was trained with BOS text EOS.
    """
    from tokenizers.processors import TemplateProcessing

    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0",
        pair=f"{bos}:0 $A:0 {eos}:0 {bos}:1 $B:1 {eos}:1",
        special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)],
    )
