"""Load test: N gradio_client visitors against the web app, on the offline tiny preset by default.

    python -m csm_multi.stress --clients 20 --requests 1 [--lines 2] [--json stress.json]
    python -m csm_multi.stress --model csm-1b-random --quantize int8 --clients 4 --compare  # csm-1b's cost

Starts `app.py` in a subprocess (its real main(), queue and limits) with a throwaway profiles
folder and TMPDIR. Each visitor uses its own library key: it adds one profile, renders
`--requests` scripts of `--lines` lines (2 by default; conversational, so line 2 hears line 1)
spoken in that voice, lists its library (which must hold exactly its own profile) and reads the
status. Prints requests/s, p50/p95/max latency per endpoint, errors by kind
(busy = the queue was full, failed, timeout, mixed = a visitor saw another visitor's voices), the
server's peak RSS and its LRU sizes. Talks to the app only over HTTP; imports no model code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf

from .config import QUANT_MODES

APP = Path(__file__).resolve().parents[1] / "app.py"
ENDPOINTS = ("connect", "add_profile", "render_script", "list_profiles", "status")
BUSY = "queue is full"


class AppServer:
    """`app.py --model tiny --no-watermark` on 127.0.0.1 in a subprocess, with its own TMPDIR (so
    its outputs and Gradio's uploads land under `tmp_dir`). Use as a context manager. `model`,
    `quantize` and `watermark` choose the engine as app.py's flags do (e.g. "csm-1b-random" with
    quantize "int8": what csm-1b costs, offline)."""

    def __init__(self, profiles_dir: str | Path, tmp_dir: str | Path, *extra_args: str, model: str = "tiny",
                 quantize: str | None = None, watermark: bool = False):
        self.profiles_dir, self.tmp_dir = Path(profiles_dir), Path(tmp_dir)
        self.extra_args = (*(("--quantize", quantize) if quantize else ()), *(() if watermark else ("--no-watermark",)),
                           *extra_args)
        self.model = model
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @property
    def outputs_root(self) -> Path:
        return self.tmp_dir / "csm-multi-outputs"

    def start(self, timeout_s: float | None = None) -> AppServer:
        timeout_s = timeout_s or (180 if self.model == "tiny" else 900)  # a csm-1b-sized engine: minutes
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"
        env = {**os.environ, "TMPDIR": str(self.tmp_dir), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        self.log_path = self.tmp_dir / f"app-{port}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(APP), "--model", self.model, "--host", "127.0.0.1",
                 "--port", str(port), "--profiles-dir", str(self.profiles_dir), *self.extra_args],
                env=env, cwd=APP.parent, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2):
                    return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"the app did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def memory_mb(self) -> dict[str, float]:
        """Current (VmRSS) and peak (VmHWM) resident memory of the server, from /proc (Linux only)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return {}
        found = re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE)
        return {key: int(value) / 1024 for key, value in found}

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the server."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> AppServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class Recorder:
    """Latencies of successful calls and error counts, per endpoint (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.samples: dict[str, str] = {}
        self.audio_s = 0.0  # seconds of audio rendered
        self.ready: threading.Barrier | None = None  # set by run(): all visitors, before their renders
        self.render_window = [float("inf"), 0.0]  # first render's start, last render's end (perf_counter)

    def render_started(self) -> None:
        with self.lock:
            self.render_window[0] = min(self.render_window[0], time.perf_counter())

    def render_ended(self) -> None:
        with self.lock:
            self.render_window[1] = max(self.render_window[1], time.perf_counter())

    def audio(self, seconds: float) -> None:
        with self.lock:
            self.audio_s += seconds

    def ok(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.latency[endpoint].append(seconds)

    def error(self, endpoint: str, kind: str, message: str = "") -> None:
        with self.lock:
            self.errors[endpoint][kind] += 1
            self.samples.setdefault(kind, f"{endpoint}: {message[:300]}")


def classify(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timeout"
    return "busy" if BUSY in str(error).lower() else "failed"


def _call(rec: Recorder, endpoint: str, fn, timeout_s: float, retries: int):
    """fn() with a timeout; a busy answer (queue full) is counted and retried after a pause, and
    counted as `gave_up` after `retries` retries. Returns the result, or None."""
    for attempt in range(retries + 1):
        start = time.perf_counter()
        try:
            result = fn(timeout_s)
        except Exception as e:  # counted by kind; the visitor goes on
            kind = classify(e)
            rec.error(endpoint, kind, str(e))
            if kind != "busy":
                return None
            time.sleep(1.0 + attempt)
            continue
        rec.ok(endpoint, time.perf_counter() - start)
        return result
    rec.error(endpoint, "gave_up")
    return None


def done(lines: int) -> str:
    """How the app's answer to a finished render of `lines` lines begins ("Done: 1 line", "Done: 2 lines")."""
    return f"Done: {lines} line{'' if lines == 1 else 's'}"


