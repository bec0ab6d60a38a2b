"""The llama.cpp candidate (csm_multi.ggml_bench): its rope factors are torchtune's scaling, and,
where llama-cpp-python is installed, a small CSM run through llama.cpp matches ours."""
import importlib.util

import numpy as np
import pytest
import torch

from csm_multi.config import LlamaConfig
from csm_multi.ggml_bench import rope_factors


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rope_factors_span_llama3_scaling_from_none_to_the_full_factor(head_dim):
    factors = rope_factors(LlamaConfig(num_layers=1, num_heads=1, num_kv_heads=1, embed_dim=head_dim,
                                       intermediate_dim=8))
    assert factors.shape == (head_dim // 2,)
    assert factors.min() == 1.0 and factors.max() == 32.0  # high frequencies kept, low ones divided by 32
    assert np.all(np.diff(factors) >= 0)  # the longer the wavelength, the more it is scaled


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
                    reason="llama-cpp-python and gguf are optional (the benchmark's backend)")
def test_a_small_csm_through_llama_cpp_matches_ours(tmp_path):
    from csm_multi.ggml_bench import check_mapping

    torch.set_num_threads(2)
    got = check_mapping(str(tmp_path))
    assert got["hidden_rel_error"] < 1e-4 and got["logits_rel_error"] < 1e-4
