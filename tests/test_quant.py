"""int8 weights for CPU (quant.py): what is replaced, how close the logits stay, and that the
whole engine still generates with them. Also the KV caches, which quantization drops."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchtune.modules.kv_cache import KVCache

from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.config import SamplingConfig
from csm_multi.engine import Engine
from csm_multi.frames import text_frames
from csm_multi.fused import PackedLinear, fuse_layers, onednn_works
from csm_multi.model import StaticKVCache
from csm_multi import quant
from csm_multi.quant import quantize
from csm_multi.text import ByteTokenizer


@pytest.fixture(scope="module")
def pair(tiny_model):
    """(float model, int8 copy) with identical float weights."""
    return tiny_model, quantize(copy.deepcopy(tiny_model))


def _linears(model):
    return [m for m in model.modules() if type(m) is nn.Linear]


def test_every_linear_layer_is_int8_and_the_rest_stays_float(pair):
    ref, q = pair
    assert len(_linears(ref)) == 7 * (ref.config.backbone.num_layers + ref.config.decoder.num_layers) + 2
    assert _linears(q) == []  # q/k/v/out projections, MLPs, projection, codebook0 head all replaced
    assert q.quantization == "int8" and ref.quantization == "none"
    assert q.audio_head.dtype == torch.float32 and torch.equal(q.audio_head, ref.audio_head)
    assert ref.codebook_heads is None and len(q.codebook_heads) == ref.config.audio_num_codebooks - 1
    assert torch.equal(q.text_embeddings.weight, ref.text_embeddings.weight)


@torch.inference_mode()
def test_int8_logits_stay_close_to_float(pair):
    ref, q = pair
    tokens, mask = text_frames([128000, *b"[0]Hello there.", 128001], ref.config.audio_num_codebooks)
    tokens, mask = tokens[None], mask[None]
    pos = torch.arange(tokens.size(1))[None]
    out = []
    for model in (ref, q):
        model.setup_caches(1)
        model.reset_caches()
        h = model.backbone_step(tokens, mask, pos)
        model.decoder.reset_caches()
        d = model.decoder_step(torch.stack([h, h], 1), model.decoder_positions[:1, :2])
        heads = torch.stack([model.codebook_logits(i, d) for i in range(1, ref.config.audio_num_codebooks)])
        out.append((h, model.codebook0_head(h), heads))
    (h_ref, l_ref, k_ref), (h_q, l_q, k_q) = out
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(h_q, h_ref) < 0.05  # per-channel int8 weights: ~1% error expected; bf16 is ~0.5%
    assert rel(l_q, l_ref) < 0.05
    assert rel(k_q, k_ref) < 0.05  # codebooks 1..K-1 through the int8 heads
    assert l_q.dtype == torch.float32 and k_q.dtype == torch.float32


def _in_subprocess(code: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


_KINDS = """
import copy, torch
from csm_multi import quant
from csm_multi.config import get_preset
from csm_multi.model import CSM
m = quant.quantize(CSM(get_preset("tiny")).init_random_(0))
print(quant.full_range_works(), sorted({type(x).__name__ for x in m.modules() if type(x).__name__.endswith("Linear")}))
"""


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="needs fbgemm (x86)")
def test_full_range_activations_only_where_the_int8_kernel_cannot_saturate():
    # fbgemm's AVX2 kernels sum pairs of u8 x s8 products in 16 bits: full-range activations would
    # saturate there, and the probe must see it (FBGEMM_ENABLE_INSTRUCTIONS caps fbgemm's ISA).
    assert _in_subprocess(_KINDS, FBGEMM_ENABLE_INSTRUCTIONS="AVX2") == "False ['Linear']"
    assert _in_subprocess(_KINDS, CSM_INT8_REDUCE_RANGE="1") == "False ['Linear']"
    saturating = """
