"""The environment variables of the web app and the command line: one table, read in one place.

Both front ends (app.py `main()` and cli.py) take their flag defaults from `setting(name)`, so
`CSM_MODEL=tiny` means the same to `python app.py` and `python -m csm_multi`; `engine_flags`
adds the flags they share. Values are read when a parser is built, never at import. Knows no model.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import QUANT_MODES


def default_profiles_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where voice libraries live unless CSM_PROFILES_DIR says otherwise: outside the working
    directory and Gradio's temp dir (so no file route can reach it), the same for every cwd."""
    base = env.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "csm-multi" / "profiles"


@dataclass(frozen=True)
class Setting:
    """One environment variable: `kind` parses it (str, int, bool: 1/0, or Path); an unset or empty
    variable gives `default` (called when it is a function)."""

    env: str
    default: object = None
    kind: type = str


SETTINGS: dict[str, Setting] = {
    # the engine: both front ends
    "model": Setting("CSM_MODEL", "auto"),
    "checkpoint": Setting("CSM_CHECKPOINT"),
    "device": Setting("CSM_DEVICE"),
    "quantize": Setting("CSM_QUANTIZE", "auto"),
    "prefix_cache_mb": Setting("CSM_PREFIX_CACHE_MB", 512, int),
    "tokenizer_repo": Setting("CSM_TOKENIZER_REPO"),
    "trust_tokenizer": Setting("CSM_TRUST_TOKENIZER", False, bool),
    "asr_model": Setting("CSM_ASR_MODEL"),  # None: loaders.ASR_MODEL; "none" turns transcription off
    "profiles_dir": Setting("CSM_PROFILES_DIR", default_profiles_dir, Path),  # the root of the libraries
    # the web app only
    "host": Setting("CSM_HOST", "127.0.0.1"),
    "port": Setting("CSM_PORT", 7860, int),
    "shared_library": Setting("CSM_SHARED_LIBRARY", False, bool),
    "libraries_in_memory": Setting("CSM_LIBRARIES_IN_MEMORY", 64, int),
    "max_voices_per_library": Setting("CSM_MAX_VOICES_PER_LIBRARY", 50, int),
    "storage_quota_mb": Setting("CSM_STORAGE_QUOTA_MB", 2000, int),
    "library_idle_days": Setting("CSM_LIBRARY_IDLE_DAYS", 30, int),
    # the generation scheduler (app.py): rows generated together, requests that may wait, rows per visitor
    "max_batch": Setting("CSM_MAX_BATCH", 8, int),
    "max_waiting": Setting("CSM_MAX_WAITING", 64, int),
    "per_visitor": Setting("CSM_PER_VISITOR", 2, int),
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def setting(name: str, env: Mapping[str, str] = os.environ):
    """The value of setting `name`: its variable parsed, else its default. ValueError naming the
    variable when the value cannot be parsed."""
    s = SETTINGS[name]
    raw = env.get(s.env, "").strip()
    if not raw:
        return s.default(env) if callable(s.default) else s.default
    if s.kind is bool:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"{s.env}={raw!r}: use 1 (on) or 0 (off)")
    if s.kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{s.env}={raw!r}: use a whole number") from None
    return s.kind(raw)


def env_name(name: str) -> str:
    return SETTINGS[name].env


def engine_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose and load the engine, as both the app and the CLI take them."""
    p.add_argument("--model", default=setting("model"),
                   help="csm-1b, tiny (random weights, offline), csm-1b-random (csm-1b's size with random "
                        "weights: an offline benchmark of its speed and memory; noise) or auto: csm-1b when the hub "
                        "is reachable, else tiny (env CSM_MODEL; default auto)")
    p.add_argument("--checkpoint", default=setting("checkpoint"),
                   help="local checkpoint file/dir or hub repo instead of sesame/csm-1b (env CSM_CHECKPOINT)")
    p.add_argument("--device", default=setting("device"),
                   help="cuda or cpu (env CSM_DEVICE; default: cuda when available)")
    p.add_argument("--quantize", default=setting("quantize"), choices=["auto", *QUANT_MODES],
                   help="CPU weights. auto (default): bf16 where the CPU multiplies bf16 natively (AVX-512 BF16 "
                        "or AMX) and the model is csm-1b-sized, else none (float32); bf16: bf16 weights and "
                        "products, float32 elsewhere (~1.8x float32's speed there, bf16's accuracy); int8: int8 "
                        "weights, ~4x faster per frame at csm-1b size, less accurate (opt-in); int4: int4 weights on "
                        "ONNX Runtime (less memory than int8, not faster on a 2-core AVX2 CPU; pip install "
                        "onnxruntime onnx), converted once and cached in "
                        "~/.cache/csm-multi/int4 or $CSM_INT4_CACHE (env CSM_QUANTIZE)")
    p.add_argument("--prefix-cache-mb", type=int, default=setting("prefix_cache_mb"),
                   help="memory for the backbone state of finished prompts, reused by prompts that start the same "
                        "way (a dialogue line prefills only what follows the last line); 0 turns it off "
                        "(env CSM_PREFIX_CACHE_MB; default 512)")
    p.add_argument("--no-watermark", action="store_true", help="explicitly disable the audio watermark")
    p.add_argument("--tokenizer-repo", default=setting("tokenizer_repo"),
                   help="a copy of the Llama 3.2 tokenizer (hub id or folder, e.g. unsloth/Llama-3.2-1B) used "
                        "when meta-llama/Llama-3.2-1B is unavailable; checked against published ids first "
                        "(env CSM_TOKENIZER_REPO)")
    p.add_argument("--trust-tokenizer", action="store_true", default=setting("trust_tokenizer"),
                   help="use --tokenizer-repo without that check (env CSM_TRUST_TOKENIZER=1)")
