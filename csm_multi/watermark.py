"""The inaudible audio watermark: mark a waveform with a 5-byte key, and check a waveform for it.

One job: wrap Sony's silentcipher (44.1 kHz model) so that callers hand in and get back torch
waveforms at their own rate. It knows nothing about CSM, Mimi, text or speakers. Building a
silentcipher model (`load_silentcipher`: published weights; `build_random_silentcipher`: untrained,
offline) is separate from using it (`Watermarker`). A check decodes a few seconds of a clip, in
windows, never a long clip whole (`Watermarker.detect_spans`). Importing this module does no work:
silentcipher itself (and its librosa / pydub / scipy imports) is imported only when a model is built.

Departs from the reference CSM code, which uses a fork of silentcipher: the PyPI package (1.0.5)
takes numpy arrays, not tensors, so tensors cross into numpy only at the silentcipher calls. On the
CPU, marking and plain decoding go through `fastmark.FastMark` (the same network from the same weights,
~1.5-2.5x cheaper, within 1e-6 of silentcipher's audio, the same decoded symbols); the phase search,
other devices and look-alike models (tests' fakes) keep silentcipher's own calls.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torchaudio.functional as AF

from . import omp
from .config import SAMPLE_RATE
from .errors import WatermarkUnavailableError
from .fastmark import FastMark

# CSM's watermark key, published in SesameAILabs/csm (watermarking.py). It is PUBLIC, not a secret:
# anyone can mark audio with it or check for it. Set CSM_WATERMARK_SECRET for a key of your own.
CSM_1B_GH_WATERMARK: tuple[int, ...] = (212, 211, 146, 56, 201)

SECRET_ENV = "CSM_WATERMARK_SECRET"
SILENTCIPHER_REPO = "sony/silentcipher"
SILENTCIPHER_SR = 44_100  # the "44.1k" model's rate; every silentcipher call happens at this rate
MESSAGE_SDR_DB = 36  # the reference's strength (silentcipher's trained default is 47 dB: fainter)
_CKPT_DIR = "44_1_khz/73999_iteration"  # the 44.1k checkpoint inside sony/silentcipher
_CKPT_FILES = ("hparams.yaml", "enc_c.ckpt", "dec_c.ckpt", "dec_m_*.ckpt")  # not opt.ckpt (23 MB, unused)
_KEY_DOMAIN = b"csm_multi watermark key v1\x00"  # so a key is not a bare hash of the secret

# A check decodes a few windows of a clip, never all of it: the decoder takes ~0.7 s of CPU (2 cores;
# silentcipher's own ~1-1.6 s) and ~115 MB (its own ~50 MB) per second of audio, so a 10-minute upload
# decoded whole would need over 20 GB.
WINDOW_MESSAGES = 3  # a window is 3 whole 21-symbol messages (2.93 s at 44.1 kHz): 3 votes per symbol
MAX_WINDOWS = 3  # per check: at most 3 windows (start, middle, end), so at most 8.8 s of audio is decoded
_READ_MARGIN = 64  # samples read beyond each side of a window, so the resampler's edges fall outside it

# The 44.1k model's hparams.yaml (values from the published file; the module shapes they give have
# exactly the published parameter counts: enc_c 43,968, dec_c 499,012, dec_m_0 2,378,773).
# message_len 21 = 20 two-bit symbols (5 bytes) + an end symbol; message_dim 5 = 4 symbols + end.
SILENTCIPHER_44K_HPARAMS: Mapping[str, Any] = {
    "model_type": "44.1k", "SR": SILENTCIPHER_SR, "N_FFT": 4096, "HOP_LENGTH": 2048,
    "message_band_size": 1024, "message_dim": 5, "message_len": 21, "n_messages": 1, "message_sdr": 47,
    "enc_n_layers": 3, "dec_c_n_layers": 4, "ensure_negative_message": True, "ensure_constrained_message": False,
    "utterance_level_normalization": True, "frame_level_normalization": False, "no_normalization": False,
}

# silentcipher's STFT class is a process-wide singleton (`metaclass=Singleton`) whose `num_samples`
# is set by every encode call and read by its inverse: two concurrent calls, on any two models,
# can trim each other's output. Every silentcipher call in this process goes through this lock
# (FastMark's calls need none: its STFT keeps no state).
_SILENTCIPHER_LOCK = threading.Lock()


def key_from_secret(secret: str) -> tuple[int, ...]:
    """A 5-byte key (ints 0..255) derived from `secret` with SHA-256; the same secret, the same key."""
    if not isinstance(secret, str) or not secret:
        raise ValueError("the watermark secret must be a non-empty string")
    digest = hashlib.sha256(_KEY_DOMAIN + secret.encode("utf-8")).digest()
    return tuple(digest[: len(CSM_1B_GH_WATERMARK)])


def key_from_env(env: Mapping[str, str] = os.environ) -> tuple[int, ...]:
    """The key from $CSM_WATERMARK_SECRET if it is set, else CSM's public key."""
    secret = env.get(SECRET_ENV)
    if secret is None:
        return CSM_1B_GH_WATERMARK
    if not secret:
        raise ValueError(f"{SECRET_ENV} is set but empty: give it a secret, or unset it to use the public CSM key")
    return key_from_secret(secret)


