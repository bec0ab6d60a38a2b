"""FastMark against silentcipher itself, on untrained 44.1k models (two seeds, no download): the marked
audio within 1e-6 for speech-like audio, noise, very short, gappy, odd-length, loud and quiet input;
the same decoded answers and per-frame symbols; silent input; its reading of symbols against
silentcipher's own on crafted symbol sequences; threads; Watermarker's fast path against its
silentcipher path; the benchmark's smoke run. CPU, clips of 0.5-1.2 s."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torchaudio.functional as AF

from csm_multi.fastmark import SR, FastMark, bench, nnpack_usable, silentcipher_decode, speech_like
from csm_multi.watermark import (
    _SILENTCIPHER_LOCK,
    CSM_1B_GH_WATERMARK,
    MESSAGE_SDR_DB,
    Watermarker,
    build_random_silentcipher,
)

KEY = list(CSM_1B_GH_WATERMARK)
TOLERANCE = 1e-6  # the bound on the marked audio, max abs difference


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def seeded(request):
    """(seed, silentcipher model, FastMark on its weights), one per seed."""
    model = build_random_silentcipher(seed=request.param)
    return request.param, model, FastMark(model)


@pytest.fixture(scope="module")
def pair(seeded):
    """(silentcipher model, FastMark on its weights), one per seed."""
    return seeded[1:]


def reference_encode(model, y: np.ndarray) -> np.ndarray:
    with _SILENTCIPHER_LOCK:
        return model.encode_wav(y, SR, KEY, message_sdr=MESSAGE_SDR_DB, calc_sdr=False)[0]


def reference_decode(model, y: np.ndarray) -> dict:
    with _SILENTCIPHER_LOCK:
        return model.decode_wav(y, SR, False)


def noise_44k(seconds: float, level: float = 0.15, seed: int = 1) -> np.ndarray:
    return (level * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def noise_24k(seconds: float, level: float = 0.15, seed: int = 2) -> np.ndarray:
    x = level * np.random.default_rng(seed).standard_normal(int(seconds * 24_000))
    return AF.resample(torch.from_numpy(x.astype(np.float32)), 24_000, SR).numpy()


def with_gaps(y: np.ndarray) -> np.ndarray:
    """Two silent stretches, each longer than an STFT window (so some frames are exactly zero)."""
    y = y.copy()
    y[int(0.03 * SR):int(0.15 * SR)] = 0
    y[int(0.2 * SR):int(0.32 * SR)] = 0
    return y


INPUTS = {  # 0.35 s (9 STFT frames) unless said
    "speech from 24 kHz": lambda: speech_like(0.35),
    "white noise at 44.1 kHz": lambda: noise_44k(0.35),
    "white noise from 24 kHz": lambda: noise_24k(0.35),
    "shorter than one window": lambda: speech_like(0.35)[:3000],
    "a few samples": lambda: noise_44k(0.35)[:37],
    "silent stretches": lambda: with_gaps(speech_like(0.35)),
    "odd length (not a multiple of the hop)": lambda: noise_24k(0.5)[:15_333],
    "loud (peak 0.95)": lambda: speech_like(0.35, level=0.95),
    "quiet (peak 0.005)": lambda: speech_like(0.35, level=0.005),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_fast_encode_matches_silentcipher(pair, name):
    model, fast = pair
    y = INPUTS[name]()
    want = reference_encode(model, y)
    got, sdr = fast.encode_wav(y, SR, KEY, message_sdr=MESSAGE_SDR_DB, calc_sdr=False)
    assert got.shape == y.shape == want.shape and got.dtype == np.float32 and sdr == 0
    mark = np.abs(want - y).max()
    deviation = np.abs(got - want).max()
    print(f"{name}: max |fast - silentcipher| {deviation:.2e}, mark peak {mark:.2e}")
    assert mark > 20 * TOLERANCE  # the mark itself is far above the tolerance: the comparison means something
    assert deviation <= TOLERANCE and deviation <= 1e-3 * mark


def test_direct_convolutions_also_match(pair):
    """Without NNPACK (its fallback, and where it is missing) the same bound holds."""
    model, _ = pair
    direct = FastMark(model, winograd=False)
    assert direct.winograd is False
    y = noise_24k(0.5)
    got, _ = direct.encode_wav(y, SR, KEY, message_sdr=MESSAGE_SDR_DB, calc_sdr=False)
    assert np.abs(got - reference_encode(model, y)).max() <= TOLERANCE


def test_a_failing_nnpack_call_falls_back_to_direct(pair, monkeypatch):
    """NNPACK raising (e.g. out of memory for its workspace) after the input was split: the layer is
    convolved directly from the input as it was, and the result is still silentcipher's."""
    from csm_multi import fastmark

    model, fast = pair
    calls = []

    def failing(*args):
        calls.append(args[0].shape)
        raise RuntimeError("NNPACK SpatialConvolution_updateOutput failed")

    y = speech_like(0.35, level=0.9)  # loud speech: some rows are split before NNPACK is called
    monkeypatch.setattr(fastmark, "_nnpack_call", failing)
    got, _ = fast.encode_wav(y, SR, KEY, message_sdr=MESSAGE_SDR_DB, calc_sdr=False)
    assert len(calls) == 5  # every Winograd layer tried, and fell back
    assert np.abs(got - reference_encode(model, y)).max() <= TOLERANCE


