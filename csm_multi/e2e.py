"""End-to-end benchmark: script text -> watermarked 24 kHz audio, per stage, as the studio renders it.

    python -m csm_multi.e2e --quick                       # tiny preset, seconds (CI runs this)
    python -m csm_multi.e2e --modes int8 fp32 --rounds 2  # csm-1b size, random weights, 2-core CPU

What a user waits for is more than the frame loop: each line's context prefill (its voice prompts
and earlier lines), the frames, Mimi decoding, the watermark and the rest (trimming, bookkeeping).
This renders a 4-line, 2-voice script with `ScriptRenderer` through the engine's scheduler (as
app.py does) and times each stage of each line from the renderer's own progress events:

  prefill    line start -> its first frame (the prompt's prefill and one frame's depth decoder)
  frames     first frame -> last frame
  decode     Mimi decoding of the line
  watermark  the watermark, then trimming and the clip's bookkeeping
  rest       the whole render less the above (scheduling, the first line's set-up)

Cases, timed in interleaved rounds (the VM is noisy): ours with the prefix cache (`prefix.py`),
ours without it (every line prefills its whole context again), and transformers'
`CsmForConditionalGeneration.generate` with the same weights for each line's prompt length and
frame count (it has no cache across calls), followed by the same Mimi decode and watermark. A
fast-mode render (lines conditioned on voices only, all four in one batch) gives the aggregate
audio seconds per second. Weights are random, so lines never end early: every case generates the
same frames. Text goes through the byte tokenizer (the Llama one cannot be downloaded here), so
text takes ~3x the positions it would with csm-1b's tokenizer.

`--overlap` also asks whether line i's watermark should run beside line i+1's generation instead of
before it (`overlap_case`): on this project's 2-core CPU it should not (README).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

from .codec import MimiCodec, build_mimi
from .config import FRAME_MS, SAMPLE_RATE, SamplingConfig, get_preset
from .engine import DECODING, GENERATING, WATERMARKING, Engine
from .frames import Segment
from .render import FAST, Progress, RenderConfig, ScriptRenderer
from .text import ByteTokenizer
from .watermark import Watermarker, build_random_silentcipher

SCRIPT = """Alice: Did you bring the maps, or do we have to find the way by the stars again?
Bob: I brought the maps, the compass and enough coffee for the two of us.
Alice: Then we leave at dawn and take the river path before the rain comes.
Bob: Dawn it is. I will wake you when the first birds start to sing.
"""
VOICES = {"alice": "alice", "bob": "bob"}
STAGES = ("prefill", "frames", "decode", "watermark", "rest")
APP_CASE = "through the app (gradio_client)"


@dataclass
class LineTimes:
    start: float | None = None
    first: float | None = None
    last: float | None = None
    decode: float | None = None
    mark: float | None = None
    end: float | None = None

    def stages(self) -> dict[str, float]:
        decode_end = self.mark if self.mark is not None else self.end
        return {"prefill": self.first - self.start, "frames": self.last - self.first,
                "decode": decode_end - (self.decode or self.last),
                "watermark": (self.end - self.mark) if self.mark is not None else 0.0}


@dataclass
class Clock:
    """The renderer's progress events as per-line stage times (`perf_counter` seconds)."""

    lines: dict[int, LineTimes] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)

    def __call__(self, p: Progress) -> None:
        now = time.perf_counter()
        t = self.lines.get(p.line)
        if t is None:
            if self.order:  # the previous line ends where this one starts
                self.lines[self.order[-1]].end = now
            t = self.lines[p.line] = LineTimes(start=now)
            self.order.append(p.line)
        if p.stage == GENERATING and p.frame >= 1:
            t.first = t.first if t.first is not None else now
            t.last = now
        elif p.stage == DECODING:
            t.decode = now
        elif p.stage == WATERMARKING:
            t.mark = now

    def close(self, now: float) -> None:
        if self.order:
            self.lines[self.order[-1]].end = now


