"""What the running app serves over HTTP: generated outputs and a visitor's own uploads, nothing else.

Gradio 6 serves files at `/gradio_api/file=<path>` (and the older `/gradio_api/file/<path>`); its
rules are `blocked_paths` (the profile store), `allowed_paths` (our outputs folder) and its own
upload/cache folder. Requests go out through `http.client` so that `../` and `%2e%2e` reach the
server exactly as written (other clients normalise them away).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import zipfile
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
import soundfile as sf

import app as app_module

KEY = "http-files-visitor-1"
MAPPING = {"headers": ["speaker", "profile"], "data": [["Alice", "Alice"]]}


def fetch(url: str, target: str) -> tuple[int, bytes]:
    """GET `target` (sent verbatim as the request target) from the server at `url`."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(running_app, tmp_path_factory):
    """The app with one stored profile and one render: (url, studio, FileData dicts of the render's files)."""
    from gradio_client import Client, handle_file

    url, studio = running_app
    t = np.arange(2 * 24_000) / 24_000
    clip = tmp_path_factory.mktemp("clip") / "alice.wav"
    sf.write(str(clip), 0.2 * np.sin(2 * np.pi * 200 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)), 24_000)
    client = Client(url, verbose=False, download_files=False)  # keep the server's URLs instead of downloading
    client.predict(KEY, handle_file(str(clip)), "hello there", "Alice", api_name="/add_profile")
    _, note, dialogue, files, *_ = client.predict(KEY, "Alice: Hi.", MAPPING, 0.9, 50, 1, 1, 0, "conversational",
                                                  api_name="/render_script")
    assert note.startswith("Done: 1 line,")
    exported = client.predict(KEY, "Alice", api_name="/export_profile")
    return url, studio, dialogue, files, exported


def test_render_outputs_are_downloadable(served):
    url, studio, dialogue, files, exported = served
    wav = next(f for f in files if f["orig_name"] == "dialogue.wav")
    for item in (dialogue, wav):
        status, body = fetch(url, urlsplit(item["url"]).path)
        assert status == 200
        audio, sr = sf.read(io.BytesIO(body))
        assert sr == 24_000 and audio.size > 0
    for item in files:  # every listed file, including the manifest, is there
        assert fetch(url, urlsplit(item["url"]).path)[0] == 200
    status, body = fetch(url, urlsplit(exported["url"]).path)
    assert status == 200 and sorted(zipfile.ZipFile(io.BytesIO(body)).namelist()) == ["profile.json", "reference.wav"]
    assert all(str(studio.profiles_root) not in item["path"] for item in [dialogue, exported, *files])


