"""Voice profiles: reference preparation, the on-disk store, its code cache, hostile input, crashes.

No model and no Mimi: a fake encoder derives codes from a hash of the audio and counts its calls.
Child processes import `csm_multi.profiles` without the package `__init__` (which loads the model
stack) so that they start in about two seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from csm_multi import audio as audio_mod
from csm_multi.audio import (
    MAX_REFERENCE_S,
    REFERENCE_PEAK_DBFS,
    TRIM_MARGIN_S,
    load_upload,
    prepare_reference,
)
from csm_multi.config import SAMPLE_RATE, SAMPLES_PER_FRAME
from csm_multi.errors import AudioInputError, ProfileError
from csm_multi.frames import Segment
from csm_multi.profiles import PROFILE_FILE, REFERENCE_FILE, ProfileStore, slugify

REPO = Path(__file__).resolve().parents[1]


# ---- helpers -----------------------------------------------------------------------------------
def speech(seconds: float, sr: int = SAMPLE_RATE, seed: int = 0, amp: float = 0.2) -> np.ndarray:
    """Speech-like test signal: a 150-250 Hz tone plus noise, in 4 Hz syllable-like bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    voice = 0.6 * np.sin(2 * np.pi * (150 + 100 * (seed % 5) / 5) * t) + 0.4 * rng.standard_normal(t.size)
    return (amp * envelope * voice / 1.2).astype(np.float32)


def write(path: Path, samples: np.ndarray, sr: int = SAMPLE_RATE, subtype: str = "PCM_16") -> Path:
    sf.write(str(path), samples, sr, subtype=subtype)
    return path


