"""Every pattern that guards a name, key or path must match the whole string: `$` in `re.match`
also matches before a final newline, so "abcdefgh\\n" once passed as a library key and became a
store folder with a newline in its name. Each guard is tried with a trailing newline (and CR)."""

from __future__ import annotations

import json
import zipfile
from types import SimpleNamespace

import pytest
import torch

from csm_multi import profiles
from csm_multi.errors import CsmError, ProfileError
from csm_multi.project import read_project
from csm_multi.studio import LIBRARY_KEY, Studio

ENDINGS = ["\n", "\r\n", "\r", "\x00"]


@pytest.mark.parametrize("end", ENDINGS)
def test_a_library_key_with_a_trailing_newline_is_refused(tmp_path, end):
    studio = Studio(SimpleNamespace(device=torch.device("cpu")), tmp_path / "profiles", outputs_root=tmp_path / "out")
    assert LIBRARY_KEY.fullmatch("abcdefgh") and not LIBRARY_KEY.fullmatch("abcdefgh" + end)
    with pytest.raises(ProfileError, match="library_key"):
        studio.library("abcdefgh" + end)
    assert [p.name for p in (tmp_path / "profiles").iterdir() if p.name.startswith("visitor-")] == []


@pytest.mark.parametrize("end", ENDINGS)
def test_a_profile_folder_with_a_trailing_newline_is_refused(tmp_path, end):
    store = profiles.ProfileStore(tmp_path / "lib")
    with pytest.raises(ProfileError, match="not a valid profile folder name"):
        store._dir("alice" + end)


@pytest.mark.parametrize("end", ENDINGS)
def test_an_audio_hash_with_a_trailing_newline_is_refused(end):
    with pytest.raises(ProfileError, match="not a SHA-256 hex digest"):
        profiles._sha_field({"audio_sha256": "0" * 64 + end}, "profile.json")


@pytest.mark.parametrize("end", ENDINGS)
def test_an_encoder_id_with_a_trailing_newline_does_not_reach_a_file_name(end):
    name = profiles._encoder_file("mimi-32" + end)
    assert name != f"codes-mimi-32{end}.pt" and name.isprintable() and "\n" not in name
    assert profiles._encoder_file("mimi-32") == "codes-mimi-32.pt"


@pytest.mark.parametrize("end", ENDINGS[:3])  # zipfile itself cuts a member name at NUL
def test_a_project_member_with_a_trailing_newline_is_refused(tmp_path, end):
    path = tmp_path / "p.csmproj"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("project.json", json.dumps({"schema": 1}))
        zf.writestr("project.json" + end, "{}")
    with pytest.raises(CsmError, match="unexpected|unsafe"):
        read_project(path)


def test_the_guards_accept_what_they_are_for(tmp_path):
    """The same guards accept the plain values, so the tests above fail for the right reason."""
    assert profiles._sha_field({"audio_sha256": "0" * 64}, "profile.json") == "0" * 64
    assert profiles.ProfileStore(tmp_path / "lib")._dir("alice") == (tmp_path / "lib" / "alice").resolve()
