"""int4 weights for CPU inference: a CSM's weight products as ONNX Runtime's blockwise `MatMulNBits`.

One job: turn a float CSM's `nn.Linear` layers (backbone, depth decoder, projection, codebook-0
head) and its stacked codebook heads 1..K-1 into `Int4Linear` modules, and keep the converted
weights in a cache on disk. Knows no loop and no engine: `quant.quantize(model, "int4")` calls it.

Why: at batch 1 a frame is bound by the weight bytes it reads (csm-1b: ~4.5 G weights per frame,
the 100M depth decoder read 31 times); int4 with one float scale per block of 32 reads 0.625
bytes a weight against int8's ~1. Side by side at csm-1b's shapes on the project's 2-core AVX2
EPYC, weights streamed from memory (`python -m csm_multi.int4 --bench`, bench/int4-candidates-cpu.json),
ORT's `MatMulNBits` at accuracy_level 4 was the only int4 kernel faster than fbgemm's int8 one at
M = 1, and only by ~1.2x: on 2 AVX2 cores its unpacking, not memory, is the limit (~15 GB/s read
against int8's ~20). At M = 4 and 8 (batched rows) int8 stays faster. torch's
`_weight_int4pack_mm_for_cpu` (bf16 activations: ~2x int8's time; fp32: ~20x) and OpenVINO's u4
FullyConnected (no AVX-512 here: ~10x) were slower still.

The scheme: weight-only, symmetric, blocks of 32 along the input dimension, llama.cpp's Q4_0 rule
(scale = the block's value of largest magnitude / -8, codes 0..15 around a zero point of 8, which
MatMulNBits assumes when none is given). Symmetric because it stores no zero points and, in the
quietest bench run, MatMulNBits' int8 path ran it faster (182 against 240 ms of products a frame;
level within noise in a loaded run), for ~6% more weight error (8.6% against 8.1% relative on
Gaussian weights; `quantize_weight_asymmetric` is kept for the bench and for a later choice).
`accuracy_level` 4 lets the kernel quantize each block of 32 activations to int8 and multiply in
int8 (0.5% error against the dequantized weights); 0 keeps activations float32 (exact) but runs
~3.5x slower here. Inputs and outputs are float32, any leading dims. Each product is one ORT
session with its own 2-thread pool whose idle thread sleeps (spinning pools, one per session,
fight each other for the 2 cores: ~60x slower measured).

The cache: converted weights in one safetensors file per model, named by a SHA-256 of the float
matrices being converted (their names, shapes and bytes) with the backend, block size, scheme and
format version, in `CSM_INT4_CACHE` or ~/.cache/csm-multi/int4. A second load of the same weights
reads the file instead of converting. Only the sessions (ORT's own weight prepacking) are rebuilt.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

BLOCK = 32  # weights per scale, along the input dimension (MatMulNBits' block_size)
BITS = 4
FORMAT = "int4-q4_0-v1"  # changes whenever the stored tensors would differ for the same weights
BACKEND = "onnxruntime MatMulNBits"
ACCURACY_LEVEL = 4  # int8 activations inside the kernel; 0: float32 activations (exact, slower)
PIP_HINT = 'pip install "onnxruntime>=1.32,<2" "onnx>=1.17,<2"'
CACHE_ENV = "CSM_INT4_CACHE"


class BackendMissing(ImportError):
    """The int4 backend (onnxruntime + onnx) is not installed."""


def backend():
    """(onnxruntime, onnx), or BackendMissing naming the packages and the pip command."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise BackendMissing(
            f"--quantize int4 runs on ONNX Runtime's MatMulNBits kernel, but {e.name or 'onnxruntime'} is not "
            f"installed: {PIP_HINT} (or use --quantize int8, which needs only PyTorch)") from e
    return onnxruntime, onnx


# ---- the weight format ---------------------------------------------------------------------