def build(preset: str, mode: str, seed: int = 0, watermark: bool = True) -> Engine:
    """An engine like `loaders.build_engine`'s on CPU for `preset`'s size with random weights:
    fused layers, then int8 weights (`mode` "int8"), int4 weights through ONNX Runtime ("int4") or
    oneDNN-packed float32 products ("fp32")."""
    from .bench import _random_model
    from .fused import fuse_layers, pack_linears
    from .quant import quantize

    model = fuse_layers(_random_model(get_preset(preset), seed))
    if mode in ("int8", "int4", "bf16"):
        quantize(model, mode)
    elif mode == "fp32":
        pack_linears(model)
    else:
        raise ValueError(f"mode must be fp32, int8 or int4, got {mode!r}")
    codec = MimiCodec(build_mimi(None, seed=seed))
    marker = Watermarker(build_random_silentcipher(seed=seed)) if watermark else None
    return Engine(model, ByteTokenizer(), codec, marker, watermark=watermark)


def voice_prompts(engine: Engine, seconds: float, seed: int = 0):
    """A profile source: each voice a transcript and `seconds` of (random) Mimi codes, as a saved
    voice profile hands them to the renderer."""
    frames = round(seconds * 1000 / FRAME_MS)

    def segment(name: str) -> Segment:
        g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
        codes = torch.randint(1, engine.codec.cardinality, (engine.config.audio_num_codebooks, frames), generator=g)
        return Segment(speaker=0, text=f"This is the voice of {name}, reading a few words.", codes=codes)

    return segment


def render_case(engine: Engine, voices, line_s: float, mode: str = "conversational", cached: bool = True) -> dict:
    """One render of SCRIPT: per-line stage times, totals, RTF and the prompt sizes."""
    engine.prefix.clear()
    keep, engine.prefix.max_bytes = engine.prefix.max_bytes, (engine.prefix.max_bytes if cached else 0)
    config = RenderConfig(seed=7, max_line_ms=line_s * 1000, extra_ms=0, mode=mode, batch_size=4, pause_ms=0)
    clock = Clock()
    try:
        t0 = time.perf_counter()
        result = ScriptRenderer(engine, voices).render(SCRIPT, VOICES, config, progress=clock)
        total = time.perf_counter() - t0
    finally:
        engine.prefix.max_bytes = keep
    clock.close(t0 + total)
    audio_s = sum(c.generated_frames for c in result.clips) * FRAME_MS / 1000
    out = {"total_s": round(total, 3), "audio_s": round(audio_s, 2), "rtf": round(total / audio_s, 3),
           "audio_s_per_s": round(audio_s / total, 3),
           "prompt_positions": [c.context_positions + c.context_split.get("text", 0) for c in result.clips],
           "frames": [c.generated_frames for c in result.clips]}
    if mode == FAST:
        return out
    lines = [clock.lines[i].stages() for i in clock.order]
    sums = {s: sum(line[s] for line in lines) for s in STAGES[:-1]}
    sums["rest"] = total - sum(sums.values())
    out["stages_s"] = {k: round(v, 3) for k, v in sums.items()}
    out["ttfa_s"] = [round(line["prefill"], 3) for line in lines]
    out["lines"] = [{k: round(v, 3) for k, v in line.items()} for line in lines]
    return out


@torch.inference_mode()
def transformers_case(hf, engine: Engine, prompts: list[int], frames: list[int], seed: int = 0) -> dict:
    """transformers' CSM for each line's prompt length and frame count (random ids: the cost of a
    position does not depend on what it holds), then our Mimi decode and watermark, as ours are."""
    g = torch.Generator().manual_seed(seed)
    kwargs = {"do_sample": True, "top_k": 50, "temperature": 0.9, "depth_decoder_do_sample": True,
              "depth_decoder_top_k": 50, "depth_decoder_temperature": 0.9}
    lines, t0 = [], time.perf_counter()
    for n, t in zip(prompts, frames, strict=True):
        ids = torch.randint(0, 2000, (1, n), generator=g)
        start = time.perf_counter()
        out = hf.generate(input_ids=ids, max_new_tokens=t, min_new_tokens=t, **kwargs)
        gen = time.perf_counter()
        codes = out[0, -t:].T.clamp(0, engine.codec.cardinality - 1)  # (K, T)
        audio = engine.decode(codes)
        dec = time.perf_counter()
        if engine.watermarker is not None:
            engine.watermarker.apply(audio)
        lines.append({"generate": gen - start, "decode": dec - gen, "watermark": time.perf_counter() - dec})
    total = time.perf_counter() - t0
    audio_s = sum(frames) * FRAME_MS / 1000
    return {"total_s": round(total, 3), "audio_s": round(audio_s, 2), "rtf": round(total / audio_s, 3),
            "audio_s_per_s": round(audio_s / total, 3),
            "stages_s": {k: round(sum(line[k] for line in lines), 3) for k in ("generate", "decode", "watermark")}}


