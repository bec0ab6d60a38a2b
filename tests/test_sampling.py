"""Sampling noise and top-k threshold: the fast CPU paths give exactly what PyTorch's own calls give."""

import math

import numpy as np
import pytest
import torch

import csm_multi.sampling as sampling
from csm_multi.sampling import exponential_noise, kth_largest, sample_topk


def _want(shape, seeds):
    """exponential_ itself: one generator for the whole tensor, or one per row."""
    if isinstance(seeds, int):
        return torch.empty(shape).exponential_(1.0, generator=torch.Generator().manual_seed(seeds))
    return torch.cat([torch.empty(1, shape[1]).exponential_(1.0, generator=torch.Generator().manual_seed(s))
                      for s in seeds])


def test_the_fast_cpu_noise_is_in_use_here():
    assert sampling._fast_noise_ok()


@pytest.mark.parametrize("seeds", [7, 2**40 + 3, [1, 2], [5, 6, 7, 8, 9, 10, 11, 12]])
def test_noise_equals_exponential_value_for_value_and_leaves_the_generators_where_it_does(seeds):
    shape = (8, 2048) if isinstance(seeds, int) else (len(seeds), 2048)
    gens = (torch.Generator().manual_seed(seeds) if isinstance(seeds, int)
            else [torch.Generator().manual_seed(s) for s in seeds])
    got = torch.cat([exponential_noise(torch.empty(shape), gens) for _ in range(40)], dim=1)
    if isinstance(seeds, int):
        ref = torch.Generator().manual_seed(seeds)
        want = torch.cat([torch.empty(shape).exponential_(1.0, generator=ref) for _ in range(40)], dim=1)
        after = [(gens, ref)]
    else:
        refs = [torch.Generator().manual_seed(s) for s in seeds]
        want = torch.cat([torch.cat([torch.empty(1, 2048).exponential_(1.0, generator=g) for g in refs])
                          for _ in range(40)], dim=1)
        after = list(zip(gens, refs))
    assert torch.equal(got, want)
    for g, ref in after:  # the next draw of each generator is the same: they advanced as far
        assert torch.equal(g.get_state(), ref.get_state())


def test_noise_stays_exact_when_the_vectorised_log1p_is_off_by_ulps(monkeypatch):
    """numpy's log1p may differ from the C library's by an ulp or two; perturbing every value by up to
    3 ulps must not change one float (values near a rounding midpoint are recomputed)."""
    real = np.log1p
    rng = np.random.default_rng(0)

    def off_by_ulps(x, out):
        real(x, out=out)
        out.view(np.int64)[:] += rng.integers(-3, 4, size=out.size)
        return out

    monkeypatch.setattr(sampling, "_vector_log1p", off_by_ulps)
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(50):
        assert torch.equal(sampling._cpu_exponential(torch.Size((8, 2048)), g),
                           torch.empty(8, 2048).exponential_(1.0, generator=ref))


def test_the_c_library_log1p_gives_exponential_values(monkeypatch):
    """The recomputation path: with a window that sends ~half of all values to math.log1p, the noise is
    still exponential_'s, value for value (PyTorch's kernel uses the C library's log1p)."""
    calls = []

    def counted(x):
        calls.append(x)
        return math.log1p(x)

    monkeypatch.setattr(sampling, "_c_log1p", counted)
    monkeypatch.setattr(sampling, "_MIDPOINT_ULPS", 1 << 26)
    g, ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(4):
        assert torch.equal(sampling._cpu_exponential(torch.Size((4, 2048)), g),
                           torch.empty(4, 2048).exponential_(1.0, generator=ref))
    assert len(calls) > 4 * 4 * 2048 // 8


def test_values_near_a_float_midpoint_are_flagged_and_the_others_round_surely():
    rng = np.random.default_rng(1)
    d = np.exp(rng.uniform(np.log(2.0 ** -53), np.log(40.0), 20_000))  # the range of -log1p(-u)
    f = d.astype(np.float32)
    upper = np.nextafter(f, np.float32(np.inf)).astype(np.float64)
    midpoints = (f.astype(np.float64) + upper) / 2  # exact in double
    near = (midpoints.view(np.int64)[:, None] + np.arange(-20, 21)[None, :]).view(np.float64).ravel()
    values = np.concatenate([d, near])
    flagged = np.zeros(values.size, bool)
    flagged[sampling._near_midpoint(values, np.empty(values.size, np.int64), 16)] = True
    ulps_away = np.concatenate([np.full(d.size, 99), np.tile(np.abs(np.arange(-20, 21)), d.size)])
    assert flagged[ulps_away <= 16].all()  # every value within 16 ulps of a midpoint is recomputed
    sure = values[~flagged]
    for shift in (-8, -3, -1, 1, 3, 8):  # and an error of a few ulps never changes the others' floats
        moved = (sure.view(np.int64) + shift).view(np.float64)
        assert np.array_equal(moved.astype(np.float32), sure.astype(np.float32))


def test_noise_without_the_fast_path_is_exponential(monkeypatch):
    monkeypatch.setattr(sampling, "_fast_noise", False)
    assert torch.equal(exponential_noise(torch.empty(4, 100), [torch.Generator().manual_seed(s) for s in range(4)]),
                       _want((4, 100), list(range(4))))


def test_noise_scratch_works_in_and_out_of_inference_mode():
    with torch.inference_mode():
        a = exponential_noise(torch.empty(2, 2048), torch.Generator().manual_seed(1))
    b = exponential_noise(torch.empty(2, 2048), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(a, _want((2, 2048), 1))


@pytest.mark.parametrize("rows,vocab,k", [(8, 2048, 50), (3, 2048, 1), (2, 2048, 100), (5, 2051, 50), (4, 64, 10)])
def test_kth_largest_equals_topk(rows, vocab, k):
    g = torch.Generator().manual_seed(rows * vocab + k)
    cases = [
        torch.randn(rows, vocab, generator=g),
        torch.randint(-4, 5, (rows, vocab), generator=g).float(),  # ties everywhere, also at the k-th value
        torch.randn(rows, vocab, generator=g).masked_fill(torch.rand(rows, vocab, generator=g) < 0.97, float("-inf")),
        torch.randn(rows, vocab, generator=g).sort(dim=-1).values,  # the largest values in a few groups
    ]
    for x in cases:
        assert torch.equal(kth_largest(x, k), torch.topk(x, k, dim=-1).values[:, -1:])


def test_sampled_ids_for_a_seed_are_unchanged_by_the_fast_paths(monkeypatch):
    logits = torch.randn(8, 2048, generator=torch.Generator().manual_seed(9)) * 3
    fast = sample_topk(logits, 50, 0.9, [torch.Generator().manual_seed(s) for s in range(8)])
    monkeypatch.setattr(sampling, "_fast_noise", False)
    monkeypatch.setattr(sampling, "kth_largest",
                        lambda x, k: torch.topk(x, k, dim=-1).values[..., -1:])
    plain = sample_topk(logits, 50, 0.9, [torch.Generator().manual_seed(s) for s in range(8)])
    assert torch.equal(fast, plain)
