"""Candidate CPU backend, measured: CSM's two Llama stacks run by llama.cpp (ggml's Q4_0 / Q8_0 kernels).

A benchmark, not a backend yet. csm-1b's backbone is Llama-3.2-1B-shaped and its depth decoder is a
4-layer Llama, both fed input vectors rather than tokens, so each is written as a llama.cpp "llama"
GGUF file (no vocabulary, `tokenizer.ggml.model = none`; torchtune's interleaved rotary layout is
llama.cpp's NORM rope, so q/k need no permutation; Llama-3 rope scaling as the `rope_freqs` tensor;
the backbone's output head is codebook 0's) and driven through llama-cpp-python's C API with
embedding input (`llama_batch.embd`) and the final-norm hidden state as output. The frame then is:
one backbone step (codebook-0 logits and hidden state), the decoder's cache cleared, and 31 decoder
steps, each followed by its codebook head (torch, float32) and a greedy pick; the decoder's inputs are
rows of the audio embeddings projected once (`projection` has no bias, so this is exact algebra).

    python -m csm_multi.ggml_bench [--rounds 3] [--frames 12] [--json bench/ggml-cpu-csm-1b.json]

checks the mapping first (a small CSM in F32: hidden state and logits against ours), then times
csm-1b-sized random weights as Q4_0 and Q8_0 against our `--quantize int8` frame, in turn, per
round. Needs `pip install llama-cpp-python gguf` (llama-cpp-python builds llama.cpp from source:
~3 min on 2 cores for the library alone, with its tools, tests, examples and llava off in CMAKE_ARGS;
~25 min with everything); not a dependency of the project. `--no-extra-buffers` loads the weights
without llama.cpp's repacked and AMX buffers (its AMX Q4_0 product crashed on an AMX Xeon VM).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE

from .config import PRESETS, LlamaConfig, ModelConfig
from .model import CSM

HINT = "pip install llama-cpp-python gguf   (builds llama.cpp from source)"


def _libs():
    try:
        import gguf
        import llama_cpp
    except ImportError as e:
        raise SystemExit(f"ggml_bench needs llama-cpp-python and gguf ({e}): {HINT}") from e
    return gguf, llama_cpp


def rope_factors(cfg: LlamaConfig) -> np.ndarray:
    """The divisor of each plain rotary frequency (llama.cpp's `rope_freqs`), taken from the Llama-3
    scaled rope our stacks use (torchtune's `Llama3ScaledRoPE`), so the two cannot drift apart."""
    plain = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))  # as torchtune
    scaled = Llama3ScaledRoPE(cfg.head_dim, cfg.max_seq_len, cfg.rope_base, scale_factor=cfg.rope_scale_factor).theta
    return (plain / scaled).numpy()


