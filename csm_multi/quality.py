"""Quality guard for the CPU modes: how far each one moves CSM's logits from float32, beside bfloat16.

    python -m csm_multi.quality --quick                              # tiny preset, 10 frames, seconds (CI)
    python -m csm_multi.quality --preset csm-1b --frames 50 \\
        --json bench/quality-cpu-csm-1b.json                         # csm-1b size: minutes on 2 cores
    python -m csm_multi.quality --preset csm-1b --frames 50 --modes int4 \\
        --add-to bench/quality-cpu-csm-1b.json                       # measure one mode, add its row

Why: a faster CPU mode is only worth making the default if it says about what float32 says. No
trained weights are reachable here, so this measures csm-1b-*sized* models with random weights
(`bench._random_model`: N(0, 0.02) matrices, unit norms). The figures are numerical drift, not
speech quality: real-speech quality stays unmeasured.

What runs: an fp32 reference (plain torchtune layers, nothing fused or packed) and, built from the
same seed so from the same weights, "bf16" (the model in bfloat16, layers fused as `build_engine`
does on CPU: the bar every mode is held to), "none" (fp32 as `build_engine` serves it on CPU:
fused layers, oneDNN products; a sanity row, its error is float rounding) and every other mode of
`quant.MODES` at run time (fuse_layers, then quantize, as `build_engine` does). A mode whose backend
is missing here is skipped, with the reason kept. One model is held at a time (csm-1b fp32 is 6.5 GB; the run peaked at 11 GB RSS).

Teacher forcing: every model gets the same inputs, a text prompt (`bench.PROMPT`) and N audio frames
of seeded random codes in 1..2047 (never the all-zero EOS frame). Calls are shaped as in generation:
the prompt is one backbone prefill, each audio frame one backbone step, and the depth decoder runs
one step per codebook ([backbone hidden, embed(code 0)], then embed(code i)) on the frame's own teacher
codes. Not one prefill over the whole sequence: int8 scales activations per call, so a call over many
positions would measure another scheme than the one that generates. The decoder sees the mode's own
backbone hidden state, so its figures are end to end (backbone drift included).

Metrics per mode against fp32, over the first 2048 ids (those the Engine samples from): relative logit
error ||l_mode - l_fp32|| / ||l_fp32|| per frame (codebook 0: the backbone's head; codebooks 1..31: the
depth decoder's, as one vector per frame), its median and max over frames; top-50 overlap
|top50_mode & top50_fp32| / 50 (50 is the sampler's default top-k), mean; greedy agreement (same
argmax), the fraction of frames (codebook 0) or of frame x codebook pairs (1..31). Verdict: a mode
"may be the CPU default" iff its median errors, backbone and decoder, are both within 2x bf16's;
otherwise it is "opt-in".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
import warnings
from collections.abc import Callable

import torch

from .bench import PROMPT, _random_model
from .config import get_preset
from .frames import text_frames
from .generate import next_frame_input
from .model import CSM

NUM_CODES = 2048  # ids the Engine samples (Mimi's codebook size; the other 3 of 2051 are never emitted)
TOPK = 50  # SamplingConfig's default top-k
DEFAULT_FACTOR = 2.0  # a mode may be the CPU default if its errors are at most this many times bf16's
DEFAULT_VERDICT, OPT_IN = "may be the CPU default", "opt-in"
QUICK_PRESET, QUICK_FRAMES = "tiny", 10


# ---- inputs and logits -------------------------------------------------------------------
def teacher_inputs(config, frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed teacher-forced sequence: prompt tokens (S, K+1), its mask, and audio codes (frames, K)
    drawn from a generator seeded with `seed`, in 1..2047, so no frame is the all-zero EOS frame."""
    k = config.audio_num_codebooks
    if frames < 1 or len(PROMPT) + frames > config.max_seq_len:
        raise ValueError(f"frames must be 1..{config.max_seq_len - len(PROMPT)} for {config.name}, got {frames}")
    tokens, mask = text_frames(PROMPT, k)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(1, NUM_CODES, (frames, k), generator=gen)
    return tokens, mask, codes


