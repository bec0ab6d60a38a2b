"""The watermark wrapper on an untrained silentcipher (no download), plus a fake cipher whose mark
can be read back, so the round trip through our resampling is tested too. CPU, ~1 s clips."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torchaudio.functional as AF

from csm_multi.errors import WatermarkUnavailableError
from csm_multi.watermark import (
    CSM_1B_GH_WATERMARK,
    MESSAGE_SDR_DB,
    SILENTCIPHER_44K_HPARAMS,
    SILENTCIPHER_SR,
    Watermarker,
    build_random_silentcipher,
    key_from_env,
    key_from_secret,
    load_silentcipher,
)

SR = 24_000
N = int(1.2 * SR)  # just over the ~0.95 s a whole 21-symbol message needs


def snr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return 10 * math.log10(ref.double().pow(2).mean().item() / (ref - test).double().pow(2).mean().item())


@pytest.fixture(scope="module")
def cipher():
    return build_random_silentcipher(seed=0)


@pytest.fixture(scope="module")
def marker(cipher):
    return Watermarker(cipher, CSM_1B_GH_WATERMARK)


@pytest.fixture(scope="module")
def voice():
    """Speech-like: harmonics of 150 Hz plus a little noise, 1.2 s at 24 kHz."""
    t = torch.arange(N) / SR
    g = torch.Generator().manual_seed(0)
    harmonics = sum(0.1 / k * torch.sin(2 * math.pi * 150 * k * t) for k in range(1, 30))
    return harmonics + 0.01 * torch.randn(N, generator=g)


@pytest.fixture(scope="module")
def marked(marker, voice):
    return marker.apply(voice, SR)


# --- the untrained silentcipher -------------------------------------------------------------------

def test_random_model_has_the_published_architecture(cipher):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # Parameter counts of the published 44.1k checkpoint (enc_c, dec_c, dec_m_0).
    assert (count(cipher.enc_c), count(cipher.dec_c), count(cipher.dec_m[0])) == (43_968, 499_012, 2_378_773)
    assert cipher.config.SR == SILENTCIPHER_SR and len(cipher.dec_m) == 1


def test_random_model_is_deterministic_from_its_seed(cipher):
    same, other = build_random_silentcipher(seed=0), build_random_silentcipher(seed=1)
    a, b, c = (m.dec_c.state_dict() for m in (cipher, same, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_apply_keeps_length_and_changes_audio_slightly(voice, marked):
    assert marked.shape == voice.shape and marked.dtype == voice.dtype and marked.device == voice.device
    assert not torch.equal(marked, voice)
    snr = snr_db(voice, marked)
    print(f"watermark SNR at 24 kHz: {snr:.1f} dB")  # measured 40.0 dB (silentcipher asked for 36)
    assert 30 < snr < 60


def test_apply_touches_only_the_mark_band(voice, marked):
    """The mark lies below 11 kHz; above it the input passes untouched (no resampler low-pass)."""
    spectrum = torch.fft.rfft((marked - voice).double()).abs().pow(2)
    freqs = torch.fft.rfftfreq(N, 1 / SR)
    assert spectrum[freqs > 11_300].sum() < 1e-4 * spectrum.sum()


def test_apply_keeps_dtype_and_odd_lengths(marker, voice):
    x = voice[: N - 7].bfloat16()
    y = marker.apply(x, SR)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and not torch.equal(x, y)


def test_silent_input_comes_back_unchanged_and_short_input_is_marked(marker, voice):
    silent = torch.zeros(N)
    assert marker.apply(silent, SR) is silent
    for n in (1920, 2000):  # one 80 ms frame (a stream's last chunk); < one 4096-sample window at 44.1 kHz
        short = voice[:n]
        marked = marker.apply(short, SR)
        assert marked.shape == short.shape and not torch.equal(marked, short)
        assert 20 < snr_db(short, marked) < 60  # the start of a mark, as strong as on long audio
    assert marker.apply(torch.zeros(0), SR).numel() == 0
    with pytest.raises(ValueError, match="mono"):
        marker.apply(voice[None], SR)


def test_verify_rejects_unmarked_noise(marker):
    noise = 0.1 * torch.randn(N, generator=torch.Generator().manual_seed(1))
    assert marker.verify(noise, SR) is False
    assert marker.verify(torch.zeros(N), SR) is False  # silent: no decoder call at all


def test_detect_on_marked_audio_reports_what_silentcipher_decodes(marker, cipher, marked):
    """An untrained decoder cannot read its own mark; detect must say so, consistently with a
    direct silentcipher call on the same 44.1 kHz audio."""
    report = marker.detect(marked, SR)
    assert set(report) == {"watermarked", "matches_key", "message", "confidence"}
    direct = cipher.decode_wav(AF.resample(marked, SR, SILENTCIPHER_SR).numpy(), SILENTCIPHER_SR, False)
    assert report["watermarked"] == bool(direct["status"])
    assert report["message"] == (direct["messages"][0] if direct["status"] else None)
    assert report["watermarked"] is False and marker.verify(marked, SR) is False  # untrained: unreadable


# --- a fake cipher whose mark can be read: the round trip through our resampling -----------------

class ToneCipher:
    """silentcipher's interface; marks 40 key bits as faint tones at 500 + 200 i Hz (44.1 kHz only)."""

    config = argparse.Namespace(**SILENTCIPHER_44K_HPARAMS)
    FREQS = 500 + 200 * np.arange(40)

    def __init__(self):
        self.calls = []

    def encode_wav(self, y, sr, message, message_sdr=None, calc_sdr=True):
        self.calls.append(("encode", type(y), y.dtype, sr, message_sdr))
        bits = np.unpackbits(np.array(message, dtype=np.uint8))
        t = np.arange(len(y)) / sr
        tones = sum(0.01 * np.sin(2 * np.pi * f * t) for f, b in zip(self.FREQS, bits) if b)
        return (y + tones).astype(np.float32), 0

    def decode_wav(self, y, sr, phase_shift_decoding):
        self.calls.append(("decode", type(y), y.dtype, sr, phase_shift_decoding))
        mag = np.abs(np.fft.rfft(y))
        bins = np.round(self.FREQS * len(y) / sr).astype(int)
        level = np.array([mag[b - 2: b + 3].max() for b in bins])
        bits = level > 10 * np.median(mag[: len(y) * 10_000 // sr])  # the noise floor below 10 kHz
        if not bits.any():
            return {"messages": [], "confidences": [], "error": "Could not find message", "status": False}
        return {"messages": [np.packbits(bits).tolist()], "confidences": [1.0], "status": True}


def test_round_trip_through_resampling_reads_the_key():
    fake = ToneCipher()
    key = key_from_secret("round trip")
    marker = Watermarker(fake, key)
    x = 0.05 * torch.randn(N + 3, generator=torch.Generator().manual_seed(2))
    y = marker.apply(x, SR)
    assert y.shape == x.shape
    assert marker.verify(y, SR) is True
    assert marker.detect(y, SR) == {"watermarked": True, "matches_key": True, "message": list(key), "confidence": 1.0}
    assert marker.verify(x, SR) is False  # unmarked
    assert Watermarker(fake, CSM_1B_GH_WATERMARK).verify(y, SR) is False  # another key
    assert marker.verify(y, SR, thorough=True) is True
    # silentcipher only ever sees numpy float32 at 44.1 kHz, marked at the reference strength
    assert fake.calls[0] == ("encode", np.ndarray, np.float32, SILENTCIPHER_SR, MESSAGE_SDR_DB)
    assert all(c[1] is np.ndarray and c[2] == np.float32 and c[3] == SILENTCIPHER_SR for c in fake.calls)
    assert [c[4] for c in fake.calls if c[0] == "decode"] == [False, False, False, False, True]


def test_watermarker_rejects_malformed_keys():
    for bad in [(1, 2, 3), (1, 2, 3, 4, 256), (-1, 0, 0, 0, 0)]:
        with pytest.raises(ValueError, match="5 ints"):
            Watermarker(ToneCipher(), bad)


# --- keys ------------------------------------------------------------------------------------------

def test_key_from_secret_is_deterministic_and_well_formed():
    a = key_from_secret("correct horse")
    assert a == key_from_secret("correct horse")
    assert len(a) == len(CSM_1B_GH_WATERMARK) == 5 and all(isinstance(v, int) and 0 <= v <= 255 for v in a)
    keys = {key_from_secret(f"secret {i}") for i in range(50)}
    assert len(keys) == 50 and CSM_1B_GH_WATERMARK not in keys
    with pytest.raises(ValueError):
        key_from_secret("")


def test_key_from_env():
    assert key_from_env({}) == CSM_1B_GH_WATERMARK
    assert key_from_env({"CSM_WATERMARK_SECRET": "s3cret"}) == key_from_secret("s3cret")
    with pytest.raises(ValueError, match="empty"):
        key_from_env({"CSM_WATERMARK_SECRET": ""})


def test_key_from_env_reads_os_environ(monkeypatch):
    monkeypatch.setenv("CSM_WATERMARK_SECRET", "from the environment")
    assert key_from_env() == key_from_secret("from the environment")
    monkeypatch.delenv("CSM_WATERMARK_SECRET")
    assert key_from_env() == CSM_1B_GH_WATERMARK


# --- the published model, offline ------------------------------------------------------------------

def test_load_silentcipher_offline_says_how_to_fix_it(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import, so patch it too
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever is on disk
    with pytest.raises(WatermarkUnavailableError) as info:
        load_silentcipher()
    message = str(info.value)
    assert "sony/silentcipher" in message and "cache" in message and "watermark=False" in message
