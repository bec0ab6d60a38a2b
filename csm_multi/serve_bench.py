"""Serving benchmark: many generations through one scheduler against the same ones one at a time.

    python -m csm_multi.serve_bench --quick                          # tiny preset, CPU (CI runs this)
    python -m csm_multi.serve_bench --preset csm-1b --quantize int8 --concurrent 4
    python -m csm_multi.serve_bench --preset csm-1b --device cuda --concurrent 1 8 32 64 128 256

Builds an engine of `--preset`'s size with random weights (speed does not depend on the values; no
end frame comes early, so every request makes `--frames` frames), gives it a scheduler, and times,
in interleaved rounds, N requests one after another and N at once (threads calling Engine.generate
as the app's handlers do: each decodes its own audio). Prints audio seconds per second for both and
their ratio, the per-stream speed (audio seconds per second each stream gets while N run, >= 1 is
faster than real time), and the time to first frame of a request that joins N - 1 running ones
against one alone. Writes JSON. Engine level, not through the web app (`python -m
csm_multi.stress` is that, on the tiny preset).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time

import torch

from .config import FRAME_MS, SamplingConfig, get_preset


def build(preset: str, device: str, dtype: str, quantize: str):
    """An Engine of `preset`'s size with random weights, prepared as build_engine prepares it."""
    from .bench import _random_model
    from .codec import MimiCodec, build_mimi
    from .engine import Engine
    from .fused import fuse_layers, pack_linears
    from .quant import quantize as quantize_model
    from .text import ByteTokenizer

    dev = torch.device(device)
    model = _random_model(get_preset(preset), seed=0).to(dev, getattr(torch, dtype))
    if dev.type == "cpu":
        fuse_layers(model)
        if quantize != "none":
            quantize_model(model, quantize)
        else:
            pack_linears(model)
    return Engine(model, ByteTokenizer(), MimiCodec(build_mimi(None, device=dev)), watermark=False)


def _texts(n: int) -> list[str]:
    return [f"Visitor {i} says a line of a test script here." for i in range(n)]


def serial(engine, n: int, sampling: SamplingConfig) -> float:
    start = time.perf_counter()
    for i, text in enumerate(_texts(n)):
        engine.generate(text, 0, (), sampling.with_(seed=i))
    return time.perf_counter() - start


def concurrent(engine, n: int, sampling: SamplingConfig) -> float:
    threads = [threading.Thread(target=engine.generate, args=(text, 0, (), sampling.with_(seed=i)))
               for i, text in enumerate(_texts(n))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def first_frame(engine, sampling: SamplingConfig, running: int) -> float:
    """Seconds to the first frame of a request submitted while `running` others are mid-utterance."""
    from .scheduler import GenerationRequest

    sched = engine.scheduler
    tokens, mask = engine.build_prompt("A request that joins the running batch.", 0)
    others = []
    for i in range(running):
        t, m = engine.build_prompt(f"Running request {i}.", 0)
        others.append(sched.submit(GenerationRequest(t, m, 0.9, 50, i, sampling.max_frames * 4)))
    streams = [iter(o) for o in others]  # kept: a stream dropped is a request cancelled
    for stream in streams:  # each has made a frame: they are in the batch
        next(stream)
    start = time.perf_counter()
    ticket = sched.submit(GenerationRequest(tokens, mask, 0.9, 50, 99, 2))
    mine = iter(ticket)
    next(mine)
    seconds = time.perf_counter() - start
    for o in [*others, ticket]:
        o.cancel()
    while sched.stats()["active"]:
        time.sleep(0.01)
    return seconds


def run(preset: str = "tiny", device: str = "cpu", dtype: str = "float32", quantize: str = "none",
        concurrency: tuple[int, ...] = (8,), frames: int = 20, rounds: int = 3) -> dict:
    engine = build(preset, device, dtype, quantize)
    engine.serve(max_rows=max(concurrency), max_waiting=max(64, max(concurrency)))
    sampling = SamplingConfig(temperature=0.9, topk=50, max_audio_length_ms=frames * FRAME_MS)
    engine.generate("Warm-up line.", 0, (), sampling.with_(seed=0))
    rows = []
    for n in concurrency:
        got: dict[str, list[float]] = {"serial": [], "concurrent": [], "ttfa_alone": [], "ttfa_joining": []}
        for _ in range(rounds):  # in turn, so both see the same drift of a shared machine
            got["serial"].append(serial(engine, n, sampling))
            got["concurrent"].append(concurrent(engine, n, sampling))
            got["ttfa_alone"].append(first_frame(engine, sampling, 0))
            got["ttfa_joining"].append(first_frame(engine, sampling, n - 1))
        audio = n * frames * FRAME_MS / 1000
        med = {k: statistics.median(v) for k, v in got.items()}
        rows.append({
            "concurrent": n, "frames": frames, "audio_s": audio,
            "serial_s": round(med["serial"], 3), "concurrent_s": round(med["concurrent"], 3),
            "serial_audio_s_per_s": round(audio / med["serial"], 3),
            "concurrent_audio_s_per_s": round(audio / med["concurrent"], 3),
            "throughput_gain": round(statistics.median(s / c for s, c in zip(got["serial"], got["concurrent"])), 2),
            "per_stream_audio_s_per_s": round(frames * FRAME_MS / 1000 / med["concurrent"], 3),
            "ttfa_alone_ms": round(med["ttfa_alone"] * 1000, 1), "ttfa_joining_ms": round(med["ttfa_joining"] * 1000, 1),
            "rounds": {k: [round(x, 3) for x in v] for k, v in got.items()},
        })
    stats = engine.scheduler.stats()
    engine.stop_serving()
    return {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None},
            "preset": preset, "device": device, "dtype": dtype, "quantize": quantize, "rounds": rounds,
            "rows": rows, "scheduler": stats}


def table(result: dict) -> str:
    lines = [f"{result['preset']}, {result['device']} {result['dtype']}"
             f"{'' if result['quantize'] == 'none' else ' + ' + result['quantize'] + ' weights'}, "
             f"median of {result['rounds']} interleaved rounds",
             "| at once | frames each | one at a time: audio s/s | at once: audio s/s | gain | per stream: audio s/s "
             "| first frame alone ms | joining a batch ms |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['concurrent']} | {r['frames']} | {r['serial_audio_s_per_s']} | "
                     f"{r['concurrent_audio_s_per_s']} | {r['throughput_gain']}x | {r['per_stream_audio_s_per_s']} | "
                     f"{r['ttfa_alone_ms']} | {r['ttfa_joining_ms']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset, 4 at once, 6 frames, 1 round (CI)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--quantize", default="none", choices=["none", "int8"])
    p.add_argument("--concurrent", type=int, nargs="+", default=[8], help="requests at once (one row each)")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default="serve_bench.json")
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.concurrent, a.frames, a.rounds = "tiny", [4], 6, 1
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    result = run(a.preset, a.device, dtype, a.quantize, tuple(a.concurrent), a.frames, a.rounds)
    print(table(result))
    with open(a.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {a.json}")
    return result


if __name__ == "__main__":
    main()