def script(speaker: str, render: int, lines: int) -> str:
    """A visitor's script: `lines` lines, all spoken by `speaker`."""
    return "\n".join(f"{speaker}: Line {i + 1} of render {render}." for i in range(lines))


def visitor(url: str, index: int, clip: str, requests: int, line_s: float, timeout_s: float, retries: int,
            rec: Recorder, report: dict, tag: str = "", lines: int = 2) -> None:
    from gradio_client import Client, handle_file

    key, name = f"stress-visitor{tag}-{index:03d}", f"Voice {index}"
    client = _call(rec, "connect", lambda t: Client(url, verbose=False, httpx_kwargs={"timeout": t},
                                                    download_files=False), timeout_s, 0)
    if client is None:
        return

    def api(endpoint, *args):
        return _call(rec, endpoint, lambda t: client.submit(*args, api_name=f"/{endpoint}").result(timeout=t),
                     timeout_s, retries)

    added = api("add_profile", key, handle_file(clip), "a short test clip", name) is not None
    try:
        rec.ready.wait(timeout_s)  # every visitor renders at the same moment: the render phase is timed alone
    except threading.BrokenBarrierError:
        pass
    if added:
        mapping = {"headers": ["speaker", "profile"], "data": [[name, name]]}
        rec.render_started()
        for r in range(requests):
            out = api("render_script", key, script(name, r, lines), mapping, 0.9, 50, index * 100 + r, line_s, 0,
                      "conversational")
            if out is not None and not str(out[1]).startswith(done(lines)):
                rec.error("render_script", "failed", f"unexpected answer {out[1]!r}")
            elif out is not None:
                rec.audio(float(re.search(r"lines?, ([\d.]+) s", str(out[1]))[1]))
                _fetch(out[2], timeout_s)  # what the page's player loads (not every file, as a browser)
        rec.render_ended()
    listed = api("list_profiles", key)
    if listed is not None:
        names = [row[0] for row in listed[0]["data"]]
        if names != ([name] if added else []):
            rec.error("list_profiles", "mixed", f"{key} lists {names}")
    status = api("status", key)
    if status is not None:
        report[index] = status


def _lru(status: str) -> dict:
    """The LRU figures in the status page's markdown."""
    out = {}
    if m := re.search(r"Profile cache:\*\* .*? (\d+)/(\d+) entries, (\d+) evictions", status):
        out["profile_cache"] = {"size": int(m[1]), "max": int(m[2]), "evictions": int(m[3])}
    if m := re.search(r"Voice libraries in memory:\*\* (\d+)/(\d+)", status):
        out["libraries"] = {"open": int(m[1]), "max": int(m[2])}
    return out


def _reference_clip(path: Path, seconds: float) -> str:
    sr = 24_000
    t = np.arange(int(sr * seconds)) / sr
    sf.write(str(path), 0.2 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)), sr)
    return str(path)


def _fetch(file_data, timeout_s: float) -> int:
    """GET a file output's URL, as the page's audio player does; its size in bytes. Visitors run with
    gradio_client's download_files=False: it would fetch every file of a render (the dialogue, each
    format, stems, zip), ~1.2 s of this machine's CPU per render, which a browser never does."""
    url = file_data.get("url") if isinstance(file_data, dict) else None
    if not url:
        return 0
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return len(response.read())