OVERLAP_WAYS = ("serial", "overlapped, watermark on 1 thread", "overlapped, watermark on 2 threads")


def overlap_case(engine: Engine, voices, line_s: float, rounds: int = 2, log=print) -> dict:
    """Should a dialogue watermark line i while line i+1 is generated? (Decoding cannot move: the
    renderer trims line i's codes by its decoded audio before line i+1 hears them.) Per round and
    in turn: line i+1's codes (through the scheduler, both voices as context) after line i's
    watermark, and beside it on another thread with 1 or 2 intra-op threads; seconds from the start
    of the watermark to line i+1's last frame. The renderer keeps whichever is faster."""
    if engine.watermarker is None:
        return {}
    context = [voices(v) for v in VOICES.values()]
    frames = round(line_s * 1000 / FRAME_MS)
    sampling = SamplingConfig(seed=3, max_audio_length_ms=frames * FRAME_MS)
    with torch.inference_mode():
        audio = engine.decode(engine.generate_codes("The line that was just spoken.", 0, context, sampling)[0])
    line = "And the next line, generated while that one is watermarked."
    engine.generate_codes(line, 1, context, sampling)  # warm-up, and the voices' state in the prefix cache

    def watermark(threads: int | None) -> None:
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            engine.watermarker.apply(audio)
        finally:
            torch.set_num_threads(before)

    def way(name: str) -> float:
        t0 = time.perf_counter()
        if name == "serial":
            watermark(None)
            engine.generate_codes(line, 1, context, sampling)
        else:
            side = threading.Thread(target=watermark, args=(1 if "1 thread" in name else 2,))
            side.start()
            engine.generate_codes(line, 1, context, sampling)
            side.join()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in OVERLAP_WAYS}
    for r in range(rounds):
        for name in OVERLAP_WAYS[r % 3:] + OVERLAP_WAYS[: r % 3]:  # each round starts with another way
            times[name].append(round(way(name), 3))
        log(f"overlap round {r + 1}: " + ", ".join(f"{n} {t[-1]} s" for n, t in times.items()))
    return {"line_s": line_s, "frames": frames, "audio_s": round(audio.numel() / SAMPLE_RATE, 2),
            "seconds_rounds": times,
            "serial_over_overlapped_rounds": {n: [round(a / b, 3) for a, b in zip(times["serial"], t)]
                                              for n, t in times.items() if n != "serial"}}


APP_MODELS = {"csm-1b": "csm-1b-random", "tiny": "tiny"}  # the app's --model for a preset's size


