"""Leaner transformer layers for CPU inference: the same Llama 3.2 math in fewer, larger ops.

One job: swap each torchtune self-attention layer of a loaded CSM for a `FusedLayer` holding the
same weights rearranged. Knows no loop, no I/O. CPU only (see `fuse_layers`).

What changes, per layer and step: q/k/v projections become one matrix (3 products -> 1), the MLP's
w1/w3 become one (2 -> 1), rotary embeddings are one complex multiply on a precomputed table,
and attention takes grouped K/V heads directly (`enable_gqa`) instead of copying them to every
query head. At batch 1 a CPU frame is ~1,000 small matrix products plus ~10,000 little ops
(measured: ~29% of an int8 frame outside the products), so fewer calls is most of the gain.
The results are the same as torchtune's layers up to float rounding (tests/test_fused.py).
Weights are moved, not copied: the fused model has no q_proj/k_proj/... parameters, so fuse after
loading a checkpoint, like `quant.quantize`.
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
    """Swap every backbone and decoder layer for a `FusedLayer` (in place; CPU float models only).

    Call after loading weights and before `quant.quantize` (which then quantizes the fused
    matrices). The CUDA path keeps torchtune's layers: its frame runs as one captured graph.
    """
    if getattr(model, "fused", False):
        return model
    p = next(model.parameters())
    if p.device.type != "cpu" or not p.is_floating_point():
        raise ValueError(f"fused layers are for CPU float models (got {p.device.type} {str(p.dtype)[6:]})")
    if model.quantization != "none":
        raise ValueError("fuse the layers before quantizing the model")
    model.drop_caches()
    for stack in (model.backbone, model.decoder):
        for i, layer in enumerate(stack.layers):
            stack.layers[i] = FusedLayer(layer)
    model.fused = True
    return model