def _render_alone(url: str, clip: str, line_s: float, timeout_s: float, tag: str = "", rounds: int = 2,
                  lines: int = 2) -> float:
    """Seconds one visitor's render of `lines` lines takes with nobody else there (best of `rounds`, after a
    warm-up)."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, httpx_kwargs={"timeout": timeout_s}, download_files=False)
    key = f"stress-alone-visitor{tag}"
    client.predict(key, handle_file(clip), "a short test clip", "Alone", api_name="/add_profile")
    mapping = {"headers": ["speaker", "profile"], "data": [["Alone", "Alone"]]}
    best = float("inf")
    for r in range(rounds + 1):
        start = time.perf_counter()
        out = client.predict(key, script("Alone", 0, lines), mapping, 0.9, 50, 7, line_s, 0, "conversational",
                             api_name="/render_script")
        _fetch(out[2], timeout_s)
        if r:
            best = min(best, time.perf_counter() - start)
    client.predict(key, "Alone", True, api_name="/delete_profile")
    return best


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(clients: int = 20, requests: int = 1, line_s: float = 1.0, clip_s: float = 1.5, timeout_s: float = 300,
        deadline_s: float = 900, retries: int = 5, libraries_in_memory: int | None = None,
        workdir: str | Path | None = None, max_batch: int | None = None, engine: dict | None = None,
        lines: int = 2) -> dict:
    """Start the app, run `clients` visitors at once, stop the app; returns the figures as a dict.
    Every call has `timeout_s`, the whole run `deadline_s`: a hung visitor is reported, never waited for.
    `max_batch`: the app's --max-batch (None: its default). Before the visitors come, one render
    alone is timed (`alone_s`), so `render_wall_s / alone_s` says what sharing the server cost. `engine`:
    AppServer's model, quantize and watermark (default: tiny, no watermark)."""
    with tempfile.TemporaryDirectory(prefix="csm-stress-") as scratch:
        root = Path(workdir or scratch)
        clip = _reference_clip(root / "reference.wav", clip_s)
        with AppServer(root / "profiles", root / "tmp", *_app_args(libraries_in_memory, max_batch),
                       **(engine or {})) as server:
            report = visit(server, clip, clients, requests, line_s, timeout_s, deadline_s, retries, lines=lines)
    return {**report, "max_batch": max_batch, "engine": _engine_label(engine)}


def _engine_label(engine: dict | None) -> dict:
    engine = engine or {}
    return {"model": engine.get("model", "tiny"), "quantize": engine.get("quantize") or "auto",  # the app's default
            "watermark": bool(engine.get("watermark", False))}


def _app_args(libraries_in_memory: int | None, max_batch: int | None) -> tuple[str, ...]:
    extra = () if libraries_in_memory is None else ("--libraries-in-memory", str(libraries_in_memory))
    return extra + (() if max_batch is None else ("--max-batch", str(max_batch)))


def visit(server: AppServer, clip: str, clients: int, requests: int, line_s: float, timeout_s: float,
          deadline_s: float, retries: int = 5, tag: str = "", lines: int = 2) -> dict:
    """One round against a running app: time one render alone, then `clients` visitors at once (their
    library keys carry `tag`, so rounds do not share libraries), each render a script of `lines`
    lines of at most `line_s` seconds; the figures as a dict."""
    alone_s = _render_alone(server.url, clip, line_s, timeout_s, tag, lines=lines)
    rec, statuses = Recorder(), {}
    rec.ready = threading.Barrier(clients)
    at_start = server.memory_mb()
    threads = [threading.Thread(target=visitor, daemon=True, name=f"visitor-{i}",
                                args=(server.url, i, clip, requests, line_s, timeout_s, retries, rec, statuses, tag,
                                      lines))
               for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline_s - (time.perf_counter() - start)))
    wall = time.perf_counter() - start
    hung = sum(t.is_alive() for t in threads)
    memory = server.memory_mb()
    lrus = [_lru(s) for s in statuses.values()]
    caches = [x["profile_cache"] for x in lrus if "profile_cache" in x]
    libraries = [x["libraries"] for x in lrus if "libraries" in x]
    totals = defaultdict(int)
    for per_kind in rec.errors.values():
        for kind, n in per_kind.items():
            totals[kind] += n
    done = sum(len(v) for k, v in rec.latency.items() if k != "connect")
    first, last = rec.render_window
    render_wall = last - first if last > first else float("nan")
    return {
        "clients": clients, "requests_per_client": requests, "lines": lines, "line_s": line_s,
        "wall_s": round(wall, 2),
        "alone_s": round(alone_s, 3), "audio_s": round(rec.audio_s, 2), "render_wall_s": round(render_wall, 2),
        "audio_s_per_s": round(rec.audio_s / render_wall, 3) if not math.isnan(render_wall) else 0.0,
        "completed_requests": done, "requests_per_s": round(done / wall, 3) if wall else 0.0, "hung_clients": hung,
        "endpoints": {e: {"ok": len(rec.latency[e]), **dict(rec.errors[e]),
                          "p50_s": round(_percentile(rec.latency[e], 50), 3),
                          "p95_s": round(_percentile(rec.latency[e], 95), 3),
                          "max_s": round(max(rec.latency[e], default=float("nan")), 3)} for e in ENDPOINTS},
        "errors": {k: totals.get(k, 0) for k in ("busy", "gave_up", "failed", "timeout", "mixed")},
        "error_samples": rec.samples,
        "server_rss_mb": {"after_start": round(at_start.get("VmRSS", float("nan"))),
                          "peak": round(memory.get("VmHWM", float("nan")))},
        "libraries": {"max_open": max((x["open"] for x in libraries), default=None),
                      "limit": libraries[0]["max"] if libraries else None},
        "profile_cache": {"max_size": max((x["size"] for x in caches), default=None),
                          "limit": caches[0]["max"] if caches else None},
        "statuses": len(statuses),
    }