def _import_silentcipher():
    # pydub warns at import that ffmpeg is missing; silentcipher uses pydub only to read files.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Couldn't find ffmpeg", category=RuntimeWarning)
        import silentcipher.server
    return silentcipher.server


def load_silentcipher(device: str | torch.device = "cpu", token: str | None = None, local_only: bool = False):
    """The published 44.1 kHz silentcipher model (hub `sony/silentcipher`), built by silentcipher's
    own `get_model`. We fetch the files first (with `token`, and without the unused optimizer state)
    so that hub failures are ours to report. Any failure raises WatermarkUnavailableError.
    """
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(SILENTCIPHER_REPO, token=token, local_files_only=local_only,
                                 allow_patterns=[f"{_CKPT_DIR}/{f}" for f in _CKPT_FILES])
        ckpt = os.path.join(root, _CKPT_DIR)
        server = _import_silentcipher()
        with _SILENTCIPHER_LOCK:
            return server.get_model(model_type="44.1k", ckpt_path=ckpt,
                                    config_path=os.path.join(ckpt, "hparams.yaml"), device=str(device))
    except Exception as e:  # hub, HTTP, file and checkpoint errors alike
        raise WatermarkUnavailableError(
            f"the silentcipher watermark model ({SILENTCIPHER_REPO}) could not be loaded "
            f"({type(e).__name__}: {e}). Connect to the network once so it lands in the Hugging Face cache "
            "(or pre-download it with `hf download sony/silentcipher`), or disable the watermark explicitly "
            "with watermark=False (--no-watermark), or use the offline 'tiny' preset.") from e


def build_random_silentcipher(device: str | torch.device = "cpu", seed: int = 0,
                              hparams: Mapping[str, Any] = SILENTCIPHER_44K_HPARAMS):
    """An UNTRAINED silentcipher model with the published 44.1k architecture; weights deterministic
    from `seed`, no download. For tests and the offline demo: it marks audio at the requested
    strength like the real model, but its decoder cannot read any mark back (`verify` is False).

    The shapes come from `hparams` (default: the real hparams.yaml values, so the STFT and all module
    sizes match the published model). Keep N_FFT / HOP_LENGTH at the real values: silentcipher's STFT
    is a process-wide singleton built by the first model, so a second model cannot have its own.
    """
    server = _import_silentcipher()

    class _Untrained(server.Model):
        def load_models(self, ckpt_dir):  # keep the seeded random init; there are no checkpoint files
            pass

    config = argparse.Namespace(**hparams, load_ckpt=None)
    with _SILENTCIPHER_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _Untrained(config, device=str(device))