@torch.inference_mode()
def teacher_forced_logits(model: CSM, tokens: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor,
                          num_codes: int = NUM_CODES) -> torch.Tensor:
    """Logits (frames, K, num_codes) float32 of every frame's K codebooks, the model fed `codes` (frames, K).

    Frame t's codebook 0 comes from the backbone after the prompt and frames 0..t-1; its codebooks
    1..K-1 from the depth decoder given codes[t, :i], step by step as `generate.depth_frame` makes them.
    """
    n, k = codes.shape
    out = torch.empty(n, k, num_codes)
    model.setup_caches(1)
    model.reset_caches()
    step_tokens, step_mask = tokens[None], mask[None]
    pos = torch.arange(tokens.shape[0]).unsqueeze(0)
    try:
        for t in range(n):
            h = model.backbone_step(step_tokens, step_mask, pos)  # (1, Db)
            out[t, 0] = model.codebook0_head(h)[0, :num_codes].float()
            frame = codes[t : t + 1]  # (1, K)
            x = torch.cat([h.unsqueeze(1), model.embed_audio(0, frame[:, :1])], dim=1)  # (1, 2, Db)
            dpos = model.decoder_positions[:1, :2]
            model.decoder.reset_caches()
            for i in range(1, k):
                out[t, i] = model.codebook_logits(i, model.decoder_step(x, dpos))[0, :num_codes].float()
                x, dpos = model.embed_audio(i, frame[:, i : i + 1]), dpos[:, -1:] + 1
            step_tokens, step_mask = next_frame_input(frame)
            pos = pos[:, -1:] + 1
    finally:
        model.drop_caches()
    return out


# ---- metrics -----------------------------------------------------------------------------
def _rel_err(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N,): ||other - ref|| / ||ref|| per leading index, over everything else."""
    ref, other = ref.flatten(1).double(), other.flatten(1).double()
    return (other - ref).norm(dim=1) / ref.norm(dim=1)


def _topk_overlap(ref: torch.Tensor, other: torch.Tensor, k: int) -> torch.Tensor:
    """(..., V) -> (...): the share of ref's top-k ids that are also in other's top-k."""
    k = min(k, ref.shape[-1])
    in_ref = torch.zeros_like(ref, dtype=torch.bool).scatter_(-1, ref.topk(k, dim=-1).indices, True)
    in_other = torch.zeros_like(other, dtype=torch.bool).scatter_(-1, other.topk(k, dim=-1).indices, True)
    return (in_ref & in_other).sum(-1).double() / k


def compare(ref: torch.Tensor, other: torch.Tensor, k: int = TOPK) -> dict[str, float]:
    """Metrics of logits `other` against `ref`, both (frames, K, V): relative error (median, max and
    first frame) of codebook 0 and of codebooks 1..K-1, top-k overlap and greedy agreement of each."""
    if ref.shape != other.shape:
        raise ValueError(f"logits differ in shape: {tuple(ref.shape)} vs {tuple(other.shape)}")
    bb_err, dec_err = _rel_err(ref[:, 0], other[:, 0]), _rel_err(ref[:, 1:], other[:, 1:])
    overlap, same = _topk_overlap(ref, other, k), ref.argmax(-1) == other.argmax(-1)  # (frames, K) each
    return {
        "backbone_rel_err_median": bb_err.median().item(),
        "backbone_rel_err_max": bb_err.max().item(),
        "backbone_rel_err_first": bb_err[0].item(),
        "decoder_rel_err_median": dec_err.median().item(),
        "decoder_rel_err_max": dec_err.max().item(),
        "backbone_topk_overlap": overlap[:, 0].mean().item(),
        "decoder_topk_overlap": overlap[:, 1:].mean().item(),
        "backbone_greedy_agreement": same[:, 0].double().mean().item(),
        "decoder_greedy_agreement": same[:, 1:].double().mean().item(),
    }


def _ratio(a: float, b: float) -> float | None:
    """a / b; None when b is 0 (no bar to compare against) unless a is 0 too."""
    if b == 0:
        return 1.0 if a == 0 else None
    return a / b


def default_eligible(metrics: dict, bf16: dict, factor: float = DEFAULT_FACTOR) -> bool:
    """The issue's rule: a mode may be the CPU default iff its median relative logit errors, backbone
    (codebook 0) and depth decoder (1..31), are each at most `factor` times bf16's."""
    return all(metrics[key] <= factor * bf16[key] for key in ("backbone_rel_err_median", "decoder_rel_err_median"))


def verdict(metrics: dict, bf16: dict, factor: float = DEFAULT_FACTOR) -> str:
    return DEFAULT_VERDICT if default_eligible(metrics, bf16, factor) else OPT_IN