def run_compare(clients: int = 8, requests: int = 1, line_s: float = 1.0, clip_s: float = 1.5, rounds: int = 3,
                max_batch: int = 8, timeout_s: float = 300, deadline_s: float = 900,
                libraries_in_memory: int | None = None, engine: dict | None = None, lines: int = 2) -> dict:
    """Two apps at once, `--max-batch max_batch` and `--max-batch 1`, visited in turn for `rounds`
    rounds (batched, serial, batched, ...: both see the same drift of a noisy machine). Returns each
    round's figures and the ratios per round and their medians."""
    with tempfile.TemporaryDirectory(prefix="csm-stress-") as scratch:
        root = Path(scratch)
        clip = _reference_clip(root / "reference.wav", clip_s)
        engine = engine or {}
        with AppServer(root / "b-profiles", root / "b-tmp", *_app_args(libraries_in_memory, max_batch),
                       **engine) as batched, \
                AppServer(root / "s-profiles", root / "s-tmp", *_app_args(libraries_in_memory, 1), **engine) as serial:
            runs: dict[str, list[dict]] = {"batched": [], "serial": []}
            for r in range(rounds):
                for name, server in (("batched", batched), ("serial", serial)):
                    runs[name].append({**visit(server, clip, clients, requests, line_s, timeout_s, deadline_s,
                                               tag=f"r{r}", lines=lines), "max_batch": max_batch if name == "batched" else 1,
                                         "engine": _engine_label(engine)})
    per_round = [compare(b, s) for b, s in zip(runs["batched"], runs["serial"])]
    medians = {k: _median([p[k] for p in per_round]) for k in per_round[0] if k != "refused"}
    medians["refused"] = {k: sum(p["refused"][k] for p in per_round) for k in ("batched", "serial")}
    return {**runs, "rounds": rounds, "per_round": per_round, "ratios": medians}


def _median(values):
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 2) if values else None


