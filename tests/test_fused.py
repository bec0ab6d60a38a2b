"""Fused CPU layers (fused.py): the same numbers as torchtune's layers, and the same codes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.config import SamplingConfig
from csm_multi.engine import Engine
from csm_multi.frames import text_frames
from csm_multi.fused import FusedLayer, fuse_layers
from csm_multi.quant import quantize
from csm_multi.text import ByteTokenizer

PROMPT = [128000, *b"[0]Hello there.", 128001]


@pytest.fixture(scope="module")
def pair(tiny_model):
    return tiny_model, fuse_layers(copy.deepcopy(tiny_model))


def _names(model):
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m) is nn.Linear}


def test_every_layer_is_fused_and_holds_the_same_weights_once(pair):
    ref, fused = pair
    n = ref.config.backbone.num_layers + ref.config.decoder.num_layers
    assert sum(isinstance(m, FusedLayer) for m in fused.modules()) == n
    assert {"q_proj", "k_proj", "v_proj", "w1", "w3"} <= _names(ref)
    assert not {"q_proj", "k_proj", "v_proj", "w1", "w3"} & _names(fused)  # moved, not copied
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in ref.parameters())
    layer = fused.backbone.layers[0]
    a = ref.backbone.layers[0].attn
    assert torch.equal(layer.qkv.weight, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))


@torch.inference_mode()
def test_fused_frames_match_torchtune_layers(pair):
    """Prefill, then several single-position steps through both stacks (KV caches and trimming)."""
    ref, fused = pair
    tokens, mask = text_frames(PROMPT, ref.config.audio_num_codebooks)
    outs = []
    for model in (ref, fused):
        model.setup_caches(1)
        model.reset_caches()
        pos = torch.arange(tokens.size(0))[None]
        h = [model.backbone_step(tokens[None], mask[None], pos)]
        step = torch.zeros(1, 1, ref.config.frame_width, dtype=torch.long)
        step[..., :-1] = torch.arange(ref.config.audio_num_codebooks) * 7
        for _ in range(3):
            pos = pos[:, -1:] + 1
            h.append(model.backbone_step(step, torch.ones_like(step, dtype=torch.bool), pos))
        model.decoder.reset_caches()
        dpos = model.decoder_positions[:1, :2]
        d = [model.decoder_step(torch.stack([h[-1], h[-2]], 1), dpos)]
        d.append(model.decoder_step(h[-1][:, None], dpos[:, -1:] + 1))
        outs.append(torch.cat([*h, *d], dim=-1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_fused_engine_gives_the_same_codes_for_a_seed(pair):
    codes = []
    for model in pair:
        engine = Engine(model, ByteTokenizer(), MimiCodec(build_mimi(None)), watermark=False)
        codes.append(engine.generate("Hi there.", 0, sampling=SamplingConfig(seed=5, topk=30,
                                                                             max_audio_length_ms=480)).codes)
    assert codes[0].shape[1] > 0 and torch.equal(codes[0], codes[1])


def test_fused_then_int8(tiny_model):
    model = quantize(fuse_layers(copy.deepcopy(tiny_model)))
    assert _names(model) == set() and model.fused and model.quantization == "int8"
    engine = Engine(model, ByteTokenizer(), MimiCodec(build_mimi(None)), watermark=False)
    assert torch.isfinite(engine.generate("Hi.", 0, sampling=SamplingConfig(seed=1, max_audio_length_ms=240)).audio).all()
    with pytest.raises(ValueError, match="before quantizing"):
        fuse_layers(quantize(copy.deepcopy(tiny_model)))
    with pytest.raises(ValueError, match="CPU float"):
        fuse_layers(copy.deepcopy(tiny_model).to("meta"))


def test_fused_batches_with_left_padding_give_the_same_codes(pair):
    """Prompts of unequal length: padding slots are masked out of attention in both layer kinds."""
    requests = [("Hi.", 0, ()), ("A much longer line than the first one.", 1, ())]
    codes = []
    for model in pair:
        engine = Engine(model, ByteTokenizer(), MimiCodec(build_mimi(None)), watermark=False)
        out = engine.generate_batch(requests, SamplingConfig(seed=9, topk=30, max_audio_length_ms=400))
        codes.append([u.codes for u in out])
    assert all(c.shape[1] > 0 for c in codes[0])
    assert all(torch.equal(a, b) for a, b in zip(codes[0], codes[1], strict=True))
