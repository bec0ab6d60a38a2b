"""Weight quantization for CPU inference: int8 weights, activations quantized per call; or int4; or
bf16 weights (`fused.PackedLinear` in bfloat16: for CPUs that multiply bf16 natively).

One job: turn a float CSM's `nn.Linear` layers into int8 ones (here) or int4 ones (`int4.py`:
ONNX Runtime's blockwise MatMulNBits, converted weights cached on disk). Knows no loop.

Why this scheme on CPU: at batch 1 a frame is ~32 matrix-vector products per layer stack, each
bound by how many weight bytes come from memory (csm-1b reads ~4.4 GB of fp32 backbone weights
plus 31 x 0.4 GB of decoder weights per frame). int8 weights read a quarter of the bytes, and
PyTorch's fbgemm kernels (`quantized::linear_dynamic`, AVX2 and up) multiply them directly.
torchao's int8 configs take a dequantize-then-matmul route in eager mode on CPU, measured slower
than fp32 on this project's 2-core AVX2 machine, so they are not used here.

Per-output-channel weight scales; activations are quantized per call with one scale (per token
during generation, where a call sees one position), over all 256 levels where fbgemm's kernel
accumulates in 32 bits (VNNI: `full_range_works`), else over 128 as PyTorch's module does. The
stacked `audio_head` (codebooks 1..K-1) gets int8 copies, one Linear per codebook in
`model.codebook_heads` (the float tensor stays: it names the model's dtype and is what checkpoints
hold). Embeddings and norms stay float. Logits are float, and sampling runs in fp32 as always.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import nn

with warnings.catch_warnings():  # torch 2.9 flags the torch.ao namespace as moving to torchao
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from .config import QUANT_MODES
from .model import CSM

MODES = QUANT_MODES


def quantize(model: CSM, mode: str = "int8", *, cache: str | None = None) -> CSM:
    """Quantize `model` in place for CPU inference (mode "int8", "int4" or "bf16"; "none" returns it
    unchanged). "bf16": every weight product's matrix in bfloat16 on oneDNN (`fused.PackedLinear`),
    activations rounded to bf16 for the products only; embeddings, norms, attention, the KV cache and
    sampling stay float32. A RuntimeError where this PyTorch has no oneDNN bf16 product.

    The model must be float32 on the CPU. Its KV caches are dropped (re-made on next use). "int4"
    needs onnxruntime and onnx (`int4.BackendMissing`, an ImportError, says how to install them);
    `cache` is its converted-weight folder (default $CSM_INT4_CACHE, else ~/.cache/csm-multi/int4).
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return model
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise ValueError(
            f"{mode} quantization runs on CPU float32 models (got {p.device.type} {str(p.dtype)[6:]}); "
            "on a GPU use bfloat16, which the CUDA-graph path is built for"
        )
    if model.packed:
        raise ValueError("quantize the model before fused.pack_linears (packed float layers cannot be quantized)")
    if mode == "int4":
        from .int4 import int4_model

        int4_model(model, cache)
    elif mode == "bf16":
        from .fused import pack_linears

        pack_linears(model, min_elements=0, dtype=torch.bfloat16)
        if not model.packed:
            raise RuntimeError("--quantize bf16 needs PyTorch's oneDNN bf16 products, which this build or CPU lacks: "
                               "use --quantize none (float32) or int8")
    else:
        int8_linears(model, ("backbone", "decoder", "projection", "codebook0_head"))
        model.codebook_heads = int8_heads(model.audio_head.detach())
    model.quantization = mode
    model.drop_caches()
    return model


def int8_linears(parent: nn.Module, names: tuple[str, ...]) -> None:
    """Swap every `nn.Linear` in `parent.<name>` (for each name; the attribute may itself be a
    Linear) for an int8 dynamic one with per-output-channel scales, in place. Used for our CSM and
    for transformers' in the benchmark, so both get the same scheme."""
    for name in names:
        holder = nn.Sequential(getattr(parent, name))  # quantize_dynamic swaps children, not the root
        _int8_children(holder)
        setattr(parent, name, holder[0])


def int8_heads(stacked: torch.Tensor) -> nn.ModuleList:
    """Stacked head matrices (H, D, V), used as x @ stacked[i] -> H int8 Linear(D, V) layers."""
    heads = nn.Sequential()
    for head in stacked:
        linear = nn.Linear(head.shape[0], head.shape[1], bias=False)
        linear.weight = nn.Parameter(head.t().contiguous(), requires_grad=False)
        heads.append(linear)
    _int8_children(heads)
    return nn.ModuleList(heads)


def _int8_children(container: nn.Module) -> None:
    """Every nn.Linear inside `container` (not the container itself) -> fbgemm int8, in place."""
    _dynamic_int8(container)
    if full_range_works():
        for module in container.modules():
            if type(module) is DynamicLinear:
                module.__class__ = FullRangeLinear


def _dynamic_int8(container: nn.Module) -> None:
    """PyTorch's dynamic int8 Linear (per-output-channel weights, fbgemm) for every nn.Linear inside
    `container`, in place."""
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch 2.9 flags the torch.ao namespace as moving to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        quantize_dynamic(container, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


class FullRangeLinear(DynamicLinear):
    """PyTorch's dynamic int8 Linear with activations quantized over all 256 levels, not 128.

    PyTorch's module asks fbgemm for `reduce_range=True` (7-bit activations) so that two u8 x s8
    products summed in 16 bits cannot saturate, which AVX2's `vpmaddubsw` can do. Where fbgemm
    multiplies with VNNI (`vpdpbusd` accumulates in 32 bits) nothing saturates, and the full range
    halves the activations' rounding step: at csm-1b shapes with random weights one product's
    relative error falls from ~1.9% to ~1.2%, at the same speed. Used only where
    `full_range_works` found the kernel exact on an input made to saturate.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, False).to(x.dtype)


@functools.cache
def full_range_works() -> bool:
    """Whether this CPU's fbgemm int8 product takes full-range (8-bit) activations without saturating.

    Probed once with a product built to saturate 16-bit pair sums (every activation at the top of
    its range, every weight at +127: each pair sums to 2 x 255 x 127 > 32767): exact to rounding
    where the kernel accumulates in 32 bits (VNNI), far off where it saturates.
    `CSM_INT8_REDUCE_RANGE=1` keeps PyTorch's 7-bit activations everywhere.
    """
    if os.environ.get("CSM_INT8_REDUCE_RANGE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        lin = nn.Sequential(nn.Linear(256, 8, bias=False))
        nn.init.constant_(lin[0].weight, 0.02)
        x = torch.full((1, 256), 3.0)
        x[0, -1] = 0.0  # the range's bottom; every other activation quantizes to 255
        with torch.inference_mode():
            want = x @ lin[0].weight.T
            _dynamic_int8(lin)
            got = torch.ops.quantized.linear_dynamic(x, lin[0]._packed_params._packed_params, False)
        return bool(((got - want).norm() / want.norm()) < 1e-2)
    except (RuntimeError, AttributeError):  # no fbgemm, or its API moved
        return False