def format_report(r: dict) -> str:
    batch = "app default" if r.get("max_batch") is None else r["max_batch"]
    eng = r.get("engine") or _engine_label(None)
    model = eng["model"] + (f" {eng['quantize']}" if eng["quantize"] not in ("none", "auto") else "") + \
        (", watermark on" if eng["watermark"] else "")
    n = r.get("lines", 1)
    lines = [f"csm-multi stress: {r['clients']} clients x {r['requests_per_client']} render(s) of {n} "
             f"line{'s' * (n != 1)} <= {r['line_s']:g} s, {model}, {os.cpu_count()} CPU cores, --max-batch {batch}: "
             f"{r['wall_s']:.1f} s",
             f"throughput: {r['requests_per_s']:.2f} requests/s ({r['completed_requests']} completed), "
             f"{r.get('audio_s_per_s', 0):.2f} s of audio per second",
             f"one render alone: {r.get('alone_s', float('nan')):.2f} s; the {r['clients']} visitors' renders, "
             f"started together, all done in {r.get('render_wall_s', float('nan')):.2f} s = "
             f"{_ratio(r.get('render_wall_s'), r.get('alone_s'))}x one alone",
             f"{'endpoint':<14} {'ok':>4} {'busy':>5} {'failed':>6} {'p50 s':>7} {'p95 s':>7} {'max s':>7}"]
    for name, e in r["endpoints"].items():
        lines.append(f"{name:<14} {e['ok']:>4} {e.get('busy', 0):>5} {e.get('failed', 0):>6} "
                     f"{e['p50_s']:>7.2f} {e['p95_s']:>7.2f} {e['max_s']:>7.2f}")
    errs = r["errors"]
    lines.append(f"errors: busy (queue full) {errs['busy']} (gave up after retries {errs['gave_up']}), "
                 f"failed {errs['failed']}, timeout {errs['timeout']}, mixed libraries {errs['mixed']}, "
                 f"hung clients {r['hung_clients']}")
    for kind, sample in r["error_samples"].items():
        lines.append(f"  e.g. {kind}: {sample}")
    rss = r["server_rss_mb"]
    lines.append(f"server RSS: {rss['after_start']} MB after start, {rss['peak']} MB peak")
    lines.append(f"LRU: voice libraries in memory {r['libraries']['max_open']}/{r['libraries']['limit']}, "
                 f"profile codes per library {r['profile_cache']['max_size']}/{r['profile_cache']['limit']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=20, help="visitors at once (default 20)")
    p.add_argument("--requests", type=int, default=1, help="renders per visitor (default 1)")
    p.add_argument("--lines", type=int, default=2, help="lines per rendered script, all in the visitor's voice "
                   "(default 2: line 2 is conditioned on line 1)")
    p.add_argument("--line-seconds", type=float, default=1.0, help="max seconds per rendered line (app minimum: 1)")
    p.add_argument("--clip-seconds", type=float, default=1.5, help="length of each visitor's reference clip")
    p.add_argument("--timeout", type=float, default=300, help="seconds per call before it counts as a timeout")
    p.add_argument("--deadline", type=float, default=900, help="seconds for the whole run")
    p.add_argument("--libraries-in-memory", type=int, help="the app's LRU of open libraries (default: the app's)")
    p.add_argument("--max-batch", type=int, help="the app's --max-batch (default: the app's, 8)")
    p.add_argument("--compare", action="store_true",
                   help="two apps at once, with --max-batch (default 8) and with --max-batch 1, visited in turn for "
                        "--rounds rounds; prints each round and the median ratios")
    p.add_argument("--rounds", type=int, default=3, help="with --compare: rounds, the two apps visited in turn")
    p.add_argument("--model", default="tiny",
                   help="the app's --model (default tiny; csm-1b-random: csm-1b's size and cost, random weights)")
    p.add_argument("--quantize", choices=QUANT_MODES, help="the app's --quantize (default: the app's)")
    p.add_argument("--watermark", action="store_true", help="leave the app's watermark on (default: off)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.lines < 1:
        p.error(f"--lines must be a whole number >= 1, got {args.lines}")
    kwargs = {"libraries_in_memory": args.libraries_in_memory} if args.libraries_in_memory is not None else {}
    kwargs["engine"] = {"model": args.model, "quantize": args.quantize, "watermark": args.watermark}
    kwargs["lines"] = args.lines
    if args.compare:
        report = run_compare(args.clients, args.requests, args.line_seconds, args.clip_seconds, args.rounds,
                             args.max_batch or 8, args.timeout, args.deadline, **kwargs)
        for b, s in zip(report["batched"], report["serial"]):
            print(format_report(b), format_report(s), sep="\n", flush=True)
        print(format_comparison(report["ratios"], args.max_batch or 8, args.rounds))
    else:
        if args.max_batch is not None:
            kwargs["max_batch"] = args.max_batch
        report = run(args.clients, args.requests, args.line_seconds, args.clip_seconds, args.timeout, args.deadline,
                     **kwargs)
        print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _ratio(a, b) -> float | None:
    return round(a / b, 2) if a and b and not (math.isnan(a) or math.isnan(b)) else None


def compare(batched: dict, serial: dict) -> dict:
    """What batching changed: the serial run's render phase (all visitors' renders, started together) and
    render p95 over the batched run's, audio throughput batched over serial, and each render phase in
    multiples of one render alone on the same app."""
    ratio = _ratio
    p95 = ratio(serial["endpoints"]["render_script"]["p95_s"], batched["endpoints"]["render_script"]["p95_s"])
    return {"render_phase_speedup": ratio(serial["render_wall_s"], batched["render_wall_s"]), "render_p95_speedup": p95,
            "audio_throughput_gain": ratio(batched["audio_s_per_s"], serial["audio_s_per_s"]),
            "batched_renders_over_alone": ratio(batched["render_wall_s"], batched["alone_s"]),
            "serial_renders_over_alone": ratio(serial["render_wall_s"], serial["alone_s"]),
            "refused": {"batched": batched["errors"]["busy"] + batched["errors"]["gave_up"],
                        "serial": serial["errors"]["busy"] + serial["errors"]["gave_up"]}}


def format_comparison(c: dict, max_batch: int, rounds: int = 1) -> str:
    return (f"--max-batch {max_batch} against --max-batch 1, median of {rounds} interleaved rounds: renders done "
            f"{c['render_phase_speedup']}x sooner, render p95 {c['render_p95_speedup']}x lower, audio throughput {c['audio_throughput_gain']}x; the renders, "
            f"started together, took {c['batched_renders_over_alone']}x one render alone batched, "
            f"{c['serial_renders_over_alone']}x serial; "
            f"refused (busy) {c['refused']['batched']} batched, {c['refused']['serial']} serial")


if __name__ == "__main__":
    main()