import torch, warnings
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
warnings.simplefilter("ignore")
lin = nn.Sequential(nn.Linear(256, 8, bias=False)); nn.init.constant_(lin[0].weight, 0.02)
q = quantize_dynamic(lin, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)[0]
x = torch.full((1, 256), 3.0); x[0, -1] = 0.0
want = x @ lin[0].weight.T
err = lambda rr: float((torch.ops.quantized.linear_dynamic(x, q._packed_params._packed_params, rr) - want).norm() / want.norm())
print(err(True) < 0.01, err(False) > 0.1)
"""
    assert _in_subprocess(saturating, FBGEMM_ENABLE_INSTRUCTIONS="AVX2") == "True True"  # what the probe guards
    if quant.full_range_works():  # this CPU's fbgemm has VNNI: the engine's own int8 layers use the full range
        assert _in_subprocess(_KINDS) == "True ['FullRangeLinear']"


@pytest.mark.skipif(not quant.full_range_works(), reason="this CPU's int8 kernel needs 7-bit activations")
@torch.inference_mode()
def test_full_range_activations_cut_the_int8_products_error(pair):
    _, q = pair
    assert {type(m) for m in q.modules() if type(m).__name__.endswith("Linear")} == {quant.FullRangeLinear}
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(1024, 512, bias=False))
    x = torch.randn(8, 1024)
    want = x.double() @ lin[0].weight.double().T
    quant._int8_children(lin)
    full = lin[0](x).double()
    reduced = quant.DynamicLinear.forward(lin[0], x).double()  # PyTorch's own: 7-bit activations
    err = lambda y: float((y - want).norm() / want.norm())  # noqa: E731
    assert type(lin[0]) is quant.FullRangeLinear and err(full) < 0.75 * err(reduced), (err(full), err(reduced))


def test_quantized_engine_generates_decodable_audio(pair):
    _, q = pair
    engine = Engine(q, ByteTokenizer(), MimiCodec(build_mimi(None)), watermark=False)
    sampling = SamplingConfig(topk=20, seed=3, max_audio_length_ms=400)
    utt = engine.generate("Hi.", 0, sampling=sampling)
    again = engine.generate("Hi.", 0, sampling=sampling)
    assert utt.codes.shape[0] == q.config.audio_num_codebooks and utt.codes.max() < 2048
    assert torch.equal(utt.codes, again.codes)  # still deterministic for a seed
    assert utt.audio.ndim == 1 and torch.isfinite(utt.audio).all()


def test_quantize_refuses_what_it_cannot_run(tiny_model):
    with pytest.raises(ValueError, match="bfloat16"):
        quantize(copy.deepcopy(tiny_model).to(torch.bfloat16))
    with pytest.raises(ValueError, match="int8"):
        quantize(tiny_model, "int2")
    assert quantize(tiny_model, "none") is tiny_model and tiny_model.quantization == "none"


def test_caches_are_static_reallocated_once_and_dropped(tiny_config):
    from csm_multi.model import CSM

    model = CSM(tiny_config).init_random_(seed=2).eval()
    model.setup_caches(2)
    caches = model._kv_caches()
    n_layers = tiny_config.backbone.num_layers + tiny_config.decoder.num_layers
    assert len(caches) == n_layers and all(type(c) is StaticKVCache for c in caches)
    assert not any(type(m) is KVCache for m in model.modules())  # torchtune's own never allocated
    assert caches[0].k_cache.shape[:3] == (2, tiny_config.backbone.num_kv_heads, tiny_config.max_seq_len)
    assert model._kv_caches()[-1].k_cache.shape[2] == tiny_config.audio_num_codebooks
    version = model.cache_version
    model.setup_caches(2)  # same size: nothing reallocated
    assert model._kv_caches()[0] is caches[0] and model.cache_version == version
    model.setup_caches(1)
    assert model._kv_caches()[0].k_cache.shape[0] == 1 and model.cache_version > version
    model.drop_caches()
    assert model._kv_caches() == [] and not model.trim_kv


def test_build_engine_quantizes_on_request_and_says_so(capsys):
    from csm_multi import cli
    from csm_multi.loaders import build_engine

    engine = build_engine("tiny", device="cpu", watermark=False, quantize="int8")
    assert engine.model.quantization == "int8" and "int8 weights" in engine.info.dtype
    bits = 8 if quant.full_range_works() else 7
    assert f"{bits}-bit activations" in engine.info.dtype  # Status says which scheme runs
    assert engine.generate("Hi.", 0, sampling=SamplingConfig(seed=1, max_audio_length_ms=240)).audio.numel() > 0
    with pytest.raises(ValueError, match="none, int8, int4"):
        build_engine("tiny", device="cpu", watermark=False, quantize="int2")
    assert cli.main(["info", "--model", "tiny", "--no-watermark", "--quantize", "int8"]) == 0
    assert "int8 weights" in capsys.readouterr().out


# ---- bf16 products (`--quantize bf16`) ----------------------------------------------------------

needs_bf16 = pytest.mark.skipif(not onednn_works(torch.bfloat16), reason="no oneDNN bf16 product in this PyTorch/CPU")


@torch.inference_mode()
def _first_frame(model):
    """The first frame's backbone state, codebook-0 logits and codebook 1..K-1 logits for one prompt."""
    tokens, mask = text_frames([128000, *b"[0]Hello there.", 128001], model.config.audio_num_codebooks)
    tokens, mask = tokens[None], mask[None]
    model.setup_caches(1)
    model.reset_caches()
    h = model.backbone_step(tokens, mask, torch.arange(tokens.size(1))[None])
    model.decoder.reset_caches()
    d = model.decoder_step(torch.stack([h, h], 1), model.decoder_positions[:1, :2])
    heads = torch.stack([model.codebook_logits(i, d) for i in range(1, model.config.audio_num_codebooks)])
    return [t.float() for t in (h, model.codebook0_head(h), heads)]


