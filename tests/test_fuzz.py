"""Fuzzing the untrusted-input boundaries: the audio loader and the `.csmvoice` importer.

Whatever bytes arrive, the loader returns a finite (S,) float32 tensor or raises `AudioInputError`,
and the importer adds a valid profile or raises `ProfileError` / `AudioInputError`, writing nothing
outside the store. Any other exception is a bug the app would show as a stack trace.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csm_multi.audio import MAX_REFERENCE_S, MIN_REFERENCE_S, load_audio, load_upload
from csm_multi.errors import AudioInputError, ProfileError
from csm_multi.profiles import PROFILE_FILE, REFERENCE_FILE, ProfileStore

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _encoded(fmt: str, subtype: str | None = None, sr: int = 16_000, channels: int = 1) -> bytes:
    t = np.arange(sr // 10) / sr  # 0.1 s keeps every example fast
    x = 0.3 * np.sin(2 * np.pi * 220 * t)
    buf = io.BytesIO()
    sf.write(buf, np.stack([x] * channels, axis=1), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


VALID_FILES = [_encoded("WAV", "PCM_16"), _encoded("WAV", "FLOAT", 44_100, 2), _encoded("WAV", "PCM_U8", 8_000),
               _encoded("FLAC", None, 48_000), _encoded("OGG", "VORBIS", 22_050)]


@st.composite
def mutated_audio(draw) -> bytes:
    """A valid small WAV/FLAC/OGG with bytes overwritten (mostly in the header) and maybe truncated."""
    data = bytearray(draw(st.sampled_from(VALID_FILES)))
    for _ in range(draw(st.integers(1, 8))):
        # headers sit in the first ~100 bytes; that is where a flip changes rates, sizes and formats
        at = draw(st.one_of(st.integers(0, 100), st.integers(0, len(data) - 1)))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def forged_wav(draw) -> bytes:
    """A WAV whose header fields (rate, channels, sample format, sizes) are arbitrary, with a short payload."""
    rate = draw(st.one_of(st.sampled_from([1, 3999, 8000, 11025, 44101, 47999, 192001, 384001]),
                          st.integers(1, 10**6), st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):  # a coherent PCM or float header, so that most of these get decoded
        tag, bits = draw(st.sampled_from([(1, 8), (1, 16), (1, 24), (1, 32), (3, 32), (3, 64)]))
        channels = draw(st.integers(1, 9))
    else:
        tag = draw(st.sampled_from([1, 3, 0xFFFE, draw(st.integers(0, 0xFFFF))]))
        channels = draw(st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)))
        bits = draw(st.sampled_from([8, 16, 24, 32, 64, 0, 12]))
    payload = draw(st.binary(max_size=2048))
    data_size = draw(st.one_of(st.just(len(payload)), st.integers(0, 2**32 - 1)))
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * align) & 0xFFFFFFFF, align & 0xFFFF, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_size) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _check_loaded(load, source) -> None:
    try:
        audio = load(source)
    except AudioInputError as e:
        assert str(e) and "Traceback" not in str(e)
        return
    assert isinstance(audio, torch.Tensor) and audio.ndim == 1 and audio.dtype == torch.float32
    assert bool(torch.isfinite(audio).all())


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_load_or_raise_audio_input_error(data):
    _check_loaded(load_upload, data)


@FUZZ
@given(mutated_audio())
def test_mutated_audio_files_load_or_raise_audio_input_error(data):
    _check_loaded(load_audio, data)


@FUZZ
@given(forged_wav())
def test_forged_wav_headers_load_or_raise_audio_input_error(data):
    _check_loaded(load_audio, data)


@settings(max_examples=40, deadline=None)
@given(mutated_audio())
def test_mutated_audio_files_on_disk_load_or_raise_audio_input_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "upload.wav"
    path.write_bytes(data)
    _check_loaded(load_upload, path)


# ---- the .csmvoice importer -------------------------------------------------------------------
class Members(dict):
    """Archive members; a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"<members {sorted(self)}>"


