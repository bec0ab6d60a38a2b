"""Leaner transformer layers: the same Llama 3.2 math in fewer, larger ops.

One job: swap each torchtune self-attention layer of a loaded CSM for a `FusedLayer` holding the
same weights rearranged. Knows no loop, no I/O. `build_engine` uses it on CPU; on CUDA it is
opt-in (`bench --fuse`) until it has been timed inside the per-frame graph.

What changes, per layer and step: q/k/v projections become one matrix (3 products -> 1), the MLP's
w1/w3 become one (2 -> 1), rotary embeddings are one complex multiply on a precomputed table,
and attention takes grouped K/V heads directly (`enable_gqa`) instead of copying them to every
query head. At batch 1 a CPU frame is ~1,000 small matrix products plus ~10,000 little ops
(measured: ~29% of an int8 frame outside the products), so fewer calls is most of the gain.
The results are the same as torchtune's layers up to float rounding (tests/test_fused.py).
Weights are moved, not copied: the fused model has no q_proj/k_proj/... parameters, so fuse after
loading a checkpoint, like `quant.quantize`.

`pack_linears` then hands a float32 CPU model's products to oneDNN with prepacked weights
(`PackedLinear`), instead of PyTorch's default CPU matrix product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import CSM


class FusedAttentionState(nn.Module):
    """What the model's cache code expects at `layer.attn`: the KV cache and the head layout."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.kv_cache = None
        self.cache_enabled = False

    def reset_cache(self) -> None:
        if self.kv_cache is not None:
            self.kv_cache.reset()


class FusedLayer(nn.Module):
    """A torchtune `TransformerSelfAttentionLayer` (Llama 3.2, RMSNorm, GQA, SwiGLU) in fused form.

    x (B, S, D) at positions input_pos (B, S), boolean mask (B, S, L) over the L cache slots
    attention sees -> (B, S, D).
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        a, mlp = layer.attn, layer.mlp
        self.attn = FusedAttentionState(a.num_heads, a.num_kv_heads, a.head_dim)
        self.attn.kv_cache, self.attn.cache_enabled = a.kv_cache, a.cache_enabled
        self.qkv = _stacked(a.q_proj, a.k_proj, a.v_proj)
        self.output_proj = a.output_proj
        self.w13 = _stacked(mlp.w1, mlp.w3)
        self.w2 = mlp.w2
        self.hidden = mlp.w1.out_features
        self.sa_norm, self.mlp_norm = layer.sa_norm, layer.mlp_norm
        rope = a.pos_embeddings.cache.float()  # (max_seq_len, head_dim / 2, 2): cos, sin
        self.register_buffer("rope", torch.view_as_complex(rope.contiguous()), persistent=False)

    # what torchtune's TransformerDecoder asks of its layers
    def caches_are_setup(self) -> bool:
        return self.attn.kv_cache is not None

    def caches_are_enabled(self) -> bool:
        return self.attn.cache_enabled

    def reset_cache(self) -> None:
        self.attn.reset_cache()

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor, input_pos: torch.Tensor, **_) -> torch.Tensor:
        b, s, _ = x.shape
        a = self.attn
        hq, hk, hd = a.num_heads, a.num_kv_heads, a.head_dim
        qkv = self.qkv(_rms(self.sa_norm, x))
        # q and k sit side by side in qkv's output, so both rotate in one complex multiply
        # (torchtune's interleaved pairs; the table is (max_seq_len, hd / 2) complex).
        qk = torch.view_as_complex(qkv[..., : (hq + hk) * hd].float().reshape(b, s, hq + hk, hd // 2, 2))
        qk = torch.view_as_real(qk * self.rope[input_pos].unsqueeze(2)).reshape(b, s, hq + hk, hd).type_as(x).transpose(1, 2)
        v = qkv[..., (hq + hk) * hd :].view(b, s, hk, hd).transpose(1, 2)
        k, v = a.kv_cache.update(qk[:, hq:], v)
        out = F.scaled_dot_product_attention(qk[:, :hq], k, v, attn_mask=mask[:, None], enable_gqa=True)
        h = x + self.output_proj(out.transpose(1, 2).reshape(b, s, -1))
        gate_up = self.w13(_rms(self.mlp_norm, h))
        return h + self.w2(F.silu(gate_up[..., : self.hidden]) * gate_up[..., self.hidden :])


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchtune's RMSNorm, minus its float()/to() round trip when x is already float32."""
    if x.dtype != torch.float32:
        return norm(x)
    return F.rms_norm(x, norm.normalized_shape, norm.scale, norm.eps)


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One bias-free Linear whose output is the given layers' outputs side by side."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def fuse_layers(model: CSM) -> CSM:
    """Swap every backbone and decoder layer for a `FusedLayer` (in place; float models).

    Call after loading weights and before `quant.quantize` (which then quantizes the fused
    matrices). The layers keep fixed shapes when the KV cache is not trimmed, so a fused model
    can also be captured in `generate.FrameGraph` on CUDA.
    """
    if getattr(model, "fused", False):
        return model
    p = next(model.parameters())
    if not p.is_floating_point():
        raise ValueError(f"fused layers are for float models (got {str(p.dtype)[6:]})")
    if model.quantization != "none":
        raise ValueError("fuse the layers before quantizing the model")
    model.drop_caches()
    for stack in (model.backbone, model.decoder):
        for i, layer in enumerate(stack.layers):
            stack.layers[i] = FusedLayer(layer)
    model.fused = True
    return model