@dataclass
class Int4Weight:
    """A (N, K) matrix in MatMulNBits' layout: `packed` (N, G, 16) uint8, two 4-bit codes a byte
    (element 2i in the low nibble), G = ceil(K / 32) blocks; `scales` (N, G) float32; `zeros`
    None (symmetric: every zero point is 8) or (N, ceil(G / 2)) uint8, two 4-bit zero points a
    byte. w[n, k] ~ (q - zero) * scale."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]


def _blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    """(N, K) -> (N, ceil(K / block), block) float32, K padded with zeros."""
    w = weight.detach().float()
    if w.shape[1] % block:
        w = torch.nn.functional.pad(w, (0, -w.shape[1] % block))
    return w.reshape(w.shape[0], -1, block)


def quantize_weight(weight: torch.Tensor, block: int = BLOCK) -> Int4Weight:
    """Symmetric int4 of a float (N, K) matrix, per block of `block` along K (llama.cpp's Q4_0 rule):
    scale = the block's value of largest magnitude / -8, code = round(w / scale) + 8 in 0..15, so that
    value is exact and the 16 levels span [-8, 7] steps around zero. No zero points are stored."""
    w = _blocks(weight, block)
    peak = w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1)
    scale = peak / -8
    scale = torch.where(scale != 0, scale, torch.ones_like(scale))  # an all-zero block: any scale works
    q = (torch.round(w / scale[..., None]) + 8).clamp(0, 15).to(torch.uint8)
    return Int4Weight(_nibbles(q), scale.contiguous(), None, weight.shape[1])


def quantize_weight_asymmetric(weight: torch.Tensor, block: int = BLOCK) -> Int4Weight:
    """Asymmetric int4 (the bench's alternative): per block, scale = (max - min) / 15 over a range
    that holds 0, and a 4-bit zero point. ~6% less weight error than `quantize_weight` on Gaussian
    weights; as fast or slower in MatMulNBits' int8 path here (bench/int4-candidates-cpu*.json)."""
    w = _blocks(weight, block)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, 15).to(torch.uint8)
    zero = zero.to(torch.uint8)
    if zero.shape[1] % 2:
        zero = torch.nn.functional.pad(zero, (0, 1))
    return Int4Weight(_nibbles(q), scale.contiguous(), _nibbles(zero), weight.shape[1])


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (..., 2m) -> (..., m) bytes, the even element in the low nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def _codes(b: torch.Tensor) -> torch.Tensor:
    """Inverse of `_nibbles`."""
    return torch.stack([b & 15, b >> 4], -1).flatten(-2)


def dequantize(q: Int4Weight) -> torch.Tensor:
    """The float (N, K) matrix the int4 weight stands for."""
    codes = _codes(q.packed).float()  # (N, G, 32)
    zero = 8.0 if q.zeros is None else _codes(q.zeros)[:, : q.scales.shape[1], None].float()
    return ((codes - zero) * q.scales[..., None]).flatten(1)[:, : q.in_features]


# ---- the module ----------------------------------------------------------------------------

SPIN = False  # see make_session
POOL = "session"  # "session": a thread pool per session; "global": one pool for all (set before the first)
_global_pool: int | None = None  # the global pool's size, once made


def make_session(in_features: int, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 accuracy_level: int = ACCURACY_LEVEL, threads: int = 2, spin: bool | None = None):
    """An ONNX Runtime session computing x (M, in_features) float32 @ the int4 weight's transpose.

    `zeros` None: symmetric codes (MatMulNBits' default zero point 8). `spin`: whether ORT's idle
    threads spin between calls (default `SPIN`); off, they sleep at once, leaving the cores to
    PyTorch's ops between products. The tensors are handed to ORT as in-memory external
    initializers (no copy into the model's protobuf); they must outlive the session (Int4Linear
    keeps them).
    """
    global _global_pool
    ort, _ = backend()
    from onnx import TensorProto, helper

    k, n = in_features, packed.shape[0]
    arrays = {"B": packed.numpy(), "scales": scales.reshape(-1).numpy()}
    if zeros is not None:
        arrays["zeros"] = zeros.reshape(-1).numpy()
    inits = []
    for name, a in arrays.items():
        t = TensorProto(name=name, data_type=TensorProto.UINT8 if a.dtype.kind == "u" else TensorProto.FLOAT,
                        dims=a.shape, data_location=TensorProto.EXTERNAL)
        t.external_data.add(key="location", value=f"in-memory:{name}")
        inits.append(t)
    node = helper.make_node("MatMulNBits", ["A", *arrays], ["Y"], domain="com.microsoft", K=k, N=n, bits=BITS,
                            block_size=packed.shape[2] * 8 // BITS, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "int4_linear", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializer=inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                                    helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if POOL == "global":
        if _global_pool is None:
            from onnxruntime.capi import _pybind_state

            _pybind_state.set_global_thread_pool_sizes(threads, 1)
            _global_pool = threads
        opts.use_per_session_threads = False
    else:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if (SPIN if spin is None else spin) else "0")
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]  # views of the tensors, no copy
    opts.add_external_initializers(list(arrays), values)
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    session.csm_initializers = values  # what ORT was handed lives as long as the session
    return session


