"""The Gradio app on the tiny preset, on 127.0.0.1, driven through gradio_client like an API user."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


@pytest.fixture(scope="module")
def app_url(running_app):
    return running_app


def _wav(path, freq, seconds=2.0, sr=22_050):
    t = np.arange(int(sr * seconds)) / sr
    sf.write(str(path), 0.2 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)), sr)
    return str(path)


MAPPING = {"headers": ["speaker", "profile"], "data": [["Alice", "Alice"], ["Bob", "Bob"]]}


def test_profile_script_regenerate_delete(app_url, tmp_path):
    url, studio = app_url
    client = Client(url, verbose=False)
    key = "visitor-one-1234"
    table, _, msg = client.predict(key, handle_file(_wav(tmp_path / "a.wav", 200)), "hello there", "Alice",
                                   api_name="/add_profile")
    assert "Saved" in msg and table["data"][0][0] == "Alice"
    client.predict(key, handle_file(_wav(tmp_path / "b.wav", 260)), "good day", "Bob", api_name="/add_profile")

    live, note, dialogue, files, manifest, *_ = client.predict(
        key, "Alice: Hi Bob.\nBob: Hello Alice!\n", MAPPING, 0.9, 50, 5, 1, 200, "conversational",
        api_name="/render_script")
    assert note.startswith("Done: 2 lines")
    audio, sr = sf.read(dialogue)
    rows = manifest["data"]
    assert sr == 24_000 and [r[1] for r in rows] == ["Alice", "Bob"] and [r[6] for r in rows] == [5, 6]
    assert len(audio) == round((rows[0][5] + rows[1][5] + 0.2) * 24_000)
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == [
        "001-Alice.wav", "002-Bob.wav", "Alice.wav", "Bob.wav", "dialogue.csv", "dialogue.flac", "dialogue.json",
        "dialogue.mp3", "dialogue.srt", "dialogue.wav"]
    assert all(str(studio.profiles_root) not in p for p in files)

    note, _, _, manifest2, context, *_ = client.predict(key, 2, 99, api_name="/regenerate_line")
    assert context["data"][1][0] == 2 and "line 1" in context["data"][1][3] and "profile:Bob" in context["data"][1][3]
    assert context["data"][1][2].endswith("/ 2048")
    assert manifest2["data"][0] == rows[0] and manifest2["data"][1][6] == 99

    table, _, msg, _ = client.predict(key, "Bob", True, api_name="/delete_profile")
    assert [r[0] for r in table["data"]] == ["Alice"]

    # a wrong transcript (typed, or written by speech recognition) is corrected in place
    table, msg = client.predict(key, "Alice", "  hello there,\x1b Bob  ", api_name="/update_transcript")
    assert "saved" in msg and table["data"][0][2] == "hello there, Bob"
    assert studio.library(key).get("Alice").transcript == "hello there, Bob"
    with pytest.raises(Exception, match="transcript"):
        client.predict(key, "Alice", "   ", api_name="/update_transcript")
    with pytest.raises(Exception, match="choose a profile"):
        client.predict(key, None, "words", api_name="/update_transcript")
    assert studio.library(key).get("Alice").transcript == "hello there, Bob"  # a refused edit changes nothing


def test_a_voice_renamed_after_rendering_is_followed_and_a_deleted_one_named(app_url, tmp_path):
    """Rename a voice after rendering: regenerate and Save project use its new name (found by its
    audio). Delete it: both say which voice is gone and what to do. An empty line number is named too."""
    url, studio = app_url
    client = Client(url, verbose=False)
    key = "visitor-renames-42"
    client.predict(key, handle_file(_wav(tmp_path / "a.wav", 200)), "hello there", "Alice", api_name="/add_profile")
    client.predict(key, handle_file(_wav(tmp_path / "b.wav", 260)), "good day", "Bob", api_name="/add_profile")
    client.predict(key, "Alice: Hi Bob.\nBob: Hello Alice!\nAlice: Bye.", MAPPING, 0.9, 50, 5, 1, 0, "conversational",
                   api_name="/render_script")
    with pytest.raises(Exception, match="enter the number of the script line"):
        client.predict(key, None, 1, api_name="/regenerate_line")
    client.predict(key, "Bob", "Robert", api_name="/rename_profile")
    _, _, _, manifest, context, *_ = client.predict(key, 1, 9, api_name="/regenerate_line")  # an Alice line
    assert [r[2] for r in manifest["data"]] == ["Alice", "Robert", "Alice"]
    assert "profile:Robert" in context["data"][0][3]  # the regenerated line heard the renamed voice
    project = client.predict(key, "Alice: Hi Bob.\nBob: Hello Alice!\nAlice: Bye.", MAPPING, 0.9, 50, 5, 1, 0,
                             "conversational", api_name="/save_project")
    import json
    import zipfile

    with zipfile.ZipFile(project) as zf:
        data = json.loads(zf.read("project.json"))
    assert data["voices"] == {"Alice": "Alice", "Bob": "Robert"}
    assert [line["profile"] for line in data["render"]["lines"]] == ["Alice", "Robert", "Alice"]
    client.predict(key, "Robert", True, api_name="/delete_profile")
    with pytest.raises(Exception, match="'Robert' of the last rendering is no longer in your library"):
        client.predict(key, 2, 9, api_name="/regenerate_line")
    with pytest.raises(Exception, match="render the script again"):
        client.predict(key, "Alice: Hi.", {"headers": ["speaker", "profile"], "data": [["Alice", "Alice"]]},
                       0.9, 50, 5, 1, 0, "conversational", api_name="/save_project")
    assert [p.name for p in studio.library(key).list()] == ["Alice"]  # nothing else was touched


def test_bad_inputs_are_errors_not_crashes(app_url, tmp_path):
    url, _ = app_url
    client = Client(url, verbose=False)
    key = "visitor-two-5678"
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really audio")
    with pytest.raises(Exception, match="could not read|audio"):
        client.predict(key, handle_file(str(bad)), "words", "X", api_name="/add_profile")
    with pytest.raises(Exception, match="not a valid profile name"):
        client.predict(key, handle_file(_wav(tmp_path / "c.wav", 300)), "words", "../../etc/passwd", api_name="/add_profile")
    with pytest.raises(Exception, match="line 1"):
        client.predict(key, "no speaker here", MAPPING, 0.9, 50, 1, 1, 200, "conversational", api_name="/render_script")
    with pytest.raises(Exception, match="no profile named"):  # visitor two cannot use visitor one's voices
        client.predict(key, "Alice: hi", MAPPING, 0.9, 50, 1, 1, 200, "conversational", api_name="/render_script")
    with pytest.raises(Exception, match="^Voice profile: no profile named 'Alice'"):  # Quick names its field
        client.predict(key, "hi", "Alice", 0.9, 50, 1, 1, api_name="/say")
    with pytest.raises(Exception, match="library key"):
        client.predict("../x", api_name="/list_profiles")
    with pytest.raises(Exception, match="longer than"):
        client.predict(key, "A: x\n" * 5000, MAPPING, 0.9, 50, 1, 1, 200, "conversational", api_name="/render_script")
    for endpoint, args in (("/rename_profile", (None, "New")), ("/delete_profile", ("", True)),
                           ("/export_profile", (None,))):
        with pytest.raises(Exception, match="choose a profile first"):
            client.predict(key, *args, api_name=endpoint)
    # the server still answers afterwards
    assert client.predict(key, api_name="/list_profiles")[0]["data"] == []


def test_only_the_documented_actions_are_api_endpoints(app_url):
    """Page set-up steps (library key, dropdown refreshes) are not offered as API endpoints."""
    url, _ = app_url
    endpoints = set(Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert endpoints == {f"/{name}" for name in (
        "add_profile", "list_profiles", "preview_profile", "rename_profile", "update_transcript", "delete_profile",
        "export_profile", "import_profile", "render_script", "regenerate_line", "save_project", "open_project", "say",
        "check_watermark", "status", "new_take", "edit_line", "choose_take", "set_pause", "rerender_stale",
        "reopen_last", "check_last_render")}


def test_watermark_check_without_a_watermarker_says_so(app_url, tmp_path):
    url, _ = app_url
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="without a watermark model"):
        client.predict(handle_file(_wav(tmp_path / "w.wav", 300)), api_name="/check_watermark")


def test_quick_say_streams_and_returns_a_file(app_url):
    url, _ = app_url
    client = Client(url, verbose=False)
    _, path, note = client.predict("visitor-three-9", "Hello there.", "(none)", 0.9, 50, 3, 1, api_name="/say")
    info = sf.info(path)
    assert info.samplerate == 24_000 and info.frames > 0 and "NOT watermarked" in note


def test_seed_minus_one_means_random():
    import app as app_module

    assert app_module._seed(-1) is None and app_module._seed(None) is None and app_module._seed("") is None
    assert app_module._seed(0) == 0 and app_module._seed(7.0) == 7


def test_watermark_check_says_how_much_of_a_long_clip_it_read(tmp_path):
    """The check reads a few windows spread over a long upload (bounded time and memory) and says so."""
    from conftest import launch

    from csm_multi.loaders import build_engine
    from csm_multi.studio import Studio

    url, demo = launch(Studio(build_engine("tiny"), tmp_path / "profiles", outputs_root=tmp_path / "out"))
    try:
        client = Client(url, verbose=False)
        answer = client.predict(handle_file(_wav(tmp_path / "long.wav", 300, seconds=60.0)), api_name="/check_watermark")
        assert "Checked 3 windows: 8.8 s of the 60.0 s clip" in answer and "random weights" in answer
        assert answer.startswith("❌ No: ")  # a text label too: the mark renders as a box in some fonts
        answer = client.predict(handle_file(_wav(tmp_path / "short.wav", 300, seconds=0.5)), api_name="/check_watermark")
        assert answer.startswith("Nothing could be checked") and "❌" not in answer  # not "❌ No", then "nothing"
    finally:
        demo.close()


# ---- Studio v2: the per-line editor's actions, reopening, downloads -------------------------------------
def test_takes_text_edits_pauses_and_stale_lines_through_the_api(app_url, tmp_path):
    """Render with 2 takes per line, then on line 1: a new take (3 kept), switch takes, edit its text
    (line 2 heard the old line 1: it is stale until re-rendered), and a per-line pause that changes
    the dialogue's length by exactly that much without regenerating anything."""
    import json

    url, _ = app_url
    client = Client(url, verbose=False)
    key = "visitor-editor-77"
    client.predict(key, handle_file(_wav(tmp_path / "a.wav", 200)), "hello there", "Alice", api_name="/add_profile")
    script = "Alice: Hi Bob.\n[pause 0.5s]\nBob: Hello Alice!"
    out = client.predict(key, script, {"headers": ["speaker", "profile"], "data": [["Alice", "Alice"], ["Bob", ""]]},
                         0.9, 50, 5, 1, 200, "conversational", 2, api_name="/render_script")
    note, files, bundle = out[1], out[3], out[-3]
    assert note.startswith("Done: 2 lines") and bundle.endswith(".zip") and "alice-hi-bob-" in bundle
    manifest = json.loads(next(Path(f).read_text(encoding="utf-8") for f in files if f.endswith("dialogue.json")))
    first, second = manifest["lines"]
    assert first["takes"] == 2 and second["pause_before_s"] == 0.5
    assert second["start_s"] == pytest.approx(first["duration_s"] + 0.5, abs=1e-3)  # the tag's pause, not 200 ms
    assert sf.info(files[0]).frames == round((second["start_s"] + second["duration_s"]) * 24_000)
    assert sorted(s["seed"] for s in first["scores"]) == sorted({s["seed"] for s in first["scores"]})  # distinct

    def lines(result_files):
        return json.loads(next(Path(f).read_text(encoding="utf-8") for f in result_files if f.endswith(".json")))["lines"]

    out = client.predict(key, 1, api_name="/new_take")
    assert out[0].startswith("New take of line 1") and lines(out[2])[0]["takes"] == 3
    chosen = lines(out[2])[0]["take"]
    other = 1 if chosen != 0 else 2  # 1-based take number of one not chosen
    out = client.predict(key, 1, other, api_name="/choose_take")
    after = lines(out[2])
    assert after[0]["take"] == other - 1 and after[1]["seed"] == second["seed"]  # line 2 is not regenerated
    with pytest.raises(Exception, match=r"^take: line 1 has takes 1 to 3, not 9$"):  # 1-based, as asked
        client.predict(key, 1, 9, api_name="/choose_take")

    out = client.predict(key, 1, "Hi there Bob.", api_name="/edit_line")
    edited = lines(out[2])
    assert edited[0]["text"] == "Hi there Bob." and edited[1]["text"] == "Hello Alice!"
    out = client.predict(key, api_name="/rerender_stale")  # line 2 heard the old line 1
    assert out[0].startswith("Re-rendered line(s) 2") and lines(out[2])[1]["seed"] != edited[1]["seed"]
    with pytest.raises(Exception, match="no line needs re-rendering"):
        client.predict(key, api_name="/rerender_stale")

    length = sf.info(out[2][0]).frames
    out = client.predict(key, 2, 2.0, api_name="/set_pause")
    assert lines(out[2])[1]["pause_before_s"] == 2.0 and sf.info(out[2][0]).frames == length + 36_000  # 1.5 s more
    for bad, message in (((0, 1.0), "line: expected a whole number from 1"), ((3, 1.0), "no line 3.*lines are 1 to 2"),
                           ((2, 11), "pause_s: expected a number from 0 to 10")):
        with pytest.raises(Exception, match=message):
            client.predict(key, *bad, api_name="/set_pause")


