"""The watermark wrapper on an untrained silentcipher (no download), plus a fake cipher whose mark
can be read back, so the round trip through our resampling is tested too; the check of long clips
by windows (which silentcipher sees, early stop, combining) with fakes; reading spans of an upload.
CPU, ~1 s clips for the real model."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torchaudio.functional as AF

from csm_multi.audio import MAX_UPLOAD_S, load_upload, open_upload_spans
from csm_multi.errors import AudioInputError, WatermarkUnavailableError
from csm_multi.watermark import (
    CSM_1B_GH_WATERMARK,
    MAX_WINDOWS,
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
    assert set(report) == {"watermarked", "matches_key", "message", "confidence", "windows", "seconds_checked",
                           "seconds_total"}
    assert (report["windows"], report["seconds_total"]) == (1, round(N / SR, 2))  # a short clip: one window, all of it
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
        self.inputs = []  # what each decode was given

    def encode_wav(self, y, sr, message, message_sdr=None, calc_sdr=True):
        self.calls.append(("encode", type(y), y.dtype, sr, message_sdr))
        bits = np.unpackbits(np.array(message, dtype=np.uint8))
        t = np.arange(len(y)) / sr
        tones = sum(0.01 * np.sin(2 * np.pi * f * t) for f, b in zip(self.FREQS, bits) if b)
        return (y + tones).astype(np.float32), 0

    def decode_wav(self, y, sr, phase_shift_decoding):
        self.calls.append(("decode", type(y), y.dtype, sr, phase_shift_decoding))
        self.inputs.append(y.copy())
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
    assert marker.detect(y, SR) == {"watermarked": True, "matches_key": True, "message": list(key), "confidence": 1.0,
                                    "windows": 1, "seconds_checked": 1.2, "seconds_total": 1.2}
    assert marker.verify(x, SR) is False  # unmarked
    assert Watermarker(fake, CSM_1B_GH_WATERMARK).verify(y, SR) is False  # another key
    assert marker.verify(y, SR, thorough=True) is True  # found by the plain decode: no phase search
    assert marker.verify(x, SR, thorough=True) is False  # a plain decode, then the phase search
    # silentcipher only ever sees numpy float32 at 44.1 kHz, marked at the reference strength
    assert fake.calls[0] == ("encode", np.ndarray, np.float32, SILENTCIPHER_SR, MESSAGE_SDR_DB)
    assert all(c[1] is np.ndarray and c[2] == np.float32 and c[3] == SILENTCIPHER_SR for c in fake.calls)
    assert [c[4] for c in fake.calls if c[0] == "decode"] == [False, False, False, False, False, False, True]


def test_watermarker_rejects_malformed_keys():
    for bad in [(1, 2, 3), (1, 2, 3, 4, 256), (-1, 0, 0, 0, 0)]:
        with pytest.raises(ValueError, match="5 ints"):
            Watermarker(ToneCipher(), bad)


# --- long clips: a few windows, early stop, any window with the key --------------------------------

class Unreadable(ToneCipher):
    """Reads no message from anything, like the untrained decoder: every check tries all its windows."""

    def decode_wav(self, y, sr, phase_shift_decoding):
        super().decode_wav(y, sr, phase_shift_decoding)
        return {"messages": [], "confidences": [], "error": "Could not find message", "status": False}


def noise(seconds: float, sr: int = SR, seed: int = 3) -> torch.Tensor:
    return 0.05 * torch.randn(int(seconds * sr), generator=torch.Generator().manual_seed(seed))


def test_a_long_clip_is_read_in_a_few_windows_on_the_hop_grid():
    """Windows of whole messages at the start, middle and end, each a whole number of hops in, each
    exactly those samples of the clip (at 44.1 kHz no resampling: a ramp tells where each began)."""
    fake = Unreadable()
    marker = Watermarker(fake)
    total = 60 * SILENTCIPHER_SR
    ramp = torch.arange(total, dtype=torch.float32) / 2**22  # exact in float32: sample i holds i / 2^22
    report = marker.detect(ramp, SILENTCIPHER_SR)
    w, hop = marker.window_samples_44k, marker.hop
    starts = [round(float(y[0]) * 2**22) for y in fake.inputs]
    assert len(starts) == MAX_WINDOWS == 3 and starts[0] == 0 and all(s % hop == 0 for s in starts)
    assert 0 <= total - (starts[-1] + w) < hop and abs(starts[1] - (total - w) / 2) <= hop
    assert all(torch.equal(torch.from_numpy(y), ramp[s:s + w]) for s, y in zip(starts, fake.inputs))
    assert report == {"watermarked": False, "matches_key": False, "message": None, "confidence": None, "windows": 3,
                      "seconds_checked": round(3 * w / SILENTCIPHER_SR, 2), "seconds_total": 60.0}
    assert report["seconds_checked"] == 8.78


@pytest.mark.parametrize("seconds, windows, checked", [(0.5, 0, 0.0), (2.0, 1, 2.0), (5.0, 2, 5.0), (9.0, 3, 8.78)])
def test_short_clips_are_read_whole_or_nearly(seconds, windows, checked):
    """Under one window: all of it; under three: windows covering it but for the last hop (46 ms)."""
    fake = Unreadable()
    report = Watermarker(fake).detect(noise(seconds), SR)
    assert (report["windows"], len(fake.inputs)) == (windows, windows)
    assert checked - 0.05 < report["seconds_checked"] <= checked and report["seconds_total"] == seconds


def test_windows_read_at_24_khz_match_the_whole_clip_resampled():
    """Each window is resampled on its own (read with a margin, from a resampler phase): the same
    samples as the clip resampled whole, edges included."""
    fake = Unreadable()
    marker = Watermarker(fake)
    clip = noise(20)
    marker.detect(clip, SR)
    whole = AF.resample(clip, SR, SILENTCIPHER_SR)
    w = marker.window_samples_44k
    assert [y.size for y in fake.inputs] == [w] * 3
    candidates = torch.stack([whole[s:s + w] for s in range(0, whole.numel() - w + 1, marker.hop)])
    errors = [(candidates - torch.from_numpy(y)).abs().amax(dim=1) for y in fake.inputs]  # per hop-grid start
    assert [int(e.argmin()) * marker.hop for e in errors][::2] == [0, (whole.numel() - w) // marker.hop * marker.hop]
    assert all(float(e.min()) < 1e-6 for e in errors)  # the same samples, to float rounding


def test_the_first_window_with_the_key_ends_the_check():
    fake = ToneCipher()
    key = key_from_secret("early stop")
    marker = Watermarker(fake, key)
    report = marker.detect(marker.apply(noise(60), SR), SR)
    assert report["matches_key"] and report["message"] == list(key) and report["confidence"] == 1.0
    assert (report["windows"], report["seconds_checked"], len(fake.inputs)) == (1, 2.93, 1)


def test_one_window_with_the_key_is_enough_for_an_edited_clip():
    """A marked line spliced after unmarked audio: only the last window holds the mark, and it counts."""
    fake = ToneCipher()
    key = key_from_secret("spliced")
    marker = Watermarker(fake, key)
    spliced = torch.cat([noise(20), marker.apply(noise(10, seed=4), SR)])
    report = marker.detect(spliced, SR)
    assert report["matches_key"] and report["message"] == list(key) and report["windows"] == 3
    unmarked = marker.detect(noise(30), SR)
    assert not unmarked["matches_key"] and not unmarked["watermarked"] and unmarked["windows"] == 3
    assert not Watermarker(fake, CSM_1B_GH_WATERMARK).detect(spliced, SR)["matches_key"]  # another key


def test_silent_windows_are_skipped():
    fake = Unreadable()
    clip = torch.zeros(30 * SR)
    clip[13 * SR:18 * SR] = noise(5)  # only the middle window has sound
    report = Watermarker(fake).detect(clip, SR)
    assert (report["windows"], report["seconds_checked"], len(fake.inputs)) == (1, 2.93, 1)
    assert Watermarker(fake).detect(torch.zeros(30 * SR), SR)["windows"] == 0


def test_thorough_adds_one_short_phase_search_only_when_no_window_matches():
    fake = ToneCipher()
    marker = Watermarker(fake, key_from_secret("thorough"))
    assert marker.detect(marker.apply(noise(30), SR), SR, thorough=True)["matches_key"]
    assert [c[4] for c in fake.calls if c[0] == "decode"] == [False]
    fake.calls.clear()
    fake.inputs.clear()
    assert not marker.detect(noise(30), SR, thorough=True)["matches_key"]
    assert [c[4] for c in fake.calls if c[0] == "decode"] == [False, False, False, True]
    assert fake.inputs[-1].size == marker.phase_window_samples_44k  # 1.02 s: 205 decoder passes over that only
    np.testing.assert_allclose(fake.inputs[-1], fake.inputs[0][:marker.phase_window_samples_44k], atol=1e-6)


def test_decode_reads_at_most_one_window():
    fake = Unreadable()
    marker = Watermarker(fake)
    with pytest.raises(ValueError, match="use detect"):
        marker.decode(noise(4), SR)
    with pytest.raises(ValueError, match="thorough"):
        marker.decode(noise(1.5), SR, thorough=True)
    assert marker.decode(noise(2.9), SR)["status"] is False and len(fake.inputs) == 1


def test_studio_check_reads_only_windows_of_a_long_file(tmp_path, monkeypatch):
    """A 2-minute 48 kHz stereo FLAC, marked (fake cipher): found in the first window, and the file's
    reads add up to about that window, not the file."""
    from types import SimpleNamespace

    import soundfile as sf

    from csm_multi.studio import Studio

    key = key_from_secret("studio")
    marker = Watermarker(ToneCipher(), key)
    mono = marker.apply(noise(120, 48_000), 48_000)
    path = tmp_path / "long.flac"
    sf.write(str(path), torch.stack([mono, mono], dim=1).numpy(), 48_000)
    studio = Studio(SimpleNamespace(watermarker=marker, device=torch.device("cpu")), tmp_path / "profiles",
                    outputs_root=tmp_path / "out")
    frames_read = []
    original = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, frames=-1, *a, **k: frames_read.append(frames)
                        or original(self, frames, *a, **k))
    found = studio.check_watermark(path)
    assert found["matches_key"] and found["windows"] == 1 and found["seconds_total"] == 120.0
    assert 0 < sum(frames_read) < 3.5 * 48_000  # one 2.93 s window and its margins, of 5.76 M frames
    frames_read.clear()
    studio.engine.watermarker = Watermarker(Unreadable(), key)  # finds nothing: reads all three windows
    assert studio.check_watermark(path)["windows"] == 3 and sum(frames_read) < 3 * 3.5 * 48_000


# --- reading spans of an upload (audio.open_upload_spans, what the check reads files with) ----------

@pytest.mark.parametrize("rate, channels, ext", [(48_000, 2, "flac"), (8_000, 1, "wav"), (44_100, 1, "mp3"),
                                                 (44_101, 1, "wav")])
def test_spans_of_an_upload_are_the_samples_load_upload_returns(tmp_path, rate, channels, ext):
    import soundfile as sf

    rng = np.random.default_rng(0)
    path = tmp_path / f"clip.{ext}"
    sf.write(str(path), (0.3 * rng.standard_normal((rate * 4, channels))).astype(np.float32), rate)
    whole = load_upload(path)
    with open_upload_spans(path) as (length, read):
        assert length == whole.numel()
        for start, n in [(0, 1000), (12_345, 54_321), (length - 500, 1000)]:
            expect = torch.nn.functional.pad(whole[start:start + n], (0, max(0, start + n - length)))
            torch.testing.assert_close(read(start, n), expect, atol=1e-6, rtol=0)
        assert torch.equal(read(length + 10, 50), torch.zeros(50))  # past the end: zeros
    with open_upload_spans(path.read_bytes()) as (length, read):  # bytes work too
        torch.testing.assert_close(read(2000, 3000), whole[2000:5000], atol=1e-6, rtol=0)


def test_spans_refuse_what_load_upload_refuses_before_decoding(tmp_path):
    import soundfile as sf

    too_long = tmp_path / "long.wav"
    sf.write(str(too_long), np.zeros(4_000 * (MAX_UPLOAD_S + 1), dtype=np.int16), 4_000)
    empty, named = tmp_path / "empty.wav", tmp_path / "clip.txt"
    empty.write_bytes(b"")
    named.write_bytes(b"RIFF")
    garbage = tmp_path / "noise.wav"
    garbage.write_bytes(b"not audio at all" * 10)
    for bad in (too_long, empty, named, garbage, tmp_path / "missing.wav"):
        with pytest.raises(AudioInputError) as expected:
            load_upload(bad)
        with pytest.raises(AudioInputError) as got:
            with open_upload_spans(bad):
                pass
        assert str(got.value) == str(expected.value)


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
