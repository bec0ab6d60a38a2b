"""The inaudible audio watermark: mark a waveform with a 5-byte key, and check a waveform for it.

One job: wrap Sony's silentcipher (44.1 kHz model) so that callers hand in and get back torch
waveforms at their own rate. It knows nothing about CSM, Mimi, text or speakers. Building a
silentcipher model (`load_silentcipher`: published weights; `build_random_silentcipher`: untrained,
offline) is separate from using it (`Watermarker`). Importing this module does no work: silentcipher
itself (and its librosa / pydub / scipy imports) is imported only when a model is built.

Departs from the reference CSM code, which uses a fork of silentcipher: the PyPI package (1.0.5)
takes numpy arrays, not tensors, so tensors cross into numpy only at the silentcipher calls.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torchaudio.functional as AF

from .config import SAMPLE_RATE
from .errors import WatermarkUnavailableError

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
# can trim each other's output. Every silentcipher call in this process goes through this lock.
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
    itself runs on the device it was built on. Thread-safe: silentcipher calls take a process-wide lock.
    """

    def __init__(self, model, key: tuple[int, ...] | list[int] = CSM_1B_GH_WATERMARK):
        cfg = model.config
        n_bytes = (cfg.message_len - 1) * 2 // 8  # two bits per symbol, one end symbol
        key = tuple(int(k) for k in key)
        if len(key) != n_bytes or not all(0 <= k <= 255 for k in key):
            raise ValueError(f"a watermark key is {n_bytes} ints in 0..255, got {key!r}")
        if cfg.SR != SILENTCIPHER_SR:
            raise ValueError(f"expected the 44.1k silentcipher model, got one at {cfg.SR} Hz")
        self.model = model
        self.key = key
        # Below one STFT window the whole input sits in a single zero-padded analysis frame.
        self.min_samples_44k = cfg.N_FFT
        # The decoder reads one symbol per STFT frame and needs a whole message of 21 frames: the input
        # is zero-padded by 1..N_FFT samples and framed with hop HOP_LENGTH (36,864 samples, 0.84 s).
        self.min_decodable_samples_44k = (cfg.message_len - 1) * cfg.HOP_LENGTH - cfg.N_FFT

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

    @torch.no_grad()
    def decode(self, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE, thorough: bool = False) -> dict:
        """silentcipher's raw answer: {"status": bool, "messages": [[5 ints]], "confidences": [float]}.

        `thorough` first searches 205 phase shifts (every 10 samples of a 2048-sample hop, for audio
        cut or shifted after marking), each a full decoder pass over the audio: about 200x the cost
        of a plain decode, minutes per second of audio on a small CPU. The plain decode reads audio
        that starts where the marked output started, as `apply` returns it.
        Too short (< 0.84 s) or silent input is answered without calling silentcipher.
        """
        if not self._usable(audio, sample_rate, self.min_decodable_samples_44k):
            return {"status": False, "messages": [], "confidences": [], "error": "too short or silent"}
        y = self._at_44k(audio, sample_rate)
        with _SILENTCIPHER_LOCK:
            return self.model.decode_wav(y.cpu().numpy(), SILENTCIPHER_SR, phase_shift_decoding=thorough)

    def detect(self, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE, thorough: bool = False) -> dict:
        """For a "check watermark" button: {"watermarked", "matches_key", "message", "confidence"}.

        "watermarked" means silentcipher decoded some message (any key): it does so for most audio,
        marked or not (any end symbol among its per-position votes counts), so only "matches_key",
        that the message is ours, is evidence. "confidence" is the share of repeated messages
        agreeing with the decoded one (silentcipher's).
        """
        result = self.decode(audio, sample_rate, thorough)
        found = bool(result.get("status")) and bool(result.get("messages"))
        message = [int(v) for v in result["messages"][0]] if found else None
        return {"watermarked": found, "matches_key": found and tuple(message) == self.key, "message": message,
                "confidence": float(result["confidences"][0]) if found else None}

    def verify(self, audio: torch.Tensor, sample_rate: int = SAMPLE_RATE, thorough: bool = False) -> bool:
        """True iff a message is decoded from `audio` and it equals the key."""
        return self.detect(audio, sample_rate, thorough)["matches_key"]
