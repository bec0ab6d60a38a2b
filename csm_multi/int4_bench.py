"""Side-by-side timing of int4 matrix-product kernels against today's fbgemm int8, at csm-1b's shapes (CPU).

    python -m csm_multi.int4 --bench            # writes bench/int4-candidates-cpu.json (a few minutes)
    python -m csm_multi.int4 --bench --quick    # fewer shapes and rounds: a smoke run

Why it exists: `int4.py` had to pick one backend; this is the evidence, and the way to redo it on
another machine. Each candidate multiplies a (M, K) float32 activation by a (N, K) weight in its own
format, for every distinct product shape of a csm-1b frame after `fused.fuse_layers` and M = 1, 4,
8. Candidates take turns within each round (the machine is shared and drifts), and a figure is
the best round's mean per call. Each shape rotates through enough copies of its weight that they
do not fit in the 32 MiB L3 cache, as a frame's 2.8 GB of int4 weights do not. Per-frame figures
sum shape x calls per frame (~620 products: the depth decoder runs 31 times). The per-call overhead
is timed on a 64 x 64 product, where the arithmetic is nothing. Error is the relative Frobenius
error against the float32 product, and for int4 against the dequantized weights (the kernel's own).

A candidate whose package is missing or whose kernel fails is recorded with the reason, not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import get_preset

CACHE_BYTES = 96 << 20  # working set per shape and candidate: three times the L3 cache
MAX_COPIES = 48


def frame_shapes(preset: str = "csm-1b") -> list[dict]:
    """Every distinct (K, N) product of one frame of `preset` after fuse_layers, and calls per frame."""
    cfg = get_preset(preset)
    b, d, k = cfg.backbone, cfg.decoder, cfg.audio_num_codebooks
    v = cfg.audio_vocab_size
    steps = k - 1  # decoder steps per frame

    def layer(tag, c, times):
        qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        calls = c.num_layers * times
        return [_shape(f"{tag} qkv", c.embed_dim, qkv, calls), _shape(f"{tag} o", c.embed_dim, c.embed_dim, calls),
                _shape(f"{tag} gate_up", c.embed_dim, 2 * c.intermediate_dim, calls),
                _shape(f"{tag} down", c.intermediate_dim, c.embed_dim, calls)]

    return [*layer("backbone", b, 1), _shape("codebook0 head", b.embed_dim, v, 1),
            _shape("projection", b.embed_dim, d.embed_dim, steps), *layer("decoder", d, steps),
            _shape("codebook head", d.embed_dim, v, steps)]


def _shape(name: str, k: int, n: int, per_frame: int) -> dict:
    return {"name": name, "k": k, "n": n, "per_frame": per_frame}


# ---- candidates: each builds a callable x (M, K) -> (M, N) from a float (N, K) weight -----------

def _fp32(w):
    from .fused import PackedLinear

    m = PackedLinear(w)
    return m, w.numel() * 4, None


def _int8(w):
    from .quant import _int8_children

    holder = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    holder[0].weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    _int8_children(holder)
    return holder[0], w.numel() + 4 * w.shape[0], None


def _ort(accuracy_level: int, symmetric: bool = True, threads: int = 2, spin: bool = False):
    def build(w):
        from .int4 import dequantize, make_session, quantize_weight, quantize_weight_asymmetric

        q = quantize_weight(w) if symmetric else quantize_weight_asymmetric(w)
        session = make_session(w.shape[1], q.packed, q.scales, q.zeros, accuracy_level, threads, spin)
        run = session._sess.run

        def f(x):
            return torch.from_numpy(run(["Y"], {"A": x.numpy()}, None)[0])
        f._keep = session
        nbytes = q.packed.numel() + 4 * q.scales.numel() + (0 if q.zeros is None else q.zeros.numel())
        return f, nbytes, lambda: dequantize(q)
    return build


def _torch_int4(dtype):
    def build(w):
        from .int4 import dequantize, quantize_weight_asymmetric

        n, k = w.shape
        pad = -n % 16  # its packing wants N divisible by 16 (the 2051-wide heads are not): zero rows
        q = quantize_weight_asymmetric(F.pad(w, (0, 0, 0, pad)))  # torch's form: (q - 8) * scale + offset
        n += pad
        codes = torch.stack([q.packed & 15, q.packed >> 4], -1).reshape(n, k).to(torch.int32)
        zp = torch.stack([q.zeros & 15, q.zeros >> 4], -1).reshape(n, -1)[:, : q.scales.shape[1]].float()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        sz = torch.stack([q.scales, (8 - zp) * q.scales], -1).transpose(0, 1).contiguous().to(dtype)

        def f(x):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, 32, sz)[:, : n - pad]
        return f, packed.numel() * packed.element_size() + sz.numel() * sz.element_size(), lambda: dequantize(q)[: n - pad]
    return build


def _openvino(w):
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    from .int4 import dequantize, quantize_weight_asymmetric

    q = quantize_weight_asymmetric(w)
    n, k = w.shape
    g = q.scales.shape[1]
    codes = torch.stack([q.packed & 15, q.packed >> 4], -1).reshape(n, g, 32)
    zp = torch.stack([q.zeros & 15, q.zeros >> 4], -1).reshape(n, -1)[:, :g, None]
    x = ops.parameter([-1, k], ov.Type.f32, name="x")
    wf = ops.convert(ops.constant(codes.numpy(), dtype=ov.Type.u4), ov.Type.f32)
    wf = ops.subtract(wf, ops.convert(ops.constant(zp.contiguous().numpy(), dtype=ov.Type.u4), ov.Type.f32))
    wf = ops.multiply(wf, ops.constant(q.scales[..., None].numpy().astype(np.float32)))
    wf = ops.reshape(wf, ops.constant(np.array([n, k], dtype=np.int64)), False)
    model = ov.Model([ops.matmul(x, wf, False, True)], [x], "int4")
    core = _openvino.core = getattr(_openvino, "core", None) or ov.Core()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "NUM_STREAMS": 1,
                                                 "PERFORMANCE_HINT": "LATENCY"})
    kinds = {op.get_rt_info()["layerType"].astype(str): op.get_rt_info()["runtimePrecision"].astype(str)
             for op in compiled.get_runtime_model().get_ordered_ops()}
    _openvino.layer = f"FullyConnected {kinds.get('FullyConnected', '?')}"
    req = compiled.create_infer_request()

    def f(x):
        return torch.from_numpy(req.infer([x.numpy()])[0].copy())
    f._keep = compiled
    return f, n * g * (16 + 4 + 0.5), lambda: dequantize(q)


CANDIDATES: dict[str, tuple[Callable, str]] = {
    "fp32 oneDNN (PackedLinear, today's float path)": (_fp32, "torch"),
    "int8 fbgemm (quant.py, today)": (_int8, "torch"),
    "int4 ORT MatMulNBits acc4 sym (Q4_0-style), 2 threads (chosen)": (_ort(4), "onnxruntime"),
    "int4 ORT MatMulNBits acc4 sym, 1 thread": (_ort(4, threads=1), "onnxruntime"),
    "int4 ORT MatMulNBits acc4 asym (zero points), 2 threads": (_ort(4, symmetric=False), "onnxruntime"),
    "int4 ORT MatMulNBits acc4 asym, 1 thread": (_ort(4, symmetric=False, threads=1), "onnxruntime"),
    "int4 ORT MatMulNBits acc0 sym (float activations)": (_ort(0), "onnxruntime"),
    "int4 ORT MatMulNBits acc0 asym": (_ort(0, symmetric=False), "onnxruntime"),
    "int4 torch _weight_int4pack_mm_for_cpu (bf16 activations)": (_torch_int4(torch.bfloat16), "torch"),
    "int4 torch _weight_int4pack_mm_for_cpu (fp32 activations)": (_torch_int4(torch.float32), "torch"),
    "int4 OpenVINO u4 weights (CPU plugin)": (_openvino, "openvino"),
}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _time(fs: list, xs: list[torch.Tensor], budget_s: float = 0.03) -> float:
    """Mean seconds per call, calling the copies in turn (each call reads a copy not read since the
    last pass, so from memory, not cache) for `budget_s` and at least 2 calls."""
    n, t0 = 0, time.perf_counter()
    while n < 2 or (time.perf_counter() - t0 < budget_s and n < 4000):
        fs[n % len(fs)](xs[n % len(xs)])
        n += 1
    return (time.perf_counter() - t0) / n


@torch.inference_mode()
def run(shapes: list[dict], names: list[str], ms=(1, 4, 8), rounds: int = 7, seed: int = 0,
        log=print) -> dict:
    load_start = os.getloadavg()
    gen = torch.Generator().manual_seed(seed)
    status: dict[str, str] = {}
    for name in names:
        package = CANDIDATES[name][1]
        status[name] = "ok" if _version(package) or package == "torch" else f"not installed: pip install {package}"
    results: dict[str, dict] = {name: {"per_shape": {}} for name in names}
    for shape in [*shapes, _shape("overhead 64x64", 64, 64, 0)]:
        k, n = shape["k"], shape["n"]
        w = torch.randn(n, k, generator=gen) * 0.02
        x8 = torch.randn(max(ms), k, generator=gen)
        ref = x8 @ w.t()
        built = {}
        for name in names:
            if status[name] != "ok":
                continue
            build = CANDIDATES[name][0]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    first, nbytes, q = build(w)
                    copies = 1 if shape["per_frame"] == 0 else max(2, min(MAX_COPIES, -(-CACHE_BYTES // int(nbytes))))
                    fs = [first] + [build(w)[0] for _ in range(copies - 1)]
                y = first(x8)
            except Exception as e:  # noqa: BLE001 - record why a candidate cannot run here
                status[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                log(f"  {name}: {status[name]}")
                continue
            entry = {"bytes": int(nbytes), "copies": len(fs),
                     "rel_err_vs_fp32": round(float((y.float() - ref).norm() / ref.norm()), 5)}
            if q is not None:  # int4: the kernel's error against its own dequantized weights
                deq = q()
                r = x8 @ deq.t()
                entry["rel_err_vs_dequantized"] = round(float((y - r).norm() / r.norm()), 6)
                entry["weight_rel_err"] = round(float((deq - w).norm() / w.norm()), 5)
            built[name] = fs
            results[name]["per_shape"][shape["name"]] = entry
        for m in ms:
            xs = [torch.randn(m, k, generator=gen) for _ in range(4)]
            best = {name: float("inf") for name in built}
            for _ in range(rounds):  # short rounds, candidates in turn: some rounds land in a quiet spell
                for name, fs in built.items():
                    best[name] = min(best[name], _time(fs, xs))
            for name in built:
                results[name]["per_shape"][shape["name"]][f"us_m{m}"] = round(best[name] * 1e6, 1)
        log(f"{shape['name']} ({k}->{n}): " + ", ".join(
            f"{name.split(' (')[0][:40]} {results[name]['per_shape'][shape['name']]['us_m1']:.0f}us" for name in built))
        del built
    for name, res in results.items():
        res["status"] = status[name]
        per = res["per_shape"]
        if status[name] == "ok" and all(s["name"] in per for s in shapes):
            for m in ms:
                res[f"frame_products_ms_m{m}"] = round(sum(s["per_frame"] * per[s["name"]][f"us_m{m}"]
                                                           for s in shapes) / 1000, 1)
            res["frame_bytes_mb"] = round(sum(s["per_frame"] * per[s["name"]]["bytes"] for s in shapes) / 2**20, 1)
            res["per_call_overhead_us"] = per.get("overhead 64x64", {}).get("us_m1")
    return {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "torch": torch.__version__,
                        "onnxruntime": _version("onnxruntime"), "openvino": _version("openvino")},
            "openvino_layer": getattr(_openvino, "layer", None),
            "shapes": shapes, "calls_per_frame": sum(s["per_frame"] for s in shapes), "ms": list(ms),
            "rounds": rounds, "candidates": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="bench/int4-candidates-cpu.json")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="three shapes, M=1, one round (a smoke run)")
    p.add_argument("--only", nargs="*", help="candidates whose name contains one of these words")
    a = p.parse_args(argv)
    shapes = frame_shapes()
    names = [n for n in CANDIDATES if not a.only or any(w in n for w in a.only)]
    ms = (1, 4, 8)
    if a.quick:
        shapes, ms, a.rounds = [shapes[1], shapes[2], shapes[-1]], (1,), 1
    t0 = time.perf_counter()
    result = run(shapes, names, ms, a.rounds)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print("| candidate | status | per-call overhead us | frame products ms (M=1) | M=4 | M=8 | MB read/frame |")
    print("|---|---|---|---|---|---|---|")
    for name, res in result["candidates"].items():
        print(f"| {name} | {res['status'][:60]} | {res.get('per_call_overhead_us', '-')} | "
              f"{res.get('frame_products_ms_m1', '-')} | {res.get('frame_products_ms_m4', '-')} | "
              f"{res.get('frame_products_ms_m8', '-')} | {res.get('frame_bytes_mb', '-')} |")
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