def test_the_last_rendering_reopens_and_its_watermark_is_checked_without_upload(app_url, tmp_path):
    url, _ = app_url
    client = Client(url, verbose=False)
    key = "visitor-reopen-88"
    with pytest.raises(Exception, match="no rendering of this library"):
        client.predict(key, api_name="/reopen_last")
    with pytest.raises(Exception, match="nothing was rendered with this voice library"):
        client.predict(key, api_name="/check_last_render")
    client.predict(key, "Alice: Hi.", {"headers": ["speaker", "profile"], "data": [["Alice", "(none)"]]},
                   0.9, 50, 5, 1, 0, "conversational", 2, api_name="/render_script")
    out = Client(url, verbose=False).predict(key, api_name="/reopen_last")  # a new session: a reloaded page
    assert out[0] == "Alice: Hi." and out[1]["data"] == [["Alice", "(none)"]] and out[4] == 5 and out[5] == 1
    assert out[-1] == 2  # Takes per line
    assert out[8].startswith("Reopened the last rendering: Done: 1 line,")
    with pytest.raises(Exception, match="without a watermark model"):  # the fixture's engine has none
        client.predict(key, api_name="/check_last_render")


def test_quick_holds_audio_made_slower_than_real_time_until_it_will_not_pause(app_url, monkeypatch):
    """On two CPU cores csm-1b makes audio 3-7x slower than real time. Streamed as made, the player
    would stop for seconds before every chunk; the page holds the first chunks back instead
    (pacing.Pacer) and says when playback starts. Here the tiny model is slowed to ~3x."""
    import time

    url, studio = app_url
    real = studio.engine.stream

    def slow(*args, **kwargs):
        for chunk in real(*args, **kwargs):
            time.sleep(chunk.audio.numel() / 24_000 * 3)
            yield chunk

    monkeypatch.setattr(studio.engine, "stream", slow)
    client = Client(url, verbose=False)
    job = client.submit("visitor-slow-01", "Hello there, this is a slower test.", "(none)", 0.9, 50, 3, 4,
                        api_name="/say")
    job.result(timeout=120)
    notes = [out[2] for out in job.outputs() if isinstance(out[2], str)]  # not the heartbeats (no change)
    assert any("playback starts in ~" in n and "does not pause" in n for n in notes), notes
    assert notes[0].endswith("Measuring the speed before playing…")  # one chunk: no speed yet, held
    held = [n for n in notes if "playback starts in ~" in n]
    assert held and 0 < float(held[0].split("Generating at ")[1].split("×")[0]) <= 0.34  # at most 1/3, said so
    assert not any("playback starts" in n for n in notes[notes.index(held[-1]) + 1:])  # then it plays on
    assert sf.info(job.outputs()[-1][1]).duration == pytest.approx(4.0, abs=0.1)  # nothing held is lost
    # random weights run every utterance to its limit (4 s here, where the text suggests ~2.5 s): the page
    # plans for the limit, so playback starts only once P >= (4 - P) * 2 + 0.88, i.e. after 4 chunks
    assert studio.engine.info.untrained
    first = next(out for out in job.outputs() if isinstance(out[0], str) and out[0].endswith(".m3u8"))
    assert float(first[2].split(" s…")[0]) >= 3.5, first[2]
    _assert_live_segments_are_short([out[0] for out in job.outputs()])