# ---- the modes ---------------------------------------------------------------------------
def prepare(mode: str, model: CSM) -> CSM:
    """`model` (fp32, CPU, freshly built) as this mode serves it, in place where possible.

    "fp32": the reference, untouched. "bf16": cast, then layers fused (build_engine on CPU with
    dtype=bfloat16). A `quant.MODES` mode: build_engine's CPU steps, fuse_layers then quantize, or for
    "none" fuse_layers then pack_linears (oneDNN products).
    """
    from .fused import fuse_layers, pack_linears
    from .quant import quantize

    if mode == "fp32":
        return model
    if mode == "bf16":
        return fuse_layers(model.to(torch.bfloat16))
    fuse_layers(model)
    return pack_linears(model) if mode == "none" else quantize(model, QUANT_NAME.get(mode, mode))


# `--quantize bf16` (bf16 products in a float32 model) is measured as "bf16-products": "bf16" names the bar
QUANT_NAME = {"bf16-products": "bf16"}


def quant_modes() -> list[str]:
    """The quantization modes `quant.MODES` holds now, "none" (served as fp32) first; `--quantize bf16`
    is "bf16-products" here."""
    from .quant import MODES

    names = {v: k for k, v in QUANT_NAME.items()}
    return ["none", *[names.get(m, m) for m in MODES if m != "none"]]


_MISSING_BACKEND = (ImportError, RuntimeError, NotImplementedError, ValueError)  # a kernel or library not here


