"""`python -m csm_multi` end to end on the tiny preset: profiles, render, say, readable errors."""

import json

import numpy as np
import pytest
import soundfile as sf

from csm_multi import loaders
from csm_multi.cli import main
from csm_multi.settings import SETTINGS


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(loaders, "hub_reachable", lambda timeout=3.0: False)


@pytest.fixture(autouse=True)
def private_data_dir(tmp_path, monkeypatch):
    """The default voice library lands in this test's folder, never in the real home; no CSM_* from outside."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    for s in SETTINGS.values():
        monkeypatch.delenv(s.env, raising=False)
    return tmp_path / "xdg" / "csm-multi" / "profiles"


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


def test_say_drops_control_characters_and_undecodable_bytes_of_argv(tmp_path, capsys):
    # a terminal in another encoding: Python hands undecodable argv bytes over as lone surrogates
    plain, odd = tmp_path / "plain.wav", tmp_path / "odd.wav"
    for text, out in (("Hello there.", plain), ("Hel\udcfflo \x1b[1mthere.\x00", odd)):
        assert main(["say", text, "-o", str(out), "--model", "tiny", "--no-watermark", "--seed", "1",
                     "--max-ms", "400"]) == 0
    assert np.array_equal(sf.read(str(plain))[0], sf.read(str(odd))[0])
    assert main(["say", "\udcff\x07", "-o", str(odd), "--model", "tiny"]) == 2
    assert "nothing to say" in capsys.readouterr().err


def test_unknown_speakers_are_listed_with_their_lines(tmp_path, capsys):
    script = tmp_path / "s.txt"
    script.write_text("Alice: Hi.\nZed: Who?\nBob: Yo.\nZed: again\n")
    assert main(["render", str(script), "--profiles-dir", str(tmp_path / "none"), "--model", "csm-1b",
                 "--voice", "Alice=none", "--voice", "Bob=none"]) == 2
    assert "no voice profile for Zed (lines 2, 4)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["say", "Hi.", "-o", "{tmp}/afile/x.wav"], "a file of that name is in the way"),
    (["say", "Hi.", "-o", "{tmp}"], "is a folder"),
    (["say", "Hi.", "-o", "{tmp}/x.txt"], "ending in .wav or .flac or .mp3"),
    (["say", "   ", "-o", "{tmp}/x.wav"], "nothing to say"),
    (["say", "Hi.", "--speaker", "-1"], "--speaker must be 0 or more"),
    (["say", "Hi.", "--seed", "18446744073709551614"], "seed must be a whole number from 0"),
    (["say", "Hi.", "--max-ms", "inf"], "must be finite"),
    (["say", "Hi.", "--context", "{tmp}/missing.wav=words"], "missing.wav does not exist"),
    (["render", "{tmp}/s.txt", "-o", "{tmp}/afile/x.wav", "--voice", "A=none"], "a file of that name is in the way"),
    (["render", "{tmp}/s.txt", "-o", "{tmp}/v1.2", "--voice", "A=none"], "must end in .wav, .flac or .mp3"),
    (["render", "{tmp}/s.txt", "--voice", "A=none", "--project", "{tmp}/afile/p.csmproj"], "is in the way"),
    (["render", "{tmp}/s.txt", "--voice", "A=none", "--seed", "-3"], "seed must be a whole number from 0"),
    (["info", "--device", "bogus"], "unknown device 'bogus'"),
    (["say", "Hi.", "--temperature", "0"], "--temperature 0: temperature must be > 0 and finite"),
    (["say", "Hi.", "--topk", "0"], "--topk 0: topk must be a whole number >= 1"),
    (["render", "{tmp}/s.txt", "--voice", "A=none", "--temperature", "-0.5"], "--temperature -0.5: temperature must"),
    (["render", "{tmp}/s.txt", "--voice", "A=none", "--temperature", "nan"], "--temperature nan: temperature must"),
    (["render", "{tmp}/s.txt", "--voice", "A=none", "--topk", "-2"], "--topk -2: topk must be a whole number >= 1"),
    (["render", "{tmp}/s.txt", "--voice", "A=none", "--batch-size", "0"], "--batch-size 0: batch_size must be >= 1"),
    (["render", "{tmp}/s.txt", "--voice", "A=none", "--pause-ms", "20000"], "--pause-ms 20000: pause_ms must be"),
    (["render", "{tmp}/s.txt", "--voice", "A=none", "--max-line-s", "0"], "--max-line-s 0: max length per line"),
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


def test_engine_settings_come_from_the_apps_environment_variables(tmp_path, capsys, monkeypatch):
    """CSM_MODEL & co. mean to the CLI what they mean to the app; flags still win."""
    seen = {}
    monkeypatch.setattr(loaders, "build_engine", lambda model, **kw: seen.update(kw, model=model) or
                        type("E", (), {"info": type("I", (), {})()})())
    env = {"CSM_MODEL": "csm-1b", "CSM_CHECKPOINT": str(tmp_path / "ckpt"), "CSM_DEVICE": "cpu", "CSM_QUANTIZE": "int8",
           "CSM_TOKENIZER_REPO": "unsloth/Llama-3.2-1B", "CSM_TRUST_TOKENIZER": "1", "CSM_PREFIX_CACHE_MB": "96"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["info"]) == 0
    assert seen == {"model": "csm-1b", "checkpoint": str(tmp_path / "ckpt"), "device": "cpu", "quantize": "int8",
                    "tokenizer_repo": "unsloth/Llama-3.2-1B", "trust_tokenizer": True, "watermark": True,
                    "prefix_cache_mb": 96}
    assert main(["info", "--model", "tiny", "--device", "cuda"]) == 0
    assert seen["model"] == "tiny" and seen["device"] == "cuda"
    monkeypatch.setenv("CSM_TRUST_TOKENIZER", "maybe")
    assert main(["info"]) == 2
    assert "CSM_TRUST_TOKENIZER='maybe': use 1 (on) or 0 (off)" in capsys.readouterr().err
    monkeypatch.delenv("CSM_TRUST_TOKENIZER")

    heard = {}  # CSM_ASR_MODEL: the transcriber `profiles add` builds without --transcript
    monkeypatch.setattr(loaders, "build_transcriber", lambda source: heard.setdefault("source", source) and None)
    monkeypatch.setenv("CSM_ASR_MODEL", "./my-whisper")
    assert main(["profiles", "add", "Alice", str(_clip(tmp_path / "a.wav", 200))]) == 2  # no transcriber: no words
    assert heard["source"] == "./my-whisper"


def test_default_library_is_the_apps_shared_one_in_any_folder(tmp_path, capsys, monkeypatch, private_data_dir):
    """No --profiles-dir: CSM_PROFILES_DIR/shared, else ~/.local/share/csm-multi/profiles/shared, whatever the cwd."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert main(["profiles", "add", "Alice", str(_clip(tmp_path / "a.wav", 200)), "--transcript", "hi"]) == 0
    assert (private_data_dir / "shared" / "alice" / "profile.json").is_file()
    assert not (tmp_path / "a" / "profiles").exists()
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert main(["profiles", "list"]) == 0
    assert "Alice" in capsys.readouterr().out
    monkeypatch.setenv("CSM_PROFILES_DIR", str(tmp_path / "root"))
    assert main(["profiles", "list"]) == 0
    assert f"no profiles in {(tmp_path / 'root' / 'shared').resolve()}" in capsys.readouterr().out

    monkeypatch.delenv("CSM_PROFILES_DIR")  # a ./profiles library from before is pointed out, not used
    assert main(["profiles", "--profiles-dir", "profiles", "add", "Bob", str(_clip(tmp_path / "b.wav", 260)),
                 "--transcript", "yo"]) == 0
    capsys.readouterr()
    assert main(["profiles", "list"]) == 0
    out, err = capsys.readouterr()
    assert "Alice" in out and "Bob" not in out
    assert "./profiles holds some too" in err and "--profiles-dir profiles" in err


