"""Benchmark: our frame loop against transformers' CsmForConditionalGeneration with the same weights.

    python -m csm_multi.bench --quick                 # tiny preset, CPU, seconds (CI runs this)
    python -m csm_multi.bench --device cuda           # csm-1b-sized random weights on a GPU
    python -m csm_multi.bench --quantize int8         # CPU: also int8 weights, ours and transformers'
    python -m csm_multi.bench --quantize int4         # CPU: also int4 weights (int4.py), beside int8 round by round

Prints a table (setting | ms/frame | RTF | frames/s | TTFA | peak mem | ratio) and writes JSON.
On CPU it also times the floor for each setting: a frame's weight products alone (`bench_products`).
Random weights give random codes, so EOS is never reached early and every run generates the same
number of frames; speed does not depend on the values of the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .config import FRAME_MS, QUANT_MODES, get_preset
from .frames import text_frames
from .generate import FrameGraph, Sampler, iterate_frames
from .model import CSM

PROMPT = [128000, 58, 15, 60, 9906, 1070, 13, 1115, 374, 264, 1296, 315, 279, 4732, 13, 128001]


@dataclass
class Row:
    engine: str
    setting: str
    batch: int
    frames: int
    ms_per_frame: float
    rtf: float
    frames_per_s: float
    audio_s_per_s: float
    ttfa_ms: float | None
    peak_mem_mb: float | None
    ms_rounds: list[float] | None = None  # every round's ms/frame (the row is their median)
    speedup_rounds: list[float] | None = None  # per round: transformers (base dtype) ms/frame over ours
    speedup_same_setting_rounds: list[float] | None = None  # the same against transformers in this row's setting


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device, held: int = 0) -> float | None:
    """Peak GPU memory (MB) since the last reset, less `held` bytes kept by the other engine's model."""
    return (torch.cuda.max_memory_allocated(device) - held) / 2**20 if device.type == "cuda" else None


def _bytes_on(module: torch.nn.Module | None, device: torch.device) -> int:
    """Bytes of `module`'s parameters and buffers on `device` (the other engine, resident while one is timed)."""
    if module is None or device.type != "cuda":
        return 0
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if t.device.type == "cuda")


def _row(engine, setting, batch, frames, seconds, ttfa, device, held: int = 0) -> Row:
    ms = seconds * 1000 / frames
    return Row(engine, setting, batch, frames, round(ms, 2), round(ms / FRAME_MS, 4), round(frames * batch / seconds, 2),
               round(frames * batch * FRAME_MS / 1000 / seconds, 3), None if ttfa is None else round(ttfa * 1000, 1),
               None if _peak(device) is None else round(_peak(device, held), 1))


@torch.inference_mode()
def bench_ours(model: CSM, device, batch: int, frames: int, codec=None, graphed: bool = False, held: int = 0) -> Row:
    """Our frame loop: ms/frame over `frames` frames (prefill included), time to first audio. `held`:
    bytes another resident model keeps on the GPU, left out of the peak memory."""
    tokens, mask = text_frames(PROMPT, model.config.audio_num_codebooks)
    tokens = tokens[None].expand(batch, -1, -1).to(device)
    mask = mask[None].expand(batch, -1, -1).to(device)
    sample = Sampler(0.9, 50, torch.Generator(device=device).manual_seed(0), num_codes=2048)
    graph = FrameGraph(model, batch, sample) if graphed else None  # captured once per setting, like Engine
    for _ in iterate_frames(model, tokens, mask, sample, 3, graph=graph):  # warm-up (allocator, kernels)
        pass
    _peak_reset(device)
    _sync(device)
    t0 = time.perf_counter()
    ttfa = None
    n = 0
    if codec is not None:
        stream = codec.stream(batch_size=batch)
        decoder = stream.__enter__()
    for codes, _ in iterate_frames(model, tokens, mask, sample, frames, graph=graph):
        n += 1
        if ttfa is None:
            if codec is not None:
                decoder.decode(codes.unsqueeze(-1))
            _sync(device)
            ttfa = time.perf_counter() - t0
    _sync(device)
    if codec is not None:
        stream.__exit__(None, None, None)
    name = "ours (CUDA graph)" if graphed else "ours (eager)"
    if model.fused and device.type == "cuda":  # on CPU our layers are always fused (build_engine)
        name = name[:-1] + ", fused layers)"
    return _row(name, _setting(model.config.name, model.audio_head.dtype, model.quantization), batch, n,
                time.perf_counter() - t0, ttfa, device, held)


