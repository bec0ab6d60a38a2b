"""A csm-1b-sized model (random weights) builds, round-trips a checkpoint and generates on CPU."""

import pytest
import torch

from csm_multi.config import get_preset
from csm_multi.frames import text_frames
from csm_multi.generate import Sampler, iterate_frames
from csm_multi.model import CSM


@pytest.mark.slow
def test_csm_1b_sized_model_generates_frames():
    cfg = get_preset("csm-1b")
    model = CSM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # quick random init: speed matters here, not the distribution
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    model.eval()
    tokens, mask = text_frames([128000, 58, 15, 60, 9906, 13, 128001], cfg.audio_num_codebooks)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        frames = [c for c, _ in iterate_frames(model, tokens[None], mask[None], Sampler(0.9, 50, gen, 2048), 3)]
    assert len(frames) == 3
    codes = torch.cat(frames)
    assert codes.shape == (3, 32) and codes.max() < 2048 and codes.min() >= 0
    assert model.backbone_causal_mask.shape == (2048, 2048)
    kv = model.backbone.layers[0].attn.kv_cache
    assert kv.k_cache.shape == (1, 8, 2048, 64) and kv.k_cache.dtype == torch.bfloat16
