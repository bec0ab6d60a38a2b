"""Pure tensor sampling functions: temperature + top-k, sampled without a host sync.

Knows nothing about models or frames: logits in, token ids out.
"""

from __future__ import annotations

import torch


def multinomial_no_sync(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one id per row of `probs` (..., V) -> (..., 1) int64, without a device->host sync.

    Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) is distributed as Categorical(p), and
    unlike `torch.multinomial` it needs no host round trip on CUDA.
    """
    q = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / q, dim=-1, keepdim=True)


def sample_topk(
    logits: torch.Tensor, topk: int, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, V) logits -> (B, 1) int64 ids from the top-k of softmax(logits / temperature).

    Computed in fp32 whatever the logits' dtype, so bf16 models sample from the same distribution.
    `topk == 1` is greedy: only the top id has non-zero probability.
    """
    logits = logits.float() / temperature
    k = min(topk, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return multinomial_no_sync(probs, generator)