class Int4Linear(nn.Module):
    """A bias-free Linear with int4 weights, run by one ONNX Runtime session (MatMulNBits).

    x (..., in_features) float -> (..., out_features) float32. The int4 tensors stay as buffers
    (so the module copies, pickles and saves); ORT keeps its own prepacked copy for the kernel.
    """

    def __init__(self, q: Int4Weight, accuracy_level: int = ACCURACY_LEVEL, threads: int | None = None):
        super().__init__()
        self.in_features, self.out_features = q.in_features, q.out_features
        self.accuracy_level = accuracy_level
        self.threads = threads or torch.get_num_threads()
        self.register_buffer("packed", q.packed)
        self.register_buffer("scales", q.scales)
        self.register_buffer("zeros", q.zeros)
        self._start()

    def weight(self) -> Int4Weight:
        return Int4Weight(self.packed, self.scales, self.zeros, self.in_features)

    def _start(self) -> None:
        session = make_session(self.in_features, self.packed, self.scales, self.zeros, self.accuracy_level,
                               self.threads)
        self._run = session._sess.run  # the C++ call itself: a few us less per call than session.run
        self._session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().reshape(-1, self.in_features)
        if a.dtype != torch.float32:
            a = a.float()
        y = self._run(["Y"], {"A": a.contiguous().numpy()}, None)[0]
        return torch.from_numpy(y).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 block {BLOCK}, "
                f"accuracy_level={self.accuracy_level}")

    # sessions do not pickle or deep-copy: rebuild one from the buffers instead
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_run", None)
        state.pop("_session", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._start()


# ---- whole models and the cache ------------------------------------------------------------

def _targets(model) -> list[tuple[str, torch.Tensor]]:
    """(name, float (N, K) weight) of every product `convert` replaces, in a fixed order."""
    out = []
    for stack in ("backbone", "decoder"):
        for name, m in getattr(model, stack).named_modules():
            if type(m) is nn.Linear:
                if m.bias is not None:
                    raise ValueError(f"int4: {stack}.{name} has a bias, which CSM's layers do not")
                out.append((f"{stack}.{name}", m.weight.detach()))
    out += [("projection", model.projection.weight.detach()), ("codebook0_head", model.codebook0_head.weight.detach())]
    out += [(f"codebook_heads.{i}", head.t()) for i, head in enumerate(model.audio_head.detach())]
    return out


def weights_key(targets: list[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 (hex) of the matrices to convert (names, shapes, float32 bytes) and the int4 format."""
    h = hashlib.sha256(f"{BACKEND}|block={BLOCK}|{FORMAT}".encode())
    for name, w in targets:
        w = w.float().contiguous()
        h.update(f"|{name}:{tuple(w.shape)}|".encode())
        h.update(memoryview(w.numpy()).cast("B"))
    return h.hexdigest()


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where converted weights are kept: `path`, else $CSM_INT4_CACHE, else ~/.cache/csm-multi/int4."""
    if path is not None:
        return Path(path)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "csm-multi" / "int4"


@dataclass
class CacheReport:
    path: Path
    hit: bool  # True: read from the file; False: converted (and written)
    key: str


def converted(model, cache: str | os.PathLike | None = None) -> tuple[dict[str, Int4Weight], CacheReport]:
    """The int4 weights of every product of `model` (a float CSM), from the cache when it holds them,
    else converted now and written there (atomically; a cache that cannot be written only warns)."""
    from safetensors.torch import load_file, save_file

    targets = _targets(model)
    key = weights_key(targets)
    path = cache_dir(cache) / f"{model.config.name}-{key[:32]}.safetensors"
    if path.is_file():
        try:
            stored = load_file(path)
            weights = {name: Int4Weight(stored[f"{name}.packed"], stored[f"{name}.scales"], stored.get(f"{name}.zeros"),
                                        w.shape[1]) for name, w in targets}
            return weights, CacheReport(path, True, key)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: convert again and replace it
            import warnings

            warnings.warn(f"int4 cache {path} is unreadable ({e}); converting again", stacklevel=2)
    weights = {name: quantize_weight(w) for name, w in targets}
    flat = {f"{name}.{part}": getattr(q, part) for name, q in weights.items() for part in ("packed", "scales", "zeros")
            if getattr(q, part) is not None}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(flat, tmp, metadata={"format": FORMAT, "backend": BACKEND, "block": str(BLOCK), "key": key})
        os.replace(tmp, path)
    except OSError as e:
        import warnings

        warnings.warn(f"int4 cache {path} could not be written ({e}); the next load converts again", stacklevel=2)
    return weights, CacheReport(path, False, key)


def int4_model(model, cache: str | os.PathLike | None = None, accuracy_level: int = ACCURACY_LEVEL):
    """Swap `model`'s products for `Int4Linear` ones in place (see the module docstring); returns the
    `CacheReport` saying where the converted weights are and whether they came from the cache."""
    backend()  # a clear error before any work when the packages are missing
    weights, report = converted(model, cache)
    for name, q in weights.items():
        if name.startswith("codebook_heads."):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int4Linear(q, accuracy_level))
    heads = sorted((int(n.rsplit(".", 1)[1]), q) for n, q in weights.items() if n.startswith("codebook_heads."))
    model.codebook_heads = nn.ModuleList(Int4Linear(q, accuracy_level) for _, q in heads)
    model.int4_cache = report
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="int4 weights (csm_multi/int4.py)")
    p.add_argument("--bench", action="store_true", help="time the int4 candidates against fbgemm int8 at csm-1b shapes")
    p.add_argument("--json", default="bench/int4-candidates-cpu.json")
    p.add_argument("--rounds", type=int, default=7)
    a, rest = p.parse_known_args(argv)
    if not a.bench:
        p.print_help()
        return 2
    from .int4_bench import main as bench_main

    return bench_main(["--json", a.json, "--rounds", str(a.rounds), *rest])


if __name__ == "__main__":
    raise SystemExit(main())
