"""Bridge to transformers' `CsmForConditionalGeneration`: the same model in their classes, for
parity tests, checkpoint writing in their layout, and the side-by-side benchmark.

Imports transformers only when called. Knows our config and checkpoint names, nothing else.
"""

from __future__ import annotations

import torch

from .checkpoints import to_transformers
from .config import ModelConfig

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def hf_config(config: ModelConfig, small_codec: bool = False):
    """A `CsmConfig` with our shapes (rope: Llama 3 scaling, as torchtune's llama3_2 builds it)."""
    from transformers import CsmConfig, MimiConfig

    b, d = config.backbone, config.decoder
    depth = dict(
        hidden_size=d.embed_dim, intermediate_size=d.intermediate_dim, num_hidden_layers=d.num_layers,
        num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads, head_dim=d.head_dim,
        backbone_hidden_size=b.embed_dim, num_codebooks=config.audio_num_codebooks,
        vocab_size=config.audio_vocab_size, max_position_embeddings=config.audio_num_codebooks + 1,
        rms_norm_eps=d.norm_eps, rope_parameters={**LLAMA3_ROPE, "rope_theta": d.rope_base},
    )
    codec = MimiConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=64, num_filters=4, codebook_dim=16, head_dim=16,
                       vector_quantization_hidden_dimension=16, upsample_groups=32) if small_codec else MimiConfig()
    return CsmConfig(
        hidden_size=b.embed_dim, intermediate_size=b.intermediate_dim, num_hidden_layers=b.num_layers,
        num_attention_heads=b.num_heads, num_key_value_heads=b.num_kv_heads, head_dim=b.head_dim,
        max_position_embeddings=b.max_seq_len, rms_norm_eps=b.norm_eps,
        rope_parameters={**LLAMA3_ROPE, "rope_theta": b.rope_base},
        num_codebooks=config.audio_num_codebooks, vocab_size=config.audio_vocab_size,
        text_vocab_size=config.text_vocab_size, depth_decoder_config=depth, codec_config=codec.to_dict(),
    )


def hf_model(state: dict[str, torch.Tensor], config: ModelConfig, small_codec: bool = False):
    """A `CsmForConditionalGeneration` holding our weights (codec weights left at their init)."""
    from transformers import CsmForConditionalGeneration

    model = CsmForConditionalGeneration(hf_config(config, small_codec))
    result = model.load_state_dict(to_transformers(state, config), strict=False)
    stray = [k for k in result.missing_keys if not k.startswith("codec_model.")]
    if stray or result.unexpected_keys:
        raise RuntimeError(f"layout mismatch: missing {stray[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()
