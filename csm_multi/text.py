"""Text tokenizers: text -> ids with Llama 3's <|begin_of_text|> / <|end_of_text|> around every
encoded string (the reference's post-processor), and an offline byte-level stand-in.

Knows nothing about frames, speakers or models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from .errors import WeightsUnavailableError

LLAMA3_BOS_ID = 128_000
LLAMA3_EOS_ID = 128_001

# Probe strings and the ids the Llama 3 tokenizer gives them, without BOS/EOS. Only published ids:
# [a] meta-llama/llama3, llama/test_tokenizer.py (Meta's own tiktoken tokenizer; test_encode and
#     test_encode_dialog); [b] belladoreai/llama3-tokenizer-js, src/llama3-tokenizer.js default tests
#     and README (a port of the Hugging Face tokenizer.json, tested against it).
_LLAMA3_PROBE_BODIES: dict[str, tuple[int, ...]] = {
    "This is a test sentence.": (2028, 374, 264, 1296, 11914, 13),  # [a]
    "This is a response.": (2028, 374, 264, 2077, 13),  # [a]
    "Hello world!": (9906, 1917, 0),  # [b] README
    "grabbed": (59312, 2788),  # [b]
    "           grabbed": (1881, 30418),  # [b] runs of spaces
    "\n": (198,),  # [b]
    "ax\n####\nboo": (710, 198, 71050, 34093),  # [b]
    "镇": (104643,),  # [b] a token beyond tiktoken's first 100k
    "Ꙋ🦙": (166, 247, 232, 9468, 99, 247),  # [b] byte fallback for characters not in the vocabulary
}
LLAMA3_PROBES: dict[str, tuple[int, ...]] = {
    text: (LLAMA3_BOS_ID, *ids, LLAMA3_EOS_ID) for text, ids in _LLAMA3_PROBE_BODIES.items()
}


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


def probe_ids(tokenizer: TextTokenizer, probes: Sequence[str] = tuple(LLAMA3_PROBES)) -> dict[str, tuple[int, ...]]:
    """What `tokenizer` makes of each probe string: the expected ids to check another tokenizer against."""
    return {text: tuple(tokenizer.encode(text)) for text in probes}


def verify_tokenizer(candidate: TextTokenizer, name: str, expected: Mapping[str, Sequence[int]] = LLAMA3_PROBES,
                     reference: str = "the Llama 3.2 tokenizer") -> None:
    """Raise WeightsUnavailableError unless `candidate` encodes every probe string to `expected`'s ids.

    CSM-1B only understands the Llama 3.2 ids, so a tokenizer that differs on any probe is refused.
    """
    for text, ids in expected.items():
        got = tuple(candidate.encode(text))
        if got != tuple(ids):
            raise WeightsUnavailableError(
                f"the tokenizer from {name} is not {reference}: it encodes {text!r} as {list(got)}, expected "
                f"{list(ids)}. Point --tokenizer-repo (CSM_TOKENIZER_REPO) at an exact copy of "
                "meta-llama/Llama-3.2-1B's tokenizer, or pass --trust-tokenizer to use it unchecked.")