def run(preset: str = "csm-1b", frames: int = 50, seed: int = 0, modes: list[str] | None = None,
        build: Callable[[object, int], CSM] = _random_model, log: Callable[[str], None] = print,
        threads: int | None = None) -> dict:
    """Measure `modes` (default: "none" and every `quant.MODES` mode) and bf16 against fp32.

    `build(config, seed)` makes the fp32 model (random weights by default); it is called once per row,
    so each row starts from the same weights and only one model is held at a time. `threads`: torch's
    CPU threads for the run (None: as set); one is faster for the tiny preset, whose ops are too small
    to share, most of all on a busy machine. Every row runs with the same setting.
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():  # torchtune's RMSNorm in bf16 notes it has no fused kernel for it
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
            return _run(preset, frames, seed, modes, build, log)
    finally:
        torch.set_num_threads(before)


def _run(preset, frames, seed, modes, build, log) -> dict:
    config = get_preset(preset)
    tokens, mask, codes = teacher_inputs(config, frames, seed)
    wanted = quant_modes() if modes is None else list(modes)
    known = quant_modes()
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; quant.MODES holds {', '.join(known)}")

    def measure(mode: str) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        model = prepare(mode, build(config, seed))
        try:
            logits = teacher_forced_logits(model, tokens, mask, codes)
        finally:
            del model
            gc.collect()
        return logits, time.perf_counter() - t0

    log(f"fp32 reference: {preset}, {frames} frames ...")
    ref, ref_s = measure("fp32")
    rows = [{"mode": "fp32", "label": "fp32 reference (torchtune layers)", **compare(ref, ref), "seconds": round(ref_s, 1)}]
    log(f"  {ref_s:.0f} s")
    for mode in ["bf16", *wanted]:
        log(f"{mode} ...")
        try:
            logits, seconds = measure(mode)
        except _MISSING_BACKEND as e:
            if mode == "bf16":
                raise
            rows.append({"mode": mode, "label": _label(mode), "skipped": f"{type(e).__name__}: {e}"})
            log(f"  skipped: {rows[-1]['skipped']}")
            continue
        rows.append({"mode": mode, "label": _label(mode), **compare(ref, logits), "seconds": round(seconds, 1)})
        del logits
        log(f"  {seconds:.0f} s")
    bf16 = next(r for r in rows if r["mode"] == "bf16")
    for row in rows:
        if "skipped" in row:
            continue
        row["backbone_err_vs_bf16"] = _ratio(row["backbone_rel_err_median"], bf16["backbone_rel_err_median"])
        row["decoder_err_vs_bf16"] = _ratio(row["decoder_rel_err_median"], bf16["decoder_rel_err_median"])
        row["verdict"] = "reference" if row["mode"] in ("fp32", "bf16") else verdict(row, bf16)
    return {
        "machine": _machine(), "preset": preset, "frames": frames, "seed": seed,
        "weights": "random: N(0, 0.02) matrices, unit norms (bench._random_model); not trained weights",
        "reference": "fp32, torchtune layers, teacher-forced",
        "num_codes": NUM_CODES, "topk": TOPK, "default_rule": f"median errors (backbone, decoder) <= {DEFAULT_FACTOR}x bf16's",
        "modes_in_quant": known, "rows": rows,
    }


_SAME_RUN_KEYS = ("preset", "frames", "seed", "num_codes", "topk")


def merge(base: dict, extra: dict, rtol: float = 1e-6) -> dict:
    """`base` report with `extra`'s mode rows added (a mode in both: extra's row replaces base's).

    Both runs measure fp32 and bf16 again; the merge refuses reports whose settings or bf16 rows
    differ (beyond `rtol`), since their rows would then not share weights, inputs or bar.
    """
    for key in _SAME_RUN_KEYS:
        if base.get(key) != extra.get(key):
            raise ValueError(f"the reports differ in {key}: {base.get(key)!r} vs {extra.get(key)!r}")
    (a,), (b,) = ([r for r in rep["rows"] if r["mode"] == "bf16"] for rep in (base, extra))
    for key, value in a.items():
        if key.endswith(("_median", "_max", "_first", "_overlap", "_agreement")) and not (
                abs(value - b[key]) <= rtol * max(abs(value), abs(b[key]))):
            raise ValueError(f"the bf16 rows differ in {key} ({value} vs {b[key]}): not the same weights or inputs")
    added = {r["mode"]: r for r in extra["rows"] if r["mode"] not in ("fp32", "bf16")}
    rows = [added.pop(r["mode"], r) for r in base["rows"]]
    merged = {**base, "rows": rows + list(added.values())}
    merged["added_runs"] = [*base.get("added_runs", []), {
        "modes": [r["mode"] for r in extra["rows"] if r["mode"] not in ("fp32", "bf16")],
        "machine": extra["machine"], "total_seconds": extra.get("total_seconds")}]
    return merged


def _label(mode: str) -> str:
    return {"bf16": "bf16 (fused layers)", "none": "fp32 as served on CPU (fused, oneDNN)",
            "bf16-products": "bf16 products, float32 elsewhere (--quantize bf16)"}.get(
        mode, f"{mode} (fused, quant.quantize)")


def _machine() -> dict:
    from .machine import cpu_name

    return {"platform": platform.platform(), "cpu": cpu_name(platform.processor() or platform.machine()), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": "cpu"}


# ---- report ------------------------------------------------------------------------------
def table(result: dict) -> str:
    """Markdown table: errors as % (median / max over frames), ratios of medians to bf16's. "wall s" is
    how long a row took to build and measure (on a shared machine: not a speed figure)."""
    header = ("| mode | cb0 rel err median / max | cb1-31 rel err median / max | x bf16 (cb0 / cb1-31) "
              "| top-50 overlap cb0 / cb1-31 | greedy agreement cb0 / cb1-31 | verdict | wall s |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]

    def pct(x: float) -> str:
        return f"{100 * x:.3g}%"

    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['label']} | skipped: {r['skipped']} | | | | | | |")
            continue
        ratios = " / ".join("-" if x is None else f"{x:.2f}x" for x in (r["backbone_err_vs_bf16"], r["decoder_err_vs_bf16"]))
        lines.append(
            f"| {r['label']} | {pct(r['backbone_rel_err_median'])} / {pct(r['backbone_rel_err_max'])} "
            f"| {pct(r['decoder_rel_err_median'])} / {pct(r['decoder_rel_err_max'])} | {ratios} "
            f"| {r['backbone_topk_overlap']:.3f} / {r['decoder_topk_overlap']:.3f} "
            f"| {r['backbone_greedy_agreement']:.3f} / {r['decoder_greedy_agreement']:.3f} "
            f"| {r['verdict']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_PRESET} preset, {QUICK_FRAMES} frames (CI)")
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--frames", type=int, default=None, help="teacher-forced audio frames (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the teacher codes")
    p.add_argument("--modes", nargs="+", default=None,
                   help="quant.MODES modes to measure (default: all, 'none' included); fp32 and bf16 always run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --quick: 1)")
    p.add_argument("--json", default="quality.json")
    p.add_argument("--add-to", metavar="PATH", default=None,
                   help="also add this run's mode rows to the report at PATH (same preset, frames, seed) and rewrite it")
    a = p.parse_args(argv)
    preset = QUICK_PRESET if a.quick else a.preset
    frames = a.frames or (QUICK_FRAMES if a.quick else 50)
    t0 = time.perf_counter()
    result = run(preset, frames, a.seed, a.modes, threads=a.threads or (1 if a.quick else None))
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"machine: {result['machine']}")
    print(f"{preset}, {frames} teacher-forced frames, seed {a.seed}, random weights; {result['total_seconds']:.0f} s")
    _write(a.json, result)  # this run on its own, kept even when the merge below refuses
    if a.add_to:
        with open(a.add_to) as f:
            result = merge(json.load(f), result)
        _write(a.add_to, result)
    print(table(result))
    return 0


def _write(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
