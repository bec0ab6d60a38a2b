"""Pure tensor sampling functions: temperature + top-k, sampled without a host sync.

Knows nothing about models or frames: logits in, token ids out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def multinomial_no_sync(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Draw one id per row of `probs` (B, V) -> (B, 1) int64, without a device->host sync.

    Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) is distributed as Categorical(p), and
    unlike `torch.multinomial` it needs no host round trip on CUDA. `generator` may be one
    generator per row (a sequence of B): then row b's draws depend only on its own generator, so
    a row sampled in a batch draws exactly what it draws alone with the same seed.
    """
    if generator is None or isinstance(generator, torch.Generator):
        q = torch.empty_like(probs).exponential_(1.0, generator=generator)
    else:
        if len(generator) != probs.size(0):
            raise ValueError(f"{len(generator)} generators for {probs.size(0)} rows")
        q = torch.cat([torch.empty_like(probs[:1]).exponential_(1.0, generator=g) for g in generator])
    return torch.argmax(probs / q, dim=-1, keepdim=True)


def sample_topk(logits: torch.Tensor, topk: int, temperature: float, generator: Generators = None) -> torch.Tensor:
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