@torch.inference_mode()
def bench_products(model: CSM, batch: int, repeats: int = 3) -> Row:
    """The floor on CPU: only the weight products a frame makes, each called once with a random
    (B, 1, D) input, back to back, with the model's own (float or int8) layers. Backbone layers
    and codebook-0 head once, then K-1 times the projection, the decoder layers and a codebook
    head. No attention, norms, sampling or loop: no engine calling these kernels per frame can be
    faster. Best of `repeats`."""
    def linears(module):
        return [m for m in module.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]

    backbone = [*linears(model.backbone), model.codebook0_head]
    decoder = [model.projection, *linears(model.decoder)]
    x = {m.in_features: torch.randn(batch, 1, m.in_features) for m in backbone + decoder}
    hd = torch.randn(batch, model.config.decoder.embed_dim)
    best = float("inf")
    for rep in range(repeats + 1):  # pass 0 warms up
        t0 = time.perf_counter()
        for m in backbone:
            m(x[m.in_features])
        for i in range(1, model.config.audio_num_codebooks):
            for m in decoder:
                m(x[m.in_features])
            model.codebook_logits(i, hd)
        if rep:
            best = min(best, time.perf_counter() - t0)
    return _row("weight products only (floor)", _setting(model.config.name, model.audio_head.dtype, model.quantization),
                batch, 1, best, None, torch.device("cpu"))


def _setting(preset: str, dtype: torch.dtype, quantization: str = "none") -> str:
    return f"{preset} {str(dtype)[6:] if quantization == 'none' else quantization + ' weights'}"


@torch.inference_mode()
def bench_transformers(hf, config, device, batch: int, frames: int, held: int = 0) -> Row:
    ids = torch.tensor([PROMPT] * batch, device=device)
    kwargs = dict(do_sample=True, top_k=50, temperature=0.9, depth_decoder_do_sample=True, depth_decoder_top_k=50,
                  depth_decoder_temperature=0.9)
    hf.generate(input_ids=ids, max_new_tokens=2, **kwargs)
    _peak_reset(device)
    _sync(device)
    t0 = time.perf_counter()
    out = hf.generate(input_ids=ids, max_new_tokens=frames, min_new_tokens=frames, **kwargs)
    _sync(device)
    n = out.shape[1]
    return _row("transformers", _setting(config.name, hf.dtype, getattr(hf, "quantization", "none")), batch, n,
                time.perf_counter() - t0, None, device, held)


def quantize_transformers(hf) -> None:
    """The same int8 scheme as `quant.quantize` on transformers' CSM (its backbone, depth decoder and
    heads' nn.Linear layers, and its stacked codebook heads), so int8 rows compare like with like.
    CPU only."""
    from .quant import int8_linears

    int8_linears(hf, ("backbone_model", "depth_decoder", "lm_head"))
    hf.depth_decoder.codebooks_head = _Int8CodebooksHead(hf.depth_decoder.codebooks_head.weight.detach())
    hf.quantization = "int8"


class _Int8CodebooksHead(torch.nn.Module):
    """transformers' `CsmCodebooksHead` (one (D, V) matrix per codebook 1..K-1, picked by index)
    with each matrix as an int8 dynamic Linear, as `quant.quantize` does for ours."""

    def __init__(self, weight: torch.Tensor):  # (K-1, D, V)
        from .quant import int8_heads

        super().__init__()
        self.heads = int8_heads(weight)

    def forward(self, hidden_states: torch.Tensor, codebook_indices: torch.Tensor) -> torch.Tensor:
        rows = (codebook_indices - 1).tolist()  # CPU only, so no device sync is hidden here
        return torch.stack([self.heads[i](hidden_states[:, j]) for j, i in enumerate(rows)], dim=1)


def _random_model(config, seed: int) -> CSM:
    """A model of `config`'s size with N(0, 0.02) matrices and unit norms (fast for 1.6B parameters);
    the same weights for the same seed, so a second copy can be made later instead of kept."""
    torch.manual_seed(seed)
    model = CSM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    return model.eval()


