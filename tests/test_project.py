"""Projects on the tiny preset: save -> load into a fresh library -> the same render, bit for bit;
the loaded rendering regenerates like the original; name collisions; malformed and unsafe files."""

import io
import json
import os
import zipfile
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.engine import Engine
from csm_multi.errors import CsmError
from csm_multi.profiles import ProfileStore
from csm_multi.project import PROJECT_FILE, ProjectError, load_project, read_project, save_project
from csm_multi.render import RenderConfig, ScriptRenderer
from csm_multi.text import ByteTokenizer

SCRIPT = "Alice: Hi Bob.\nBob: Hello Alice, all well?\nAlice: Yes, thanks\n"
CONFIG = RenderConfig(pause_ms=120, seed=11, max_line_ms=240, extra_ms=160, margin_ms=100)


def voice(freq: float, seconds: float = 1.5, sr: int = 16_000) -> tuple[np.ndarray, int]:
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32), sr


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, ByteTokenizer(), MimiCodec(build_mimi(None, seed=0)), watermark=False)


def renderer(engine, store) -> ScriptRenderer:
    return ScriptRenderer(engine, partial(store.segment, encoder=engine.encode_reference, encoder_id=engine.codec_id))


@pytest.fixture(scope="module")
def saved(engine, tmp_path_factory):
    """A two-voice library, a rendered scene and its project file."""
    root = tmp_path_factory.mktemp("project")
    store = ProfileStore(root / "home")
    store.create("Alice", voice(200), "Hello there, this is Alice.")
    store.create("Bob", voice(260), "Good day, Bob speaking.")
    voices = {"Alice": "alice", "Bob": "Bob"}
    result = renderer(engine, store).render(SCRIPT, voices, CONFIG)
    path = save_project(root / "scene", SCRIPT, voices, CONFIG, result, store=store)
    return path, result, store


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".lock" not in p.name)


def test_round_trip_renders_the_same_audio_in_a_fresh_library(saved, engine, tmp_path):
    path, original, _ = saved
    assert path.suffix == ".csmproj"
    fresh = ProfileStore(tmp_path / "elsewhere")
    project = load_project(path, store=fresh)
    assert (project.script, project.config) == (SCRIPT, CONFIG)
    assert project.voices == {"Alice": "Alice", "Bob": "Bob"}  # canonical names
    assert sorted(project.imported) == ["Alice", "Bob"] and project.renamed == {}
    assert [p.name for p in fresh.list()] == ["Alice", "Bob"]

    again = renderer(engine, fresh).render(project.script, project.voices, project.config)
    assert torch.equal(again.audio, original.audio)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(again.clips, original.clips))

    loaded = project.result
    canonical = {"alice": "Alice", "Bob": "Bob"}  # the scene mapped Alice to "alice"
    assert loaded.config == CONFIG
    assert loaded.manifest() == [{**row, "profile": canonical[row["profile"]]} for row in original.manifest()]
    for a, b in zip(loaded.clips, original.clips):
        assert torch.equal(a.codes, b.codes) and a.codes.dtype == torch.long
        assert a.audio.numel() == b.audio.numel() and float((a.audio - b.audio).abs().max()) < 1e-4  # 16-bit WAV
    # the loaded rendering regenerates a line exactly as the original would
    redo_loaded = renderer(engine, fresh).rerender_line(loaded, 2, project.voices, seed=77)
    redo_original = renderer(engine, saved[2]).rerender_line(original, 2, {"Alice": "Alice", "Bob": "Bob"}, seed=77)
    assert torch.equal(redo_loaded.clips[2].audio, redo_original.clips[2].audio)


def test_project_file_layout(saved):
    path, result, _ = saved
    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist())
        data = json.loads(zf.read(PROJECT_FILE))
    assert names == ["clips/001.npy", "clips/001.wav", "clips/002.npy", "clips/002.wav", "clips/003.npy",
                     "clips/003.wav", "profiles/alice.csmvoice", "profiles/bob.csmvoice", PROJECT_FILE]
    assert data["schema"] == 1 and data["config"]["seed"] == 11 and data["config"]["end_padding"] is True
    assert [r["model_text"] for r in data["render"]["lines"]] == [c.model_text for c in result.clips]
    assert data["render"]["lines"][2]["model_text"] == "Yes, thanks. ..."