def test_script_lines_made_slower_than_they_play_are_held_for_the_live_player(app_url, monkeypatch):
    """The Script tab's "Playing while rendering" holds lines back the same way when they come
    slower than they play, and hands over the rest before the files; the dialogue is complete."""
    from conftest import slow_lines

    url, studio = app_url
    slow_lines(monkeypatch, studio, 3.0)  # ~3x slower than real time
    client = Client(url, verbose=False)
    script = "A: One line here.\nB: And another one.\nA: And a third line to end."
    job = client.submit("visitor-slow-02", script, {"headers": ["speaker", "profile"], "data": []}, 0.9, 50, 5, 1,
                        0, "conversational", 1, api_name="/render_script")
    job.result(timeout=180)
    notes = [out[1] for out in job.outputs()]
    assert any("slower than they play here, so playback starts" in n for n in notes), notes
    assert notes[-1].startswith("Done: 3 lines")
    assert sf.info(job.outputs()[-1][2]).duration > 1.0
    _assert_live_segments_are_short([out[0] for out in job.outputs()])


def _assert_live_segments_are_short(live_outputs):
    """The live player streams over HLS: Gradio's playlist declares its longest segment as the target
    duration, and the browser reloads the playlist about that often. Held audio handed over as one long
    segment made the page look for new audio only every few seconds and pause; it goes in pieces of
    at most 0.48 s, so the target stays about 1 s. Gradio joins the pieces that reach its encoder
    between two of its reads into one segment, so on a loaded machine two or three pieces can share one
    (1.37 s was seen under the full suite); held audio handed over whole was 3.5 s and more here. The
    pieces themselves are checked exactly in test_live_pieces_are_whole_wav_files_that_gradio_reads_without_ffmpeg."""
    playlists = [o for o in live_outputs if isinstance(o, str) and o.endswith(".m3u8")]
    assert playlists, live_outputs
    text = Path(playlists[-1]).read_text()
    target = int(re.search(r"#EXT-X-TARGETDURATION:(\d+)\n", text).group(1))
    segments = [float(line.split(":")[1].rstrip(",")) for line in text.splitlines() if line.startswith("#EXTINF:")]
    assert len(segments) > 2 and max(segments) <= 2.0 and target <= 2, (target, segments)
    assert sorted(segments)[len(segments) // 2] <= 1.0, segments  # most segments are single pieces


def test_the_editor_names_the_lines_it_leaves_out():
    """Under the editor's last row: which lines are only in the files (the count used to be printed as
    a literal "{MAX_EDITOR_ROWS}", and one line left out read "Lines 61–61")."""
    import app

    n = app.MAX_EDITOR_ROWS
    assert app.editor_overflow(n + 1) == f"Line {n + 1} is in the manifest and the files; the editor shows the first {n}."
    assert app.editor_overflow(n + 20) == (f"Lines {n + 1}–{n + 20} are in the manifest and the files; the editor "
                                           f"shows the first {n}.")


def test_live_pieces_are_whole_wav_files_that_gradio_reads_without_ffmpeg(monkeypatch):
    """What the live players get: complete 16-bit WAV files of at most 0.48 s that Gradio's stream
    encoder parses itself (a file it cannot parse goes to ffmpeg, which fails the render), holding
    exactly the held audio, in order."""
    from gradio import audio_stream_encoder as encoder

    import app

    def no_ffmpeg(*args, **kwargs):
        raise AssertionError("Gradio handed a live piece to ffmpeg")

    monkeypatch.setattr(encoder, "_ffmpeg_decode", no_ffmpeg)
    monkeypatch.setattr(encoder.AudioSegment, "from_file", no_ffmpeg)
    audio = (np.random.default_rng(0).standard_normal(30_001) * 3000).astype(np.int16)
    pieces = app.live_pieces([audio[:7], audio[7:20_000], audio[20_000:]])
    assert len(pieces) == 3 and all(isinstance(p, bytes) for p in pieces)
    pcm = []
    for i, piece in enumerate(pieces):
        rate, channels, raw = encoder.decode_to_pcm(piece) if i == 0 else encoder.decode_to_pcm(piece, 24_000, 1)
        assert (rate, channels) == (24_000, 1)
        assert len(raw) // 2 <= app.LIVE_PIECE_SAMPLES
        pcm.append(np.frombuffer(raw, "<i2"))
    np.testing.assert_array_equal(np.concatenate(pcm), audio)


def test_a_cancelled_render_stops_generating_within_a_second(app_url, monkeypatch):
    """Cancel (the button, a closed tab, gradio_client's job.cancel()) reaches a streaming handler only
    at its next yield. The Script render used to yield only when a line finished, so a cancelled render
    kept its generation row until then (on two CPU cores at csm-1b size, ~30 s per line)."""
    import time

    url, studio = app_url
    real, stopped = studio.render, []

    def timed(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        finally:
            stopped.append(time.monotonic())

    monkeypatch.setattr(studio, "render", timed)
    client = Client(url, verbose=False)
    script = "A: A long first line that runs all the way to its limit.\nB: And a second one."
    job = client.submit("visitor-cancel-01", script, {"headers": ["speaker", "profile"], "data": []}, 0.9, 50, 5, 30,
                        0, "conversational", api_name="/render_script")
    time.sleep(2.5)  # generating line 1 (30 s of audio: several seconds here)
    went_on = _seconds_until_stopped(job, stopped)
    assert went_on < 1.5, f"generation went on {went_on:.1f} s after the cancel"


def test_a_render_lost_with_its_page_is_named_when_the_tester_reopens(app_url, monkeypatch):
    """A page reloaded or closed mid-render ends that render (like gradio_client's job.cancel() here). The
    tester who then pressed "Reopen the last rendering" read only that there was no rendering since the
    server started; now the lost render is named, and an earlier rendering is still reopened."""
    import time

    from conftest import slow_lines

    url, studio = app_url
    client = Client(url, verbose=False)
    key, table = "visitor-lost-0001", {"headers": ["speaker", "profile"], "data": []}
    with pytest.raises(Exception, match="no rendering of this library since the server started"):
        client.predict(key, api_name="/reopen_last")
    slow_lines(monkeypatch, studio, 4.0)
    job = client.submit(key, "A: One.\nB: Two.\nA: Three.", table, 0.9, 50, 5, 1, 0, "conversational",
                        api_name="/render_script")
    time.sleep(3.0)
    job.cancel()
    time.sleep(2.0)
    with pytest.raises(Exception, match=r"the render started at \d\d:\d\d was stopped when its page was closed or "
                                        r"reloaded \([0-3] of 3 lines done\), so it was not kept; render the script again"):
        client.predict(key, api_name="/reopen_last")
    monkeypatch.undo()
    client.predict(key, "A: Kept.", table, 0.9, 50, 5, 1, 0, "conversational", api_name="/render_script")
    assert "Reopened the last rendering: Done: 1 line" in client.predict(key, api_name="/reopen_last")[8]


def _seconds_until_stopped(job, stopped: list, wait_s: float = 60) -> float:
    """Cancel the running `job`; seconds until a patched generation appended its time to `stopped`."""
    import time

    assert not stopped and not job.done()
    cancelled = time.monotonic()
    job.cancel()
    while not stopped and time.monotonic() - cancelled < wait_s:
        time.sleep(0.05)
    assert stopped, f"still generating {wait_s} s after the cancel"
    return stopped[0] - cancelled


def test_beating_hands_over_items_with_heartbeats_between_and_stops_its_worker():
    """`app.beating` runs an iterator on a worker thread: its items in order, None whenever nothing came
    for `every_s`, its error raised on the caller's side, and closing it stops the worker and closes the
    iterator there, before it makes another item."""
    import threading
    import time

    import app

    made, closed_on = [], []

    def slow(stopped):
        try:
            for i in range(100):
                if stopped():
                    return
                time.sleep(0.15 if i != 1 else 0.5)
                made.append(i)
                yield i
        finally:
            closed_on.append(threading.current_thread().name)

    beats = app.beating(slow, 0.1)
    got = []
    for item in beats:
        got.append(item)
        if len([g for g in got if g is not None]) == 3:
            break
    beats.close()
    assert [g for g in got if g is not None] == [0, 1, 2]
    assert got.count(None) >= 4  # the 0.5 s wait before item 1 alone gives 4 beats
    deadline = time.monotonic() + 5
    while not closed_on and time.monotonic() < deadline:
        time.sleep(0.02)
    assert closed_on == ["csm-handler-worker"] and len(made) <= 4  # stopped at once, not run to 100

    def broken(stopped):
        yield "first"
        raise ValueError("the worker's error")

    with pytest.raises(ValueError, match="the worker's error"):
        assert list(app.beating(broken, 1.0)) == ["first"]


def test_on_worker_hands_over_events_beats_while_they_flow_and_returns_the_result():
    """`app.on_worker` runs a blocking call on a worker thread: what it emits, in order, with None at
    least every `every_s` even while events keep coming (a handler yields on None, and Gradio closes
    it only at a yield); the call's result as the generator's return value; its error raised on the
    caller's side; and closing it makes `stopped()` true, so the call stops at its next check."""
    import time

    import app

    def busy(emit, stopped):
        for i in range(12):  # an event every 0.05 s for 0.6 s: never a quiet `every_s`
            time.sleep(0.05)
            emit(i)
        return "result"

    got, work = [], app.on_worker(busy, 0.2)
    while True:
        try:
            got.append(next(work))
        except StopIteration as done:
            result = done.value
            break
    assert result == "result" and [g for g in got if g is not None] == list(range(12))
    assert got.count(None) >= 2  # 0.6 s of steady events still gives a beat every 0.2 s

    stopped_after = []

    def endless(emit, stopped):
        started = time.monotonic()
        while not stopped():
            time.sleep(0.01)
        stopped_after.append(time.monotonic() - started)
        return "never seen"

    work = app.on_worker(endless, 0.1)
    assert next(work) is None  # nothing emitted: a beat after 0.1 s
    work.close()
    deadline = time.monotonic() + 5
    while not stopped_after and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stopped_after and stopped_after[0] < 1.0  # closed: the call saw stopped() at once

    def broken(emit, stopped):
        emit("first")
        raise ValueError("the worker's error")

    work = app.on_worker(broken, 1.0)
    assert next(work) == "first"
    with pytest.raises(ValueError, match="the worker's error"):
        next(work)


def test_a_cancelled_line_action_stops_its_generation(app_url, monkeypatch):
    """New take, Re-render with this text, Re-render stale lines and Regenerate generate one line each.
    They were plain handlers, which Gradio cannot stop: a closed tab or a cancelled API call left the
    line generating to its end, holding a generation row. They now run on a worker and yield every
    HEARTBEAT_S, so a cancel stops the line at its next frame. Here each frame's progress event is
    slowed to 0.3 s (a 2 s line: ~8 s), and the cancel comes 2 s in."""
    import time

    from csm_multi.render import RenderCancelled

    url, studio = app_url
    client = Client(url, verbose=False)
    key = "visitor-line-cancel-01"
    out = client.predict(key, "A: One short line.", {"headers": ["speaker", "profile"], "data": [["A", "(none)"]]},
                         0.9, 50, 5, 2, 0, "conversational", api_name="/render_script")
    assert out[1].startswith("Done: 1 line,")
    for name, args in (("new_takes", (key, 1)), ("rerender", (key, 1, 7))):
        real, stopped, raised = getattr(studio, name), [], []

        def crawling(*a, progress=None, cancel=None, _real=real, **kw):
            def crawl(item):
                time.sleep(0.3)
                progress(item)
            try:
                return _real(*a, progress=crawl, cancel=cancel, **kw)
            except BaseException as e:
                raised.append(type(e))
                raise
            finally:
                stopped.append(time.monotonic())

        monkeypatch.setattr(studio, name, crawling)
        job = client.submit(*args, api_name="/new_take" if name == "new_takes" else "/regenerate_line")
        time.sleep(2.0)
        went_on = _seconds_until_stopped(job, stopped)
        assert went_on < 1.5, f"{name}: the line went on {went_on:.1f} s after the cancel"
        assert raised == [RenderCancelled], f"{name}: ended with {raised}, not by the cancel"


def test_quick_stops_generating_when_cancelled_between_chunks(app_url, monkeypatch):
    """Quick's chunks come every few seconds at csm-1b size on two CPU cores; a cancel (Stop, a closed
    tab) used to wait for the next one. Its stream now runs on a worker, and the handler yields between
    chunks, so the stream is closed within about a second."""
    import time

    url, studio = app_url
    real, closed = studio.engine.stream, []

    def slow(*args, cancel, **kwargs):  # a chunk every 3 s, as at csm-1b size here; frames asked after
        try:                               # each 0.1 s (the engine asks `cancel` after every frame)
            for chunk in real(*args, cancel=cancel, **kwargs):
                for _ in range(30):
                    if cancel():
                        return
                    time.sleep(0.1)
                yield chunk
        finally:
            closed.append(time.monotonic())

    monkeypatch.setattr(studio.engine, "stream", slow)
    client = Client(url, verbose=False)
    job = client.submit("visitor-stop-01", "A sentence to speak slowly.", "(none)", 0.9, 50, 3, 10, api_name="/say")
    time.sleep(4.5)  # one chunk made, the next one on its way
    went_on = _seconds_until_stopped(job, closed, wait_s=30)
    assert went_on < 1.5, f"the stream went on {went_on:.1f} s after the cancel"


def test_no_change_updates_cost_no_component_rebuild(monkeypatch):
    """A streaming handler's heartbeat (gr.skip() for every output, every 0.5 s) is answered as a
    no-change update without Gradio building a new component and its API schema for each output: with
    8 testers rendering, that had taken a quarter of the server's CPU beside the frame loop. Real
    updates and values beside it still go through Gradio."""
    import asyncio

    import gradio as gr

    import app

    with app._checked_blocks()() as demo:
        box, files, button = gr.Textbox(), gr.File(), gr.Button("Go")
        button.click(lambda: None, None, [box, files, button])
    block_fn = next(iter(demo.fns.values()))
    built = []
    real_init = gr.File.__init__

    def counting_init(self, *args, **kwargs):
        built.append(kwargs)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(gr.File, "__init__", counting_init)
    state = gr.blocks.SessionState(demo)

    def post(predictions):
        return asyncio.run(demo.postprocess_data(block_fn, predictions, state))

    assert post([gr.skip(), gr.skip(), gr.skip()]) == [{"__type__": "update"}] * 3
    assert post(gr.skip()) == [{"__type__": "update"}] * 3  # one skip() for all outputs, as Gradio allows
    out = post(["typed", gr.skip(), gr.update(interactive=False)])
    assert out[0] == "typed" and out[1] == {"__type__": "update"}
    assert out[2]["__type__"] == "update" and out[2]["interactive"] is False
    assert built == []  # the File output was never rebuilt
    out = post([gr.skip(), gr.update(visible=False), gr.skip()])
    assert out[1] == {"__type__": "update", "visible": False} and len(built) == 1  # a real update still is