def test_a_visitors_own_upload_is_downloadable(served):
    url = served[0]
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    boundary = "csmmultiboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"mine.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\nmy own words\r\n--{boundary}--\r\n").encode()
    conn.request("POST", "/gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = conn.getresponse()
    assert response.status == 200
    [path] = json.loads(response.read())
    conn.close()
    assert fetch(url, f"/gradio_api/file={path}") == (200, b"my own words")


def _private_targets(studio) -> dict[str, str]:
    """Name -> request target for files that must never be served."""
    [folder] = [p for p in studio.profiles_root.iterdir() if p.name == f"visitor-{KEY}"]
    reference = folder / "alice" / "reference.wav"
    assert reference.is_file()
    outputs = studio.outputs_root
    hops = "/".join([".."] * len(outputs.relative_to(studio.profiles_root.parent).parts))
    traversal = f"{outputs}/{hops}/{reference.relative_to(studio.profiles_root.parent)}"
    app_py = Path(app_module.__file__).resolve()
    return {
        "stored reference": f"/gradio_api/file={reference}",
        "stored profile.json": f"/gradio_api/file={folder / 'alice' / 'profile.json'}",
        "stored reference, old route": f"/gradio_api/file/{reference}",
        "/etc/passwd": "/gradio_api/file=/etc/passwd",
        "app source": f"/gradio_api/file={app_py}",
        "app source, relative": "/gradio_api/file=app.py",
        "../ from outputs to a reference": f"/gradio_api/file={traversal}",
        "../ to /etc/passwd": f"/gradio_api/file={outputs}/{'../' * 12}etc/passwd",
        "%2e%2e%2f to /etc/passwd": f"/gradio_api/file={outputs}/" + "%2e%2e%2f" * 12 + "etc%2fpasswd",
        "%2e%2e to a reference": f"/gradio_api/file={quote(traversal.replace('..', '%2e%2e'), safe='/%')}",
        "double-encoded": f"/gradio_api/file={outputs}/" + "%252e%252e/" * 12 + "etc/passwd",
        "relative ../": "/gradio_api/file=" + "../" * 12 + "etc/passwd",
        "file:// URL": "/gradio_api/file=file:///etc/passwd",
        "no /gradio_api prefix": "/file=/etc/passwd",
        "static ../": "/static/../../../../etc/passwd",
    }


def test_stored_profiles_system_and_source_files_are_refused(served):
    url, studio, *_ = served
    secret_bytes = [(studio.profiles_root / f"visitor-{KEY}" / "alice" / "reference.wav").read_bytes()[44:2000],
                    b"root:", b"def build_demo"]
    for name, target in _private_targets(studio).items():
        status, body = fetch(url, target)
        assert status in (403, 404), (name, target, status)
        assert not any(secret in body for secret in secret_bytes), name


def test_links_in_the_outputs_folder_do_not_reach_private_files(served):
    url, studio, *_ = served
    folder = studio.fresh_dir("links-")
    reference = studio.profiles_root / f"visitor-{KEY}" / "alice" / "reference.wav"
    (folder / "voice.wav").symlink_to(reference)
    (folder / "passwd").symlink_to("/etc/passwd")
    (folder / "real.txt").write_text("generated")
    assert fetch(url, f"/gradio_api/file={folder / 'real.txt'}") == (200, b"generated")  # the folder is served...
    for link in ("voice.wav", "passwd"):  # ...but not what links in it point to
        assert fetch(url, f"/gradio_api/file={folder / link}")[0] in (403, 404)


def test_main_launches_with_the_file_rules_tested_here(tmp_path, monkeypatch, running_app):
    """`app.main()` blocks the profile store and allows only the outputs folder, as the fixture does."""
    import gradio as gr

    _, fixture_studio = running_app
    monkeypatch.setattr(app_module, "build_engine", lambda *a, **k: fixture_studio.engine)
    monkeypatch.setattr(app_module, "build_transcriber", lambda *a, **k: None, raising=False)  # no ASR model here
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    monkeypatch.delenv("SPACE_ID", raising=False)
    app_module.main(["--model", "tiny", "--profiles-dir", str(tmp_path / "voices")])
    profiles = (tmp_path / "voices").resolve()
    assert launched["blocked_paths"] == [str(profiles)]
    [allowed] = launched["allowed_paths"]
    assert Path(allowed).name == "csm-multi-outputs" and not Path(allowed).is_relative_to(profiles)
    assert not profiles.is_relative_to(allowed) and not Path(os.getcwd()).is_relative_to(allowed)


def test_a_player_never_shows_a_half_written_file(tmp_path, monkeypatch):
    """The page's players (dialogue, per-line, voice preview) put (rate, samples) in Gradio's cache at
    a path named by the samples. Two events with the same samples (two testers previewing one voice)
    used to write that one file at once, in place: while one wrote, the path held half a WAV, which
    the other could serve or copy. Here a writer is held halfway: the path must not exist until the
    file is whole, and a second event with the same samples gets the same, whole file."""
    import threading

    from gradio import processing_utils

    real = processing_utils.audio_to_file
    halfway, go_on, calls = threading.Event(), threading.Event(), []

    def slow_writer(rate, data, filename, format="wav"):  # writes half its bytes, then waits
        calls.append(filename)
        buffer = str(tmp_path / "whole.wav")
        real(rate, data, buffer, format=format)
        data_bytes = Path(buffer).read_bytes()
        with open(filename, "wb") as f:
            f.write(data_bytes[: len(data_bytes) // 2])
            f.flush()
            halfway.set()
            go_on.wait(10)
            f.write(data_bytes[len(data_bytes) // 2:])

    monkeypatch.setattr(processing_utils, "audio_to_file", slow_writer)
    player = app_module._player_class()(type="numpy", render=False)
    player.GRADIO_CACHE = str(tmp_path / "cache")
    assert player.get_block_name() == "audio"  # the browser draws it as gr.Audio
    assert not Path(app_module.__file__).with_suffix(".pyi").exists()  # Gradio's stub of app.py: never written
    samples = (np.sin(np.arange(24_000) / 7) * 20_000).astype(np.int16)
    answers = []
    first = threading.Thread(target=lambda: answers.append(player.postprocess((24_000, samples))))
    first.start()
    assert halfway.wait(10)
    visible = list((tmp_path / "cache").glob("*/audio.wav"))
    go_on.set()
    first.join(10)
    assert visible == [], "the player's path existed while its file was half written"
    second = player.postprocess((24_000, samples))  # the same samples: the same, whole file, not written again
    assert len(answers) == 1 and answers[0].path == second.path and len(calls) == 1
    read, rate = sf.read(second.path, dtype="int16")
    assert rate == 24_000 and np.array_equal(read, samples)
    assert player.postprocess((24_000, samples[:100])).path != second.path
