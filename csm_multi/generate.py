"""The hot loop: one CSM frame (backbone step + K-1 depth-decoder steps) and the frame iterator.

No I/O, no logging, no tokenizer, no host syncs inside a frame. Shapes: B batch, S positions,
K codebooks. A frame's codes come out as (B, K) int64.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .frames import is_eos
from .model import CSM
from .sampling import sample_topk


@dataclass(frozen=True)
class Sampler:
    """Top-k / temperature sampling of one codebook. `num_codes` limits ids to [0, num_codes).

    Departure from the reference: CSM's audio vocabulary has 2051 ids but Mimi decodes only 2048;
    the reference samples all 2051 (and its decode fails on the other 3). The Engine passes
    num_codes=2048 so it never emits an id the codec cannot decode; None keeps reference sampling.
    """

    temperature: float
    topk: int
    generator: torch.Generator | None = None
    num_codes: int | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.num_codes is not None:
            logits = logits[..., : self.num_codes]
        return sample_topk(logits, self.topk, self.temperature, self.generator)


def generate_frame(
    model: CSM, tokens: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor, sample: Sampler,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """New frames (B, S, K+1) at positions (B, S) -> the next frame's codes (B, K)."""
    last_h = model.backbone_step(tokens, mask, input_pos, key_valid)  # (B, Db)
    code = sample(model.codebook0_head(last_h))  # (B, 1)
    codes = [code]
    h = torch.cat([last_h.unsqueeze(1), model.embed_audio(0, code)], dim=1)  # (B, 2, Db)
    pos = model.decoder_positions[: last_h.size(0), :2]
    model.decoder.reset_caches()  # the depth decoder sees one frame at a time
    for i in range(1, model.config.audio_num_codebooks):
        code = sample(model.codebook_logits(i, model.decoder_step(h, pos)))
        codes.append(code)
        h, pos = model.embed_audio(i, code), pos[:, -1:] + 1
    return torch.cat(codes, dim=1)


def next_frame_input(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated codes (B, K) -> the backbone's next input frame (B, 1, K+1) and its mask."""
    b, k = codes.shape
    tokens = torch.cat([codes, codes.new_zeros(b, 1)], dim=1).unsqueeze(1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[..., -1] = False
    return tokens, mask


def iterate_frames(
    model: CSM, tokens: torch.Tensor, mask: torch.Tensor, sample: Sampler, max_frames: int,
    pad: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (codes (B, K), alive (B,) bool) per frame until every row has emitted EOS.

    `tokens`/`mask` are (B, S, K+1) prompts, left-padded; `pad` (B,) says how many leading
    positions of each row are padding (they are masked out of attention). A row's EOS frame and
    everything after it are reported with alive=False. The caller checks the window beforehand.
    """
    b, s, _ = tokens.shape
    model.setup_caches(b)
    model.reset_caches()
    device = tokens.device
    input_pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    key_valid = None
    if pad is not None:
        key_valid = torch.arange(model.config.max_seq_len, device=device).unsqueeze(0) >= pad.to(device).unsqueeze(1)
    alive = torch.ones(b, dtype=torch.bool, device=device)
    for _ in range(max_frames):
        codes = generate_frame(model, tokens, mask, input_pos, sample, key_valid)
        alive = alive & ~is_eos(codes)
        if not bool(alive.any()):  # one host sync per frame: the caller needs the frame anyway
            return
        yield codes, alive
        tokens, mask = next_frame_input(codes)
        input_pos = input_pos[:, -1:] + 1