@pytest.fixture(scope="module")
def voice(tmp_path_factory) -> dict[str, bytes]:
    """The members of a valid export: {"profile.json": ..., "reference.wav": ...}."""
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    t = np.arange(24_000 * 2) / 24_000
    voiced = np.sin(2 * np.pi * 180 * t) + 0.3 * rng.standard_normal(t.size)
    x = 0.2 * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)) * voiced
    store = ProfileStore(root / "store")
    store.create("Alice", (x.astype(np.float32), 24_000), "Hello there.")
    with zipfile.ZipFile(store.export("Alice", root)) as zf:
        return Members({n: zf.read(n) for n in zf.namelist()})


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A store nested two levels inside a folder that the test watches for anything written outside it."""
    base = tmp_path_factory.mktemp("sandbox")
    (base / "neighbour").mkdir()
    (base / "neighbour" / "keep.txt").write_text("untouched")
    store = ProfileStore(base / "a" / "b" / "store")
    return base, store


def _tree(base: Path, skip: Path) -> dict[str, int]:
    return {str(p.relative_to(base)): p.stat().st_size for p in base.rglob("*") if skip not in (p, *p.parents)}


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _declare_size(archive: bytes, size: int) -> bytes:
    """Rewrite every member's declared uncompressed size (local and central headers) to `size`."""
    data = bytearray(archive)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        while at >= 0:
            data[at + offset:at + offset + 4] = struct.pack("<I", size)
            at = data.find(signature, at + 4)
    return bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)
names = st.sampled_from(["Bob", "Zoë", "אליס", "../../etc/passwd", "CON", "a/b", "x" * 200, "nul\x00", "\u202eecilA"])
profile_fields = st.fixed_dictionaries(
    {"name": st.one_of(names, st.text(max_size=120), json_values),
     "transcript": st.one_of(st.just("Hello there."), st.text(max_size=60), json_values)},
    optional={"schema": json_values, "speaker_id": json_values, "speaker": json_values, "slug": json_values},
)
evil_names = st.sampled_from(["../x", "../../escaped.txt", "a/../../x", "/tmp/csm-fuzz-abs", "..\\x", "C:/x", "/",
                              "profile.json/../x", "./reference.wav", "PROFILE.JSON", "reference.wav\x00.txt"])


@st.composite
def hostile_voice_files(draw, voice: dict[str, bytes], base: Path) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "json", "json-fields", "extra", "absolute", "huge", "audio"]))
    good = [(PROFILE_FILE, voice[PROFILE_FILE]), (REFERENCE_FILE, voice[REFERENCE_FILE])]
    if kind in ("flip", "truncate"):
        data = bytearray(_zip(good))
        if kind == "flip":
            for _ in range(draw(st.integers(1, 6))):
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        else:
            data = data[: draw(st.integers(0, len(data) - 1))]
        return bytes(data)
    if kind == "json":
        return _zip([(PROFILE_FILE, json.dumps(draw(json_values)).encode()), good[1]])
    if kind == "json-fields":
        return _zip([(PROFILE_FILE, json.dumps(draw(profile_fields)).encode()), good[1]])
    if kind == "extra":
        return _zip([*good, (draw(evil_names), b"payload")])
    if kind == "absolute":
        return _zip([*good, (str(base / "escaped-absolute.txt"), b"payload")])
    if kind == "huge":
        return _declare_size(_zip(good), draw(st.sampled_from([2**31 - 1, 2**32 - 1, 17 << 20, 0])))
    reference = bytearray(voice[REFERENCE_FILE])
    for _ in range(draw(st.integers(1, 6))):
        reference[draw(st.integers(0, 100))] = draw(st.integers(0, 255))
    return _zip([good[0], (REFERENCE_FILE, bytes(reference[: draw(st.integers(0, len(reference)))]))])


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile cuts names at NUL: a duplicate is one of our cases
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_hostile_voice_files_import_or_raise_and_write_nothing_outside(voice, sandbox, data):
    base, store = sandbox
    archive = data.draw(hostile_voice_files(voice, base))
    incoming = base / "incoming.csmvoice"
    incoming.write_bytes(archive)
    before = _tree(base, store.root)
    try:
        profile = store.import_file(incoming)
    except (ProfileError, AudioInputError) as e:
        assert str(e) and "Traceback" not in str(e)
    else:  # accepted: it must be a complete, usable profile; removed so the next example can import again
        got = store.get(profile.name)
        assert got == profile and got.transcript.strip()
        audio = store.audio(profile.name)
        assert MIN_REFERENCE_S <= audio.numel() / 24_000 <= MAX_REFERENCE_S and bool(torch.isfinite(audio).all())
        store.delete(profile.name)
    assert _tree(base, store.root) == before
    assert sorted(p.name for p in store.root.iterdir()) == [".lock"]