class Watermarker:
    """Marks waveforms with `key` and checks them for it, with a built silentcipher model.

    Waveforms are mono `(S,)` float tensors at any rate (CSM: 24 kHz), on any device; silentcipher
    itself runs on the device it was built on.

    `fast` (default): mark and plain-decode with `fastmark.FastMark`, silentcipher's network from the
    model's weights computed ~1.5-2.5x cheaper on the CPU, within 1e-6 of silentcipher's audio (3e-7
    measured) and with the same decoded symbols; used where FastMark computes the model exactly (a
    silentcipher 44.1k model on the CPU: `FastMark.for_model`), and `self.fast` is then that FastMark,
    else None. The phase search (`thorough`) is silentcipher's own call either way. Thread-safe:
    FastMark keeps no state; silentcipher calls take a process-wide lock.
    """

    def __init__(self, model, key: tuple[int, ...] | list[int] = CSM_1B_GH_WATERMARK, fast: bool = True):
        cfg = model.config
        n_bytes = (cfg.message_len - 1) * 2 // 8  # two bits per symbol, one end symbol
        key = tuple(int(k) for k in key)
        if len(key) != n_bytes or not all(0 <= k <= 255 for k in key):
            raise ValueError(f"a watermark key is {n_bytes} ints in 0..255, got {key!r}")
        if cfg.SR != SILENTCIPHER_SR:
            raise ValueError(f"expected the 44.1k silentcipher model, got one at {cfg.SR} Hz")
        self.model = model
        self.key = key
        self.fast = FastMark.for_model(model) if fast else None
        # Below one STFT window the whole input sits in a single zero-padded analysis frame.
        self.min_samples_44k = cfg.N_FFT
        # The decoder reads one symbol per STFT frame and needs a whole message of 21 frames: the input
        # is zero-padded by 1..N_FFT samples and framed with hop HOP_LENGTH (36,864 samples, 0.84 s).
        self.min_decodable_samples_44k = (cfg.message_len - 1) * cfg.HOP_LENGTH - cfg.N_FFT
        # A window holds WINDOW_MESSAGES whole messages and starts a whole number of hops into the clip,
        # so its frames fall where `apply`'s frames fell (its first message starts the clip).
        self.hop = cfg.HOP_LENGTH
        self.window_samples_44k = WINDOW_MESSAGES * cfg.message_len * cfg.HOP_LENGTH  # 129,024 (2.93 s)
        # The phase search (`thorough`) reads one message plus the largest shift it tries: 45,056 (1.02 s).
        self.phase_window_samples_44k = (cfg.message_len + 1) * cfg.HOP_LENGTH

    @staticmethod
    def _usable(audio: torch.Tensor, sample_rate: int, min_samples_44k: int) -> bool:
        """Mono, long enough (counted at 44.1 kHz) and not all zeros."""
        if audio.dim() != 1:
            raise ValueError(f"expected a mono waveform of shape (S,), got {tuple(audio.shape)}")
        return audio.numel() * SILENTCIPHER_SR >= min_samples_44k * sample_rate and bool(audio.abs().amax() > 0)

    @staticmethod
    def _at_44k(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
        audio = audio.detach().float()
        return audio if sample_rate == SILENTCIPHER_SR else AF.resample(audio, sample_rate, SILENTCIPHER_SR)

    @omp.released
    @torch.no_grad()
    def apply(self, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """`audio` (S,) marked with the key: same length, rate, dtype and device.

        Silent input comes back unchanged (silentcipher skips zero-power input: there is nothing to
        hide a mark in). Input shorter than one STFT window at 44.1 kHz (~93 ms, e.g. a one-frame
        last chunk of a stream) is marked as the start of a zero-padded window, so every non-silent
        output carries the mark signal. A mark can be read back only from audio of 0.84 s or more
        (one whole 21-symbol message).
        """
        if not self._usable(audio, sample_rate, 1):  # mono (else ValueError), not empty, not silent
            return audio
        n = audio.numel()
        window = -(-self.min_samples_44k * sample_rate // SILENTCIPHER_SR)  # one 44.1 kHz window, at this rate
        y = self._at_44k(torch.nn.functional.pad(audio.float(), (0, max(0, window - n))), sample_rate)
        if self.fast is not None:
            marked, _ = self.fast.encode_wav(y.cpu().numpy(), SILENTCIPHER_SR, list(self.key),
                                             message_sdr=MESSAGE_SDR_DB, calc_sdr=False)
        else:
            with _SILENTCIPHER_LOCK:
                marked, _ = self.model.encode_wav(y.cpu().numpy(), SILENTCIPHER_SR, list(self.key),
                                                  message_sdr=MESSAGE_SDR_DB, calc_sdr=False)
        # Departs from the reference, which returns resample(marked): we add only the mark (marked - y)
        # back onto the untouched input, so the resampler's low-pass (it costs white noise ~15 dB
        # SNR at 24 kHz) spares the input. The mark lies below 11 kHz and survives the trip intact.
        mark = torch.from_numpy(marked).to(y.device) - y
        if sample_rate != SILENTCIPHER_SR:
            mark = AF.resample(mark, SILENTCIPHER_SR, sample_rate)
        # the padding (if any) is cut off again; resampling there and back can be a sample off
        mark = mark[:n] if mark.numel() >= n else torch.nn.functional.pad(mark, (0, n - mark.numel()))
        return (audio.float() + mark).to(audio.dtype)

    @omp.released
    @torch.no_grad()
    def decode(self, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE, thorough: bool = False) -> dict:
        """silentcipher's raw answer for all of `audio`, in one call: {"status": bool, "messages":
        [[5 ints]], "confidences": [float]}. Longer audio goes to `detect`, which decodes windows.

        Bounded: at most one window (2.93 s), with `thorough` 1.02 s; longer raises ValueError.
        `thorough` first searches 205 phase shifts (every 10 samples of a 2048-sample hop, for audio
        cut or shifted after marking), each a full decoder pass: about 200x the cost of a plain decode,
        minutes per second of audio on a small CPU. The plain decode reads audio that starts where the
        marked output started, as `apply` returns it.
        Too short (< 0.84 s) or silent input is answered without calling silentcipher.
        """
        if not self._usable(audio, sample_rate, self.min_decodable_samples_44k):
            return {"status": False, "messages": [], "confidences": [], "error": "too short or silent"}
        limit = self.phase_window_samples_44k if thorough else self.window_samples_44k
        if audio.numel() * SILENTCIPHER_SR > limit * sample_rate:
            raise ValueError(f"decode reads at most {limit / SILENTCIPHER_SR:.2f} s of audio"
                             f"{' with thorough' if thorough else ''}; use detect, which reads windows of longer audio")
        return self._decode_44k(self._at_44k(audio, sample_rate), thorough)

    def _decode_44k(self, y: torch.Tensor, thorough: bool) -> dict:
        if self.fast is not None and not thorough:
            return self.fast.decode_wav(y.cpu().numpy(), SILENTCIPHER_SR)
        with _SILENTCIPHER_LOCK:
            return self.model.decode_wav(y.cpu().numpy(), SILENTCIPHER_SR, phase_shift_decoding=thorough)

    def detect(self, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE, thorough: bool = False) -> dict:
        """`detect_spans` on a mono waveform `audio` (S,) in memory."""
        if audio.dim() != 1:
            raise ValueError(f"expected a mono waveform of shape (S,), got {tuple(audio.shape)}")
        return self.detect_spans(audio.numel(), lambda start, n: audio[start:start + n], sample_rate, thorough)

    @torch.no_grad()
    def detect_spans(self, length: int, read: Callable[[int, int], torch.Tensor], sample_rate: int = SAMPLE_RATE,
                     thorough: bool = False) -> dict:
        """For a "check watermark" button: {"watermarked", "matches_key", "message", "confidence",
        "windows", "seconds_checked", "seconds_total"} for a mono clip of `length` samples at
        `sample_rate`, of which only a few seconds are read, by `read(start, n)` -> samples start ..
        start + n (fewer past the end; `audio.open_upload_spans` reads them from a file alone).

        Windows: at most MAX_WINDOWS of WINDOW_MESSAGES whole messages (2.93 s each), at the start,
        middle and end of the clip; a clip under 8.8 s gets windows covering all of it but its last
        hop (46 ms), one under 2.93 s a single window of all of it. Each starts a whole number of STFT
        hops into the clip, where `apply`'s frames fell. Silent windows are skipped. So a check decodes
        at most 8.8 s of audio whatever the clip's length: ~6 s of 2 CPU cores and ~350 MB (silentcipher's
        own decoder: ~10-15 s and ~160 MB).

        Combining them: the key is found ("matches_key") as soon as one window decodes it; the rest
        are skipped. One window, not a majority: a clip edited after marking (trimmed, spliced into
        other audio) keeps the mark in some windows only, and a majority would miss it; while a false
        match needs silentcipher to read our exact 40-bit key from unmarked audio, about 1 in 10^12 per
        window if its readings were random, so three windows instead of one hardly add to that risk.

        "watermarked": silentcipher decoded some message (any key) in some window. It does so for most
        audio, marked or not (any end symbol among its per-position votes counts), so only
        "matches_key", that the message is ours, is evidence. "message" and "confidence" are the
        matching window's, else those of the window silentcipher was surest of; "confidence" is the
        share of a window's repeated messages agreeing with its decoded one (silentcipher's).
        "windows" counts the windows decoded, "seconds_checked" the audio they cover.

        `thorough`: when no window matches, silentcipher's phase search (see `decode`) also runs on
        the first 1.02 s of the first window, for audio cut or shifted after marking. It adds minutes
        (205 decoder passes over that second), not memory.
        """
        total = length * SILENTCIPHER_SR // sample_rate  # the clip's length at 44.1 kHz
        spans: list[tuple[int, int]] = []
        answers: list[dict] = []
        for start, n in self._windows(total):
            y = self._read_44k(read, sample_rate, start, n)
            if not bool(y.abs().amax() > 0):  # silent: nothing to read (and silentcipher would divide by 0)
                continue
            spans.append((start, n))
            answers.append(self._answer(self._decode_44k(y, False)))
            if answers[-1]["matches_key"]:
                break
        if thorough and spans and not answers[-1]["matches_key"]:
            start = spans[0][0]
            y = self._read_44k(read, sample_rate, start, min(self.phase_window_samples_44k, total - start))
            answers.append(self._answer(self._decode_44k(y, True)))
        read_some = [a for a in answers if a["watermarked"]]
        match = next((a for a in read_some if a["matches_key"]), None)
        best = match or max(read_some, key=lambda a: a["confidence"], default=self._answer({}))
        covered = end = 0
        for start, n in spans:  # in order of start; windows of a short clip may overlap
            covered, end = covered + max(0, start + n - max(start, end)), max(end, start + n)
        return {**best, "windows": len(spans), "seconds_checked": round(covered / SILENTCIPHER_SR, 2),
                "seconds_total": round(total / SILENTCIPHER_SR, 2)}

    def _windows(self, length: int) -> list[tuple[int, int]]:
        """(start, n) of the windows `detect_spans` decodes, in 44.1 kHz samples of a clip of `length`."""
        w = self.window_samples_44k
        if length < self.min_decodable_samples_44k:
            return []
        if length <= w:
            return [(0, length)]
        count = min(MAX_WINDOWS, -(-length // w))
        last = (length - w) // self.hop  # the latest start, in hops
        return [(start, w) for start in sorted({round(i * last / (count - 1)) * self.hop for i in range(count)})]

    def _read_44k(self, read: Callable[[int, int], torch.Tensor], sample_rate: int, start: int, n: int) -> torch.Tensor:
        """Samples start .. start + n (44.1 kHz) of the clip, read at `sample_rate` and resampled: the
        samples of the whole clip resampled, to rounding (read with a margin, from a resampler phase)."""
        step = sample_rate // math.gcd(sample_rate, SILENTCIPHER_SR)  # clip samples that map to whole 44.1 kHz ones
        first = max(0, (start * sample_rate // SILENTCIPHER_SR - _READ_MARGIN) // step * step)
        stop = -(-(start + n) * sample_rate // SILENTCIPHER_SR) + _READ_MARGIN
        y = self._at_44k(read(first, stop - first), sample_rate)
        skip = start - first * SILENTCIPHER_SR // sample_rate  # exact: `first` is a multiple of `step`
        y = y[skip:skip + n]
        return torch.nn.functional.pad(y, (0, n - y.numel()))

    def _answer(self, result: dict) -> dict:
        """One silentcipher answer as {"watermarked", "matches_key", "message", "confidence"}."""
        found = bool(result.get("status")) and bool(result.get("messages"))
        message = [int(v) for v in result["messages"][0]] if found else None
        return {"watermarked": found, "matches_key": found and tuple(message) == self.key, "message": message,
                "confidence": float(result["confidences"][0]) if found else None}

    def verify(self, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE, thorough: bool = False) -> bool:
        """True iff a window of `audio` decodes to the key (see `detect_spans`)."""
        return self.detect(audio, sample_rate, thorough)["matches_key"]
