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


def test_unknown_speakers_are_listed_with_their_lines(tmp_path, capsys):
    script = tmp_path / "s.txt"
    script.write_text("Alice: Hi.\nZed: Who?\nBob: Yo.\nZed: again\n")
    assert main(["render", str(script), "--profiles-dir", str(tmp_path / "none"), "--model", "csm-1b",
                 "--voice", "Alice=none", "--voice", "Bob=none"]) == 2
    assert "no voice profile for Zed (lines 2, 4)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["say", "Hi.", "-o", "{tmp}/afile/x.wav"], "a file of that name may be in the way"),
    (["say", "Hi.", "-o", "{tmp}"], "is a folder"),
    (["say", "Hi.", "-o", "{tmp}/x.txt"], "ending in .wav or .flac or .mp3"),
    (["say", "   ", "-o", "{tmp}/x.wav"], "nothing to say"),
    (["say", "Hi.", "--speaker", "-1"], "--speaker must be 0 or more"),
    (["say", "Hi.", "--seed", "18446744073709551614"], "seed must be a whole number from 0"),
    (["say", "Hi.", "--max-ms", "inf"], "must be finite"),
    (["say", "Hi.", "--context", "{tmp}/missing.wav=words"], "missing.wav does not exist"),
    (["render", "{tmp}/s.txt", "-o", "{tmp}/afile/x.wav", "--voice", "A=none"], "a file of that name may be in the way"),
    (["render", "{tmp}/s.txt", "-o", "{tmp}/v1.2", "--voice", "A=none"], "must end in .wav, .flac or .mp3"),
    (["render", "{tmp}/s.txt", "--voice", "A=none", "--project", "{tmp}/afile/p.csmproj"], "may be in the way"),
    (["render", "{tmp}/s.txt", "--voice", "A=none", "--seed", "-3"], "seed must be a whole number from 0"),
    (["info", "--device", "bogus"], "unknown device 'bogus'"),
])
def test_bad_paths_and_values_fail_before_the_model_loads(tmp_path, capsys, monkeypatch, argv, expected):
    """Each of these is a one-line error with exit code 2, found before any model loads."""
    (tmp_path / "afile").write_text("in the way")
    (tmp_path / "s.txt").write_text("A: Hi.\n")
    monkeypatch.chdir(tmp_path)  # the default profile store (./profiles) lands here, not in the checkout
    monkeypatch.setattr(loaders, "_build_real", lambda *a, **k: pytest.fail("loaded a model"))
    if argv[0] != "info":
        monkeypatch.setattr("csm_multi.cli._build", lambda args: pytest.fail("loaded a model"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*args, "--model", "tiny"] if "--model" not in args else args) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "in the way"


def test_render_writes_the_format_it_is_asked_for(tmp_path, capsys):
    script = tmp_path / "s.txt"
    script.write_text("A: Hi.\n")
    out = tmp_path / "new" / "scene.mp3"
    assert main(["render", str(script), "-o", str(out), "--voice", "A=none", "--profiles-dir", str(tmp_path / "voices"),
                 "--model", "tiny", "--no-watermark", "--seed", "1", "--max-line-s", "0.3", "-q"]) == 0
    assert sf.info(str(out)).format == "MP3" and not (out.parent / "scene.wav").exists()
    assert json.loads((out.parent / "scene.json").read_text())["lines"][0]["seed"] == 1


def test_export_never_overwrites_a_file(tmp_path, capsys):
    store = str(tmp_path / "voices")
    clip = _clip(tmp_path / "alice.wav", 200)
    assert main(["profiles", "--profiles-dir", store, "add", "Alice", str(clip), "--transcript", "hello there"]) == 0
    before = clip.read_bytes()
    assert main(["profiles", "--profiles-dir", store, "export", "Alice", str(clip)]) == 2  # the clip, by mistake
    assert "a voice file ends in .csmvoice" in capsys.readouterr().err and clip.read_bytes() == before
    assert main(["profiles", "--profiles-dir", store, "export", "alice", str(tmp_path / "exp") + "/"]) == 0
    made = tmp_path / "exp" / "alice.csmvoice"
    assert made.is_file()
    assert main(["profiles", "--profiles-dir", store, "export", "Alice", str(made)]) == 2
    assert "the file exists" in capsys.readouterr().err
    assert main(["profiles", "--profiles-dir", store, "delete", "ALICE"]) == 0
    assert capsys.readouterr().out.strip() == "deleted Alice"


def test_profiles_dir_is_accepted_before_or_after_the_action(tmp_path, capsys):
    store = str(tmp_path / "voices")
    assert main(["profiles", "add", "Alice", str(_clip(tmp_path / "a.wav", 200)), "--transcript", "hi",
                 "--profiles-dir", store]) == 0
    assert main(["profiles", "list", "--profiles-dir", store]) == 0
    assert "Alice" in capsys.readouterr().out
    assert main(["profiles", "--profiles-dir", store, "list"]) == 0
    assert "Alice" in capsys.readouterr().out