def test_a_bad_project_makes_no_folders(tmp_path, capsys):
    """`project open` checks the archive before it makes -o, --script-out's folder or the library."""
    junk = tmp_path / "junk.csmproj"
    junk.write_bytes(b"PK not really a zip")
    argv = ["project", "--profiles-dir", str(tmp_path / "voices"), "open", str(junk), "-o", str(tmp_path / "restored"),
            "--script-out", str(tmp_path / "scripts" / "s.txt")]
    assert main(argv) == 2
    assert "not a readable .csmproj" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.csmproj"]


def test_bad_sampling_values_make_no_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("csm_multi.cli._build", lambda args: pytest.fail("loaded a model"))
    (tmp_path / "s.txt").write_text("A: Hi.\n")
    assert main(["render", str(tmp_path / "s.txt"), "-o", str(tmp_path / "out" / "d.wav"), "--voice", "A=none",
                 "--profiles-dir", str(tmp_path / "voices"), "--topk", "0"]) == 2
    assert main(["say", "Hi.", "-o", str(tmp_path / "said" / "x.wav"), "--temperature", "inf"]) == 2
    err = capsys.readouterr().err
    assert "error: --topk 0: topk must be a whole number >= 1, got 0" in err
    assert "error: --temperature inf: temperature must be > 0 and finite, got inf" in err
    assert [p.name for p in tmp_path.iterdir()] == ["s.txt"]  # no output folders, no library