def test_a_project_without_a_rendering(engine, saved, tmp_path):
    _, _, store = saved
    path = save_project(tmp_path / "draft.csmproj", "Bob: Only me.", {"Bob": "bob"}, RenderConfig(seed=3), store=store)
    project = load_project(path, store=ProfileStore(tmp_path / "other"))
    assert project.result is None and project.voices == {"Bob": "Bob"} and project.imported == ["Bob"]


def test_identical_voice_is_reused_and_a_different_one_renamed(saved, engine, tmp_path):
    path, original, _ = saved
    store = ProfileStore(tmp_path / "mine")
    store.create("Alicia", voice(200), "Hello there, this is Alice.")  # the same voice under another name
    store.create("Bob", voice(330), "Someone else entirely.")  # another voice named Bob
    project = load_project(path, store=store)
    assert project.voices == {"Alice": "Alicia", "Bob": "Bob (2)"}
    assert project.imported == ["Bob (2)"] and project.renamed == {"Alice": "Alicia", "Bob": "Bob (2)"}
    assert [c.profile for c in project.result.clips] == ["Alicia", "Bob (2)", "Alicia"]
    assert any("already had that name" in n for n in project.notes)
    assert sorted(p.name for p in store.list()) == ["Alicia", "Bob", "Bob (2)"]
    again = renderer(engine, store).render(project.script, project.voices, project.config)
    assert torch.equal(again.audio, original.audio)  # the remapped voices are the project's voices
    assert load_project(path, store=store).imported == []  # a second open adds nothing


