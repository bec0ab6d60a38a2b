"""The llama.cpp candidate (csm_multi.ggml_bench): its rope factors are torchtune's scaling, and,
where llama-cpp-python is installed, a small CSM run through llama.cpp matches ours."""
import importlib.util

import numpy as np
import pytest
import torch
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE

from csm_multi.ggml_bench import rope_factors


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rope_factors_give_torchtunes_scaled_frequencies(head_dim):
    base = 500_000.0
    plain = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaled = Llama3ScaledRoPE(head_dim, 2048, base, scale_factor=32).theta.double().numpy()
    factors = rope_factors(head_dim, base, 32.0)
    assert factors.min() == 1.0 and factors.max() == 32.0  # both ends of the scaling are present
    np.testing.assert_allclose(plain / factors, scaled, rtol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
                    reason="llama-cpp-python and gguf are optional (the benchmark's backend)")
def test_a_small_csm_through_llama_cpp_matches_ours(tmp_path):
    from csm_multi.ggml_bench import check_mapping

    torch.set_num_threads(2)
    got = check_mapping(str(tmp_path))
    assert got["hidden_rel_error"] < 1e-4 and got["logits_rel_error"] < 1e-4