def test_voice_names_match_exactly_before_by_folder_name(tmp_path, capsys):
    """`--voice A=Alice` takes the profile named Alice; a profile that only shares its folder name
    ("Ålice" is stored as alice) is used with a note saying so, and a clash names the other profile."""
    store = str(tmp_path / "voices")
    assert main(["profiles", "--profiles-dir", store, "add", "Ålice", str(_clip(tmp_path / "a.wav", 200)),
                 "--transcript", "hello there"]) == 0
    assert main(["profiles", "--profiles-dir", store, "add", "Alice", str(_clip(tmp_path / "b.wav", 300)),
                 "--transcript", "good day"]) == 2
    assert "'Alice' is stored as 'alice', which the profile 'Ålice' already uses" in capsys.readouterr().err
    script = tmp_path / "s.txt"
    script.write_text("A: Hi.\n")
    render = ["render", str(script), "--profiles-dir", store, "--voice", "A=Alice", "--model", "tiny", "--no-watermark",
              "--seed", "1", "--max-line-s", "0.16", "-q"]
    assert main([*render, "-o", str(tmp_path / "one" / "d.wav")]) == 0
    assert json.loads((tmp_path / "one" / "d.json").read_text())["lines"][0]["profile"] == "Ålice"
    assert "note: --voice: no profile is named 'Alice'; using 'Ålice', whose folder name 'alice' is the same" in \
        capsys.readouterr().err

    # a library copied from elsewhere can hold both: the exact name wins, with no note
    assert main(["profiles", "--profiles-dir", store, "add", "Someone", str(_clip(tmp_path / "b.wav", 300)),
                 "--transcript", "good day"]) == 0
    meta = tmp_path / "voices" / "someone" / "profile.json"
    meta.write_text(meta.read_text().replace('"Someone"', '"Alice"'))
    capsys.readouterr()
    assert main([*render, "-o", str(tmp_path / "two" / "d.wav")]) == 0
    [line] = json.loads((tmp_path / "two" / "d.json").read_text())["lines"]
    assert line["profile"] == "Alice" and "note:" not in capsys.readouterr().err
    from csm_multi.profiles import ProfileStore

    assert ProfileStore(store).get("Alice").slug == "someone"  # what the renderer reads the voice from


def test_debug_puts_the_traceback_in_the_log(tmp_path, capsys, caplog):
    assert main(["info", "--device", "bogus", "--model", "tiny"]) == 2
    assert "Traceback" not in caplog.text
    assert main(["info", "--device", "bogus", "--model", "tiny", "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: unknown device 'bogus'") == 2 and "Traceback" not in err
    assert "Traceback" in caplog.text and "ValueError: unknown device" in caplog.text
