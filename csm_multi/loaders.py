"""The composition root: find weights (hub or local), build models on a device, wire the Engine.

Everything else takes built objects. Hub access happens only when a function here is called.
Presets: `csm-1b` loads the published weights (gated: HF_TOKEN); `tiny` builds random weights,
a random Mimi and a random watermarker offline; `auto` tries `csm-1b` and falls back to `tiny`.
The text tokenizer comes from the gated Llama 3.2 repo, else from a configured copy that must first
encode a table of probe strings to Meta's published ids. `build_transcriber` makes the optional
Whisper model that writes missing reference transcripts.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch

from . import omp
from .checkpoints import check_shapes, read_state_dict, to_ours
from .config import ModelConfig, get_preset
from .engine import Engine, EngineInfo
from .errors import TranscriptionError, WeightsUnavailableError
from .model import CSM
from .text import LLAMA3_PROBES, ByteTokenizer, HFTextTokenizer, add_bos_eos, verify_tokenizer
from .transcribe import Transcriber

log = logging.getLogger("csm_multi")

CSM_REPO = "sesame/csm-1b"
TOKENIZER_REPO = "meta-llama/Llama-3.2-1B"
# English-only like CSM-1B; 74M parameters, so it runs beside CSM on a GPU and in seconds on a CPU
ASR_MODEL = "openai/whisper-base.en"
ASR_OFF = ("", "none", "off")
CHECKPOINT_FILES = ("model.safetensors", "ckpt.pt")  # hub layout first, then the first release's file
HUB_HOST = "huggingface.co"
UNTRAINED_WARNING = (
    "OFFLINE DEMO: the 'tiny' preset has RANDOM, UNTRAINED weights (model, Mimi codec and watermarker): "
    "its output is noise, not speech. Set HF_TOKEN with access to sesame/csm-1b and meta-llama/Llama-3.2-1B "
    "and use --model csm-1b for real speech."
)
BENCHMARK_WARNING = (
    "OFFLINE BENCHMARK: 'csm-1b-random' is csm-1b's size with RANDOM, UNTRAINED weights (model, Mimi codec and "
    "watermarker): it costs what csm-1b costs, but its output is noise. Use it to measure speed and memory; "
    "use --model csm-1b for real speech."
)
# Offline models of random weights: name -> (the preset whose sizes it has, what Status calls it, its warning).
RANDOM_MODELS = {"tiny": ("tiny", "tiny (random weights, offline demo)", UNTRAINED_WARNING),
                 "csm-1b-random": ("csm-1b", "csm-1b size, random weights (offline benchmark)", BENCHMARK_WARNING)}
MODEL_CHOICES = ("auto", "csm-1b", *RANDOM_MODELS)


def hf_token(env=os.environ) -> str | None:
    return env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline start does not wait through the hub client's retries."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_file(repo: str, filename: str, token: str | None = None, revision: str | None = None,
             local_only: bool = False) -> Path:
    """Download (or find in the local HF cache) one file; failures become WeightsUnavailableError."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hub_errors

    url = f"https://huggingface.co/{repo}"
    try:
        return Path(hf_hub_download(repo, filename, token=token, revision=revision, local_files_only=local_only))
    except hub_errors.GatedRepoError as e:
        raise WeightsUnavailableError(
            f"{repo} is gated: accept its licence at {url} with your account, then set HF_TOKEN to a token "
            f"of that account (or run with --model tiny for the offline demo). ({type(e).__name__})") from e
    except hub_errors.RepositoryNotFoundError as e:
        raise WeightsUnavailableError(
            f"{repo} was not found or your token cannot see it: check the repo id and HF_TOKEN "
            f"(status: {getattr(getattr(e, 'response', None), 'status_code', '?')}).") from e
    except hub_errors.LocalEntryNotFoundError as e:  # before EntryNotFoundError: it is a subclass
        raise WeightsUnavailableError(
            f"cannot reach the Hugging Face hub for {repo}/{filename} and it is not in the local cache: "
            "connect to the network and set HF_TOKEN for gated repos (or pre-download the files with `hf download`), "
            "or run with --model tiny for the offline demo.") from e
    except hub_errors.EntryNotFoundError as e:
        raise WeightsUnavailableError(f"{repo} has no file {filename!r} (revision {revision or 'main'}).") from e
    except Exception as e:  # HTTP, httpx transport and OS errors alike
        raise WeightsUnavailableError(
            f"downloading {repo}/{filename} failed ({type(e).__name__}: {e}); check the network and HF_TOKEN, "
            "or run with --model tiny for the offline demo.") from e