@needs_bf16
def test_bf16_products_keep_the_rest_float32_and_move_the_logits_no_more_than_bf16(tiny_model):
    q = quantize(fuse_layers(copy.deepcopy(tiny_model)), "bf16")
    assert q.quantization == "bf16" and _linears(q) == []  # every product, small ones too
    packed = [m for m in q.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 4 * (q.config.backbone.num_layers + q.config.decoder.num_layers) + 2 + len(q.codebook_heads)
    assert all(m.dtype == torch.bfloat16 for m in packed)
    assert q.audio_head.dtype == torch.float32 and torch.equal(q.text_embeddings.weight, tiny_model.text_embeddings.weight)
    ref = _first_frame(tiny_model)
    bar = _first_frame(copy.deepcopy(tiny_model).to(torch.bfloat16))  # the whole model in bf16: the bar
    got = _first_frame(q)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    for name, r, b, g in zip(("hidden state", "codebook 0", "codebooks 1..K-1"), ref, bar, got):
        assert g.dtype == torch.float32, name
        assert 0 < rel(g, r) <= 2 * rel(b, r), name  # bf16 rounding shows, and no more than bf16's


@needs_bf16
def test_bf16_engine_generates_the_same_codes_for_a_seed_and_says_so():
    from csm_multi.loaders import build_engine

    engine = build_engine("tiny", device="cpu", watermark=False, quantize="bf16")
    assert engine.model.quantization == "bf16" and "bf16 weights" in engine.info.dtype
    sampling = SamplingConfig(topk=20, seed=3, max_audio_length_ms=400)
    utt, again = (engine.generate("Hi.", 0, sampling=sampling) for _ in range(2))
    assert utt.codes.max() < 2048 and torch.equal(utt.codes, again.codes)
    assert torch.isfinite(utt.audio).all() and utt.audio.numel() > 0


def test_bf16_refuses_clearly_where_oneDNN_has_no_bf16_product(tiny_model, monkeypatch):
    import csm_multi.fused as fused

    monkeypatch.setattr(fused, "onednn_works", lambda dtype=torch.float32: dtype == torch.float32)
    with pytest.raises(RuntimeError, match="--quantize bf16 needs .* use --quantize none"):
        quantize(fuse_layers(copy.deepcopy(tiny_model)), "bf16")


def test_auto_takes_bf16_only_for_large_matrices_on_a_cpu_that_multiplies_bf16(tiny_model, monkeypatch):
    import csm_multi.fused as fused
    from csm_multi.loaders import auto_quantize, build_engine

    monkeypatch.setattr(fused, "bf16_native", lambda: True)
    monkeypatch.setattr(fused, "onednn_works", lambda dtype=torch.float32: True)
    assert auto_quantize(tiny_model) == "none"  # the tiny preset's products are too small to gain
    monkeypatch.setattr(fused, "MIN_PACKED", 1)  # as if its matrices were csm-1b's
    assert auto_quantize(tiny_model) == "bf16"
    assert auto_quantize(copy.deepcopy(tiny_model).to(torch.bfloat16)) == "none"  # a bf16 model stays as it is
    monkeypatch.setattr(fused, "bf16_native", lambda: False)  # AVX2 only: oneDNN would emulate bf16, slower
    assert auto_quantize(tiny_model) == "none"
    assert build_engine("tiny", device="cpu", watermark=False).model.quantization == "none"


@needs_bf16
def test_auto_builds_the_bf16_engine_where_it_applies_and_says_so(monkeypatch, caplog):
    import csm_multi.fused as fused
    from csm_multi.loaders import build_engine

    monkeypatch.setattr(fused, "bf16_native", lambda: True)
    monkeypatch.setattr(fused, "MIN_PACKED", 1)
    with caplog.at_level("INFO", logger="csm_multi"):
        engine = build_engine("tiny", device="cpu", watermark=False)
    assert engine.model.quantization == "bf16" and "bf16 weights" in engine.info.dtype
    assert "--quantize none for float32" in caplog.text
    assert build_engine("tiny", device="cpu", watermark=False, quantize="none").model.quantization == "none"
