"""Storage limits on a public link: the per-library voice cap, the store-wide byte quota, expiry of
idle visitor libraries. Through the core (ProfileStore, Studio, project import) and through the
running app's HTTP API. No model in the core tests (a stub engine: saving a voice needs none).

"Bytes on disk" is measured here independently of the code under test: `du` below walks the tree
and adds each entry's allocated blocks (at least its size), folders included.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from csm_multi.config import SAMPLE_RATE
from csm_multi.errors import CsmError, ProfileError
from csm_multi.profiles import QUOTA_FILE, ProfileStore, StorageQuota
from csm_multi.project import import_project, read_project, save_project
from csm_multi.render import RenderConfig
from csm_multi.studio import Studio, StudioLimits

DAY = 86400
FULL = "the server's voice storage is full"


def speech(seconds: float, seed: int = 0) -> tuple[np.ndarray, int]:
    """A speech-like clip (tone + noise in 4 Hz bursts) at 24 kHz, as (samples, rate)."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    voice = 0.6 * np.sin(2 * np.pi * (150 + 20 * (seed % 5)) * t) + 0.4 * rng.standard_normal(t.size)
    return (0.15 * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)) * voice).astype(np.float32), SAMPLE_RATE


def du(root) -> int:
    def size(path) -> int:
        st = os.lstat(path)
        return max(st.st_blocks * 512, st.st_size)

    return size(root) + sum(size(os.path.join(folder, name)) for folder, dirs, files in os.walk(root)
                            for name in dirs + files)