def mimi_weights_path(token: str | None = None, local_only: bool = False) -> Path:
    """Kyutai's pretrained Mimi checkpoint (the file the reference CSM generator uses)."""
    from moshi.models.loaders import DEFAULT_REPO, MIMI_NAME

    return hub_file(DEFAULT_REPO, MIMI_NAME, token, local_only=local_only)


def resolve_checkpoint(source: str, token: str | None = None, revision: str | None = None,
                       local_only: bool = False) -> Path:
    """A local file, a local directory holding one, or a hub repo id -> the checkpoint file."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        for name in CHECKPOINT_FILES:
            if (path / name).is_file():
                return path / name
        raise WeightsUnavailableError(f"{path} holds none of {CHECKPOINT_FILES}")
    if source.startswith((".", "/", "~")) or path.suffix in (".pt", ".safetensors"):
        raise WeightsUnavailableError(f"checkpoint {source} does not exist")
    last: WeightsUnavailableError | None = None
    for name in CHECKPOINT_FILES:
        try:
            return hub_file(source, name, token, revision, local_only)
        except WeightsUnavailableError as e:
            if "has no file" not in str(e):
                raise
            last = e
    raise WeightsUnavailableError(f"{source} holds no CSM checkpoint ({', '.join(CHECKPOINT_FILES)})") from last


def load_csm(checkpoint: str | Path, config: ModelConfig, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> CSM:
    """Read a checkpoint in either supported layout into a CSM of `config`'s shapes."""
    state = to_ours(read_state_dict(checkpoint), config)
    model = CSM(config)
    check_shapes(state, model.state_dict(), config.name)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def load_text_tokenizer(repo: str = TOKENIZER_REPO, token: str | None = None, local_only: bool = False, *,
                        fallback: str | None = None, trust: bool = False,
                        expected: Mapping[str, Sequence[int]] = LLAMA3_PROBES) -> HFTextTokenizer:
    """The Llama 3.2 tokenizer with the reference's BOS ... EOS post-processor.

    From `repo` (a hub id or a local folder); if that cannot be loaded, from `fallback`, which must
    encode every probe string of `expected` (default: Meta's published Llama 3 ids) to the same ids,
    unless `trust`. WeightsUnavailableError says which repo failed and why.
    """
    try:
        return HFTextTokenizer(_hf_tokenizer(repo, token, local_only), repo)
    except WeightsUnavailableError as e:
        if not fallback:
            raise WeightsUnavailableError(
                f"{e} To use a public copy of the Llama 3.2 tokenizer instead, set --tokenizer-repo "
                "(CSM_TOKENIZER_REPO), e.g. unsloth/Llama-3.2-1B: it is checked against the published ids first.") from e
        log.warning("tokenizer %s is unavailable (%s); trying the configured copy %s", repo, e, fallback)
        primary_error = e
    try:
        tok = HFTextTokenizer(_hf_tokenizer(fallback, token, local_only), fallback)
    except WeightsUnavailableError as e:
        raise WeightsUnavailableError(f"no text tokenizer could be loaded. {repo}: {primary_error} "
                                      f"Fallback {fallback}: {e}") from e
    if trust:
        log.warning("using tokenizer %s UNCHECKED (--trust-tokenizer): if its ids differ from %s, csm-1b "
                    "speaks nonsense", fallback, repo)
        tok.name = f"{fallback} (unchecked copy of {repo})"
        return tok
    verify_tokenizer(tok, fallback, expected, reference=f"the tokenizer of {repo}")
    log.info("using tokenizer %s: it encodes all %d probe strings exactly like %s", fallback, len(expected), repo)
    tok.name = f"{fallback} (checked copy of {repo})"
    return tok


def _hf_tokenizer(source: str, token: str | None, local_only: bool):
    """A fast tokenizer from a local folder or a hub repo, with the BOS ... EOS post-processor."""
    from transformers import AutoTokenizer

    folder = Path(source).expanduser()
    if folder.is_dir():
        if not (folder / "tokenizer.json").is_file():
            raise WeightsUnavailableError(f"{folder} holds no tokenizer.json: point it at a saved fast tokenizer")
        source = str(folder)
    else:
        hub_file(source, "tokenizer.json", token, local_only=local_only)  # clear errors for gating/network
    try:
        tok = AutoTokenizer.from_pretrained(source, token=token, local_files_only=local_only)
        add_bos_eos(tok)
    except Exception as e:  # a broken or non-Llama tokenizer folder
        raise WeightsUnavailableError(f"the tokenizer in {source} could not be loaded ({type(e).__name__}: {e})") from e
    return tok