def test_nnpack_is_used_here():
    """Where PyTorch has NNPACK (x86 builds do), the Winograd route runs (else FastMark measures the fallback)."""
    if not torch._nnpack_available():
        pytest.skip("this PyTorch build has no NNPACK: FastMark convolves directly")
    assert nnpack_usable() and FastMark(build_random_silentcipher(seed=0)).winograd


def heavy_tailed(rows: list[int], shape=(1, 32, 60, 20), seed=0) -> torch.Tensor:
    """Normal noise with spikes of 300 standard deviations in the given rows (as STFT peaks give)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    for r in rows:
        x[0, r % shape[1], r, torch.randint(0, shape[3], (3,), generator=g)] = 300.0
    return x


def test_winograd_split_is_as_accurate_as_direct():
    """The split (clip to 16 standard deviations for NNPACK, the rest directly) against float64: on spiky
    input plain NNPACK is far off, the split is as close as oneDNN's direct convolution. Too many spiky
    rows: no split (None), the caller convolves directly."""
    if not nnpack_usable():
        pytest.skip("no NNPACK here")
    from csm_multi.fastmark import _Gated

    g = torch.Generator().manual_seed(1)
    layer = _Gated.make(torch.randn(64, 32, 3, 3, generator=g) / 17, torch.randn(64, generator=g), torch.ones(32),
                        torch.zeros(32), 1e-5)
    x = heavy_tailed([0, 7, 8, 31, 59])
    exact = torch.nn.functional.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
    scale = exact.abs().max().item()
    plain = torch._nnpack_spatial_convolution(x, layer.weight, layer.bias, [1, 1], [1, 1])
    direct = torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
    centre, spread = torch.zeros(32), torch.ones(32)
    split = FastMark._winograd(x.clone(), layer, centre, spread)
    errors = {name: (t.double() - exact).abs().max().item() / scale for name, t in
              (("plain", plain), ("direct", direct), ("split", split))}
    print(errors)
    assert errors["split"] < 4 * errors["direct"] and errors["plain"] > 20 * errors["split"]
    assert FastMark._winograd(heavy_tailed(list(range(0, 60, 2))), layer, centre, spread) is None


def test_long_clips_go_to_nnpack_in_chunks():
    """Over 224 frames NNPACK is called on even chunks of at most 192 (bounding its workspace): the same result."""
    if not nnpack_usable():
        pytest.skip("no NNPACK here")
    from csm_multi.fastmark import _nnpack

    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(1, 32, 40, 400, generator=g), torch.randn(64, 32, 3, 3, generator=g), torch.randn(64)
    whole = torch._nnpack_spatial_convolution(x, w, b, [1, 1], [1, 1])
    exact = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1)
    chunked = _nnpack(x, w, b)
    assert chunked.shape == whole.shape
    assert (chunked.double() - exact).abs().max() < 2 * (whole.double() - exact).abs().max() + 1e-5


def test_sdr_and_default_strength_as_silentcipher(pair):
    model, fast = pair
    y = speech_like(0.5)
    with _SILENTCIPHER_LOCK:
        want, want_sdr = model.encode_wav(y, SR, KEY, message_sdr=None, calc_sdr=True)  # the model's 47 dB
    got, sdr = fast.encode_wav(torch.from_numpy(y), SR, KEY)  # a tensor works too
    assert np.abs(got - want).max() <= TOLERANCE
    assert abs(sdr - want_sdr) < 1e-3 and 40 < sdr < 55


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # silentcipher's vote over no whole message
def test_silent_input_comes_back_unchanged(pair):
    model, fast = pair
    silent = np.zeros(5000, dtype=np.float32)
    got, sdr = fast.encode_wav(silent, SR, KEY, message_sdr=MESSAGE_SDR_DB)
    assert sdr == 0 and np.array_equal(got, silent) and got is not silent
    assert np.array_equal(reference_encode(model, silent), got)
    with np.errstate(divide="ignore", invalid="ignore"):
        assert fast.decode_wav(silent, SR) == reference_decode(model, silent)


# Unmarked noise (noise_44k(0.93, seed=n)) the untrained decoder of each model seed reads a message from.
READABLE_NOISE = {0: 11, 1: 1}


def test_decode_reads_the_same_symbols_and_answers(seeded):
    """Marked audio and unmarked noise, one whole message (0.93 s): the same dict and the same per-frame
    argmax as silentcipher's decoder. The untrained decoder fails on the first and reads a message from
    the second, so both kinds of answer are compared."""
    seed, model, fast = seeded
    clips = (reference_encode(model, speech_like(0.93, seed=5)), noise_44k(0.93, seed=READABLE_NOISE[seed]))
    answers = []
    for y in clips:
        want, symbols = silentcipher_decode(model, y)
        got = fast.symbols(y)
        np.testing.assert_array_equal(got, symbols)
        assert fast._read(got) == want  # decode_wav is symbols, then _read: called whole once, below
        answers.append(want)
    assert fast.decode_wav(clips[1], SR) == answers[1]
    assert [a["status"] for a in answers] == [False, True]


class FixedReader(torch.nn.Module):
    """A message decoder that reads the given per-frame symbols (one-hot logits), whatever the audio."""

    def __init__(self, symbols):
        super().__init__()
        self.symbols = torch.tensor(symbols)

    def forward(self, carrier):
        frames = carrier.shape[3]
        return torch.nn.functional.one_hot(self.symbols[:frames], 5).T.float()[None, None]


def test_reading_symbols_is_silentcipher_s(monkeypatch):
    """FastMark's vote and conversion against silentcipher's own, on crafted symbol sequences: a clean
    message, noisy votes with ties, no end symbol, an end symbol inside the message, several messages,
    fewer frames than a message."""
    model = build_random_silentcipher(seed=0)
    fast = FastMark(model)
    rng = np.random.default_rng(0)
    message = [int(v) + 1 for v in rng.integers(0, 4, 20)]
    clean = [*message, 0] * 4
    noisy = [s if rng.random() > 0.3 else int(rng.integers(0, 5)) for s in clean]
    rotated = clean[7:] + clean[:7]
    inner_end = [*message[:5], 0, *message[6:], 0] * 4
    no_end = [1 + (i % 4) for i in range(84)]
    negative = [0, 1, 2, 3, *message[4:], 0] * 4  # "-1" leads a byte: int() reads a negative number
    y = speech_like(1.95, seed=3)
    frames = (y.size // 4096 + 1) * 2 + 1  # 43: two whole messages and a bit (the STFT pads to whole windows)
    for symbols in (clean, noisy, rotated, inner_end, no_end, negative):
        symbols = (symbols * 3)[:frames]
        monkeypatch.setattr(model, "dec_m", [FixedReader(symbols)])
        want = reference_decode(model, y)
        assert fast._read(np.array(symbols)) == want, symbols
    assert fast._read(np.array(clean[:20])) == {"messages": [], "confidences": [], "error": "Could not find message",
                                                  "status": False}


def test_no_batch_norm_statistics_change():
    """FastMark never calls the modules: their running statistics stay; silentcipher's own call moves them.
    (A model of its own: silentcipher's decode of silence, above, leaves NaNs in the shared ones' stats.)"""
    model = build_random_silentcipher(seed=2)
    fast = FastMark(model)

    def stats():
        return {k: v.clone() for m in (model.enc_c, model.dec_c, model.dec_m[0]) for k, v in m.state_dict().items()
                if "running" in k or "num_batches" in k}

    before = stats()
    y = speech_like(0.93)
    fast.encode_wav(y, SR, KEY, message_sdr=MESSAGE_SDR_DB)
    fast.decode_wav(y, SR)
    assert all(torch.equal(before[k], v) for k, v in stats().items())
    reference_encode(model, y[:5000])
    assert not all(torch.equal(before[k], v) for k, v in stats().items())


def test_threads_give_the_serial_results():
    """Four threads marking and reading at once, no lock (silentcipher's is held throughout, so any use
    of it would stall them): the same audio, answers and symbols as one call after another."""
    fast = FastMark(build_random_silentcipher(seed=0))
    clips = [speech_like(0.35, seed=s) if s % 2 else noise_24k(0.35, seed=s) for s in range(4)]

    def work(i):  # decode_wav is symbols, then _read (no state): the symbols are what threads could spoil
        marked, _ = fast.encode_wav(clips[i], SR, KEY, message_sdr=MESSAGE_SDR_DB)
        symbols = fast.symbols(marked)
        return marked, fast._read(symbols), symbols

    serial = [work(i) for i in range(4)]
    results: list = [None] * 4
    errors: list = []

    def run(i):
        try:
            results[i] = work(i)
        except Exception as e:  # noqa: BLE001  (reported below, with the thread's index)
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    with _SILENTCIPHER_LOCK:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    for (a, da, sa), (b, db, sb) in zip(serial, results):
        assert np.abs(a - b).max() <= 1e-7 and da == db and np.array_equal(sa, sb)


def test_watermarker_fast_path_matches_its_silentcipher_path():
    model = build_random_silentcipher(seed=1)
    fast, slow = Watermarker(model), Watermarker(model, fast=False)
    assert isinstance(fast.fast, FastMark) and slow.fast is None
    voice = AF.resample(torch.from_numpy(speech_like(1.0)), SR, 24_000)  # CSM's rate
    for audio, rate in ((voice, 24_000), (voice[:2000], 24_000), (torch.from_numpy(noise_44k(0.35)), SR)):
        a, b = fast.apply(audio, rate), slow.apply(audio, rate)
        assert a.shape == audio.shape and (a - audio).abs().max() > 20 * TOLERANCE
        assert (a - b).abs().max() <= TOLERANCE
    marked = fast.apply(voice, 24_000)
    assert fast.detect(marked, 24_000) == slow.detect(marked, 24_000)


class LookAlike:
    """silentcipher's interface (config, encode_wav, decode_wav) without its modules, like the watermark
    tests' fake ciphers."""

    def __init__(self):
        import argparse

        from csm_multi.watermark import SILENTCIPHER_44K_HPARAMS

        self.config = argparse.Namespace(**SILENTCIPHER_44K_HPARAMS)

    def encode_wav(self, y, sr, message, message_sdr=None, calc_sdr=True):
        return y + 0.25, 0

    def decode_wav(self, y, sr, phase_shift_decoding):
        return {"messages": [], "confidences": [], "error": "Could not find message", "status": False}


