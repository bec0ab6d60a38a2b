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
        self.splits = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim)
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

    def _rotate(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """(B, S, H, hd) rotated pairwise (torchtune's interleaved layout) -> (B, H, S, hd)."""
        b, s, h, _ = x.shape
        pairs = torch.view_as_complex(x.float().reshape(b, s, h, -1, 2))
        return torch.view_as_real(pairs * freqs).flatten(3).type_as(x).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor, input_pos: torch.Tensor, **_) -> torch.Tensor:
        b, s, _ = x.shape
        a = self.attn
        q, k, v = self.qkv(self.sa_norm(x)).split(self.splits, dim=-1)
        freqs = self.rope[input_pos].unsqueeze(2)  # (B, S, 1, hd / 2)
        q = self._rotate(q.view(b, s, a.num_heads, a.head_dim), freqs)
        k = self._rotate(k.view(b, s, a.num_kv_heads, a.head_dim), freqs)
        k, v = a.kv_cache.update(k, v.view(b, s, a.num_kv_heads, a.head_dim).transpose(1, 2))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        h = x + self.output_proj(out.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.w13(self.mlp_norm(h)).split(self.hidden, dim=-1)
        return h + self.w2(F.silu(gate) * up)


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
