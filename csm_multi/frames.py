"""CSM's input format: text ids and audio codes -> (tokens, mask) frames; the `Segment` type.

A frame has K + 1 columns: K Mimi codebooks, then one text column. A text position fills only the
text column; an audio position fills only the K codebook columns. An all-zero audio frame ends an
utterance (the reference appends one after every context clip). Knows no model and no tokenizer
internals: it takes already-encoded ids and codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segment:
    """One utterance of a conversation: who said it, what, and (optionally) how it sounded.

    `audio` is a (S,) float waveform at 24 kHz; `codes` its (K, T) Mimi codes when already known
    (voice profiles keep them, so context audio is encoded once).
    """

    speaker: int
    text: str
    audio: torch.Tensor | None = None
    codes: torch.Tensor | None = None


def format_text(speaker: int, text: str) -> str:
    """The reference's speaker-tagged text: `[0]Hello there.`"""
    return f"[{speaker}]{text}"


def text_frames(token_ids: list[int] | torch.Tensor, num_codebooks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ids (S,) -> tokens (S, K+1) int64 and mask (S, K+1) bool, text in the last column."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    tokens = torch.zeros(ids.numel(), num_codebooks + 1, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    tokens[:, -1] = ids
    mask[:, -1] = True
    return tokens, mask


def audio_frames(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (K, T) -> tokens (T+1, K+1) and mask (T+1, K+1): T audio frames plus the EOS frame."""
    k, t = codes.shape
    tokens = torch.zeros(t + 1, k + 1, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    tokens[:t, :k] = codes.detach().to("cpu", torch.long).T
    mask[:, :k] = True  # the EOS frame is all zeros but still an audio position
    return tokens, mask


def concat_frames(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.cat([t for t, _ in parts], dim=0)
    mask = torch.cat([m for _, m in parts], dim=0)
    return tokens, mask


def is_eos(frame_codes: torch.Tensor) -> torch.Tensor:
    """(B, K) codes -> (B,) bool: the all-zero frame that ends an utterance."""
    return (frame_codes == 0).all(dim=-1)
