"""README's code for developers, run as a stranger runs it: the gradio_client snippet, then the openai and
curl ones, in that order, against the real app.py (tiny preset) in a subprocess. Only the server address
and the clip files are the test's; the code is taken from README.md as it stands.

Found by a tester: run in order, the client snippet stopped at `rerender_stale` (after editing the last
line nothing was stale) and the OpenAI one asked another key's library for Alice."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("gradio_client")
pytest.importorskip("openai")

README = Path(__file__).resolve().parents[1] / "README.md"
README_URL = "http://127.0.0.1:7860/"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n### {title}\n")
    end = text.index("\n## ", start + 1)
    nxt = text.find("\n### ", start + 1)
    return text[start:min(end, nxt) if nxt != -1 else end]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from csm_multi.stress import AppServer

    root = tmp_path_factory.mktemp("readme")
    server = AppServer(root / "profiles", root / "tmp").start()
    yield server
    server.stop()


def _clip(path: Path, freq: float) -> None:
    t = np.arange(int(3.0 * 24_000)) / 24_000
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32),
             24_000)


def test_the_readme_api_snippets_run_in_order(app, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _clip(tmp_path / "alice.wav", 220)
    _clip(tmp_path / "bob.wav", 330)
    (client_code,) = _blocks(_section("API (gradio_client)"), "python")
    assert README_URL in client_code
    scope: dict = {}
    exec(compile(client_code.replace(README_URL, app.url), "README gradio_client snippet", "exec"), scope)
    assert Path(scope["zip_path"]).suffix == ".zip" and Path(scope["dialogue_wav"]).exists()

    openai_section = _section("OpenAI-compatible speech API")
    (openai_code,) = _blocks(openai_section, "python")
    api_base = README_URL.rstrip("/") + "/v1"
    assert api_base in openai_code
    exec(compile(openai_code.replace(api_base, app.url.rstrip("/") + "/v1"), "README openai snippet", "exec"), {})
    assert sf.info(tmp_path / "hello.mp3").samplerate == 24_000  # the voice was in the key's library

    if shutil.which("curl"):
        (curl_code,) = _blocks(openai_section, "bash")
        shell = curl_code.replace(README_URL.rstrip("/"), app.url.rstrip("/"))
        done = subprocess.run(["bash", "-ec", shell], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr + done.stdout
        assert sf.info(tmp_path / "hello.wav").samplerate == 24_000
        assert '"Alice"' in done.stdout  # the voice list