def load_whisper(source: str, device: str | torch.device, dtype: torch.dtype, token: str | None = None):
    """A Whisper model and its processor from a local folder or a hub repo (cache only when the hub is
    unreachable); TranscriptionError, telling the user to type the transcript, when they cannot be loaded."""
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    offline = not Path(source).expanduser().is_dir() and not hub_reachable()
    try:
        processor = AutoProcessor.from_pretrained(source, token=token, local_files_only=offline)
        model = WhisperForConditionalGeneration.from_pretrained(source, token=token, local_files_only=offline,
                                                                dtype=dtype)
    except Exception as e:  # network, gating, missing files, not a Whisper model
        why = ("the Hugging Face hub is unreachable and it is not in the local cache" if offline
               else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise TranscriptionError(
            f"could not load the speech recognition model {source} ({why}). Type what the clip says as its "
            "transcript.", ASR_HINT) from e
    return model.to(device).eval(), processor


ASR_HINT = ("set --asr-model (CSM_ASR_MODEL) to a Whisper model you can load (hub id or local folder), or to "
            "'none' to turn automatic transcription off")


def whisper_unavailable(source: str) -> str | None:
    """Why the Whisper model `source` cannot be loaded here, or None when it can (a local folder, a hub
    repo in the local cache, or a reachable hub). Cheap: reads no weights, so a server can tell its
    visitors at start-up whether an empty transcript will be written for them."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return None if (folder / "config.json").is_file() else f"{source} has no config.json (not a Whisper model)"
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(source, "config.json"), str):
            return None
    except ValueError:  # a malformed id (HFValidationError): the hub cannot have it either
        return f"{source} is not a valid hub id"
    return None if hub_reachable() else "the Hugging Face hub is unreachable and it is not in the local cache"


def build_transcriber(source: str | None = ASR_MODEL, device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None, token: str | None = None) -> Transcriber | None:
    """A lazily loaded Whisper transcriber, or None when `source` is 'none'/'off'/empty. Loads nothing now."""
    if source is None or source.strip().lower() in ASR_OFF:
        return None
    dev = _device(device) if device else default_device()
    load = partial(load_whisper, source.strip(), dev, dtype or default_dtype(dev), token or hf_token())
    return Transcriber(source.strip(), load)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _device(name: str) -> torch.device:
    """A device the user named, or a ValueError that says what to use instead."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}: use cpu or cuda (or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is available here; use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported: use cpu or cuda")
    return dev


@omp.released  # the main thread's OpenMP pool is not kept after loading (omp.py)
def build_engine(model: str = "auto", *, quantize: str = "auto", prefix_cache_mb: int | None = None,
                 **kwargs) -> Engine:
    """Build a ready Engine (arguments: see `_build_engine`). On CPU the layers are fused and
    float32 products run on oneDNN (`fused.py`); quantize="int8" gives the CPU model int8
    weights instead (`quant.py`), quantize="int4" int4 ones on ONNX Runtime (`int4.py`: converted
    once, then read from its cache; an ImportError naming the pip command when onnxruntime is
    missing), quantize="bf16" bf16 ones on oneDNN. "auto" (default) is `auto_quantize`'s choice:
    bf16 on a CPU that multiplies it natively for a csm-1b-sized model, else "none" (float32).
    `prefix_cache_mb` bounds the prefix cache (`prefix.py`; 0: off, None: the engine's default)."""
    from .fused import fuse_layers, pack_linears
    from .quant import MODES, quantize as quantize_model

    if quantize not in MODES and quantize != "auto":
        raise ValueError(f"unknown quantization {quantize!r}; choose one of auto, {', '.join(MODES)}")
    if prefix_cache_mb is not None and (isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, int)
                                        or prefix_cache_mb < 0):
        raise ValueError(f"the prefix cache size (--prefix-cache-mb, CSM_PREFIX_CACHE_MB) must be a whole number "
                         f"of MB >= 0 (0 turns it off), got {prefix_cache_mb!r}")
    engine = _build_engine(model, **kwargs)
    if engine.device.type == "cpu":  # same results, fewer ops (fused.py); CUDA runs one graph per frame
        fuse_layers(engine.model)
    if quantize == "auto":
        quantize = auto_quantize(engine.model)
        if quantize != "none":
            log.info("this CPU multiplies bf16 natively: weight products in bf16, float32 elsewhere "
                     "(--quantize bf16; --quantize none for float32 throughout)")
    if quantize != "none":
        quantize_model(engine.model, quantize)
        detail = ""
        if quantize == "int8":  # which activation scheme ran, for bug reports and benchmarks
            from .quant import full_range_works

            detail = ", 8-bit activations" if full_range_works() else ", 7-bit activations"
        engine.info.dtype = f"{engine.info.dtype} ({quantize} weights{detail})"
    elif engine.device.type == "cpu":
        pack_linears(engine.model)
    if prefix_cache_mb is not None:
        engine.prefix.max_bytes = prefix_cache_mb << 20
    return engine