def app_case(mode: str, line_s: float, voice_s: float, rounds: int = 1, watermark: bool = True,
             timeout_s: float = 1800, log=print, preset: str = "csm-1b") -> dict:
    """SCRIPT through the web app, as a visitor renders it: `app.py --model csm-1b-random` (csm-1b's
    size, random weights; "tiny" for the tiny preset) in a subprocess with `mode`'s --quantize, two
    voices saved from `voice_s` seconds of audio each, then `rounds` renders over gradio_client after a
    warm-up render of 1 s lines, each timed from the call to the dialogue file fetched. The in-process
    cases' numbers plus what the app adds (the queue, Gradio, the exports it writes). The page lets a
    line run its "max seconds" plus RenderConfig's 0.8 s allowance, so it is asked for `line_s` less
    that (at least 1 s, the page's minimum): the same frames as the in-process cases' lines."""
    import re
    import tempfile
    from pathlib import Path

    from gradio_client import Client, handle_file

    from .stress import AppServer, _fetch, _reference_clip

    if preset not in APP_MODELS:
        raise ValueError(f"the app case runs the presets {sorted(APP_MODELS)}, not {preset!r}")
    ask_s = max(line_s - RenderConfig().extra_ms / 1000, 1.0)

    with tempfile.TemporaryDirectory(prefix="csm-e2e-app-") as scratch:
        root = Path(scratch)
        clip = _reference_clip(root / "voice.wav", voice_s)
        quantize = "none" if mode == "fp32" else mode  # "none": float32 even where the app's auto picks bf16
        with AppServer(root / "profiles", root / "tmp", model=APP_MODELS[preset], quantize=quantize,
                       watermark=watermark) as server:
            client = Client(server.url, verbose=False, httpx_kwargs={"timeout": timeout_s}, download_files=False)
            key = "e2e-benchmark-visitor"
            for name in VOICES:
                client.predict(key, handle_file(clip), f"This is the voice of {name}, reading a few words.", name,
                               api_name="/add_profile")
            mapping = {"headers": ["speaker", "profile"], "data": [["Alice", "alice"], ["Bob", "bob"]]}
            runs = []
            for r in range(rounds + 1):  # the first, with 1 s lines, pays the first calls' one-off costs
                start = time.perf_counter()
                out = client.predict(key, SCRIPT, mapping, 0.9, 50, 7, ask_s if r else 1.0, 0, "conversational",
                                     api_name="/render_script")
                _fetch(out[2], timeout_s)
                total = time.perf_counter() - start
                found = re.search(r"lines, ([\d.]+) s", str(out[1]))
                if found is None:
                    raise RuntimeError(f"the app's render answered {out[1]!r}")
                if r:
                    audio_s = float(found[1])
                    runs.append({"total_s": round(total, 3), "audio_s": audio_s, "rtf": round(total / audio_s, 3),
                                 "audio_s_per_s": round(audio_s / total, 3)})
                    log(f"{mode} app round {r}: {total:.1f} s for {audio_s} s of audio")
            memory = server.memory_mb()
    median = sorted(runs, key=lambda c: c["total_s"])[(len(runs) - 1) // 2]
    return {**median, "total_rounds_s": [c["total_s"] for c in runs], "max_line_s_asked": ask_s,
            "server_peak_rss_mb": round(memory.get("VmHWM", float("nan")))}


def run(preset: str = "csm-1b", modes=("int8",), rounds: int = 2, line_s: float = 2.4, voice_s: float = 5.0,
        with_hf: bool = True, fast: bool = True, watermark: bool = True, seed: int = 0, log=print,
        app: bool = False, app_rounds: int = 1, app_only: bool = False, overlap: bool = False) -> dict:
    """Every case of every mode, `rounds` interleaved rounds each; the JSON `main` writes. `app`: then
    `app_rounds` renders of the same script through the web app at csm-1b size (`app_case`, not
    interleaved with the others: two csm-1b engines at once would not fit in this machine's memory);
    `app_only`: that case alone; `overlap`: also `overlap_case` (watermark beside generation)."""
    results = {}
    for mode in modes:
        if app_only:
            results[mode] = {APP_CASE: app_case(mode, line_s, voice_s, app_rounds, watermark, log=log,
                                                 preset=preset)}
            continue
        engine = build(preset, mode, seed, watermark)
        engine.serve()
        voices = voice_prompts(engine, voice_s, seed)
        hf = None
        if with_hf:
            from .bench import _random_model, quantize_transformers
            from .hf_compat import hf_model

            hf = hf_model(_random_model(get_preset(preset), seed).state_dict(), get_preset(preset), small_codec=True)
            hf = hf.eval()
            if mode in ("int8", "int4"):  # transformers has no int4 CPU path: int4 is compared with its int8
                quantize_transformers(hf)
        cases: dict[str, list[dict]] = {}
        specs = [("ours, prefix cache", {}), ("ours, no prefix cache", {"cached": False})]
        if fast:
            specs.append(("ours, fast mode (4 lines batched)", {"mode": FAST}))
        try:
            render_case(engine, voices, min(line_s, 0.4))  # warm-up: first calls pay one-off costs
            for r in range(rounds):
                for name, kwargs in specs:
                    cases.setdefault(name, []).append(render_case(engine, voices, line_s, **kwargs))
                    log(f"{mode} round {r + 1}: {name}: {cases[name][-1]['total_s']} s")
                if hf is not None:
                    ref = cases["ours, no prefix cache"][-1]
                    cases.setdefault("transformers", []).append(
                        transformers_case(hf, engine, ref["prompt_positions"], ref["frames"], seed))
                    log(f"{mode} round {r + 1}: transformers: {cases['transformers'][-1]['total_s']} s")
            if overlap:
                overlaps = overlap_case(engine, voices, line_s, rounds, log)
        finally:
            engine.stop_serving()
        summary = {}
        for name, runs in cases.items():
            median = sorted(runs, key=lambda c: c["total_s"])[(len(runs) - 1) // 2]
            summary[name] = {**median, "total_rounds_s": [c["total_s"] for c in runs]}
        if "transformers" in cases:
            for name, runs in cases.items():
                if name != "transformers":  # per round, against transformers in the same round
                    summary[name]["speedup_vs_transformers_rounds"] = [
                        round(h["total_s"] / c["total_s"], 3) for c, h in zip(runs, cases["transformers"])]
        results[mode] = summary
        if overlap:
            summary["overlap"] = overlaps
        engine = hf = None  # before the next mode's copies are built
        if app:  # after this mode's in-process engines are gone: a csm-1b-sized app needs their memory
            summary[APP_CASE] = app_case(mode, line_s, voice_s, app_rounds, watermark, log=log, preset=preset)
    return {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__},
            "preset": preset, "rounds": rounds, "line_s": line_s, "voice_s": voice_s, "watermark": watermark,
            "sample_rate": SAMPLE_RATE, "script_lines": SCRIPT.strip().count("\n") + 1, "modes": results}


def table(result: dict) -> str:
    lines = [("| mode | case | total s | audio s | RTF | audio s/s | prefill | frames | decode | watermark | rest "
              "| TTFA per line s | vs transformers |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, cases in result["modes"].items():
        for name, c in cases.items():
            if name == "overlap":
                continue
            st = c.get("stages_s", {})
            if name == "transformers":
                cells = [st.get("generate", "-"), "(in generate)", st.get("decode", "-"), st.get("watermark", "-"), "-"]
            else:
                cells = [st.get(s, "-") for s in STAGES]
            ttfa = " / ".join(str(x) for x in c.get("ttfa_s", [])) or "-"
            speed = c.get("speedup_vs_transformers_rounds")
            vs = f"{statistics.median(speed):.2f}x" if speed else "-"
            lines.append(f"| {mode} | {name} | {c['total_s']} | {c['audio_s']} | {c['rtf']} | {c['audio_s_per_s']} | "
                         + " | ".join(str(x) for x in cells) + f" | {ttfa} | {vs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m csm_multi.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny preset, short lines, one round (CI)")
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--modes", nargs="+", default=["int8"], choices=["fp32", "int8", "int4", "bf16"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--line-s", type=float, default=None,
                   help="seconds of audio per line (random weights never end early; default 2.4, --quick 0.8)")
    p.add_argument("--voice-s", type=float, default=5.0, help="seconds of each voice prompt")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-fast", action="store_true", help="skip the fast-mode render")
    p.add_argument("--no-watermark", action="store_true")
    p.add_argument("--app", action="store_true",
                   help="also render the script through the web app (app.py --model csm-1b-random), after each mode")
    p.add_argument("--app-rounds", type=int, default=1)
    p.add_argument("--app-only", action="store_true", help="only the app case (with --app's rounds)")
    p.add_argument("--overlap", action="store_true",
                   help="also time a line's watermark beside the next line's generation against one after the other")
    p.add_argument("--json", default="e2e.json")
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.modes, a.rounds, a.voice_s = "tiny", ["fp32"], 1, 1.0
    a.line_s = a.line_s or (0.8 if a.quick else 2.4)
    result = run(a.preset, a.modes, a.rounds, a.line_s, a.voice_s, with_hf=not a.no_transformers, fast=not a.no_fast,
                 watermark=not a.no_watermark, app=a.app or a.app_only, app_rounds=a.app_rounds, app_only=a.app_only,
                 overlap=a.overlap)
    print(table(result))
    for mode, cases in result["modes"].items():
        if cases.get("overlap"):
            print(f"{mode}: line i's watermark beside line i+1's generation, serial / overlapped per round: "
                  f"{cases['overlap']['serial_over_overlapped_rounds']}")
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