class PackedLinear(nn.Module):
    """A bias-free Linear run by oneDNN (PyTorch's mkldnn ops) on a weight reordered once into
    oneDNN's blocked layout. On CPU, PyTorch's default path (MKL sgemm) is slow on AMD processors
    and for a few rows at a time; this one read ~19 GB/s against 11.5 for batch 1 and 4.3x faster
    at batch 4 on the project's 2-core EPYC (bench/README). float32 x (..., in_features) ->
    float32 (..., out_features).

    `dtype` float32 (default): the same values as F.linear up to float rounding. bfloat16: the
    weight is kept in bf16 (half the bytes to read) and the input rounded to bf16 for the product,
    which oneDNN accumulates in float32 and rounds to bf16 (`--quantize bf16`; fast only where the
    CPU multiplies bf16 natively: `bf16_native`).
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float32):  # (out_features, in_features)
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous()),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, None, "none", [], "").float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {str(self.dtype)[6:]} oneDNN"


def onednn_works(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build has the packed oneDNN linear for `dtype` weights and it computes what
    F.linear does (to float rounding; to bf16's for bfloat16)."""
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        gen = torch.Generator().manual_seed(0)
        w, x = torch.randn(24, 40, generator=gen), torch.randn(3, 2, 40, generator=gen)
        got, want = PackedLinear(w, dtype)(x), F.linear(x, w)
        if dtype == torch.float32:
            return torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        return bool((got - want).norm() <= 2e-2 * want.norm())  # bf16 rounds inputs and weights: ~0.4% here
    except (RuntimeError, AttributeError, NotImplementedError):  # a build or CPU without these kernels
        return False


def bf16_native() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX), where bf16 products run
    at memory speed; elsewhere oneDNN emulates them and `--quantize bf16` is slower than float32."""
    cpu = getattr(torch._C, "_cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks) if cpu is not None else False


MIN_PACKED = 2**20  # weights below this many elements stay on PyTorch's product: oneDNN's call costs
# ~40 us against ~10 (measured on the 2-core EPYC), more than it saves on a small matrix. Every
# csm-1b matrix is at least 1024 x 1024; the tiny preset's are all smaller.


def large_products(model: CSM) -> bool:
    """Whether some weight product of `model` is csm-1b-sized (CPU): a Linear of at least MIN_PACKED
    weights, a packed oneDNN one, or quantized weights. There intra-op threads pay (the scheduler)
    and the products are bound by the bytes they read (`loaders.auto_quantize`)."""
    return model.quantization != "none" or any(
        isinstance(m, PackedLinear) or (isinstance(m, nn.Linear) and m.weight.numel() >= MIN_PACKED)
        for m in model.modules())


def pack_linears(model: CSM, min_elements: int | None = None, dtype: torch.dtype = torch.float32) -> CSM:
    """Swap each float32 `nn.Linear` of a CPU model (layers, projection, codebook-0 head) with at
    least `min_elements` (default `MIN_PACKED`) weights for a `PackedLinear`, and give the stacked
    codebook heads 1..K-1 packed copies in `model.codebook_heads` (as `quant.quantize` does with int8).

    In place; the last step before generating (after `fuse_layers`; int8 models are left as they
    are). `model.packed` says whether anything was packed: where oneDNN is missing or wrong, or
    every matrix is small, the model is left unchanged. `dtype` bfloat16 keeps the packed weights in
    bf16 (`quant.quantize(model, "bf16")` calls it so).
    """
    if model.packed or model.quantization != "none":
        return model
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32 or not onednn_works(dtype):
        return model
    min_elements = MIN_PACKED if min_elements is None else min_elements
    with torch.no_grad():
        for parent in [model, *model.backbone.modules(), *model.decoder.modules()]:
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child.bias is None and child.weight.numel() >= min_elements and (
                        parent is not model or name in ("projection", "codebook0_head")):
                    setattr(parent, name, PackedLinear(child.weight, dtype))
        if model.audio_head[0].numel() >= min_elements:
            model.codebook_heads = nn.ModuleList(PackedLinear(head.t(), dtype) for head in model.audio_head.detach())
    model.packed = any(isinstance(m, PackedLinear) for m in model.modules())
    return model
