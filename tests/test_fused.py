"""Fused layers (fused.py): the same numbers as torchtune's layers, and the same codes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from csm_multi import fused as fused_module
from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.config import SamplingConfig
from csm_multi.engine import Engine
from csm_multi.frames import text_frames
from csm_multi.fused import FusedLayer, PackedLinear, fuse_layers, pack_linears
from csm_multi.quant import quantize
from csm_multi.text import ByteTokenizer

PROMPT = [128000, *b"[0]Hello there.", 128001]


@pytest.fixture(scope="module")
def pair(tiny_model):
    return tiny_model, fuse_layers(copy.deepcopy(tiny_model))


@pytest.fixture(scope="module", params=["fused", "fused+packed"])
def variant(request, tiny_model):
    """(torchtune model, the same weights with fused layers, and with oneDNN-packed products too)."""
    model = fuse_layers(copy.deepcopy(tiny_model))
    if request.param.endswith("packed"):
        assert pack_linears(model, min_elements=0).packed  # tiny's matrices are all below MIN_PACKED
    return tiny_model, model


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
def test_fused_frames_match_torchtune_layers(variant):
    """Prefill, then several single-position steps through both stacks (KV caches and trimming)."""
    ref, fused = variant
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


def _steps(model, trim: bool) -> torch.Tensor:
    """Prefill and four single-frame backbone steps, then two decoder steps; hidden states side by side."""
    tokens, mask = text_frames(PROMPT, model.config.audio_num_codebooks)
    model.setup_caches(1)
    model.trim_kv = trim
    model.reset_caches()
    pos = torch.arange(tokens.size(0))[None]
    h = [model.backbone_step(tokens[None], mask[None], pos)]
    step = torch.ones(1, 1, model.config.frame_width, dtype=torch.long)
    for _ in range(4):
        pos = pos[:, -1:] + 1
        h.append(model.backbone_step(step, torch.ones_like(step, dtype=torch.bool), pos))
    model.decoder.reset_caches()
    dpos = model.decoder_positions[:1, :2]
    d = [model.decoder_step(torch.stack([h[-1], h[-2]], 1), dpos), model.decoder_step(h[-1][:, None], dpos[:, -1:] + 1)]
    model.drop_caches()  # the next setup_caches picks the device's default trimming again
    return torch.cat([*h, *d], dim=-1).float()


@torch.inference_mode()
def test_fused_layers_with_fixed_shape_attention_as_the_cuda_graph_runs_them(variant):
    """CUDA keeps the whole 2048-slot cache in attention (no trimming) so a frame can be captured:
    the fused layers give the same numbers that way too."""
    ref, fused = variant
    want = _steps(ref, trim=True)
    torch.testing.assert_close(_steps(fused, trim=False), want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torchtune's bf16 RMSNorm
@torch.inference_mode()
def test_fused_layers_in_bfloat16_as_on_a_gpu(tiny_model):
    """bf16 (the CUDA dtype): norms go through torchtune's fp32 round trip, RoPE runs in fp32."""
    ref = copy.deepcopy(tiny_model).to(torch.bfloat16)
    fused = fuse_layers(copy.deepcopy(tiny_model).to(torch.bfloat16))
    assert next(fused.parameters()).dtype == torch.bfloat16
    want, exact = _steps(ref, trim=False), _steps(tiny_model, trim=False)
    got = _steps(fused, trim=False)
    bf16_error = float((want - exact).norm() / exact.norm())
    assert 0 < bf16_error < 0.05
    assert float((got - exact).norm() / exact.norm()) < 2 * bf16_error  # no worse than torchtune's bf16 layers


def test_fused_engine_gives_the_same_codes_for_a_seed(variant):
    codes = []
    for model in variant:
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


def test_fused_batches_with_left_padding_give_the_same_codes(variant):
    """Prompts of unequal length: padding slots are masked out of attention in both layer kinds."""
    requests = [("Hi.", 0, ()), ("A much longer line than the first one.", 1, ())]
    codes = []
    for model in variant:
        engine = Engine(model, ByteTokenizer(), MimiCodec(build_mimi(None)), watermark=False)
        out = engine.generate_batch(requests, SamplingConfig(seed=9, topk=30, max_audio_length_ms=400))
        codes.append([u.codes for u in out])
    assert all(c.shape[1] > 0 for c in codes[0])
    assert all(torch.equal(a, b) for a, b in zip(codes[0], codes[1], strict=True))


def test_packed_model_has_no_float_linear_left_and_packs_once(tiny_model):
    model = pack_linears(fuse_layers(copy.deepcopy(tiny_model)), min_elements=0)
    cfg = tiny_model.config
    assert model.packed and _names(model) == set()
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    k = cfg.audio_num_codebooks
    assert len(packed) == 4 * (cfg.backbone.num_layers + cfg.decoder.num_layers) + 2 + (k - 1)
    assert len(model.codebook_heads) == k - 1
    assert pack_linears(model) is model and len([m for m in model.modules() if isinstance(m, PackedLinear)]) == len(packed)
    with pytest.raises(ValueError, match="before fused.pack_linears"):
        quantize(model)


def test_packed_linear_computes_what_linear_does():
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(300, 200, generator=gen), torch.randn(4, 7, 200, generator=gen)
    layer = PackedLinear(w)
    assert (layer.in_features, layer.out_features) == (200, 300)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


def test_without_onednn_the_model_stays_as_it_was(tiny_model, monkeypatch):
    monkeypatch.setattr(fused_module, "onednn_works", lambda dtype=None: False)
    model = pack_linears(fuse_layers(copy.deepcopy(tiny_model)), min_elements=0)
    assert not model.packed and model.codebook_heads is None
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    int8 = pack_linears(quantize(fuse_layers(copy.deepcopy(tiny_model))), min_elements=0)  # int8 stays as it is
    assert not int8.packed and int8.quantization == "int8"


def test_only_matrices_of_at_least_min_elements_are_packed(tiny_model):
    assert not pack_linears(fuse_layers(copy.deepcopy(tiny_model))).packed  # MIN_PACKED: tiny stays as it was
    cfg = tiny_model.config
    cut = cfg.backbone.embed_dim * cfg.backbone.intermediate_dim  # w2 of the backbone and bigger
    model = pack_linears(fuse_layers(copy.deepcopy(tiny_model)), min_elements=cut)
    packed = {id(m) for m in model.modules() if isinstance(m, PackedLinear)}
    sizes = [m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features")]
    assert model.packed and packed and len(packed) < len(sizes)
    assert all((m.in_features * m.out_features >= cut) == (id(m) in packed)
               for m in model.modules() if hasattr(m, "in_features"))


def test_build_engine_packs_float_cpu_models_and_not_int8_ones(monkeypatch):
    from csm_multi.loaders import build_engine

    monkeypatch.setattr(fused_module, "MIN_PACKED", 0)  # tiny's matrices count as big here
    engine = build_engine("tiny", device="cpu", watermark=False)
    assert engine.model.fused and engine.model.packed and engine.model.codebook_heads is not None
    utt = engine.generate("Hi.", 0, sampling=SamplingConfig(seed=1, max_audio_length_ms=240))
    assert utt.codes.shape[1] > 0 and torch.isfinite(utt.audio).all()
    int8 = build_engine("tiny", device="cpu", watermark=False, quantize="int8")
    assert int8.model.quantization == "int8" and not int8.model.packed