# ---- malformed and unsafe files ------------------------------------------------------------------
def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rezip(path: Path, content: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in content.items():
            zf.writestr(name, data)
    return path


def edit_json(m: dict[str, bytes], change) -> dict[str, bytes]:
    data = json.loads(m[PROJECT_FILE])
    change(data)
    return {**m, PROJECT_FILE: json.dumps(data).encode()}


def npy(array) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def nested_voice(m: dict[str, bytes], extra: dict[str, bytes]) -> bytes:
    inner = members_of(m["profiles/bob.csmvoice"])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in {**inner, **extra}.items():
            zf.writestr(name, data)
    return out.getvalue()


def members_of(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


BAD = {
    "zip-slip": (lambda m: {**m, "../evil.txt": b"x"}, "unsafe"),
    "absolute": (lambda m: {**m, "/tmp/evil.txt": b"x"}, "unsafe"),
    "nested-path": (lambda m: {**m, "clips/../../evil.wav": b"x"}, "unsafe"),
    "extra": (lambda m: {**m, "notes.txt": b"hi"}, "unexpected"),
    "no-project-json": (lambda m: {k: v for k, v in m.items() if k != PROJECT_FILE}, "not a csm-multi project"),
    "bad-json": (lambda m: {**m, PROJECT_FILE: b"{nope"}, "not valid JSON"),
    "newer-schema": (lambda m: edit_json(m, lambda d: d.update(schema=2)), "upgrade csm_multi"),
    "bad-setting": (lambda m: edit_json(m, lambda d: d["config"].update(temperature="hot")), "temperature"),
    "bool-as-int": (lambda m: edit_json(m, lambda d: d["config"].update(topk=True)), "topk"),
    "bad-range": (lambda m: edit_json(m, lambda d: d["config"].update(temperature=0)), "render settings are invalid"),
    "unknown-voice": (lambda m: edit_json(m, lambda d: d["voices"].update(Carol="Carol")), "no such voice"),
    "missing-clip": (lambda m: {k: v for k, v in m.items() if k != "clips/002.wav"}, "audio file is missing"),
    "short-codes": (lambda m: {**m, "clips/001.npy": npy(np.zeros((32, 1), np.uint16))}, "do not match"),
    "codes-range": (lambda m: {**m, "clips/001.npy": npy(np.full((32, 3), 4000, np.uint16))}, "outside"),
    "pickled-codes": (lambda m: {**m, "clips/001.npy": npy(np.array([{"x": 1}], dtype=object))}, "unreadable"),
    "bad-audio": (lambda m: {**m, "clips/001.wav": b"RIFF junk"}, "unreadable"),
    "bad-pause": (lambda m: edit_json(m, lambda d: d["render"]["lines"][0].update(pause_before_ms=-5)),
                  "its pause must be"),
    "bad-score": (lambda m: edit_json(m, lambda d: d["render"]["lines"][1].update(scores=[{"wer": "low"}])),
                  "take score must"),
    "bad-take": (lambda m: edit_json(m, lambda d: d["render"]["lines"][1].update(take=3)), "'take' the chosen one"),
    "bad-takes": (lambda m: edit_json(m, lambda d: d["config"].update(takes=9)), "render settings are invalid"),
    # in words a reader knows, not Python's type names, and with what was found
    "script-a-number": (lambda m: edit_json(m, lambda d: d.update(script=12345)),
                        r"field 'script' must be text, found 12345 \(a whole number\); save the project again"),
    "huge-topk": (lambda m: edit_json(m, lambda d: d["config"].update(topk=10**30)),
                  r"setting 'topk' must be a whole number below 2\^63, found a whole number of 31 digits"),
    "voice-name-path": (lambda m: edit_json(m, lambda d: d["profiles"][0].update(name="../../etc/passwd")),
                        "unusable name: '../../etc/passwd' is not a valid profile name"),
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_projects_are_refused_and_change_nothing(saved, tmp_path, case):
    build, message = BAD[case]
    bad = rezip(tmp_path / "bad.csmproj", build(members(saved[0])))
    store = ProfileStore(tmp_path / "library")
    before = tree(tmp_path)
    with pytest.raises(ProjectError, match=message):
        load_project(bad, store=store)
    assert tree(tmp_path) == before and store.list() == []


def test_an_unusable_voice_name_is_refused_even_where_the_voice_matches_one_of_the_library(saved, tmp_path):
    """A voice whose audio and transcript match a library voice is not imported (it is reused), so its name
    was never checked: a 5,000-character name opened and was repeated whole in the note."""
    path, _, original = saved
    store = ProfileStore(tmp_path / "mine")
    store.create("Alice", voice(200), "Hello there, this is Alice.")  # the project's Alice, the same voice
    m = members(path)
    long_name = "A" * 5000

    def rename(d):
        d["profiles"][0]["name"] = long_name
        d["voices"] = {k: long_name if v == "Alice" else v for k, v in d["voices"].items()}
        d["render"] = None

    bad = rezip(tmp_path / "long.csmproj", edit_json(m, rename))
    with pytest.raises(ProjectError, match=r"unusable name: 'A{60}'\.\.\. \(5,000 characters\) is not a valid") as e:
        load_project(bad, store=store)
    assert len(str(e.value)) < 400
    assert [p.name for p in store.list()] == ["Alice"]


def test_a_bad_voice_inside_rolls_back_the_others(saved, tmp_path):
    m = members(saved[0])
    m["profiles/bob.csmvoice"] = nested_voice(m, {"../escape.json": b"{}"})
    bad = rezip(tmp_path / "bad.csmproj", m)
    store = ProfileStore(tmp_path / "library")
    with pytest.raises(ProjectError, match="voice 'Bob' cannot be imported.*unsafe member path"):
        load_project(bad, store=store)
    assert store.list() == [] and not (tmp_path / "escape.json").exists()


def scored_result():
    """A hand-made rendering: line 2 chose take 2 of three and has its own pause, line 3 an explicit 0."""
    from csm_multi.render import Clip, RenderResult
    from csm_multi.script import ScriptLine
    from csm_multi.takes import TakeScore

    config = RenderConfig(pause_ms=200, seed=5, takes=3)

    def clip(i, pause, take=0, score=None):
        return Clip(index=i, line=ScriptLine(i + 1, "AB"[i % 2], f"Line {i}.", pause), speaker_id=i % 2, profile=None,
                    audio=torch.full((2400,), 0.05 * (take + 1)), codes=torch.full((32, 2), take, dtype=torch.long),
                    seed=10 * i + take, watermarked=False, model_text=f"Line {i}. ...", generated_frames=4, take=take,
                    score=score)

    scores = [TakeScore(0.0, True, 0.1), TakeScore(0.5, False, 0.2), TakeScore(0.25, False, 1.5)]
    takes = [clip(1, 1500, t, scores[t]) for t in range(3)]
    result = RenderResult([clip(0, None, score=scores[1]), takes[2], clip(2, 0)], config, takes={1: takes})
    return "A: Line 0.\n[pause 1.5s]\nB: Line 1.\nA: [pause 0s] Line 2.", result


def test_pauses_and_the_chosen_take_survive_save_and_open(tmp_path):
    script, result = scored_result()
    store = ProfileStore(tmp_path / "lib")
    path = save_project(tmp_path / "takes", script, {"A": None, "B": None}, result.config, result, store=store)
    rows = json.loads(members(path)[PROJECT_FILE])["render"]["lines"]
    assert [r["pause_before_ms"] for r in rows] == [None, 1500, 0] and [len(r["scores"]) for r in rows] == [1, 3, 1]
    loaded = read_project(path).result
    assert [c.line.pause_before_ms for c in loaded.clips] == [None, 1500, 0]
    assert torch.equal(loaded.clips[1].codes, result.clips[1].codes)  # the chosen take's codes, not take 0's
    assert loaded.clips[1].score == result.clips[1].score and loaded.clips[0].score == result.clips[0].score
    assert loaded.clips[2].score is None
    assert loaded.takes == {} and [c.take for c in loaded.clips] == [0, 0, 0]  # only the chosen take is kept
    assert loaded.config.takes == 3
    assert [m["pause_before_s"] for m in loaded.manifest()] == [m["pause_before_s"] for m in result.manifest()] == [
        0.0, 1.5, 0.0]
    assert loaded.audio.numel() == result.audio.numel()


def test_projects_from_before_pauses_and_takes_still_open(tmp_path):
    script, result = scored_result()
    path = save_project(tmp_path / "new", script, {"A": None, "B": None}, result.config, result,
                        store=ProfileStore(tmp_path / "lib"))

    def older(data):
        for row in data["render"]["lines"]:
            for key in ("pause_before_ms", "pause_before_s", "take", "takes", "scores"):
                row.pop(key)
        for config in (data["config"], data["render"]["config"]):
            config.pop("takes")

    old = rezip(tmp_path / "old.csmproj", edit_json(members(path), older))
    loaded = read_project(old)
    assert loaded.config.takes == 1 and loaded.result.config.takes == 1
    assert [c.line.pause_before_ms for c in loaded.result.clips] == [None, None, None]
    assert all(c.score is None for c in loaded.result.clips)
    assert [m["pause_before_s"] for m in loaded.result.manifest()] == [0.0, 0.2, 0.2]


def test_not_a_zip_and_oversized_files(tmp_path, monkeypatch, saved):
    junk = tmp_path / "junk.csmproj"
    junk.write_text("hello")
    with pytest.raises(ProjectError, match="not a readable .csmproj"):
        read_project(junk)
    with pytest.raises(ProjectError, match="cannot open"):
        read_project(tmp_path / "missing.csmproj")
    monkeypatch.setattr("csm_multi.project.MAX_PROJECT_BYTES", 1000)
    with pytest.raises(ProjectError, match="at most"):
        read_project(saved[0])
    monkeypatch.setattr("csm_multi.project.MAX_PROJECT_BYTES", 1 << 30)
    monkeypatch.setitem(__import__("csm_multi.project").project._LIMITS, ".wav", 100)
    with pytest.raises(ProjectError, match="too large"):
        read_project(saved[0])


def test_compression_bomb_is_cut_off_while_reading(tmp_path, saved, monkeypatch):
    m = members(saved[0])
    path = tmp_path / "bomb.csmproj"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in m.items():
            zf.writestr(name, data if name != "clips/001.wav" else bytes(40 << 20))
    with pytest.raises(ProjectError, match="too large"):
        read_project(path)
    assert os.path.getsize(path) < 1 << 20


def test_saving_needs_known_voices_and_a_folder(saved, tmp_path):
    _, _, store = saved
    with pytest.raises(CsmError, match="no profile named 'Zed'"):
        save_project(tmp_path / "x.csmproj", "Zed: hi", {"Zed": "Zed"}, CONFIG, store=store)
    with pytest.raises(ProjectError, match="check the folder exists"):
        save_project(tmp_path / "no" / "such" / "x.csmproj", "Bob: hi", {"Bob": "Bob"}, CONFIG, store=store)


def test_exported_voice_imports_bit_for_bit(saved, tmp_path):
    _, _, store = saved
    other = ProfileStore(tmp_path / "other")
    got = other.import_file(store.export("Alice", tmp_path))
    assert got.audio_sha256 == store.get("Alice").audio_sha256
    assert torch.equal(other.audio("Alice"), store.audio("Alice"))
    wav = members_of((tmp_path / "alice.csmvoice").read_bytes())["reference.wav"]
    samples, _ = sf.read(io.BytesIO(wav), dtype="float32")
    assert samples.size == store.audio("Alice").numel()


# ---- the web app ---------------------------------------------------------------------------------
def test_app_saves_a_project_and_another_library_opens_it(running_app, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    url, studio = running_app
    owner, guest = gradio_client.Client(url, verbose=False), gradio_client.Client(url, verbose=False)
    path = tmp_path / "alice.wav"
    sf.write(str(path), *voice(200, seconds=2.0))
    owner.predict("project-owner-01", gradio_client.handle_file(str(path)), "hello there", "Alice",
                  api_name="/add_profile")
    script = "Alice: Hi there.\nNarrator: The end.\n"
    mapping = {"headers": ["speaker", "profile"], "data": [["Alice", "Alice"], ["Narrator", "(none)"]]}
    settings = (0.8, 40, 5, 1, 100, "conversational")
    rendered = owner.predict("project-owner-01", script, mapping, *settings, api_name="/render_script")
    project = owner.predict("project-owner-01", script, mapping, *settings, 3, api_name="/save_project")
    assert project.endswith(".csmproj") and str(studio.profiles_root) not in project
    assert Path(project).name.startswith("alice-hi-there-")  # named as its zip is, not "project.csmproj"

    opened = guest.predict("project-guest-0002", gradio_client.handle_file(project), api_name="/open_project")
    assert opened[0] == script and opened[1]["data"] == mapping["data"]
    assert tuple(opened[2:8]) == settings and opened[-1] == 3  # Takes per line, last
    assert opened[8].startswith("Opened the project: Done: 2 lines")
    assert opened[11]["data"] == rendered[4]["data"]  # the same manifest: the rendering came back
    assert [row[0] for row in opened[13]["data"]] == ["Alice"]  # the voice is in the guest's library now
    assert [p.name for p in studio.library("project-guest-0002").list()] == ["Alice"]
    # the restored rendering can be regenerated line by line
    _, _, _, manifest, *_ = guest.predict("project-guest-0002", 2, 99, api_name="/regenerate_line")
    assert manifest["data"][0] == rendered[4]["data"][0] and manifest["data"][1][6] == 99
    with pytest.raises(Exception, match="not a readable .csmproj"):
        junk = tmp_path / "junk.csmproj"
        junk.write_text("nope")
        guest.predict("project-guest-0002", gradio_client.handle_file(str(junk)), api_name="/open_project")


# ---- the command line ----------------------------------------------------------------------------
def test_cli_render_writes_a_project_and_project_open_imports_it(tmp_path, capsys, monkeypatch):
    from csm_multi import loaders
    from csm_multi.cli import main

    monkeypatch.setattr(loaders, "hub_reachable", lambda timeout=3.0: False)
    home, away = str(tmp_path / "home"), str(tmp_path / "away")
    sf.write(str(tmp_path / "bob.wav"), *voice(260))
    assert main(["profiles", "--profiles-dir", home, "add", "Bob", str(tmp_path / "bob.wav"), "--transcript", "hi"]) == 0
    assert main(["profiles", "--profiles-dir", away, "add", "Bob", str(tmp_path / "bob.wav"), "--transcript", "other"]) == 0
    (tmp_path / "scene.txt").write_text("Bob: Hello\nNarrator: Bye\n")
    assert main(["render", str(tmp_path / "scene.txt"), "-o", str(tmp_path / "out" / "scene.wav"), "--profiles-dir",
                 home, "--voice", "Narrator=none", "--model", "tiny", "--no-watermark", "--seed", "2",
                 "--max-line-s", "0.16", "-q", "--project", str(tmp_path / "scene.csmproj")]) == 0
    assert f"project: {tmp_path / 'scene.csmproj'}" in capsys.readouterr().out

    assert main(["project", "--profiles-dir", away, "open", str(tmp_path / "scene.csmproj"),
                 "--script-out", str(tmp_path / "again.txt"), "-o", str(tmp_path / "restored")]) == 0
    out = capsys.readouterr().out
    assert "imported voice Bob (2)" in out
    assert f"--voice 'Bob=Bob (2)' --voice Narrator=none --profiles-dir {away}" in out  # the library it went into
    assert (tmp_path / "again.txt").read_text() == "Bob: Hello\nNarrator: Bye\n"
    manifest = json.loads((tmp_path / "restored" / "dialogue.json").read_text())["lines"]
    assert [m["profile"] for m in manifest] == ["Bob (2)", None] and [m["seed"] for m in manifest] == [2, 3]
    assert main(["project", "--profiles-dir", away, "open", str(tmp_path / "scene.txt")]) == 2
    assert "not a readable .csmproj" in capsys.readouterr().err

    # a file the user wrote is never written over unasked (it had been, without a word); the same script is
    (tmp_path / "mine.txt").write_text("Bob: my own edited script\n")
    opened = ["project", "--profiles-dir", away, "open", str(tmp_path / "scene.csmproj")]
    library = sorted((tmp_path / "away").iterdir())
    assert main([*opened, "--script-out", str(tmp_path / "mine.txt")]) == 2
    assert "holds another script" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "Bob: my own edited script\n"
    assert main([*opened, "-o", str(tmp_path / "restored")]) == 2  # not empty any more
    assert "not empty" in capsys.readouterr().err and sorted((tmp_path / "away").iterdir()) == library
    assert main([*opened, "--script-out", str(tmp_path / "again.txt")]) == 0  # the same script: nothing lost
    assert main([*opened, "--script-out", str(tmp_path / "mine.txt"), "-o", str(tmp_path / "restored"), "--force"]) == 0
    assert (tmp_path / "mine.txt").read_text() == "Bob: Hello\nNarrator: Bye\n"


def test_cli_render_refuses_a_voice_flag_for_a_speaker_the_script_lacks(tmp_path, capsys):
    """`--voice Alcie=Bob` (a typo) had been ignored, and Alice spoke with her default voice."""
    from csm_multi.cli import main

    (tmp_path / "scene.txt").write_text("Alice: Hi.\nbob: Hello.\n")
    assert main(["render", str(tmp_path / "scene.txt"), "--profiles-dir", str(tmp_path / "v"), "--model", "csm-1b",
                 "--voice", "Alice=none", "--voice", "BOB=none", "--voice", "Alcie=none"]) == 2
    err = capsys.readouterr().err
    assert "the script has no speaker 'Alcie'; its speakers are Alice, bob" in err and err.count("\n") == 1


def test_opening_a_project_bounds_settings_to_the_web_controls(saved, engine, tmp_path):
    """A project written by the command line may carry settings the Script tab's controls cannot show:
    they are brought within this server's limits, each with a note."""
    from csm_multi.studio import Studio

    _, _, store = saved
    wild = RenderConfig(pause_ms=5000, topk=500, temperature=3.0, max_line_ms=60_000, seed=3)
    path = save_project(tmp_path / "wild", "Bob: hi", {"Bob": "Bob"}, wild, store=store)
    studio = Studio(engine, tmp_path / "profiles", outputs_root=tmp_path / "out")
    project = studio.open_project("bounds-key-0001", path)
    c, lim = project.config, studio.limits
    assert (c.pause_ms, c.topk, c.temperature, c.max_line_ms) == (
        lim.max_pause_ms, lim.max_topk, lim.temperature[1], lim.max_line_s * 1000)
    assert c.seed == 3 and len(project.notes) == 4
    assert "pause between lines changed from 5000 ms to 2000 ms (this server's limit)" in project.notes
    within = replace(CONFIG, max_line_ms=2000)
    tame = studio.open_project("bounds-key-0001", save_project(tmp_path / "tame", "Bob: hi", {"Bob": "Bob"}, within,
                                                               store=store))
    assert tame.config == within and not tame.notes
    # below the controls too: 0.1 s per line showed under the slider's 1 s, and the page then refused
    # every render and draft save ("Max seconds per line: expected a number from 1 to 30; got 0.1")
    short = studio.open_project("bounds-key-0001", save_project(
        tmp_path / "short", "Bob: hi", {"Bob": "Bob"}, replace(CONFIG, max_line_ms=100), store=store))
    assert short.config.max_line_ms == lim.min_line_s * 1000
    assert short.notes == ["max length per line changed from 0.1 s to 1 s (this server's limit)"]


def test_a_project_with_more_speakers_than_a_script_can_have_is_refused(saved, tmp_path):
    """A voice map of 50,002 speakers was opened and sent to the page, whose draft then could not be
    saved (at most 1000 map rows)."""
    _, _, store = saved
    path = save_project(tmp_path / "many", "Bob: hi", {"Bob": "Bob"}, CONFIG, store=store)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    data = json.loads(members["project.json"])
    data["voices"].update({f"Extra {i}": None for i in range(50_001)})
    members["project.json"] = json.dumps(data).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    with pytest.raises(ProjectError, match="the voice map has 50002 speakers; a project has at most 200"):
        read_project(path)
