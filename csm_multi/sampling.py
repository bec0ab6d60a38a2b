"""Pure tensor sampling functions: temperature + top-k, sampled without a host sync.

Knows nothing about models or frames: logits in, token ids out.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def multinomial_no_sync(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Draw one id per row of `probs` (B, V) -> (B, 1) int64, without a device->host sync.

    Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) is distributed as Categorical(p), and
    unlike `torch.multinomial` it needs no host round trip on CUDA. `generator` may be one
    generator per row (a sequence of B): then row b's draws depend only on its own generator, so
    a row sampled in a batch draws exactly what it draws alone with the same seed.
    """
    if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != probs.size(0):
        raise ValueError(f"{len(generator)} generators for {probs.size(0)} rows")
    return torch.argmax(probs / exponential_noise(probs, generator), dim=-1, keepdim=True)


def exponential_noise(like: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Exp(1) noise shaped like `like` (B, V): exactly `torch.empty_like(like).exponential_(1.0,
    generator=...)`, row b from generator b when given one per row, and the generators advance
    as far. For several rows on CPU in float32 it is computed in about half the time
    (`_cpu_exponential`: ~150 against ~350 us for 8 rows of 2048); for one row its dozen small
    calls cost about what they save, so there and elsewhere it is `exponential_` itself."""
    generators = None if generator is None or isinstance(generator, torch.Generator) else list(generator)
    if (like.device.type == "cpu" and like.dtype == torch.float32 and like.dim() == 2 and like.size(0) > 1
            and _fast_noise_ok()):
        return _cpu_exponential(like.shape, generator if generators is None else generators)
    if generators is None:
        return torch.empty_like(like).exponential_(1.0, generator=generator)
    return torch.cat([torch.empty_like(like[:1]).exponential_(1.0, generator=g) for g in generators])


def _cpu_exponential(shape: torch.Size, generator) -> torch.Tensor:
    """What PyTorch's CPU `exponential_` (rate 1) writes into a float32 tensor, value for value.

    That kernel is serial: for each element it takes a 64-bit word from the generator's Mersenne
    Twister (`random64`), makes u = (its low 53 bits) * 2^-53 and stores float(-log1p(-u)), with
    log1p in double from the C library: ~20 ns an element. Here the words come from `random_` on
    int64 (the same `random64` per element, reduced mod 2^63, which keeps the low 53 bits) and the
    arithmetic is vectorised in numpy, in per-thread scratch buffers. A vectorised log1p may differ
    from the C library's by an ulp or two in double. That changes the float only where the double
    lies within a few ulps of the midpoint between two floats, i.e. where its 29 mantissa bits
    below float precision are within 16 of 2^28: those elements (33 in 2^29: one in ~16 million)
    are recomputed with the C library's log1p (`math.log1p`). `_fast_noise_ok` checks the whole scheme against
    `exponential_` once per process and keeps `exponential_` if they ever disagree.
    """
    n = math.prod(shape)
    words, neg_u, d, low = _scratch(n)
    if isinstance(generator, list):
        for row, g in zip(words[:n].view(len(generator), -1), generator):
            row.random_(generator=g)
    else:
        words[:n].random_(generator=generator)
    w, neg_u, d, low = words.numpy()[:n], neg_u[:n], d[:n], low[:n]
    np.bitwise_and(w, _MASK_53, out=w)
    np.multiply(w, -(2.0 ** -53), out=neg_u)  # exact: w < 2^53
    _vector_log1p(neg_u, out=d)
    np.negative(d, out=d)  # Exp(1) in double; d >= 2^-53 or 0, so its float is never subnormal
    q = d.astype(np.float32)
    for i in _near_midpoint(d, low, _MIDPOINT_ULPS).tolist():
        q[i] = np.float32(-_c_log1p(float(neg_u[i])))
    return torch.from_numpy(q).view(shape)


def _near_midpoint(d: np.ndarray, scratch: np.ndarray, ulps: int) -> np.ndarray:
    """Indices of the positive doubles in `d` (normal as floats) within `ulps` double ulps of a midpoint
    between two floats, where an error of that size could change their rounding to float."""
    np.subtract(d.view(np.int64), (1 << 28) - ulps, out=scratch)  # the 29 bits below float precision,
    np.bitwise_and(scratch, (1 << 29) - 1, out=scratch)  # shifted so that the midpoint is at `ulps`
    return np.flatnonzero(scratch <= 2 * ulps)


_MASK_53, _MIDPOINT_ULPS = (1 << 53) - 1, 16
_vector_log1p, _c_log1p = np.log1p, math.log1p  # module attributes, so tests can perturb one
_scratch_local = threading.local()


def _scratch(n: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """This thread's buffers of at least n elements (int64 words as a tensor, two float64, int64)."""
    bufs = getattr(_scratch_local, "bufs", None)
    if bufs is None or bufs[1].size < n:
        size = max(n, 8 * 2051)
        with torch.inference_mode(False):  # a normal tensor: written in place in and out of inference mode
            bufs = (torch.empty(size, dtype=torch.int64), np.empty(size), np.empty(size), np.empty(size, np.int64))
        _scratch_local.bufs = bufs
    return bufs


_fast_noise: bool | None = None


def _fast_noise_ok() -> bool:
    """Whether `_cpu_exponential` matches this PyTorch's `exponential_` bit for bit (checked once,
    on 2 x 65,536 draws from fixed seeds, one generator and two per-row ones)."""
    global _fast_noise
    if _fast_noise is None:
        try:
            shape = torch.Size((32, 2048))
            want = torch.empty(shape).exponential_(1.0, generator=torch.Generator().manual_seed(20261207))
            got = _cpu_exponential(shape, torch.Generator().manual_seed(20261207))
            rows = [torch.Generator().manual_seed(s) for s in (1, 2)]
            want_rows = torch.cat([torch.empty(1, 2048).exponential_(1.0, generator=torch.Generator().manual_seed(s))
                                   for s in (1, 2)])
            got_rows = _cpu_exponential(torch.Size((2, 2048)), rows)
            _fast_noise = bool(torch.equal(want, got) and torch.equal(want_rows, got_rows))
        except (RuntimeError, TypeError, ValueError):  # a PyTorch without this random_ or layout
            _fast_noise = False
    return _fast_noise


def sample_topk(logits: torch.Tensor, topk: int, temperature: float, generator: Generators = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) int64 ids from the top-k of softmax(logits / temperature).

    Computed in fp32 whatever the logits' dtype, so bf16 models sample from the same distribution.
    `topk == 1` is greedy: only the top id has non-zero probability.
    """
    logits = logits.float() / temperature
    k = min(topk, logits.size(-1))
    kth = kth_largest(logits, k)
    logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return multinomial_no_sync(probs, generator)


def kth_largest(x: torch.Tensor, k: int, group: int = 8) -> torch.Tensor:
    """(B, V) -> (B, 1): the k-th largest value of each row, exactly `torch.topk(x, k).values[:, -1:]`.

    For several rows it looks only at the k groups (of `group` neighbouring values) with the largest
    maxima: every value above the k-th largest lies in one of them, and they hold at least k values
    at least as large as their smallest maximum, so their k-th largest is the row's. topk over 2048
    values costs ~20 us a row on this project's CPU (it mispredicts a branch per value); over the
    groups' maxima and then the k groups' values it costs ~12.
    """
    b, v = x.shape
    if b > 1 and v % group == 0 and k * group < v:
        groups = x.view(b, v // group, group)
        top = torch.topk(groups.amax(dim=-1), k, dim=-1, sorted=False).indices
        x = groups.gather(1, top.unsqueeze(-1).expand(-1, -1, group)).view(b, k * group)
    return torch.topk(x, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