class _Rounds:
    """Times settings in turn, round after round, and keeps each one's median.

    On a shared machine the speed drifts by 15% and more within minutes; timing ours and
    transformers one after the other, `rounds` times, spreads the drift over both instead of
    giving it to whichever ran in the slow minutes. A row is the median round (the lower one for
    an even count); `ms_rounds` keeps every round's ms/frame. Speed-ups are taken per round,
    against transformers timed in the same round of the same phase, and their median reported.

    Keys: ours (engine, quantization, ..., batch); transformers' ("transformers", quantization, batch).
    """

    def __init__(self, rounds: int):
        self.rounds = max(1, rounds)
        self.runs: dict[tuple, list[Row]] = {}
        self.at: dict[tuple, list[tuple[int, int]]] = {}  # key -> (phase, round) of each of its runs
        self.phases = 0

    def phase(self, timers: dict[tuple, object]) -> None:
        """Call every timer (key -> () -> Row) once per round; a key seen in an earlier phase adds to its rounds."""
        for r in range(self.rounds):
            for key, timer in timers.items():
                self.runs.setdefault(key, []).append(timer())
                self.at.setdefault(key, []).append((self.phases, r))
        self.phases += 1

    def speedups(self, key: tuple, ref: tuple) -> list[float]:
        """ref's ms/frame over key's, for every round in which both were timed."""
        ref_ms = {at: row.ms_per_frame for at, row in zip(self.at.get(ref, []), self.runs.get(ref, []))}
        return [round(ref_ms[at] / row.ms_per_frame, 3) for at, row in zip(self.at[key], self.runs[key]) if at in ref_ms]

    def rows(self) -> list[Row]:
        out = []
        for key, runs in self.runs.items():
            row = sorted(runs, key=lambda r: r.ms_per_frame)[(len(runs) - 1) // 2]
            row.ms_rounds = [r.ms_per_frame for r in runs]
            if key[0] != "transformers":
                row.speedup_rounds = self.speedups(key, ("transformers", "none", key[-1])) or None
                row.speedup_same_setting_rounds = self.speedups(key, ("transformers", key[1], key[-1])) or None
            out.append(row)
        return [r for r in out if r.engine != "transformers"] + [r for r in out if r.engine == "transformers"]


def run(preset: str, device: str, dtype: str, batches: list[int], frames: int, with_hf: bool, seed: int = 0,
        compiled: bool = False, quantize: str = "none", fuse: bool = False, rounds: int = 3) -> dict:
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    config = get_preset(preset)
    model = _random_model(config, seed)
    from .codec import MimiCodec, build_mimi
    from .fused import fuse_layers, pack_linears

    hf = None
    if with_hf:  # the same weights in transformers' classes; both stay loaded so their rounds interleave
        from .hf_compat import hf_model

        hf = hf_model(model.state_dict(), config, small_codec=True).to(dev, dt)

    def hf_timers():
        if hf is None:
            return {}
        setting = getattr(hf, "quantization", "none")
        return {("transformers", setting, b): (lambda b=b: bench_transformers(hf, config, dev, b, frames, _bytes_on(model, dev)))
                for b in batches}

    def ours(name, **kw):
        m = model  # the model of the moment (int8 and int4 rows time two models in one phase)

        def timer(b):
            row = bench_ours(m, dev, b, frames, codec, held=_bytes_on(hf, dev), **kw)
            row.engine = name or row.engine
            return row
        return {(name, m.quantization, kw.get("graphed", False), b): (lambda b=b: timer(b)) for b in batches}

    def floor():
        m = model
        return {("floor", m.quantization, b): (lambda b=b: bench_products(m, b)) for b in batches}

    model = model.to(dev, dt)
    codec = MimiCodec(build_mimi(None, device=dev))
    sched = _Rounds(rounds)
    if dev.type == "cpu" or fuse:  # build_engine fuses on CPU; on CUDA it is opt-in (--fuse)
        fuse_layers(model)
    if dev.type == "cpu":
        if dt == torch.float32:  # build_engine's CPU float path packs products for oneDNN: time both
            sched.phase({**ours(None), **hf_timers()})
            if pack_linears(model).packed:
                for key in [k for k in sched.runs if k[0] is None]:  # those rounds ran PyTorch's default products
                    for row in sched.runs[key]:
                        row.engine = "ours (eager, PyTorch's default products)"
                sched.phase({**ours("ours (eager)"), **floor(), **hf_timers()})
            else:
                sched.phase(floor())
        else:
            sched.phase({**ours(None), **floor(), **hf_timers()})
    else:
        sched.phase({**ours(None), **ours(None, graphed=True), **hf_timers()})
        if compiled:
            model.compile_steps()
            name = "ours (compile + CUDA graph" + (", fused layers)" if model.fused else ")")
            sched.phase({**ours(name, graphed=True), **hf_timers()})
    if quantize != "none":
        from .quant import quantize as quantize_model

        del model
        timers = {}
        # int4 and bf16 are timed beside int8, bf16 also beside float32 (its rival as the CPU default)
        modes = {"int4": ("int8", "int4"), "bf16": ("none", "int8", "bf16")}.get(quantize, (quantize,))
        for mode in modes:
            if mode == "none":
                model = pack_linears(fuse_layers(_random_model(config, seed)))
                timers.update(ours("ours (eager, in the rounds of the modes below)"))
                continue
            model = quantize_model(fuse_layers(_random_model(config, seed)), mode)
            timers.update({**ours(None), **floor()})
        if hf is not None:
            quantize_transformers(hf)
        sched.phase({**timers, **hf_timers()})
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "torch": torch.__version__},
        "preset": preset, "device": device, "dtype": dtype, "quantize": quantize, "frames": frames,
        "rounds": sched.rounds, "rows": [asdict(r) for r in sched.rows()],
    }


