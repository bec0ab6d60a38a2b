"""Hostile and broken input through the core, the command line and the web API.

Each case gets an error naming the problem and what to do (asserted on its words), any sample rate
and channel count that people really use is converted, nothing crashes the server, and nothing is
written outside the profile store.
"""

from __future__ import annotations

import io
import re
import struct
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from csm_multi import audio as audio_mod
from csm_multi import loaders
from csm_multi.audio import MAX_UPLOAD_S, load_audio, load_upload
from csm_multi.cli import main as cli
from csm_multi.errors import AudioInputError, ProfileError, ScriptError
from csm_multi.profiles import PROFILE_FILE, REFERENCE_FILE, ProfileStore
from csm_multi.engine import Engine
from csm_multi.script import clean_utterance, parse_script
from csm_multi.studio import Studio
from csm_multi.text import ByteTokenizer

SR = 24_000


# ---- files -------------------------------------------------------------------------------------
def tone(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t) * (0.7 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def write(path: Path, samples: np.ndarray, sr: int = SR, **kw) -> Path:
    sf.write(str(path), samples, sr, **kw)
    return path


def wav_bytes(samples: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def forged_wav(rate: int, channels: int, payload: bytes) -> bytes:
    """16-bit PCM WAV with arbitrary header fields, e.g. a rate or channel count no encoder would write."""
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def hour_of_silence(path: Path) -> Path:
    """An hour at 8 kHz as FLAC: silence compresses to ~90 KB, so the file is cheap but the audio is not."""
    with sf.SoundFile(str(path), "w", 8000, 1, format="FLAC") as f:
        block = np.zeros(8000 * 60, np.float32)
        for _ in range(60):
            f.write(block)
    return path


def _with_nan(d: Path) -> Path:
    x = tone(2, 16_000)
    x[100:200] = np.nan
    return write(d / "nan.wav", x, 16_000, subtype="FLOAT")


def _with_inf(d: Path) -> Path:
    x = tone(2, 16_000)
    x[5] = np.inf
    return write(d / "inf.wav", x, 16_000, subtype="FLOAT")


def _put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BROKEN = {  # case -> (make(folder) -> path, words the error must contain)
    "header cut in half": (lambda d: _put(d / "half.wav", wav_bytes(tone(1, SR))[:22]), ["could not read", "WAV"]),
    "zero-length": (lambda d: _put(d / "zero.wav", b""), ["empty", "0 bytes"]),
    "header, no samples": (lambda d: write(d / "none.wav", np.zeros((0, 1), np.float32)), ["empty", "0 samples"]),
    "0 channels": (lambda d: _put(d / "c0.wav", forged_wav(16_000, 0, bytes(3200))),
                   ["could not read", "Channel count is zero"]),
    "NaN samples": (_with_nan, ["NaN", "damaged"]),
    "Inf samples": (_with_inf, ["infinite", "damaged"]),
    "PNG named .wav": (lambda d: _put(d / "img.wav", b"\x89PNG\r\n\x1a\n" + bytes(200)), ["could not read", "MP3"]),
    "text named .wav": (lambda d: _put(d / "notes.wav", b"just some notes\n" * 50), ["could not read", "MP3"]),
    "rate of 1 Hz": (lambda d: _put(d / "slow.wav", forged_wav(1, 1, bytes(200))), ["sample rate", "1 Hz", "kHz"]),
    "rate of 1 MHz": (lambda d: _put(d / "fast.wav", forged_wav(10**6, 1, bytes(2000))), ["sample rate", "kHz"]),
    "an hour long": (lambda d: hour_of_silence(d / "hour.flac"), ["3,600 s", f"limit is {MAX_UPLOAD_S} s", "trim"]),
}


def tree(base: Path, skip: Path | None = None) -> dict[str, int]:
    """Every path under `base` (except under `skip`) with its size: compared before and after."""
    return {str(p.relative_to(base)): p.stat().st_size for p in base.rglob("*")
            if skip is None or skip not in (p, *p.parents)}


@pytest.fixture
def store(tmp_path) -> ProfileStore:
    return ProfileStore(tmp_path / "voices" / "store")


# ---- audio -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", BROKEN)
def test_broken_audio_gets_a_specific_error_and_saves_nothing(tmp_path, store, case):
    make, words = BROKEN[case]
    path = make(tmp_path)
    before = tree(tmp_path, store.root)
    for source in (path, path.read_bytes()):
        with pytest.raises(AudioInputError) as info:
            load_upload(source)
        message = str(info.value)
        assert all(w in message for w in words), message
        assert "0x" not in message  # no object reprs such as <_io.BytesIO object at 0x7f...>
    with pytest.raises(AudioInputError):
        store.create("Alice", path, "Hello there.")
    assert tree(tmp_path, store.root) == before and [p.name for p in store.root.iterdir()] == [".lock"]


def test_an_in_memory_array_with_no_channels_is_refused(store):
    with pytest.raises(AudioInputError, match="no channels"):
        store.create("Alice", (np.zeros((24_000, 0), np.float32), 24_000), "Hello there.")


def test_an_hour_long_upload_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    path = hour_of_silence(tmp_path / "hour.flac")
    assert path.stat().st_size < 200_000  # small to upload, an hour to decode

    def no_decoding(*args, **kwargs):
        raise AssertionError("the audio was decoded")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    t0 = time.perf_counter()
    with pytest.raises(AudioInputError, match="limit is 600 s"):
        load_upload(path)
    with pytest.raises(AudioInputError, match="limit is 600 s"):
        load_upload(path.read_bytes())
    assert time.perf_counter() - t0 < 1.0


def test_the_duration_limit_is_inclusive_and_decoded_size_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(audio_mod, "MAX_UPLOAD_S", 2)
    ok, long = write(tmp_path / "ok.wav", tone(2.0, 8000), 8000), write(tmp_path / "long.wav", tone(2.01, 8000), 8000)
    assert load_upload(ok).numel() == 2 * SR
    with pytest.raises(AudioInputError, match="limit is 2 s"):
        load_upload(long)
    monkeypatch.setattr(audio_mod, "MAX_DECODED_SAMPLES", 8000 * 3)  # 2 s of 8 channels is 4x that
    wide = write(tmp_path / "wide.wav", np.tile(tone(1.0, 8000)[:, None], (1, 8)), 8000)
    with pytest.raises(AudioInputError, match="8 channels.*mono"):
        load_upload(wide)


def _peak_hz(x: torch.Tensor) -> float:
    spectrum = np.abs(np.fft.rfft(x.numpy()))
    return float(np.argmax(spectrum) * SR / x.numel())


@pytest.mark.parametrize("sr", [8000, 11025, 16000, 22050, 44100, 48000, 96000, 192000, 44101, 7999])
def test_any_real_sample_rate_becomes_24k_mono_with_pitch_and_length_kept(tmp_path, monkeypatch, sr):
    # torchaudio's resampler builds a (24000/g) x (sr/g) table: for 44101 Hz that is ~10^9 numbers
    calls = []

    def bounded(audio, orig_freq, new_freq):
        g = np.gcd(orig_freq, new_freq)
        calls.append((orig_freq // g) * (new_freq // g))
        assert calls[-1] <= 1 << 20
        return torch_resample(audio, orig_freq=orig_freq, new_freq=new_freq)

    torch_resample = audio_mod.AF.resample
    monkeypatch.setattr(audio_mod, "AF", SimpleNamespace(resample=bounded))
    loaded = load_upload(write(tmp_path / f"r{sr}.wav", tone(1.0, sr), sr, subtype="PCM_16"))
    assert loaded.dtype == torch.float32 and loaded.ndim == 1
    assert abs(loaded.numel() - SR) <= 1
    assert _peak_hz(loaded) == pytest.approx(440, abs=2)
    assert calls or sr in (44101, 7999)  # the odd rates take the polyphase path


def test_eight_channels_are_averaged_and_make_a_profile(tmp_path, store):
    x = np.zeros((SR * 2, 8), np.float32)
    x[:, 0] = tone(2.0, SR)
    loaded = load_upload(write(tmp_path / "eight.wav", x, SR))
    assert float(loaded.abs().max()) == pytest.approx(float(np.abs(x[:, 0]).max()) / 8, rel=1e-3)
    profile = store.create("Eight", write(tmp_path / "eight48.flac", np.repeat(x, 2, axis=0), 48_000), "Hi there.")
    assert profile.duration_s == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_a_wav_extension_on_flac_or_ogg_content_still_works(tmp_path, store, fmt):
    buf = io.BytesIO()
    sf.write(buf, tone(2.0, 16_000), 16_000, format=fmt)
    path = _put(tmp_path / "really-not.wav", buf.getvalue())
    assert abs(load_audio(path).numel() - 2 * SR) <= 1
    assert store.create("Liar", path, "It says wav.").duration_s == pytest.approx(2.0, abs=0.05)


def test_a_truncated_wav_loads_the_samples_that_are_there(tmp_path):
    data = wav_bytes(tone(2.0, SR))
    cut = load_upload(_put(tmp_path / "cut.wav", data[: len(data) // 2]))
    assert abs(cut.numel() - SR) <= 30  # half the bytes, less the header


# ---- transcripts and names ---------------------------------------------------------------------
def test_transcripts_long_empty_control_and_right_to_left(tmp_path, store):
    clip = write(tmp_path / "clip.wav", tone(2.0, SR))
    with pytest.raises(ProfileError, match="6000 characters; the limit is 5000"):
        store.create("Alice", clip, "words " * 1000)
    for empty in ("", "   \n\t", "\x00\x1b\x07"):
        with pytest.raises(ProfileError, match="transcript is empty"):
            store.create("Alice", clip, empty)
    made = store.create("Alice", clip, "Hello\x00 the\x1bre,\n  friend.")
    assert made.transcript == "Hello there, friend."  # control characters dropped, whitespace collapsed
    store.update_transcript("Alice", "\x1b[32mHello\x1b[0m\x0bthere")
    assert store.get("Alice").transcript == "Hello there"  # colour codes gone whole; a vertical tab is a space
    for name, text in (("Hebrew", "שלום, מה שלומך?"), ("Arabic", "مرحبا، كيف حالك؟")):
        assert store.create(name, clip, text).transcript == text


BAD_NAMES = ["../../etc/passwd", "CON", "a/b", "a\\b", "nul\x00name", "", "x" * 500, "\u202eecilA", "..",
             "/etc/passwd", "esc\x1bname"]


def test_hostile_profile_names_are_refused_and_nothing_escapes(tmp_path, store):
    clip = write(tmp_path / "clip.wav", tone(2.0, SR))
    store.create("Alice", clip, "Hello there.")
    before = tree(tmp_path)
    for name in BAD_NAMES:
        with pytest.raises(ProfileError, match="not a valid profile name|reserved device name"):
            store.create(name, clip, "Hello there.")
        with pytest.raises(ProfileError, match="not a valid profile name|reserved device name"):
            store.rename("Alice", name)
        with pytest.raises(ProfileError):
            store.delete(name)
    assert tree(tmp_path) == before
    assert not [p for p in tmp_path.rglob("*") if p.name in ("passwd", "etc", "CON", "b")]


def test_right_to_left_and_accented_names_get_safe_folders(tmp_path, store):
    clip = write(tmp_path / "clip.wav", tone(2.0, SR))
    for name in ("אליס", "علي", "José"):
        profile = store.create(name, clip, "Hello there.")
        assert (store.root / profile.slug).parent == store.root and store.get(name).name == name


# ---- scripts -----------------------------------------------------------------------------------
def test_a_ten_thousand_line_script_is_refused_quickly_with_the_limit(tmp_path):
    text = "\n".join(f"Speaker{i % 7}: line number {i}, said out loud." for i in range(10_000))
    t0 = time.perf_counter()
    with pytest.raises(ScriptError, match="10000 lines to speak, the limit is 500"):
        parse_script(text)
    assert time.perf_counter() - t0 < 2.0
    studio = Studio(SimpleNamespace(device=torch.device("cpu")), tmp_path / "voices", outputs_root=tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(ScriptError, match="longer than 20000 characters"):
        studio.parse(text)
    with pytest.raises(ScriptError, match="201 lines to speak, the limit is 200"):
        studio.parse("A: hi\n" * 201)
    assert time.perf_counter() - t0 < 1.0


def test_script_control_characters_and_right_to_left_text():
    lines = parse_script("אליס: שלום עולם\nعلي: مرحبا بك\nBob: he\x00llo\x1b there\x07")
    assert [(line.speaker, line.text) for line in lines] == [
        ("אליס", "שלום עולם"), ("علي", "مرحبا بك"), ("Bob", "hello there")]
    for name in ("Al\x1bice", "\u202eecilA", "A\x00"):
        with pytest.raises(ScriptError, match="control characters or invalid text — retype"):
            parse_script(f"{name}: hello")
    with pytest.raises(ScriptError, match="5000 characters, the limit is 1000"):
        parse_script("Alice: " + "y" * 5000)
    with pytest.raises(ScriptError, match="empty"):
        parse_script("")


def test_unpaired_surrogates_are_dropped_from_text_and_refused_in_names(tmp_path, store, tiny_model):
    # Not text at all (no encoding writes them), yet JSON carries them and a browser can send one.
    assert [(line.speaker, line.text) for line in parse_script("Bob: he\ud800llo\udfff there")] == [("Bob", "hello there")]
    with pytest.raises(ScriptError, match="control characters or invalid text — retype"):
        parse_script("Al\ud800ice: hello")
    assert clean_utterance(" \x00Hi\ud800\tthere\nfriend\x1b[0m ") == "Hi\tthere\nfriend"
    clip = write(tmp_path / "clip.wav", tone(2.0, SR))
    with pytest.raises(ProfileError, match="not a valid profile name.*unpaired surrogates"):
        store.create("Al\udc00ice", clip, "Hello.")
    assert store.create("Alice", clip, "Hel\ud800lo.").transcript == "Hello."
    engine = Engine(tiny_model, ByteTokenizer(), codec=None, watermark=False)
    with pytest.raises(ValueError, match="character 3 is an unpaired surrogate"):
        engine.text_frames("Hel\ud800lo", 0)  # the library's own callers get a message, not a codec error


# ---- the command line --------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for input that should be refused first")

    monkeypatch.setattr(loaders, "build_engine", no_model)


def test_cli_refuses_hostile_input_with_readable_errors(tmp_path, capsys, offline):
    voices = tmp_path / "voices"
    add = ["profiles", "--profiles-dir", str(voices), "add"]
    clip = str(write(tmp_path / "clip.wav", tone(2.0, SR)))
    calls = [([*add, name, clip, "--transcript", "Hello."], "not a valid profile name|reserved") for name in BAD_NAMES]
    for case in ("PNG named .wav", "zero-length", "an hour long", "0 channels"):
        make, words = BROKEN[case]
        calls.append(([*add, "Alice", str(make(tmp_path)), "--transcript", "Hello."], re.escape(words[-1])))
    big = tmp_path / "big.txt"
    big.write_text("\n".join(f"A: line {i}" for i in range(10_000)))
    calls.append((["render", str(big), "--profiles-dir", str(voices), "--model", "csm-1b"], "the limit is 500"))
    spoof = tmp_path / "spoof.txt"
    spoof.write_text("\u202eecilA: hello\n", encoding="utf-8")
    calls.append((["render", str(spoof), "--profiles-dir", str(voices)], "control characters"))
    before = tree(tmp_path)
    t0 = time.perf_counter()
    for argv, words in calls:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err and re.search(words, err), (argv, err)
    assert time.perf_counter() - t0 < 10.0  # every refusal comes before any model or heavy decoding
    assert set(tree(tmp_path)) - set(before) <= {"voices", "voices/.lock"}
    assert not [p for p in tmp_path.rglob("*") if p.name == "passwd"]


def test_cli_converts_a_many_channel_high_rate_file(tmp_path, capsys, offline):
    x = np.tile(tone(2.0, 96_000)[:, None], (1, 8))
    path = write(tmp_path / "eight.flac", x, 96_000)
    argv = ["profiles", "--profiles-dir", str(tmp_path / "v"), "add", "Wide", str(path), "--transcript", "Hi."]
    assert cli(argv) == 0
    assert "Wide" in capsys.readouterr().out


def test_cli_import_refuses_a_traversal_archive(tmp_path, capsys, offline):
    evil = tmp_path / "evil.csmvoice"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr(PROFILE_FILE, '{"name": "X", "transcript": "x"}')
        zf.writestr(REFERENCE_FILE, wav_bytes(tone(2.0, SR)))
        zf.writestr("../../escaped.txt", "payload")
    assert cli(["profiles", "--profiles-dir", str(tmp_path / "v"), "import", str(evil)]) == 2
    assert "unsafe member path" in capsys.readouterr().err
    assert not list(tmp_path.rglob("escaped.txt"))


# ---- the web API -------------------------------------------------------------------------------
def _api_error(client, *args, api_name: str) -> str:
    with pytest.raises(Exception) as info:
        client.predict(*args, api_name=api_name)
    return str(info.value)


def _raw_call(url: str, name: str, data: list) -> str:
    """The answer of one call through Gradio's REST API, with the arguments as JSON escapes (ASCII)."""
    import json

    import httpx

    posted = httpx.post(f"{url}gradio_api/call/{name}", content=json.dumps({"data": data}, ensure_ascii=True),
                        headers={"Content-Type": "application/json"})
    return httpx.get(f"{url}gradio_api/call/{name}/{posted.json()['event_id']}", timeout=60).text


def test_the_app_answers_hostile_calls_with_messages_and_keeps_serving(running_app, tmp_path):
    from gradio_client import Client, handle_file

    url, studio = running_app
    client = Client(url, verbose=False)
    key = "hostile-visitor-01"
    app_root = studio.profiles_root.parent
    before = tree(app_root, skip=studio.profiles_root)
    clip = handle_file(str(write(tmp_path / "clip.wav", tone(2.0, SR))))

    for case in ("header cut in half", "zero-length", "NaN samples", "PNG named .wav", "an hour long", "rate of 1 Hz"):
        make, words = BROKEN[case]
        message = _api_error(client, key, handle_file(str(make(tmp_path))), "words", "Alice", api_name="/add_profile")
        assert all(w in message for w in words), (case, message)
    for name in BAD_NAMES[:-1]:
        if not name:  # the app asks for a name before looking at it
            continue
        message = _api_error(client, key, clip, "words", name, api_name="/add_profile")
        assert "not a valid profile name" in message or "reserved device name" in message, (name, message)
    assert "limit is 5000" in _api_error(client, key, clip, "w " * 3000, "Alice", api_name="/add_profile")

    evil = tmp_path / "evil.csmvoice"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr(PROFILE_FILE, '{"name": "X", "transcript": "x"}')
        zf.writestr(REFERENCE_FILE, wav_bytes(tone(2.0, SR)))
        zf.writestr("../../etc/passwd", "root:x:0:0")
    assert "unsafe member path" in _api_error(client, key, handle_file(str(evil)), "", api_name="/import_profile")

    args = ({"headers": ["speaker", "profile"], "data": []}, 0.9, 50, 1, 1, 0, "conversational")
    t0 = time.perf_counter()
    huge = "\n".join(f"A: line {i}" for i in range(10_000))
    assert "longer than 20000 characters" in _api_error(client, key, huge, *args, api_name="/render_script")
    assert time.perf_counter() - t0 < 10.0
    assert "control characters" in _api_error(client, key, "\u202eecilA: hi", *args, api_name="/render_script")
    assert "limit is 1000" in _api_error(client, key, "A: " + "y" * 1500, *args, api_name="/render_script")
    # gradio_client cannot send an unpaired surrogate (it encodes UTF-8), a page's JSON can
    assert "invalid text" in _raw_call(url, "render_script", [key, "A\ud800: hi", *args])
    assert "write some text" in _raw_call(url, "say", [key, "\udfff\x00", None, 0.9, 50, 1, 1])

    assert tree(app_root, skip=studio.profiles_root) == before  # the hostile calls wrote nothing of ours
    root = studio.library(key).root  # made by the first save: refused saves may leave none at all
    assert not root.exists() or [p.name for p in root.iterdir()] == [".lock"]
    assert not [p for p in app_root.rglob("*") if p.name == "passwd"]

    # still serving: an 8-channel 44.1 kHz clip under a right-to-left name, then one short line with it
    wide = write(tmp_path / "wide.wav", np.tile(tone(2.0, 44_100)[:, None], (1, 8)), 44_100)
    table, _, note = client.predict(key, handle_file(str(wide)), "שלום עולם", "אליס", api_name="/add_profile")
    assert "Saved" in note and [row[0] for row in table["data"]] == ["אליס"]
    mapping = {"headers": ["speaker", "profile"], "data": [["אליס", "אליס"]]}
    _, note, dialogue, *_ = client.predict(key, "אליס: שלום", mapping, 0.9, 50, 1, 1, 0, "conversational",
                                           api_name="/render_script")
    assert note.startswith("Done: 1 line,") and sf.info(dialogue).samplerate == SR