def auto_quantize(model) -> str:
    """The default CPU mode for `model`: "bf16" where the CPU multiplies bf16 in hardware, oneDNN has
    the product, and the model has csm-1b-sized matrices (at least `fused.MIN_PACKED` weights: there
    the products are bound by the bytes they read, halved in bf16); else "none" (float32). bf16
    products move csm-1b's logits less than the whole model in bf16 does (README, CPU modes), within
    the issue's rule for a default (at most 2x bf16's error); small models gain nothing from it."""
    from .fused import bf16_native, large_products, onednn_works

    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32 or not bf16_native():
        return "none"
    return "bf16" if large_products(model) and onednn_works(torch.bfloat16) else "none"


def _build_engine(model: str = "auto", *, checkpoint: str | None = None, device: str | None = None,
                  dtype: torch.dtype | None = None, watermark: bool = True, watermark_key=None,
                  token: str | None = None, tokenizer_repo: str | None = None, trust_tokenizer: bool = False,
                  seed: int = 0) -> Engine:
    """Build a ready Engine.

    model: "csm-1b" (published weights), "tiny" (random, offline), "csm-1b-random" (csm-1b's size,
    random weights: an offline benchmark of what csm-1b costs) or "auto" (csm-1b, else tiny).
    checkpoint: a local file/directory or hub repo to read instead of sesame/csm-1b.
    watermark: False disables the watermark explicitly; True with no loadable watermarker raises.
    tokenizer_repo: a copy of the Llama 3.2 tokenizer (hub id or folder) used when meta-llama's gated
    repo cannot be loaded, after it encodes the probe strings to the published ids (or unchecked
    with trust_tokenizer).
    """
    from .codec import MimiCodec, build_mimi
    from .watermark import Watermarker, build_random_silentcipher, key_from_env

    token = token or hf_token()
    dev = _device(device) if device else default_device()
    dt = dtype or default_dtype(dev)
    key = tuple(watermark_key) if watermark_key else key_from_env()
    tokenizer = partial(load_text_tokenizer, fallback=tokenizer_repo, trust=trust_tokenizer)

    if model == "auto":
        local_only = not hub_reachable()
        try:
            return _build_real(checkpoint, dev, dt, watermark, key, token, tokenizer, local_only)
        except WeightsUnavailableError as e:
            log.warning("csm-1b is unavailable (%s); falling back to the offline 'tiny' preset.", e)
            model = "tiny"

    if model == "csm-1b":
        return _build_real(checkpoint, dev, dt, watermark, key, token, tokenizer, False)
    if model not in RANDOM_MODELS:
        raise ValueError(f"unknown model {model!r} (--model, CSM_MODEL); use {', '.join(MODEL_CHOICES)}")

    preset, label, warning = RANDOM_MODELS[model]
    log.warning(warning)
    config = get_preset(preset)
    if checkpoint:
        csm = load_csm(resolve_checkpoint(checkpoint, token), config, dev, dt)
    else:
        csm = CSM(config).init_random_(seed).to(device=dev, dtype=dt).eval()
    codec = MimiCodec(build_mimi(None, device=dev, seed=seed))
    marker = Watermarker(build_random_silentcipher(device=dev, seed=seed), key) if watermark else None
    info = EngineInfo(model=label, device=str(dev), dtype=str(dt).replace("torch.", ""),
                      tokenizer=ByteTokenizer.name, codec="Mimi (random codebooks)",
                      watermark="on (random watermarker)" if marker else "OFF", codec_id=f"mimi-random-{seed}",
                      untrained=True,
                      notes=[warning])
    return Engine(csm, ByteTokenizer(), codec, marker, watermark=watermark, info=info)


def _build_real(checkpoint, dev, dt, watermark, key, token, load_tokenizer, local_only) -> Engine:
    from .codec import MimiCodec, build_mimi
    from .watermark import Watermarker, load_silentcipher

    config = get_preset("csm-1b")
    ckpt = resolve_checkpoint(checkpoint or CSM_REPO, token, local_only=local_only)
    tokenizer = load_tokenizer(token=token, local_only=local_only)
    codec = MimiCodec(build_mimi(mimi_weights_path(token, local_only), device=dev))
    marker = None
    if watermark:
        marker = Watermarker(load_silentcipher(device=str(dev), token=token, local_only=local_only), key)
    csm = load_csm(ckpt, config, dev, dt)
    info = EngineInfo(model=f"csm-1b ({checkpoint or CSM_REPO})", device=str(dev), dtype=str(dt).replace("torch.", ""),
                      tokenizer=tokenizer.name, codec="Mimi (kyutai)", watermark="on" if marker else "OFF",
                      codec_id="mimi-kyutai")
    return Engine(csm, tokenizer, codec, marker, watermark=watermark, info=info)