def test_look_alike_models_keep_their_own_calls():
    """A model that is not silentcipher's (no modules) is not taken over: FastMark.supports says no,
    and Watermarker calls the model itself."""
    fake = LookAlike()
    assert not FastMark.supports(fake)
    marker = Watermarker(fake)
    assert marker.fast is None and torch.allclose(marker.apply(torch.zeros(5000) + 0.5, SR), torch.full((5000,), 0.75))
    with pytest.raises(ValueError, match="44.1k"):
        FastMark(fake)
    fast = FastMark(build_random_silentcipher(seed=0))
    with pytest.raises(ValueError, match="44100"):
        fast.encode_wav(np.zeros(100, np.float32), 24_000, KEY)
    with pytest.raises(ValueError, match="mono"):
        fast.decode_wav(np.zeros((2, 100), np.float32), SR)
    with pytest.raises(ValueError, match="5 bytes"):
        fast.encode_wav(np.ones(100, np.float32), SR, KEY[:4])


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
def test_bench_smoke():
    result = bench(seconds=[0.5], rounds=1, warm_up=False, log=lambda line: None)
    (row,) = result["rows"]
    assert row["seconds"] == 0.5 and row["max_abs_deviation"] <= TOLERANCE and row["decode_same"]
    for task in ("apply", "verify"):
        assert row[task]["fast_s_per_s"]["min"] > 0 and row[task]["silentcipher_s_per_s"]["min"] > 0
    assert set(result["targets_met"]) == {"apply", "verify"} and result["machine"]["torch_threads"] >= 1