def table(result: dict) -> str:
    """Markdown table. Speed-ups are transformers' ms/frame over ours at the same batch size, against
    transformers at the run's base dtype and, for int8 rows, against transformers with int8 too:
    the median of the per-round speed-ups where both were timed in the same round (interleaved),
    else the ratio of the two rows' medians."""
    hf = {(r["batch"], r["setting"]): r for r in result["rows"] if r["engine"] == "transformers"}
    base = f"{result['preset']} {result['dtype']}"
    lines = ["| engine | setting | batch | ms/frame | RTF | frames/s | audio s/s | TTFA ms | peak MB "
             "| speed-up vs transformers | vs transformers, same setting |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratios = []
        for setting, paired in ((base, r.get("speedup_rounds")), (r["setting"], r.get("speedup_same_setting_rounds"))):
            ref = hf.get((r["batch"], setting))
            if paired:
                ratios.append(f"{statistics.median(paired):.2f}x")
            else:
                ratios.append(f"{ref['ms_per_frame'] / r['ms_per_frame']:.2f}x" if ref else "-")
        lines.append(f"| {r['engine']} | {r['setting']} | {r['batch']} | {r['ms_per_frame']} | {r['rtf']} | "
                     f"{r['frames_per_s']} | {r['audio_s_per_s']} | {r['ttfa_ms'] or '-'} | {r['peak_mem_mb'] or '-'} "
                     f"| {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset, few frames (CI)")
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps inside the CUDA graph")
    p.add_argument("--quantize", default="none", choices=QUANT_MODES,
                   help="CPU: also time int8 weights (ours and transformers, same scheme); int4 or bf16: ours with "
                        "those weights too, in the same rounds as int8 (transformers stays int8)")
    p.add_argument("--fuse", action="store_true",
                   help="CUDA: our rows with fused layers (fused.py; always on for CPU)")
    p.add_argument("--rounds", type=int, default=3,
                   help="time every setting this many times, ours and transformers in turn; rows are medians")
    p.add_argument("--json", default="bench.json")
    a = p.parse_args(argv)
    preset = "tiny" if a.quick else a.preset
    frames = a.frames or (4 if a.quick else 20)
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    result = run(preset, a.device, dtype, a.batch, frames, not a.no_transformers, compiled=a.compile,
                 quantize=a.quantize, fuse=a.fuse, rounds=a.rounds)
    print(f"machine: {result['machine']}")
    print(table(result))
    with open(a.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
