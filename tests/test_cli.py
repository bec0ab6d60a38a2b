"""`python -m csm_multi` end to end on the tiny preset: profiles, render, say, readable errors."""

import json

import numpy as np
import pytest
import soundfile as sf

from csm_multi import loaders
from csm_multi.cli import main


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(loaders, "hub_reachable", lambda timeout=3.0: False)


def _clip(path, freq, sr=16_000, seconds=2.0, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.2 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    sf.write(str(path), np.stack([x] * channels, axis=1) if channels > 1 else x, sr)
    return path


def test_profiles_then_render(tmp_path, capsys):
    store = str(tmp_path / "voices")
    assert main(["profiles", "--profiles-dir", store, "add", "Alice", str(_clip(tmp_path / "a.wav", 200)),
                 "--transcript", "hello there"]) == 0
    assert main(["profiles", "--profiles-dir", store, "add", "Bob", str(_clip(tmp_path / "b.flac", 260, 48_000, 2.0, 2)),
                 "--transcript", "good day"]) == 0
    assert main(["profiles", "--profiles-dir", store, "list"]) == 0
    listed = capsys.readouterr().out
    assert "Alice" in listed and "Bob" in listed

    script = tmp_path / "scene.txt"
    script.write_text("Alice: Hi Bob.\nbob: Hello Alice!\n# a comment\nNarrator: And so it ends.\n")
    out = tmp_path / "out" / "scene.wav"
    assert main(["render", str(script), "-o", str(out), "--profiles-dir", store, "--voice", "Narrator=none",
                 "--model", "tiny", "--no-watermark", "--seed", "3", "--max-line-s", "0.4", "--pause-ms", "100", "-q"]) == 0
    audio, sr = sf.read(str(out))
    manifest = json.loads((out.parent / "scene.json").read_text())["lines"]
    assert sr == 24_000 and [m["speaker"] for m in manifest] == ["Alice", "bob", "Narrator"]
    assert len(audio) == round(sum(m["duration_s"] for m in manifest) * 24_000) + 2 * 2400
    assert [m["profile"] for m in manifest] == ["Alice", "Bob", None]
    assert "profile cache" in capsys.readouterr().out


def test_render_reports_missing_voice_before_loading(tmp_path, capsys):
    script = tmp_path / "s.txt"
    script.write_text("Zed: hi\n")
    assert main(["render", str(script), "--profiles-dir", str(tmp_path / "none"), "--model", "csm-1b"]) == 2
    err = capsys.readouterr().err
    assert "no voice profile for Zed" in err and "--voice Zed=" in err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....garbage")
    assert main(["profiles", "--profiles-dir", str(tmp_path), "add", "X", str(bad), "--transcript", "t"]) == 2
    assert main(["profiles", "--profiles-dir", str(tmp_path), "add", "../../etc/passwd",
                 str(_clip(tmp_path / "c.wav", 220)), "--transcript", "t"]) == 2
    script = tmp_path / "broken.txt"
    script.write_text("no speaker marker here\n")
    assert main(["render", str(script), "--profiles-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err
    assert "line 1" in err


def test_say_writes_a_wav(tmp_path, capsys):
    out = tmp_path / "hi.wav"
    assert main(["say", "Hello there.", "-o", str(out), "--model", "tiny", "--no-watermark", "--seed", "1",
                 "--max-ms", "400"]) == 0
    info = sf.info(str(out))
    assert info.samplerate == 24_000 and info.frames % 1920 == 0 and info.frames > 0
    assert "NOT watermarked" in capsys.readouterr().out