def write_gguf(path: str, sd: dict, prefix: str, cfg: LlamaConfig, output: np.ndarray | None, qname: str,
               vocab: int) -> None:
    """One torchtune Llama stack (`prefix` in the CSM state dict `sd`, float32 numpy) as a GGUF file."""
    gguf, _ = _libs()
    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qname]
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.embed_dim)
    w.add_feed_forward_length(cfg.intermediate_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("none")
    w.add_file_type({"f32": 0, "q4_0": 2, "q8_0": 7}[qname])

    def matrix(name, a):
        a = np.ascontiguousarray(a, dtype=np.float32)
        if qtype == Q.F32 or a.shape[-1] % 32:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    w.add_tensor("token_embd.weight", np.zeros((vocab, cfg.embed_dim), np.float32))  # unused: inputs are vectors
    w.add_tensor("output_norm.weight", sd[f"{prefix}norm.scale"])
    if output is not None:
        matrix("output.weight", output)
    w.add_tensor("rope_freqs.weight", rope_factors(cfg))
    names = {"attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
             "attn_output": "attn.output_proj", "ffn_gate": "mlp.w1", "ffn_down": "mlp.w2", "ffn_up": "mlp.w3"}
    for i in range(cfg.num_layers):
        p = f"{prefix}layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "sa_norm.scale"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "mlp_norm.scale"])
        for ours, theirs in names.items():
            matrix(f"blk.{i}.{ours}.weight", sd[f"{p}{theirs}.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class Stack:
    """A llama.cpp context over one GGUF stack: vectors in, final-norm hidden state (and logits) out."""

    _log = None

    extra_buffers = True  # llama.cpp's repacked / AMX weight buffers (--no-extra-buffers: off)

    def __init__(self, path: str, n_ctx: int, threads: int = 2, f32_cache: bool = False):
        _, L = _libs()
        self.L = L
        if Stack._log is None:
            L.llama_backend_init()
            Stack._log = L.llama_log_callback(lambda level, text, user: None)  # kept: C holds the pointer
            L.llama_log_set(Stack._log, None)
        mp = L.llama_model_default_params()
        if not Stack.extra_buffers:
            mp.use_extra_bufts = False
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = min(512, n_ctx)
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.embeddings = True
        cp.pooling_type = L.LLAMA_POOLING_TYPE_NONE
        if f32_cache:
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32 (default F16)
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.dim = L.llama_model_n_embd(self.model)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(cp.n_batch, self.dim, 1)
        self.memory = L.llama_get_memory(self.ctx)

    def clear(self) -> None:
        self.L.llama_memory_clear(self.memory, True)

    def run(self, x: np.ndarray, pos0: int, logits: bool = True):
        """x (n, dim) float32 at positions pos0..: the last position's (hidden state, logits or None)."""
        L, b, n = self.L, self.batch, x.shape[0]
        b.n_tokens = n
        np.ctypeslib.as_array(b.embd, shape=(n * self.dim,))[:] = x.reshape(-1)
        for i in range(n):
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = int(i == n - 1)
        if (rc := L.llama_decode(self.ctx, b)) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        h = np.ctypeslib.as_array(L.llama_get_embeddings_ith(self.ctx, -1), shape=(self.dim,)).copy()
        lg = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.vocab,)).copy() if logits else None
        return h, lg


def _state(model: CSM) -> dict:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def check_mapping(workdir: str) -> dict:
    """A small CSM in F32 through llama.cpp against ours: relative error of hidden state and logits."""
    cfg = ModelConfig(name="check",
                      backbone=LlamaConfig(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128, intermediate_dim=256),
                      decoder=LlamaConfig(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128))
    model = CSM(cfg).init_random_(seed=3).eval()
    sd = _state(model)
    path = os.path.join(workdir, "check.gguf")
    write_gguf(path, sd, "backbone.", cfg.backbone, sd["codebook0_head.weight"], "f32", cfg.audio_vocab_size)
    stack = Stack(path, 2048, f32_cache=True)
    S = 300
    x = torch.randn(1, S, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.backbone(x)[0, -1]
        ref_logits = model.codebook0_head(ref)
    stack.run(x[0, :-1].numpy(), 0, logits=False)  # a prefill, then one step, as generation does
    h, lg = stack.run(x[0, -1:].numpy(), S - 1)
    rel = lambda a, b: float(np.linalg.norm(a - b.numpy()) / np.linalg.norm(b.numpy()))
    return {"positions": S, "hidden_rel_error": rel(h, ref), "logits_rel_error": rel(lg, ref_logits)}


class GgmlFrames:
    """csm-1b frames through llama.cpp: greedy codes, real heads and embeddings (timing, not serving)."""

    def __init__(self, model: CSM, sd: dict, workdir: str, qname: str):
        cfg = model.config
        bb, dd = os.path.join(workdir, f"backbone-{qname}.gguf"), os.path.join(workdir, f"decoder-{qname}.gguf")
        write_gguf(bb, sd, "backbone.", cfg.backbone, sd["codebook0_head.weight"], qname, cfg.audio_vocab_size)
        write_gguf(dd, sd, "decoder.", cfg.decoder, None, qname, 32)
        self.backbone, self.decoder = Stack(bb, cfg.max_seq_len), Stack(dd, cfg.audio_num_codebooks + 1)
        k, v = cfg.audio_num_codebooks, cfg.audio_vocab_size
        with torch.no_grad():
            self.embed = model.audio_embeddings.weight.detach().float().clone().view(k, v, -1)
            self.projected = (self.embed @ model.projection.weight.detach().float().T).contiguous()
            self.proj = model.projection.weight.detach().float().clone()
            self.heads = model.audio_head.detach().float().clone()  # (K-1, Dd, V)
        self.pos = 0

    def prefill(self, prompt: np.ndarray) -> None:
        self.backbone.clear()
        for start in range(0, prompt.shape[0], 512):
            self.last = self.backbone.run(prompt[start:start + 512], start, logits=start + 512 >= prompt.shape[0])
        self.pos = prompt.shape[0]

    def frame(self) -> list[int]:
        h, logits = self.last
        codes = [int(np.argmax(logits[:2048]))]
        self.decoder.clear()
        x = np.stack([(torch.from_numpy(h) @ self.proj.T).numpy(), self.projected[0, codes[0]].numpy()])
        hd, _ = self.decoder.run(x, 0, logits=False)
        for i in range(1, len(self.heads) + 1):
            codes.append(int(torch.argmax((torch.from_numpy(hd) @ self.heads[i - 1])[:2048])))
            if i < len(self.heads):
                hd, _ = self.decoder.run(self.projected[i, codes[-1]].numpy()[None], i + 1, logits=False)
        frame_in = self.embed[torch.arange(len(codes)), torch.tensor(codes)].sum(0).numpy()[None]
        self.last = self.backbone.run(frame_in, self.pos)
        self.pos += 1
        return codes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--modes", nargs="+", default=["q4_0", "q8_0"], choices=["q4_0", "q8_0"])
    ap.add_argument("--no-extra-buffers", action="store_true",
                    help="load the weights without llama.cpp's repacked/AMX buffers (use_extra_bufts off): its AMX "
                         "Q4_0 product crashed on a Sapphire Rapids-class Xeon VM (llama-cpp-python 0.3.36)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    Stack.extra_buffers = not args.no_extra_buffers
    _libs()
    from . import bench, quant

    torch.set_num_threads(2)
    from .machine import cpu_name

    out = {"machine": f"{cpu_name(platform.processor() or platform.machine())}, {os.cpu_count()} CPUs",
           "model": "csm-1b size, random weights (N(0, 0.02), unit norms)", "batch": 1,
           "frames": args.frames, "rounds": args.rounds, "extra_buffers": Stack.extra_buffers}
    with tempfile.TemporaryDirectory(prefix="csm-ggml-") as work:
        out["mapping_check_f32"] = check_mapping(work)
        print("mapping (F32, small CSM):", out["mapping_check_f32"], flush=True)
        model = bench._random_model(PRESETS["csm-1b"], 0)
        sd = _state(model)
        rng = np.random.default_rng(0)
        prompt = (rng.standard_normal((len(bench.PROMPT), 2048)) * 0.02).astype(np.float32)  # as long as ours
        ggml = {q: GgmlFrames(model, sd, work, q) for q in args.modes}
        del sd
        quant.quantize(model, "int8")
        times: dict[str, list[float]] = {q: [] for q in [*args.modes, "ours int8"]}
        for r in range(args.rounds):
            for q, g in ggml.items():
                g.prefill(prompt)
                g.frame()  # warm-up
                t0 = time.perf_counter()  # the prefill included, as bench_ours times it
                g.prefill(prompt)
                for _ in range(args.frames):
                    g.frame()
                times[q].append((time.perf_counter() - t0) / args.frames * 1000)
            row = bench.bench_ours(model, torch.device("cpu"), 1, args.frames)
            times["ours int8"].append(row.ms_per_frame)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} ms/frame" for k, v in times.items()), flush=True)
    out["ms_per_frame_rounds"] = times
    out["ms_per_frame_median"] = {k: float(np.median(v)) for k, v in times.items()}
    out["speedup_vs_ours_int8_per_round"] = {q: [o / t for o, t in zip(times["ours int8"], times[q])]
                                             for q in args.modes}
    print(json.dumps(out["ms_per_frame_median"]), json.dumps(out["speedup_vs_ours_int8_per_round"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