class FakeEncoder:
    """(S,) float -> (32, S // 1920) codes derived from a hash of the samples; counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        digest = hashlib.sha256(audio.numpy().tobytes()).digest()
        base = torch.tensor(list(digest), dtype=torch.long).view(32, 1)
        return (base * 8 + torch.arange(max(1, audio.numel() // SAMPLES_PER_FRAME))) % 2048


def put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def store(tmp_path) -> ProfileStore:
    return ProfileStore(tmp_path / "store", cache_size=4)


@pytest.fixture
def clip(tmp_path) -> Path:
    return write(tmp_path / "alice.wav", speech(3.0))


def child(code: str, *args: str) -> subprocess.Popen:
    """A Python process running `code` with `csm_multi.profiles` importable (package init skipped)."""
    prelude = textwrap.dedent(f"""
        import sys, time, types
        import numpy as np
        pkg = types.ModuleType("csm_multi")
        pkg.__path__ = [{str(REPO / "csm_multi")!r}]
        sys.modules["csm_multi"] = pkg
        from csm_multi import profiles
        def speech(seconds, seed):
            rng = np.random.default_rng(seed)
            t = np.arange(round(seconds * 24000)) / 24000
            return (0.15 * (0.55 + 0.45 * np.sin(8 * np.pi * t)) * (np.sin(2 * np.pi * 180 * t)
                    + 0.5 * rng.standard_normal(t.size))).astype(np.float32)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # short-lived children: no thread-pool start-up
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---- reference preparation -------------------------------------------------------------------
def test_prepare_reference_trims_silence_and_normalises():
    quiet = speech(2.0, amp=0.03)
    padded = np.concatenate([np.zeros(SAMPLE_RATE), quiet, np.zeros(SAMPLE_RATE // 2)]).astype(np.float32)
    out = prepare_reference(torch.from_numpy(padded))
    assert abs(out.numel() / SAMPLE_RATE - (2.0 + 2 * TRIM_MARGIN_S)) < 0.05
    peak_limit = 10 ** (REFERENCE_PEAK_DBFS / 20)
    assert float(out.abs().max()) <= peak_limit + 1e-6
    loud = float(out.pow(2).mean().sqrt())
    assert loud > 5 * float(torch.from_numpy(quiet).pow(2).mean().sqrt())  # it was made louder
    assert 20 * math.log10(loud) > -24  # near the -20 dBFS target (pauses lower the whole-clip RMS)


def test_prepare_reference_limits_peaks_of_spiky_audio():
    x = speech(2.0, amp=0.05)
    x[SAMPLE_RATE] = 0.9  # one spike: RMS-normalising alone would push it far past full scale
    out = prepare_reference(torch.from_numpy(x))
    assert float(out.abs().max()) == pytest.approx(10 ** (REFERENCE_PEAK_DBFS / 20), rel=1e-4)


@pytest.mark.parametrize(("samples", "message"), [
    (np.zeros(3 * SAMPLE_RATE, np.float32), "silent"),
    (speech(0.5), "at least 1 s"),
    (speech(MAX_REFERENCE_S + 1.0), f"trim it to under {MAX_REFERENCE_S} s"),
    (np.clip(speech(3.0) * 20, -1, 1), "clipped"),
    (np.array([0.1, float("nan")] * SAMPLE_RATE, np.float32), "NaN"),
    (np.zeros(0, np.float32), "empty"),
], ids=["silent", "short", "long", "clipped", "nan", "empty"])
def test_prepare_reference_rejects_unusable_clips(samples, message):
    with pytest.raises(AudioInputError, match=message):
        prepare_reference(torch.from_numpy(samples))


def test_a_constant_offset_is_no_sound_and_is_removed_from_a_voice():
    """A DC offset passes for loudness: a clip of a constant 0.9 is refused as holding no sound, and
    a real voice on an offset is kept with the offset removed (and not taken for clipping)."""
    with pytest.raises(AudioInputError, match=r"holds no sound, only a constant offset of \+0\.90"):
        prepare_reference(torch.full((3 * SAMPLE_RATE,), 0.9))
    out = prepare_reference(torch.from_numpy(speech(3.0) + np.float32(0.5)))
    assert abs(float(out.mean())) < 1e-3 and out.numel() >= 2.9 * SAMPLE_RATE


def test_a_clip_just_under_the_minimum_says_by_how_much():
    with pytest.raises(AudioInputError) as e:  # sound from start to end: nothing is trimmed
        prepare_reference(torch.from_numpy(speech(0.9995)))
    assert "only 0.999 s of sound" in str(e.value) and "1 ms short of the 1 s minimum" in str(e.value)


# ---- uploads -----------------------------------------------------------------------------------
def _corrupt(d: Path) -> Path:
    return put(d / "c.wav", b"RIFF\x10\x00\x00\x00WAVEfmt garbage" + os.urandom(2000))


def _nan_file(d: Path) -> Path:
    x = speech(2.0)
    x[100:200] = np.nan
    return write(d / "n.wav", x, subtype="FLOAT")


BAD_UPLOADS = {
    "corrupt": (_corrupt, "could not read"),
    "empty": (lambda d: put(d / "e.wav", b""), "empty"),
    "silent": (lambda d: write(d / "s.wav", np.zeros(3 * SAMPLE_RATE, np.float32)), "silent"),
    "short": (lambda d: write(d / "short.flac", speech(0.4)), "at least 1 s"),
    "long": (lambda d: write(d / "l.wav", speech(31.0)), "under 30 s"),
    "txt": (lambda d: write(d / "voice.wav", speech(2.0)).rename(d / "voice.txt"), "WAV, FLAC"),
    "nan": (_nan_file, "NaN"),
    "missing": (lambda d: d / "nothing.wav", "does not exist"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_uploads_get_their_own_message_and_save_nothing(tmp_path, store, case):
    make, message = BAD_UPLOADS[case]
    path = make(tmp_path)
    with pytest.raises(AudioInputError, match=message):
        store.create("Alice", path, "Hello there.")
    assert store.list() == []
    assert tree(store.root) <= {".lock"}


def test_upload_size_is_checked_before_reading(tmp_path, monkeypatch, clip):
    monkeypatch.setattr(audio_mod, "MAX_UPLOAD_BYTES", 1000)
    with pytest.raises(AudioInputError, match="the limit is"):
        load_upload(clip)
    with pytest.raises(AudioInputError, match="the limit is"):
        load_upload(clip.read_bytes())


@pytest.mark.parametrize("sr", [8000, 44100, 48000])
def test_other_rates_and_stereo_are_converted(tmp_path, store, sr):
    left, right = speech(2.5, sr=sr, seed=1), speech(2.5, sr=sr, seed=2)
    path = write(tmp_path / f"in{sr}.wav", np.stack([left, right], axis=1), sr=sr)
    loaded = load_upload(path)
    assert loaded.ndim == 1 and loaded.numel() / SAMPLE_RATE == pytest.approx(2.5, abs=1e-3)
    profile = store.create(f"Voice {sr}", path, "Two channels, any rate.")
    assert profile.duration_s == pytest.approx(2.5, abs=0.05)  # the signal fills the clip: nothing trimmed
    info = sf.info(str(store.root / profile.slug / REFERENCE_FILE))
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")


def test_array_inputs_int16_and_gradio_order(store):
    x = speech(2.0, sr=16000)
    pcm = (x * 32767).astype(np.int16)
    a = store.create("From int16", (pcm, 16000), "Hi.")
    b = store.create("From gradio", (16000, pcm), "Hi.")  # gr.Audio(type="numpy") gives (rate, samples)
    assert a.audio_sha256 == b.audio_sha256 and a.duration_s == pytest.approx(2.0, abs=0.05)
    c = store.create("From uint8", ((x * 127 + 128).astype(np.uint8), 16000), "Hi.")
    assert c.duration_s == pytest.approx(2.0, abs=0.05)
    assert float((store.audio("From uint8") - store.audio("From int16")).abs().max()) < 0.02
    with pytest.raises(AudioInputError, match="NaN"):
        store.create("Broken", (np.full(48000, np.nan, np.float32), 24000), "Hi.")


# ---- store basics ------------------------------------------------------------------------------
def test_round_trip_persists_profile_and_codes(tmp_path, clip):
    enc = FakeEncoder()
    first = ProfileStore(tmp_path / "store")
    created = first.create("Alice Smith", clip, "  Hello   there.  ")
    assert (created.slug, created.transcript, created.speaker_id, created.schema) == ("alice-smith", "Hello there.", 0, 1)
    codes = first.codes("Alice Smith", enc, "fake-v1")
    assert codes.shape[0] == 32 and codes.dtype == torch.long and enc.calls == 1

    again = ProfileStore(tmp_path / "store")
    assert again.get("alice smith") == again.get("ALICE-SMITH") == created
    enc2 = FakeEncoder()
    assert torch.equal(again.codes("alice-smith", enc2, "fake-v1"), codes)
    assert enc2.calls == 0 and again.stats()["encodes"] == 0  # read from codes-fake-v1.pt
    assert torch.equal(again.audio("Alice Smith"), first.audio("Alice Smith"))
    # another encoder id never reuses these codes
    again.codes("alice smith", enc2, "other codec/v2")
    assert enc2.calls == 1
    assert (tmp_path / "store" / "alice-smith" / "codes-fake-v1.pt").is_file()
    assert all(p.parent == tmp_path / "store" / "alice-smith" for p in (tmp_path / "store").rglob("codes-*.pt"))


def test_cache_hits_and_segment(store, clip):
    enc = FakeEncoder()
    store.create("Alice", clip, "Hello there.", speaker_id=3)
    a = store.codes("Alice", enc, "fake")
    a[:] = -1  # callers get copies; the cache is not theirs to change
    b = store.codes("alice", enc, "fake")
    assert enc.calls == 1 and (b >= 0).all()
    assert store.stats() == {"hits": 1, "misses": 1, "evictions": 0, "size": 1, "maxsize": 4, "encodes": 1}
    seg = store.segment("ALICE", enc, "fake")
    assert isinstance(seg, Segment) and (seg.speaker, seg.text) == (3, "Hello there.")
    assert torch.equal(seg.codes, b) and enc.calls == 1


def test_set_audio_invalidates_persisted_and_cached_codes(tmp_path, store, clip):
    enc = FakeEncoder()
    store.create("Alice", clip, "Hello there.")
    other_view = ProfileStore(store.root)  # another process's view of the same folder
    old = store.codes("Alice", enc, "fake")
    assert torch.equal(other_view.codes("Alice", enc, "fake"), old) and enc.calls == 1

    before = store.get("Alice")
    after = store.set_audio("Alice", write(tmp_path / "new.wav", speech(4.0, seed=7)))
    assert after.audio_sha256 != before.audio_sha256 and after.duration_s == pytest.approx(4.0, abs=0.05)
    assert after.created == before.created and after.updated >= before.updated
    assert not list((store.root / "alice").glob("codes-*.pt"))
    new = store.codes("Alice", enc, "fake")
    assert enc.calls == 2 and not torch.equal(new, old)
    assert torch.equal(other_view.codes("Alice", enc, "fake"), new)  # its stale entry is never used
    assert enc.calls == 2


def test_lru_evicts_least_recent_and_counts(tmp_path, clip):
    store = ProfileStore(tmp_path / "store", cache_size=1)
    enc = FakeEncoder()
    store.create("A", clip, "one")
    store.create("B", write(tmp_path / "b.wav", speech(2.0, seed=3)), "two")
    store.codes("A", enc, "fake")
    store.codes("B", enc, "fake")
    store.codes("A", enc, "fake")  # evicted, so a miss: served from its codes file
    assert store.stats() == {"hits": 0, "misses": 3, "evictions": 2, "size": 1, "maxsize": 1, "encodes": 2}
    store.codes("A", enc, "fake")
    assert store.stats()["hits"] == 1 and enc.calls == 2
    with pytest.raises(ValueError):
        ProfileStore(tmp_path / "store", cache_size=0)


def test_speaker_ids_lowest_free_then_least_used(tmp_path, store, clip):
    ids = [store.create(f"V{i}", clip, "hi").speaker_id for i in range(3)]
    assert ids == [0, 1, 2]
    store.delete("V1")
    assert store.create("V3", clip, "hi").speaker_id == 1
    assert store.create("V4", clip, "hi", speaker_id=7).speaker_id == 7
    with pytest.raises(ProfileError, match="speaker_id"):
        store.create("V5", clip, "hi", speaker_id=-1)


def test_rename_update_delete(store, clip):
    enc = FakeEncoder()
    created = store.create("Alice", clip, "Hello there.")
    store.codes("Alice", enc, "fake")
    renamed = store.rename("alice", "Bob Jones")
    assert (renamed.name, renamed.slug, renamed.audio_sha256) == ("Bob Jones", "bob-jones", created.audio_sha256)
    assert not (store.root / "alice").exists()
    with pytest.raises(ProfileError, match="no profile named 'Alice'; existing: Bob Jones"):
        store.get("Alice")
    store.codes("bob jones", enc, "fake")
    assert enc.calls == 1  # the codes file moved with the folder
    assert store.rename("Bob Jones", "BOB JONES").slug == "bob-jones"  # case-only rename: same folder

    store.create("Carol", clip, "Hi.")
    with pytest.raises(ProfileError, match="already exists"):
        store.rename("Carol", "bob jones")
    updated = store.update_transcript("carol", "A new   line.")
    assert ProfileStore(store.root).get("Carol").transcript == "A new line." == updated.transcript
    with pytest.raises(ProfileError, match="transcript is empty"):
        store.update_transcript("carol", "   ")

    store.delete("BOB JONES")
    assert [p.name for p in store.list()] == ["Carol"]
    assert sorted(os.listdir(store.root)) == [".lock", "carol"]
    with pytest.raises(ProfileError, match="existing: Carol"):
        store.delete("Bob Jones")


# ---- names -------------------------------------------------------------------------------------
BAD_NAMES = ["../../etc/passwd", "a/b", "a\\b", "CON", "con.txt", "Lpt9", "nul\x00x", "tab\tname", "", "   ",
             ".", "..", "!!!", "x" * 101, "con!"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_rejected_and_nothing_is_written(tmp_path, store, clip, name):
    before = tree(tmp_path)
    with pytest.raises(ProfileError, match="reserved|not a valid profile name"):
        store.create(name, clip, "Hello there.")
    assert tree(tmp_path) == before
    with pytest.raises(ProfileError):
        store.get(name)


def test_slugs():
    assert slugify("  Alice   Smith ") == "alice-smith"
    assert slugify("José-María") == "jose-maria"
    assert slugify("A--B__c!!") == "a-b__c"
    assert slugify("..hidden") == "hidden"
    assert slugify("日本語の声").startswith("voice-")
    assert len(slugify("Ab" * 50)) == 64


def test_duplicate_names_are_refused(store, clip, tmp_path):
    original = store.create("Alice", clip, "Hello there.")
    for name in ["Alice", "alice", " ALICE ", "Alice!"]:
        with pytest.raises(ProfileError, match="already (exists|uses)"):
            store.create(name, write(tmp_path / "x.wav", speech(2.0, seed=9)), "Other text.")
    assert store.list() == [original]


def test_names_that_differ_only_in_invisible_characters_are_one_name(store, clip, tmp_path):
    """A right-to-left mark inside a Hebrew name, or a zero-width joiner, does not show: the two names look
    the same in the list, so the second is refused (they had been saved side by side, in two folders)."""
    store.create("שלוםעולם", clip, "Hello there.")
    for name in ["שלום\u200fעולם", "\u200eשלוםעולם", "שלום\u200dעולם", "\ufeffשלוםעולם"]:
        with pytest.raises(ProfileError, match="looks the same"):
            store.create(name, write(tmp_path / "x.wav", speech(2.0, seed=9)), "Other text.")
    assert [p.name for p in store.list()] == ["שלוםעולם"]
    store.create("שלום עולם", write(tmp_path / "y.wav", speech(2.0, seed=8)), "A space shows.")  # visibly different


def test_profile_folders_resolving_outside_root_are_ignored(tmp_path, store, clip):
    outside = tmp_path / "outside"
    outside.mkdir()
    other = ProfileStore(outside)
    other.create("Eve", clip, "Hi.")
    (store.root / "eve").symlink_to(outside / "eve")
    assert store.list() == []
    with pytest.raises(ProfileError, match="no profile named"):
        store.get("eve")


def test_broken_folders_are_skipped_and_logged(store, clip, caplog):
    store.create("Good", clip, "Fine.")
    (store.root / "no-json").mkdir()
    (store.root / "bad-json").mkdir()
    (store.root / "bad-json" / PROFILE_FILE).write_text("{not json")
    (store.root / "future").mkdir()
    (store.root / "future" / PROFILE_FILE).write_text(json.dumps({"schema": 99, "name": "F", "transcript": "x"}))
    (store.root / "no-audio").mkdir()
    (store.root / "no-audio" / PROFILE_FILE).write_text(json.dumps({"name": "NA", "transcript": "x", "speaker": 0}))
    with caplog.at_level(logging.WARNING, logger="csm_multi.profiles"):
        assert [p.name for p in store.list()] == ["Good"]
    assert sum("skipping profile folder" in r.message for r in caplog.records) == 4


def test_schema_0_profile_loads_and_upgrades(store, clip):
    folder = store.root / "old-voice"
    folder.mkdir()
    write(folder / REFERENCE_FILE, speech(2.0))
    (folder / PROFILE_FILE).write_text(json.dumps({"name": "Old Voice", "transcript": "From before.", "speaker": 3}))
    old = store.get("old voice")
    assert (old.schema, old.speaker_id, old.transcript, old.slug) == (0, 3, "From before.", "old-voice")
    assert old.duration_s == pytest.approx(2.0, abs=1e-3) and len(old.audio_sha256) == 64
    assert store.codes("Old Voice", FakeEncoder(), "fake").shape == (32, 25)
    store.update_transcript("Old Voice", "Edited.")
    data = json.loads((folder / PROFILE_FILE).read_text())
    assert (data["schema"], data["speaker_id"], data["audio_sha256"]) == (1, 3, old.audio_sha256)
    assert store.get("old-voice").schema == 1


# ---- export / import ---------------------------------------------------------------------------
def test_export_import_round_trip(tmp_path, store, clip):
    made = store.create("Alice", clip, "Hello there.", speaker_id=4)
    exported = store.export("Alice", tmp_path)
    assert exported == tmp_path / "alice.csmvoice"
    assert sorted(zipfile.ZipFile(exported).namelist()) == [PROFILE_FILE, REFERENCE_FILE]

    elsewhere = ProfileStore(tmp_path / "elsewhere")
    got = elsewhere.import_file(exported)
    assert (got.name, got.transcript, got.speaker_id) == ("Alice", "Hello there.", 4)
    assert got.duration_s == pytest.approx(made.duration_s, abs=0.05)
    a, b = store.audio("Alice"), elsewhere.audio("Alice")
    n = min(a.numel(), b.numel())
    assert float((a[:n] - b[:n]).abs().max()) < 0.01  # re-prepared, so equal up to re-quantisation

    with pytest.raises(ProfileError, match="already exists; pass a new name"):
        store.import_file(exported)
    copy = store.import_file(exported, name="Alice 2")
    assert copy.slug == "alice-2" and copy.speaker_id != made.speaker_id


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def good_members(store, clip, tmp_path) -> dict[str, bytes]:
    store.create("Alice", clip, "Hello there.")
    with zipfile.ZipFile(store.export("Alice", tmp_path / "good")) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    store.delete("Alice")
    return members


MALICIOUS = {
    "traversal": (lambda m: {**m, "../evil": b"x"}, "unsafe member path"),
    "traversal-only": (lambda m: {"../profile.json": m[PROFILE_FILE], REFERENCE_FILE: m[REFERENCE_FILE]}, "unsafe"),
    "absolute": (lambda m: {"/tmp/evil.json": b"{}", **m}, "unsafe member path"),
    "backslash": (lambda m: {"..\\evil": b"x", **m}, "unsafe member path"),
    "extra": (lambda m: {**m, "notes.txt": b"hi"}, "unexpected member"),
    "missing": (lambda m: {PROFILE_FILE: m[PROFILE_FILE]}, "exactly"),
    "oversized": (lambda m: {PROFILE_FILE: m[PROFILE_FILE], REFERENCE_FILE: bytes(17 << 20)},
                  r"too large \(17,825,792 bytes; the limit is [\d,]+\)"),
    "bad-json": (lambda m: {PROFILE_FILE: b"[1, 2]", REFERENCE_FILE: m[REFERENCE_FILE]}, "JSON object"),
    "bad-audio": (lambda m: {PROFILE_FILE: m[PROFILE_FILE], REFERENCE_FILE: b"RIFF junk"}, "unusable"),
}


@pytest.mark.parametrize("case", MALICIOUS)
def test_malicious_imports_are_rejected(tmp_path, store, good_members, case):
    build, message = MALICIOUS[case]
    bad = _zip(tmp_path / f"{case}.csmvoice", build(good_members))
    before = tree(tmp_path)
    with pytest.raises(ProfileError, match=message):
        store.import_file(bad)
    assert tree(tmp_path) == before and store.list() == []


def test_non_zip_and_huge_imports_are_rejected(tmp_path, store, monkeypatch):
    (tmp_path / "fake.csmvoice").write_text("just text")
    with pytest.raises(ProfileError, match="not a readable .csmvoice"):
        store.import_file(tmp_path / "fake.csmvoice")
    monkeypatch.setattr("csm_multi.profiles.MAX_IMPORT_BYTES", 4)
    with pytest.raises(ProfileError, match="at most"):
        store.import_file(tmp_path / "fake.csmvoice")
    assert store.list() == []


# ---- crashes and concurrency -------------------------------------------------------------------
@pytest.mark.slow
def test_writer_killed_mid_save_leaves_a_loadable_store(tmp_path):
    root = tmp_path / "store"
    proc = child("""
        root = sys.argv[1]
        write = profiles._atomic_write
        def slow_write(path, data):  # the 6th profile hangs between its audio and its profile.json
            if path.name == "profile.json" and "p5" in ready:
                print("stuck", flush=True)
                time.sleep(600)
            time.sleep(0.005)
            write(path, data)
        profiles._atomic_write = slow_write
        ready = []
        store = profiles.ProfileStore(root)
        for i in range(6):
            ready.append(f"p{i}")
            store.create(f"p{i}", (speech(1.5, i), 24000), f"line {i}")
            print(f"saved p{i}", flush=True)
    """, str(root))
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.startswith("stuck"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert lines == [f"saved p{i}" for i in range(5)] + ["stuck"], proc.stderr.read()

    leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / REFERENCE_FILE).exists()
    store = ProfileStore(root)  # the dead writer's lock is gone with it: this does not block
    assert not leftovers[0].exists()  # made under the lock this store now holds, so its writer is dead
    assert [p.name for p in store.list()] == [f"p{i}" for i in range(5)]
    assert all(store.codes(f"p{i}", FakeEncoder(), "fake").shape[0] == 32 for i in range(5))


@pytest.mark.slow
def test_two_processes_creating_at_once_lose_nothing(tmp_path):
    root, go = tmp_path / "store", tmp_path / "go"
    code = """
        root, tag, go = sys.argv[1:]
        write = profiles._atomic_write
        profiles._atomic_write = lambda path, data: (time.sleep(0.003), write(path, data))  # widen races
        store = profiles.ProfileStore(root)
        print("ready", flush=True)
        while not __import__("os").path.exists(go):
            time.sleep(0.01)
        for i in range(10):
            store.create(f"{tag}-{i}", (speech(1.2, i), 24000), f"{tag} line {i}")
        try:
            store.create("shared", (speech(1.2, 99), 24000), tag)
            print("shared: won")
        except profiles.ProfileError as e:
            print("shared: refused", e)
    """
    procs = [child(code, str(root), tag, str(go)) for tag in ("a", "b")]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2  # both imported and waiting
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert sorted(out.split()[1] for out, _ in outs) == ["refused", "won"]

    profiles = ProfileStore(root).list()
    names = sorted(p.name for p in profiles)
    assert names == sorted([f"{t}-{i}" for t in "ab" for i in range(10)] + ["shared"])
    # ids are assigned under the lock: 0..9 once, then the least used again
    ids = sorted(p.speaker_id for p in profiles)
    assert ids == sorted([*range(10), *range(10), 0])


def test_codes_read_during_an_audio_edit_do_not_stay_cached(tmp_path, monkeypatch):
    """A reader between set_audio's new profile.json and its new reference.wav encodes the old clip;
    those codes must not be cached under the new audio's hash (found by an audit)."""
    import os
    import threading
    import time

    import csm_multi.profiles as profiles_module

    store = ProfileStore(tmp_path, cache_size=4)

    def tone(f):
        t = np.arange(48_000) / 24_000
        return (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), 24_000

    def encoder(audio):  # the codes say which clip they came from (zero crossings)
        return torch.full((32, 3), int((audio[1:] * audio[:-1] < 0).sum()) % 2048, dtype=torch.long)

    store.create("Alice", tone(220), "hello")
    store.codes("Alice", encoder, "e1")
    real_replace = os.replace

    def slow_replace(a, b):  # widens the window between the two files of an edit
        time.sleep(0.5)
        return real_replace(a, b)

    monkeypatch.setattr(profiles_module.os, "replace", slow_replace)
    old = store.get("Alice").audio_sha256
    writer = threading.Thread(target=store.set_audio, args=("Alice", (tone(440)[0] * 0.5, 24_000)))
    writer.start()
    deadline = time.time() + 10
    while store.get("Alice").audio_sha256 == old and time.time() < deadline:
        time.sleep(0.005)
    store.codes("Alice", encoder, "e1")  # mid-edit: may see the old clip
    writer.join()
    monkeypatch.setattr(profiles_module.os, "replace", real_replace)
    assert torch.equal(store.codes("Alice", encoder, "e1"), encoder(store.audio("Alice")))