def snapshot(root) -> dict[str, bytes | None]:
    """Every entry under `root` with the bytes of files (folders: None), but the quota's own count."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*")) if p.name != QUOTA_FILE}


def studio(root, **limits) -> Studio:
    engine = SimpleNamespace(device=torch.device("cpu"))  # a voice library needs no model
    return Studio(engine, root / "profiles", outputs_root=root / "out", limits=StudioLimits(**limits))


def key() -> str:
    return secrets.token_hex(8)


# ---- the per-library voice cap ---------------------------------------------------------------------
def test_voice_cap_refuses_the_next_voice_and_leaves_the_store_as_it_was(tmp_path):
    store = ProfileStore(tmp_path / "lib", max_profiles=3)
    for i, name in enumerate(["Ann", "Bob", "Cy"]):
        store.create(name, speech(1.2, seed=i), "hello there")
    before = snapshot(store.root)
    with pytest.raises(ProfileError, match=r"your voice library holds 3 voices and this server keeps at most 3 in "
                                           r"one library, so this voice cannot be added: delete one first"):
        store.create("Dee", speech(1.2, seed=7), "hello there")
    assert snapshot(store.root) == before
    voice = store.export("Cy", tmp_path)  # import obeys it too
    with pytest.raises(ProfileError, match="holds 3 voices"):
        store.import_file(voice, "Cy two")
    assert snapshot(store.root) == before

    # the cap counts voices: a full library still renames and edits, and room comes back by deleting
    store.rename("Ann", "Anna")
    store.update_transcript("Bob", "good day to you")
    store.delete("Anna")
    store.import_file(voice, "Cy two")
    assert [p.name for p in store.list()] == ["Bob", "Cy", "Cy two"]


def test_studio_caps_each_library_and_the_shared_one(tmp_path):
    s = studio(tmp_path, voices_per_library=2)
    mine, theirs = key(), key()
    for name in ("Ann", "Bob"):
        s.library(mine).create(name, speech(1.2), "hello")
    with pytest.raises(ProfileError, match="holds 2 voices.*at most 2 in one library"):
        s.library(mine).create("Cy", speech(1.2), "hello")
    s.library(theirs).create("Cy", speech(1.2), "hello")  # per library, not per server
    shared = Studio(s.engine, tmp_path / "team", outputs_root=tmp_path / "out", shared_library=True,
                    limits=StudioLimits(voices_per_library=1))
    shared.library(None).create("Ann", speech(1.2), "hello")
    with pytest.raises(ProfileError, match="holds 1 voice and"):
        shared.library(None).create("Bob", speech(1.2), "hello")


# ---- the total quota --------------------------------------------------------------------------------
def test_quota_refuses_a_save_that_would_cross_it_and_counts_right(tmp_path):
    root = tmp_path / "profiles"
    quota = StorageQuota(root, 600_000)
    first = ProfileStore(root / "visitor-first", quota=quota)
    assert first.list() == [] and not first.root.exists()  # looking costs no disk
    saved, refusal = 0, None
    for i in range(20):
        store = first if i % 2 else ProfileStore(root / f"visitor-{i}", quota=quota)
        before = snapshot(root)
        try:
            store.create(f"Voice {i}", speech(2.0, seed=i), "hello there")
            saved += 1
        except ProfileError as e:
            refusal = str(e)
            assert snapshot(root) == before  # nothing written, not even the new library's folder
        assert du(root) <= quota.max_bytes
        assert quota.used() == du(root)  # the kept count is the disk's
    assert saved >= 3 and refusal is not None
    assert re.fullmatch(rf"{FULL} \(\d+\.\d KB of its 600\.0 KB in use; this needs \d+\.\d KB more\), so nothing "
                        r"was saved: delete voices you no longer need, try again later, or tell whoever runs this "
                        r"demo", refusal), refusal
    used, need = (float(x) * 1000 for x in re.findall(r"(\d+\.\d) KB", refusal)[::2])
    assert used + need > quota.max_bytes and abs(used - du(root)) < 100

    # deleting frees room at once, and another process (a second quota object) sees the same count
    name = first.list()[0].name
    first.delete(name)
    assert StorageQuota(root, 600_000).used() == du(root)
    first.create(name, speech(2.0), "hello there")
    # a change made behind the quota's back is caught by the next count (at start-up, or when stale)
    (root / "stray.bin").write_bytes(b"x" * 50_000)
    assert quota.recount() == du(root)


def test_disk_stays_within_the_quota_with_fresh_library_keys(tmp_path):
    quota = 2_000_000
    s = studio(tmp_path, storage_quota_bytes=quota)
    root = s.profiles_root
    clip = tmp_path / "clip.wav"
    sf.write(str(clip), *speech(1.5))
    outcomes = []
    for _ in range(30):
        k = key()
        try:
            s.add_profile(k, "Alice", clip, "hello there")
            outcomes.append("saved")
        except ProfileError as e:
            assert str(e).startswith(FULL + " (") and "of its 2.0 MB in use" in str(e)
            assert s.library(k).list() == [] and not (root / f"visitor-{k}").exists()  # not even a folder
            outcomes.append("refused")
        assert du(root) <= quota, (len(outcomes), du(root))
    assert outcomes.count("saved") >= 10 and outcomes[-1] == "refused", outcomes
    assert s.quota.used() == du(root) <= quota
    # a restart counts afresh: the same number
    assert studio(tmp_path, storage_quota_bytes=quota).quota.used() == du(root)


def test_quota_covers_set_audio_and_codes(tmp_path):
    root = tmp_path / "profiles"
    store = ProfileStore(root / "visitor-a", quota=StorageQuota(root, 250_000))
    store.create("Ann", speech(1.2), "hello")
    before = snapshot(root)
    with pytest.raises(ProfileError, match=FULL):
        store.set_audio("Ann", speech(4.0, seed=3))  # the old and new clip both, for a moment
    assert snapshot(root) == before
    codes = store.codes("Ann", lambda a: torch.zeros(32, 2000, dtype=torch.long), "big")  # 512 KB of codes
    assert codes.shape == (32, 2000) and not list((root / "visitor-a" / "ann").glob("codes-*"))  # used, not kept
    store.codes("Ann", lambda a: torch.zeros(32, 15, dtype=torch.long), "small")
    assert list((root / "visitor-a" / "ann").glob("codes-*")) and du(root) <= 250_000


# ---- imports ------------------------------------------------------------------------------------------
def test_import_file_and_project_import_obey_the_caps(tmp_path):
    home = ProfileStore(tmp_path / "home")
    home.create("Alice", speech(1.5, seed=1), "Hello there, this is Alice.")
    home.create("Bob", speech(1.5, seed=2), "Good day, Bob speaking.")
    project = save_project(tmp_path / "scene", "Alice: Hi.\nBob: Hello.\n", {"Alice": "Alice", "Bob": "Bob"},
                           RenderConfig(), store=home)

    # the voice cap: a project bringing two new voices into a library with room for one
    capped = ProfileStore(tmp_path / "capped", max_profiles=2)
    capped.create("Carol", speech(1.5, seed=3), "Carol here.")
    before = snapshot(capped.root)
    with pytest.raises(CsmError, match=r"scene\.csmproj cannot be opened: your voice library holds 1 voice and this "
                                       r"server keeps at most 2 in one library, so these 2 voices cannot be added: "
                                       r"delete one first"):
        import_project(read_project(project), capped)
    assert snapshot(capped.root) == before
    capped.delete("Carol")
    assert sorted(import_project(read_project(project), capped).imported) == ["Alice", "Bob"]
    import_project(read_project(project), capped)  # voices it already has are reused: no room needed

    # the quota: the second voice does not fit, and the first is taken back out
    root = tmp_path / "profiles"
    quota = StorageQuota(root, 10**9)
    tight = ProfileStore(root / "visitor-tight", quota=quota)
    tight.create("Dan", speech(1.5, seed=4), "Dan here.")
    tight.delete("Dan")
    quota.max_bytes = du(root) + 1
    with pytest.raises(ProfileError, match=FULL):
        tight.import_file(home.export("Alice", tmp_path))
    one_voice = du(tmp_path / "home" / "alice") + 40_000  # room for one voice (and its codes), not two
    quota.max_bytes = du(root) + one_voice
    before = snapshot(root)
    with pytest.raises(CsmError, match=rf"its voice 'Bob' cannot be imported: {FULL}"):
        import_project(read_project(project), tight)
    assert snapshot(root) == before and tight.list() == []
    assert du(root) <= quota.max_bytes and quota.used() == du(root)


# ---- expiry of idle visitor libraries ------------------------------------------------------------
def test_idle_visitor_libraries_expire_and_the_rest_stay(tmp_path):
    s = studio(tmp_path, storage_quota_bytes=10**8)
    root = s.profiles_root
    idle, recent = key(), key()
    s.library(idle).create("Ann", speech(1.2), "hello")
    s.library(recent).create("Bob", speech(1.2), "hello")
    shared = ProfileStore(root / "shared")  # the shared library (`--shared-library`) is never expired
    shared.create("Cy", speech(1.2), "hello")
    (root / "notes").mkdir()  # nor anything that is not a visitor library
    (root / ".expired-0123456789ab").mkdir()  # the leftover of an expiry killed mid-way
    (root / ".expired-0123456789ab" / "reference.wav").write_bytes(b"x" * 10_000)
    past = time.time() - 31 * DAY
    for folder in (f"visitor-{idle}", "shared", "notes"):
        os.utime(root / folder, (past, past))
    os.utime(root / f"visitor-{recent}", (time.time() - 29 * DAY,) * 2)

    restarted = studio(tmp_path, storage_quota_bytes=10**8)  # expiry runs at start-up
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [QUOTA_FILE, f"visitor-{recent}", "shared", "notes"])
    assert restarted.quota.used() == du(root)  # the count dropped with them
    assert [p.name for p in restarted.library(recent).list()] == ["Bob"]
    assert restarted.library(idle).list() == []  # an expired key starts over with an empty library


def test_expiry_spares_libraries_in_use_and_runs_on_requests(tmp_path):
    s = studio(tmp_path, expiry_every_s=0)  # every request may run it
    root = s.profiles_root
    open_idle, in_use, busy, other = key(), key(), key(), key()
    for k in (open_idle, in_use, busy):
        s.library(k).create("Ann", speech(1.2), "hello")
    past = time.time() - 40 * DAY
    for k in (open_idle, in_use, busy):
        os.utime(root / f"visitor-{k}", (past, past))
    s.library(open_idle).touched_at = past  # open in the LRU, but nobody has used it for 40 days
    s._stores[f"visitor-{busy}"].touched_at = past
    # `in_use` keeps its recent in-memory use (a request holding it touched it when it got it)
    os.utime(root / f"visitor-{open_idle}", (past, past))
    fd = os.open(root / f"visitor-{busy}" / ".lock", os.O_RDWR)  # a writer in another process holds it
    import fcntl
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        s.library(other)  # any request runs the expiry when it is due
    finally:
        os.close(fd)
    assert not (root / f"visitor-{open_idle}").exists() and f"visitor-{open_idle}" not in s._stores
    assert (root / f"visitor-{in_use}").exists() and (root / f"visitor-{busy}").exists()
    assert s.library(open_idle).list() == []
    # each use renews the folder's mark (the one that survives a restart)
    os.utime(root / f"visitor-{in_use}", (past, past))
    s._stores[f"visitor-{in_use}"]._marked_at = 0
    s.library(in_use)
    assert time.time() - (root / f"visitor-{in_use}").stat().st_mtime < 60
    studio(tmp_path)  # a restart: its writer is gone now, so it goes
    assert not (root / f"visitor-{busy}").exists() and (root / f"visitor-{in_use}").exists()


# ---- through the running app ---------------------------------------------------------------------
gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def small_app(tmp_path_factory, tiny_model):
    """The app on the tiny preset with small limits: 2 voices per library, a 1 MB quota."""
    from conftest import launch

    from csm_multi.codec import MimiCodec, build_mimi
    from csm_multi.engine import Engine
    from csm_multi.text import ByteTokenizer

    root = tmp_path_factory.mktemp("quota-app")
    engine = Engine(tiny_model, ByteTokenizer(), MimiCodec(build_mimi(None)), watermark=False)
    s = Studio(engine, root / "profiles", outputs_root=root / "out",
               limits=StudioLimits(voices_per_library=2, storage_quota_bytes=1_000_000))
    url, demo = launch(s)
    yield url, s
    demo.close()


def test_api_callers_meet_the_cap_and_the_quota(small_app, tmp_path):
    from gradio_client import Client, handle_file

    url, s = small_app
    client = Client(url, verbose=False)
    clip = tmp_path / "clip.wav"
    sf.write(str(clip), *speech(1.5))
    mine = "quota-visitor-0001"
    for name in ("Alice", "Bob"):
        client.predict(mine, handle_file(str(clip)), "hello there", name, api_name="/add_profile")
    with pytest.raises(Exception, match="holds 2 voices and this server keeps at most 2 in one library"):
        client.predict(mine, handle_file(str(clip)), "hello there", "Carol", api_name="/add_profile")
    table, *_ = client.predict(mine, api_name="/list_profiles")
    assert [r[0] for r in table["data"]] == ["Alice", "Bob"]

    refused = 0
    for i in range(12):  # a script with fresh keys: the disk stays within the quota
        try:
            client.predict(f"quota-fresh-{i:04d}", handle_file(str(clip)), "hello there", "Alice",
                           api_name="/add_profile")
        except Exception as e:
            assert FULL in str(e) and "1.0 MB" in str(e), e
            refused += 1
        assert du(s.profiles_root) <= 1_000_000
    assert refused >= 1
