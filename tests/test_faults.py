"""Faults: the app SIGKILLed mid-render and mid-save, then restarted; a full disk under the profile
store, the render outputs and the running app; a real full tmpfs where the machine allows mounting
one; temp leftovers on storage where `flock` does not work.

The full disk is simulated by patching `os.fsync` (every store file is fsynced before it is
renamed into place) and the audio writer of render outputs to raise ENOSPC after a number of
files, so the partial temp files a real full disk leaves behind are really there to clean up.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from csm_multi import profiles as profiles_mod
from csm_multi import render as render_mod
from csm_multi.errors import CsmError, ProfileError
from csm_multi.profiles import STALE_TMP_S, ProfileStore, disk_full_errors
from csm_multi.render import Clip, RenderConfig, RenderResult
from csm_multi.script import ScriptLine
from csm_multi.stress import AppServer
from csm_multi.studio import Studio

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

DISK_FULL = "disk is full"
SR = 24_000


def clip(path: Path, freq: float, seconds: float = 1.2) -> str:
    t = np.arange(int(SR * seconds)) / SR
    sf.write(str(path), 0.2 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)), SR)
    return str(path)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders); the lock file is not content."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


def temp_litter(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".tmp")]


def fake_encoder(audio: torch.Tensor) -> torch.Tensor:
    return (torch.arange(32 * 4).view(32, 4) + int(audio.abs().sum() * 1000)) % 2048


# ---- SIGKILL and restart -------------------------------------------------------------------------
def _watch_and_freeze(server: AppServer, library: Path, deadline: float) -> Path | None:
    """Poll `library` for a profile being built (`.tmp-*` folder); SIGSTOP the server and return
    the folder if it is still there once the server is frozen (so the kill lands mid-save)."""
    while time.monotonic() < deadline:
        for entry in os.scandir(library) if library.exists() else ():
            if entry.name.startswith(".tmp-") and entry.is_dir():
                server.proc.send_signal(signal.SIGSTOP)
                if os.path.isdir(entry.path):
                    return Path(entry.path)
                server.proc.send_signal(signal.SIGCONT)  # it finished in between: try the next save
    return None


@pytest.mark.slow
def test_app_killed_mid_render_and_mid_save_restarts_clean(tmp_path):
    profiles, tmp = tmp_path / "profiles", tmp_path / "tmp"
    key = "faults-visitor-01"
    mapping = {"headers": ["speaker", "profile"], "data": [["Alice", "Alice"], ["Bob", "Bob"]]}
    library = profiles / f"visitor-{key}"
    with AppServer(profiles, tmp) as server:
        client = Client(server.url, verbose=False)
        client.predict(key, handle_file(clip(tmp_path / "a.wav", 200)), "hello there", "Alice", api_name="/add_profile")
        client.predict(key, handle_file(clip(tmp_path / "b.wav", 260)), "good day", "Bob", api_name="/add_profile")
        before = {name: sf.read(client.predict(key, name, api_name="/preview_profile"))[0] for name in ("Alice", "Bob")}

        # a render long enough to be killed in the middle: wait for its first frames
        render = client.submit(key, "Alice: " + "and on and on " * 20, mapping, 0.9, 50, 1, 30, 0, "conversational",
                               api_name="/render_script")
        deadline = time.monotonic() + 120
        while not (render.status().progress_data or render.done()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert render.status().progress_data and not render.done(), "the render never reported progress"

        # meanwhile a loop of saves of a 30 s clip (the largest write); freeze the server inside one
        saved, stop = [], threading.Event()
        big = clip(tmp_path / "big.wav", 300, seconds=30)

        def saves():
            saver = Client(server.url, verbose=False)
            for i in range(100):
                if stop.is_set():
                    return
                try:
                    saver.predict(key, handle_file(big), "a long clip", f"Extra {i}", api_name="/add_profile")
                except Exception:  # the server is gone: that is the point
                    return
                saved.append(f"Extra {i}")

        saver = threading.Thread(target=saves, daemon=True)
        saver.start()
        building = _watch_and_freeze(server, library, time.monotonic() + 90)
        stop.set()
        in_flight = render.done()
        server.kill()
        assert building is not None, "no save was caught in the middle within 90 s"
        assert not in_flight, "the render finished before the kill"
        saver.join(30)

    assert building.exists() and temp_litter(profiles)  # a half-built profile was left behind
    outputs = tmp / "csm-multi-outputs"
    assert not list(outputs.glob("render-*")), "a killed render must not leave an output folder"
    old = outputs / "render-partial-from-a-crash"  # what a kill during write_outputs leaves: pruned after 1 h
    old.mkdir(parents=True)
    (old / "dialogue.wav").write_bytes(b"RIFF")
    os.utime(old, (time.time() - 7200,) * 2)

    with AppServer(profiles, tmp) as server:
        client = Client(server.url, verbose=False)
        table, _ = client.predict(key, api_name="/list_profiles")
        expected = sorted(["Alice", "Bob", *saved], key=str.casefold)
        assert [row[0] for row in table["data"]] == expected  # every saved profile, nothing half-made
        assert temp_litter(profiles) == []  # opening the library removed the dead writer's leftovers
        for name in expected:
            audio, sr = sf.read(client.predict(key, name, api_name="/preview_profile"))
            assert sr == SR and len(audio) > SR
            if name in before:
                assert np.array_equal(audio, before[name])
        _, note, dialogue, *_ = client.predict(key, "Alice: Hi Bob.\nBob: Hello!", mapping, 0.9, 50, 3, 1, 0,
                                               "conversational", api_name="/render_script")
        assert note.startswith("Done: 2 lines") and sf.info(dialogue).frames > 0
        assert not old.exists() and len(list(outputs.glob("render-*"))) == 1


# ---- full disk: the profile store ----------------------------------------------------------------
class FullDisk:
    """`os.fsync` of regular files raises ENOSPC after the first `files_that_fit` (a real full disk
    fails at write, fsync or close; what is left on disk is the same partial temp file)."""

    def __init__(self, monkeypatch, files_that_fit: int = 0, error: int = errno.ENOSPC):
        self.left, self.error, self.real = files_that_fit, error, os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            if self.left <= 0:
                raise OSError(self.error, os.strerror(self.error))
            self.left -= 1
        self.real(fd)


@pytest.fixture
def store(tmp_path):
    s = ProfileStore(tmp_path / "store")
    s.create("Alice", (np.asarray(sf.read(clip(tmp_path / "a.wav", 200))[0], np.float32), SR), "hello there")
    s.create("Bob", (np.asarray(sf.read(clip(tmp_path / "b.wav", 260))[0], np.float32), SR), "good day")
    s.codes("Alice", fake_encoder, "fake")
    return s


OPERATIONS = {
    "create": lambda s, tmp: s.create("Carol", clip(tmp / "c.wav", 320), "new voice"),
    "rename": lambda s, tmp: s.rename("Alice", "Alicia"),
    "rename-same-slug": lambda s, tmp: s.rename("Alice", "ALICE"),
    "import": lambda s, tmp: s.import_file(tmp / "bob.csmvoice", "Imported Bob"),
    "update_transcript": lambda s, tmp: s.update_transcript("Bob", "good evening"),
}
CASES = [(op, 0) for op in OPERATIONS] + [("create", 1), ("import", 1)]  # 1: the audio fits, profile.json not


@pytest.mark.parametrize(("op", "files_that_fit"), CASES)
def test_full_disk_leaves_the_store_as_it_was(store, tmp_path, monkeypatch, op, files_that_fit):
    store.export("Bob", tmp_path / "bob.csmvoice")  # made while there is space
    before = snapshot(store.root)
    listed = store.list()
    FullDisk(monkeypatch, files_that_fit)
    with pytest.raises(ProfileError, match=DISK_FULL) as info:
        OPERATIONS[op](store, tmp_path)
    assert "free some space and try again" in str(info.value)
    assert snapshot(store.root) == before and temp_litter(store.root) == []
    monkeypatch.undo()
    reopened = ProfileStore(store.root)
    assert reopened.list() == listed
    assert reopened.codes("Alice", fake_encoder, "fake").shape == (32, 4)


@pytest.mark.parametrize("files_that_fit", [0, 1])  # 1: the new clip fits, profile.json does not
def test_replacing_a_clip_on_a_full_disk_keeps_the_old_clip(store, tmp_path, monkeypatch, files_that_fit):
    """Only the codes cache is dropped first (so no crash can pair old codes with a new clip)."""
    before = {k: v for k, v in snapshot(store.root).items() if "codes-" not in str(k)}
    listed = store.list()
    FullDisk(monkeypatch, files_that_fit)
    with pytest.raises(ProfileError, match=DISK_FULL):
        store.set_audio("Alice", clip(tmp_path / "new.wav", 330))
    after = snapshot(store.root)
    assert {k: v for k, v in after.items() if "codes-" not in str(k)} == before and temp_litter(store.root) == []
    monkeypatch.undo()
    reopened = ProfileStore(store.root)
    assert reopened.list() == listed
    assert torch.equal(reopened.audio("Alice"), store.audio("Alice"))
    assert reopened.codes("Alice", fake_encoder, "fake").shape == (32, 4)  # re-encoded from the kept clip


def test_quota_exceeded_is_a_full_disk_too(store, tmp_path, monkeypatch):
    FullDisk(monkeypatch, error=errno.EDQUOT)
    with pytest.raises(ProfileError, match=DISK_FULL):
        store.create("Carol", clip(tmp_path / "c.wav", 320), "new voice")


def test_other_os_errors_are_not_called_a_full_disk():
    with pytest.raises(PermissionError), disk_full_errors():
        raise PermissionError(errno.EACCES, "Permission denied")


def test_export_to_a_full_disk(store, tmp_path, monkeypatch):
    FullDisk(monkeypatch)
    with pytest.raises(ProfileError, match=DISK_FULL):
        store.export("Alice", tmp_path)
    assert temp_litter(tmp_path) == [] and not list(tmp_path.glob("*.csmvoice"))


def test_codes_are_served_when_they_cannot_be_persisted(store, monkeypatch, caplog):
    before = snapshot(store.root)
    FullDisk(monkeypatch)
    codes = store.codes("Bob", fake_encoder, "fake")  # the disk is full: still usable, just not cached on disk
    assert codes.shape == (32, 4) and "could not persist codes" in caplog.text
    assert snapshot(store.root) == before


# ---- full disk: render outputs -------------------------------------------------------------------
def _result() -> RenderResult:
    clips = [Clip(index=i, line=ScriptLine(number=i + 1, speaker=spk, text="hi"), speaker_id=i, profile=None,
                  audio=torch.zeros(SR // 2), codes=torch.zeros(32, 6, dtype=torch.long), seed=i, watermarked=False)
             for i, spk in enumerate(["Alice", "Bob"])]
    return RenderResult(clips, RenderConfig(pause_ms=100))


def _studio(tmp_path: Path) -> Studio:
    return Studio(SimpleNamespace(device=torch.device("cpu")), tmp_path / "profiles", outputs_root=tmp_path)


@pytest.mark.parametrize("files_that_fit", [0, 3])
def test_render_outputs_on_a_full_disk_leave_no_partial_folder(tmp_path, monkeypatch, files_that_fit):
    studio = _studio(tmp_path)
    real, written = render_mod.save_audio, []

    def save_audio(path, audio, sample_rate=SR):
        if len(written) >= files_that_fit:
            Path(path).write_bytes(b"RIFF\x00\x00")  # what a full disk leaves: a truncated file
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        return real(path, audio, sample_rate)

    monkeypatch.setattr(render_mod, "save_audio", save_audio)
    with pytest.raises(CsmError, match=DISK_FULL):
        studio.write_outputs(_result())
    assert list(studio.outputs_root.iterdir()) == []
    monkeypatch.undo()
    paths = studio.write_outputs(_result())  # space is back: it works again
    assert sf.info(str(paths["dialogue"])).frames == SR + SR // 10


def test_a_real_write_failure_in_save_audio_reads_as_disk_full(tmp_path, monkeypatch):
    """save_audio encodes in memory and writes the bytes itself, so ENOSPC keeps its errno
    (libsndfile writing to disk would report only "System error.")."""
    studio = _studio(tmp_path)

    def write_bytes(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(OSError) as e:
        render_mod.save_audio(tmp_path / "x.flac", torch.zeros(SR))
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(CsmError, match=DISK_FULL):
        studio.write_outputs(_result())
    assert list(studio.outputs_root.iterdir()) == []


def test_an_encoder_failure_is_reported_and_leaves_no_folder(tmp_path, monkeypatch):
    studio = _studio(tmp_path)

    def save_audio(path, audio, sample_rate=SR):
        raise sf.LibsndfileError(2)

    monkeypatch.setattr(render_mod, "save_audio", save_audio)
    with pytest.raises(CsmError, match="could not encode the audio files"):
        studio.write_outputs(_result())
    assert list(studio.outputs_root.iterdir()) == []


# ---- full disk: the running app ------------------------------------------------------------------
def test_app_reports_a_full_disk_and_stays_up(running_app, tmp_path, monkeypatch):
    url, studio = running_app
    client = Client(url, verbose=False)
    key, mapping = "faults-full-disk-1", {"headers": ["speaker", "profile"], "data": [["Alice", "Alice"]]}
    client.predict(key, handle_file(clip(tmp_path / "a.wav", 200)), "hello there", "Alice", api_name="/add_profile")
    library = studio.library(key).root
    before = snapshot(library)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    FullDisk(monkeypatch)
    monkeypatch.setattr(render_mod, "save_audio", full)
    with pytest.raises(Exception, match="disk is full.*free some space and try again"):
        client.predict(key, handle_file(clip(tmp_path / "b.wav", 260)), "good day", "Bob", api_name="/add_profile")
    with pytest.raises(Exception, match="disk is full"):
        client.predict(key, "Alice", "Alicia", api_name="/rename_profile")
    with pytest.raises(Exception, match="disk is full"):
        client.predict(key, "Alice: hi.", mapping, 0.9, 50, 1, 1, 0, "conversational", api_name="/render_script")
    assert snapshot(library) == before
    assert not list(studio.outputs_root.glob("render-*"))

    monkeypatch.undo()  # space is back: the same server carries on
    table, *_ = client.predict(key, handle_file(clip(tmp_path / "b.wav", 260)), "good day", "Bob",
                                   api_name="/add_profile")
    assert [r[0] for r in table["data"]] == ["Alice", "Bob"]
    _, note, *_ = client.predict(key, "Alice: hi.", mapping, 0.9, 50, 1, 1, 0, "conversational",
                                 api_name="/render_script")
    assert note.startswith("Done: 1 line,")


# ---- a real full filesystem ----------------------------------------------------------------------
@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 512 KiB tmpfs (needs root with CAP_SYS_ADMIN, as in CI's container; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True,
                          check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_real_full_filesystem(tiny_tmpfs, tmp_path):
    store = ProfileStore(tiny_tmpfs / "profiles")
    saved = []
    with pytest.raises(ProfileError, match=DISK_FULL):
        for i in range(50):  # ~80 KB per profile: the disk fills within a few
            store.create(f"Voice {i}", clip(tmp_path / f"{i}.wav", 150 + 10 * i, seconds=1.7), f"line {i}")
            saved.append(f"Voice {i}")
    assert len(saved) >= 2 and temp_litter(store.root) == []
    reopened = ProfileStore(store.root)
    assert [p.name for p in reopened.list()] == sorted(saved, key=str.casefold)
    assert all(reopened.audio(name).numel() > SR for name in saved)

    studio = Studio(SimpleNamespace(device=torch.device("cpu")), tmp_path / "p2", outputs_root=tiny_tmpfs)
    with pytest.raises(CsmError, match="disk (is|may be) full"):
        studio.write_outputs(_result())
    assert not list(studio.outputs_root.glob("render-*"))


def test_without_a_working_lock_only_old_leftovers_are_removed(tmp_path, monkeypatch, caplog):
    root = tmp_path / "store"
    root.mkdir()
    young, old = root / ".tmp-young", root / ".tmp-old"
    young.mkdir(), old.mkdir()
    os.utime(old, (time.time() - 2 * STALE_TMP_S,) * 2)
    monkeypatch.setattr(profiles_mod, "fcntl", None)  # as on Windows; FUSE mounts fail flock likewise
    ProfileStore(root)
    assert young.exists() and not old.exists()  # a young one may belong to a live writer elsewhere
    assert "runs without a lock" in caplog.text


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_new_library_that_cannot_be_created_says_why_without_the_server_path(tmp_path, monkeypatch, code):
    studio = _studio(tmp_path)
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith("visitor-"):
            raise OSError(code, os.strerror(code))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(ProfileError) as e:  # the folder is made by the first save (an unused key costs no disk)
        studio.library("new-visitor-key-1").create("Ann", clip(tmp_path / "a.wav", 200), "hello")
    assert str(tmp_path) not in str(e.value)
    assert (DISK_FULL if code == errno.ENOSPC else "cannot open your voice library") in str(e.value)
    monkeypatch.undo()
    assert studio.library("new-visitor-key-1").list() == []  # not cached broken: works once it can
