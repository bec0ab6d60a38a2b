"""End to end in a real browser: the Gradio app (tiny preset, random weights) in headless Debian Chromium,
driven by Playwright for Python. Uses /usr/bin/chromium (apt package `chromium`); never downloads a browser.

Saves a voice profile from an uploaded WAV, renders a two-line script with it, and leaves a full-page
screenshot in tests/artifacts/browser-render.png.
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

CHROMIUM = os.environ.get("CSM_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
expect = sync_api.expect

CHOOSE = "— choose a voice —"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def app_url(running_app):
    return running_app[0]


@pytest.fixture()
def page(tmp_path):
    with sync_api.sync_playwright() as p:
        # a persistent context gives Chromium a fresh, empty --user-data-dir of its own
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def _wav(path: Path, seconds: float = 2.0, sr: int = 22_050) -> Path:
    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(0)
    audio = 0.2 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(t.size)
    sf.write(str(path), audio.astype(np.float32), sr)
    return path


def _block(page, label: str):
    """The Gradio component block whose label is exactly `label`."""
    return page.locator(".block").filter(has=page.get_by_text(label, exact=True)).last


def test_save_voice_and_render_in_browser(app_url, page, tmp_path):
    page.set_default_timeout(30_000)
    page.goto(app_url)
    expect(page.get_by_text("Offline demo: random untrained weights")).to_be_visible()

    # ---- Voices: upload a clip, type its transcript and a name, save ------------------------------
    page.get_by_role("tab", name="Voices").click()
    clip = _block(page, "Reference clip (1-30 s of one voice)")
    clip.locator("input[type=file]").set_input_files(str(_wav(tmp_path / "alice.wav")))
    expect(clip.locator("audio, .waveform-container, [data-testid='waveform-Reference clip (1-30 s of one voice)']")
           .first).to_be_attached()
    page.get_by_label("Transcript (exactly what the clip says)").fill("hello there")
    page.get_by_label("Profile name").fill("Alice")
    page.get_by_role("button", name="Save voice profile").click()
    expect(page.get_by_text(re.compile(r"Saved Alice \(\d+\.\d s\)"))).to_be_visible()
    library = page.get_by_role("grid", name="Your voices")
    expect(library.get_by_role("gridcell", name="Alice", exact=True)).to_be_visible()

    # ---- Script: two lines for Alice, mapped to her profile, render ----------------------------------
    page.get_by_role("tab", name="Script").click()
    script = page.get_by_label("Script", exact=True)
    script.fill("Alice: Hello.\nAlice: Bye.")
    expect(page.get_by_label("Voice for Alice")).to_have_value("Alice")  # speaker Alice -> profile Alice
    max_s = page.get_by_label("number input for Max seconds per line")
    max_s.fill("1")
    max_s.press("Enter")
    page.get_by_role("button", name="Render", exact=True).click()

    expect(page.get_by_text(re.compile(r"^Done: 2 lines"))).to_be_visible(timeout=120_000)
    dialogue = _block(page, "Dialogue")
    expect(dialogue.locator("audio, a[download]").first).to_be_attached()
    page.get_by_role("button", name="All files and tables").click()
    manifest = page.get_by_role("grid", name="Manifest")
    expect(manifest.get_by_role("gridcell", name="Hello.", exact=True)).to_be_visible()
    expect(manifest.get_by_role("gridcell", name="Bye.", exact=True)).to_be_visible()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-render.png"), full_page=True)


def test_an_error_with_markup_shows_as_text_on_the_page(app_url, page):
    """Errors reach the page HTML-escaped (its notifications render HTML), so a name typed with
    markup is shown as typed, not rendered; API callers get the same message as plain text
    (tests/test_api_arguments.py)."""
    page.set_default_timeout(30_000)
    page.goto(app_url)
    page.get_by_role("tab", name="Voices").click()
    profile = page.get_by_label("Profile", exact=True)
    profile.fill("<b>Nobody</b>")
    profile.press("Enter")
    page.get_by_label("New name").fill("Somebody")
    page.get_by_role("button", name="Rename").click()
    toast = page.get_by_test_id("toast-body").filter(has_text="no profile named")
    expect(toast).to_be_visible()
    assert "'<b>Nobody</b>'" in toast.inner_text()
    assert toast.locator("b").count() == 0  # shown as text, not rendered as bold


def test_a_refusal_reads_as_written_one_problem_per_line(app_url, page, tmp_path):
    """A refusal's note is Markdown and its toast HTML: a name with backslashes or stars shows them as
    typed (the note dropped the backslash, the toast doubled it), and a script's problems stand one per
    line in both (they ran together into one paragraph)."""
    _open(page, app_url)
    page.get_by_role("tab", name="Voices").click()
    clip = _block(page, "Reference clip (1-30 s of one voice)")
    clip.locator("input[type=file]").set_input_files(str(_wav(tmp_path / "ann.wav")))
    expect(clip.locator("audio, .waveform-container").first).to_be_attached()
    page.get_by_label("Transcript (exactly what the clip says)").fill("hello there")
    page.get_by_label("Profile name").fill(r"C:\voices\*Ann*")
    page.get_by_role("button", name="Save voice profile").click()
    note = page.locator(".prose.csm-note").filter(has_text="not a valid profile name")
    expect(note).to_be_visible()
    assert r"'C:\voices\*Ann*' is not" in note.inner_text() and "no '/', '\\'," in note.inner_text()
    toast = page.get_by_test_id("toast-body").filter(has_text="not a valid profile name").first
    assert r"'C:\voices\*Ann*' is not" in toast.inner_text(), toast.inner_text()
    page.get_by_role("tab", name="Script").click()
    page.get_by_label("Script", exact=True).fill("Alice: Hello [pause soon] there.\n[pause 2]\nBob: yes\n[pause 1s]")
    page.get_by_role("button", name="Render", exact=True).click()
    note = page.locator(".prose.csm-note").filter(has_text="could not be read")
    expect(note).to_be_visible()
    lines = [ln for ln in note.inner_text().splitlines() if ln.strip()]
    assert [ln.split(":")[0] for ln in lines[1:]] == ["line 1", "line 2", "line 4"], lines
    toast = page.get_by_test_id("toast-body").filter(has_text="could not be read").first
    said = toast.inner_text().splitlines()
    said = said[next(i for i, ln in enumerate(said) if "could not be read" in ln) + 1:]
    assert [ln.split(":")[0] for ln in said] == ["line 1", "line 2", "line 4"], said
    assert toast.locator("code").count() >= 2  # `[pause 1.5s]` shown as code, not with its backticks


# ---- the "Studio v2" defects first-time testers hit ------------------------------------------------
def _save_voice(page, tmp_path, name: str, transcript: str = "hello there"):
    page.get_by_role("tab", name="Voices").click()
    clip = _block(page, "Reference clip (1-30 s of one voice)")
    if not clip.locator("input[type=file]").count():  # the previous voice's clip is still there
        clip.get_by_role("button", name="Clear").click()
    clip.locator("input[type=file]").set_input_files(str(_wav(tmp_path / f"{name}.wav")))
    expect(clip.locator("audio, .waveform-container").first).to_be_attached()
    page.get_by_label("Transcript (exactly what the clip says)").fill(transcript)
    page.get_by_label("Profile name").fill(name)
    page.get_by_role("button", name="Save voice profile").click()
    expect(page.get_by_text(re.compile(rf"Saved {name} \(\d+\.\d s\)"))).to_be_visible()


def _open(page, app_url, width=1280, height=900):
    page.set_default_timeout(30_000)
    page.set_viewport_size({"width": width, "height": height})
    page.goto(app_url)
    expect(page.get_by_label("Profile", exact=True)).to_be_attached()
    page.wait_for_timeout(1500)  # the page's set-up chain (library, choices, speaker map) has run


def _shot(page, name: str):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_the_speaker_map_follows_the_library(app_url, page, tmp_path):
    """Save a voice after the page loaded: the Script tab's map uses it; a rename is followed, a delete forgotten."""
    _open(page, app_url)
    _save_voice(page, tmp_path, "Alice")
    page.get_by_role("tab", name="Script").click()
    alice, bob = page.get_by_label("Voice for Alice"), page.get_by_label("Voice for Bob")
    expect(alice).to_have_value("Alice")
    expect(bob).to_have_value(CHOOSE)

    page.get_by_role("tab", name="Voices").click()
    page.get_by_label("New name").fill("Alicia")
    page.get_by_role("button", name="Rename").click()
    expect(page.get_by_text("Renamed to Alicia.")).to_be_visible()
    page.get_by_role("tab", name="Script").click()
    expect(alice).to_have_value("Alicia")

    page.get_by_role("tab", name="Voices").click()
    page.get_by_label("Yes, delete it").check()
    page.get_by_role("button", name="Delete", exact=True).click()
    expect(page.get_by_text("Deleted Alicia.")).to_be_visible()
    page.get_by_role("tab", name="Script").click()
    expect(alice).to_have_value(CHOOSE)


def test_a_speaker_typed_into_the_script_gets_a_voice_row(app_url, page, tmp_path):
    """Typing a script with speakers the page has not seen yet redraws the map: a row per new speaker,
    with the saved voice of the same name chosen, and the default script's speakers gone."""
    _open(page, app_url)
    _save_voice(page, tmp_path, "Dora")
    page.get_by_role("tab", name="Script").click()
    page.get_by_label("Script", exact=True).fill("Dora: First line.\nEve: Second line.")
    expect(page.get_by_label("Voice for Dora")).to_have_value("Dora", timeout=20_000)
    expect(page.get_by_label("Voice for Eve")).to_have_value(CHOOSE)
    expect(page.get_by_label("Voice for Alice")).to_have_count(0)


def test_a_voice_saved_in_another_tab_is_offered_without_a_reload(app_url, page, tmp_path):
    """Two tabs of one library: voices saved in one after the other loaded. The other's speaker map and
    Quick used to offer only the voices of its load (and the map showed "choose a voice" while the
    render used the same-name voice); a map's dropdown, the script box, and the Script and Quick tabs
    now bring the page's library up to date when they are used."""
    _open(page, app_url)
    page.get_by_role("tab", name="Script").click()
    page.get_by_label("Script", exact=True).fill("Wes: Hello there.\nAlice: Hi.")
    expect(page.get_by_label("Voice for Wes")).to_have_value(CHOOSE, timeout=20_000)
    other = page.context.new_page()
    _open(other, app_url)
    _save_voice(other, tmp_path, "Wes")
    page.bring_to_front()
    page.get_by_label("Voice for Wes").click()  # opening the list reads the library again: Wes is offered
    page.get_by_role("option", name="Wes", exact=True).click()
    expect(page.get_by_label("Voice for Wes")).to_have_value("Wes")

    other.bring_to_front()
    _save_voice(other, tmp_path, "Alice")
    page.bring_to_front()
    page.get_by_label("Script", exact=True).click()  # back to the script: the same-name voice is filled in
    expect(page.get_by_label("Voice for Alice")).to_have_value("Alice", timeout=20_000)
    expect(page.get_by_label("Voice for Wes")).to_have_value("Wes")
    page.get_by_role("tab", name="Quick").click()
    page.get_by_label("Voice profile").click()
    for name in ("Wes", "Alice"):
        expect(page.get_by_role("option", name=name, exact=True)).to_be_visible()
    _shot(page, "library-from-another-tab.png")


# every queued event (a refill of the speaker map, a render) reaches the server 3 s after the page
# sent it, as on a slow link or behind a busy queue; quick events (a chosen voice) are not held
LATE_QUEUE_JS = """(() => {
  const send = window.fetch;
  window.fetch = async (url, ...rest) => {
    if (String(url).includes("/queue/join")) await new Promise(r => setTimeout(r, 3000));
    return send(url, ...rest);
  };
})();"""


def test_a_voice_chosen_while_the_map_is_refilled_is_kept(app_url, page):
    """A refill of the speaker map sent before a voice was chosen (an edit of the script), or before a
    reload's draft was back, and answered after it, must not put the earlier map back: the fills read
    the choices when they run, not when the page sent them (with the table as sent, Bob's (none)
    went back to "choose a voice" here, and a reload then lost it too)."""
    page.add_init_script(LATE_QUEUE_JS)
    _open(page, app_url, 1440, 900)
    page.get_by_role("tab", name="Script").click()
    expect(page.get_by_label("Voice for Bob")).to_be_visible(timeout=30_000)  # the set-up chain, held too
    page.wait_for_timeout(4000)  # its last answers have landed
    page.get_by_label("Script", exact=True).fill("Alice: Still here.\nBob: Me too.")  # the same speakers
    _choose(page, "Voice for Bob", "(none) no reference voice")  # while the refill is held
    page.wait_for_timeout(5000)  # the refill has landed
    expect(page.get_by_label("Voice for Bob")).to_have_value("(none) no reference voice")
    page.reload()
    expect(page.get_by_label("Profile", exact=True)).to_be_attached()
    page.get_by_role("tab", name="Script").click()
    expect(page.get_by_label("Script", exact=True)).to_have_value("Alice: Still here.\nBob: Me too.")
    page.wait_for_timeout(8000)  # the restored script's refill and the set-up chain's, both held
    expect(page.get_by_label("Voice for Bob")).to_have_value("(none) no reference voice")


def _choose(page, label: str, option: str):
    """Pick `option` in the dropdown labelled `label` (Gradio's dropdown is a combobox with a list)."""
    box = page.get_by_label(label)
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(box).to_have_value(option)


def test_speaker_voices_are_chosen_from_the_library_and_render_asks_first(app_url, page, tmp_path):
    """The map offers only the library's profiles; a speaker nobody gave a voice is asked about before
    rendering, and (none) chosen on purpose renders without asking."""
    _open(page, app_url)
    _save_voice(page, tmp_path, "Alice")
    _save_voice(page, tmp_path, "Carol")
    page.get_by_role("tab", name="Script").click()
    page.get_by_label("Script", exact=True).fill("Alice: Hi.\nBob: Hello.")
    bob = page.get_by_label("Voice for Bob")
    expect(bob).to_have_value(CHOOSE)
    bob.click()
    options = page.get_by_role("option").all_inner_texts()
    assert [o.replace("✓", "").strip() for o in options] == [CHOOSE, "(none) no reference voice", "Alice", "Carol"]
    page.keyboard.press("Escape")
    page.get_by_label("number input for Max seconds per line").fill("1")

    page.get_by_role("button", name="Render", exact=True).click()
    expect(page.get_by_text(re.compile("Bob has no voice yet"))).to_be_visible()
    expect(page.get_by_role("button", name="Render Bob without a reference voice")).to_be_visible()
    expect(page.get_by_role("button", name="Render", exact=True)).to_be_enabled()  # nothing is running

    _choose(page, "Voice for Bob", "Carol")
    page.get_by_role("button", name="Render", exact=True).click()
    expect(page.get_by_text(re.compile(r"^Done: 2 lines"))).to_be_visible(timeout=120_000)
    page.get_by_role("button", name="All files and tables").click()
    manifest = page.get_by_role("grid", name="Manifest")
    expect(manifest.get_by_role("row").filter(has_text="Hello.")).to_contain_text("Carol")
    context = page.get_by_role("grid", name=re.compile("^Context budget"))
    expect(context.get_by_role("row").filter(has_text="Bob")).to_contain_text("profile:Carol")  # her voice was heard
    page.get_by_role("button", name="All files and tables").click()

    _choose(page, "Voice for Bob", "(none) no reference voice")
    page.get_by_role("button", name="Render", exact=True).click()
    expect(page.get_by_text(re.compile(r"^Done: 2 lines"))).to_be_visible(timeout=120_000)
    expect(page.get_by_text(re.compile("has no voice yet"))).to_have_count(0)


def test_an_error_leaves_the_page_usable(app_url, page, tmp_path):
    """A refused action is a warning and a note; no output is covered by an error overlay."""
    _open(page, app_url)
    _save_voice(page, tmp_path, "Alice")
    page.get_by_role("button", name="Delete", exact=True).click()  # without ticking "Yes, delete it"
    expect(page.get_by_test_id("toast-body").filter(has_text="tick 'Yes, delete it' first")).to_be_visible()
    expect(page.get_by_text(re.compile("Not done: tick 'Yes, delete it' first"))).to_be_visible()
    expect(page.locator(".error")).to_have_count(0)
    page.get_by_label("Yes, delete it").check(timeout=5_000)  # clickable: nothing lies over it
    expect(page.get_by_role("grid", name="Your voices").get_by_role("gridcell", name="Alice", exact=True)).to_be_visible()
    page.get_by_label("Yes, delete it").uncheck()
    page.get_by_label("New name").fill("")
    page.get_by_role("button", name="Rename").click()
    expect(page.get_by_test_id("toast-body").filter(has_text="New name")).to_be_visible()
    expect(page.locator(".error")).to_have_count(0)
    _shot(page, "studio-error-1280.png")

    # a value the page's own checks refuse (below the seed's minimum) is answered the same way
    page.get_by_role("tab", name="Script").click()
    page.get_by_label("Seed (-1 = random; line i uses seed + i)").fill("-5")
    page.get_by_role("button", name="Render", exact=True).click()
    expect(page.get_by_text(re.compile(r"Not done: seed \(Seed .*expected a whole number from -1"))).to_be_visible()
    expect(page.locator(".error")).to_have_count(0)
    expect(page.get_by_role("button", name="Render", exact=True)).to_be_enabled()


def test_render_shows_its_stage_and_is_off_while_busy(app_url, page, tmp_path):
    _open(page, app_url)
    page.get_by_role("tab", name="Script").click()
    page.get_by_label("Script", exact=True).fill("Alice: one two three.\nAlice: four five six.")
    _choose(page, "Voice for Alice", "(none) no reference voice")
    page.get_by_label("number input for Max seconds per line").fill("4")
    render = page.get_by_role("button", name="Render", exact=True)
    render.click()
    expect(render).to_be_disabled()
    expect(page.get_by_role("button", name="Cancel")).to_be_enabled()
    expect(page.get_by_text(re.compile(r"line [12]/2 · Alice · (frame \d+|decoding|watermarking)"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Done: 2 lines"))).to_be_visible(timeout=120_000)
    expect(render).to_be_enabled()


def _slow_decode(monkeypatch, studio, seconds: float) -> None:
    """Make every Mimi decode of `studio`'s engine take `seconds` longer (as csm-1b's do on two CPU cores)."""
    real = studio.engine.decode

    def slow_decode(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(studio.engine, "decode", slow_decode)


def test_the_progress_stays_shown_while_a_line_is_decoded(running_app, page, monkeypatch):
    """Gradio's page drops the progress text at every output of a streaming handler, and a render
    yields a no-change update every 0.5 s (so a cancel lands): while a line was decoded and
    watermarked (seconds at csm-1b size) the page showed no progress at all. Here decoding takes 3 s."""
    url, studio = running_app
    _slow_decode(monkeypatch, studio, 3.0)
    _open(page, url)
    _start_render(page, "Alice: one two three.", ("Alice",))
    decoding = page.get_by_text("line 1/1 · Alice · decoding")
    expect(decoding).to_be_visible(timeout=60_000)
    seen = []
    for _ in range(20):  # 2 s of the 3 s decode
        seen.append(" ".join(decoding.all_inner_texts()))
        page.wait_for_timeout(100)
    shown = sum("line 1/1 · Alice · decoding" in s for s in seen)
    assert shown >= 16, seen  # was shown in the first 0.5 s only, until the first no-change update
    expect(page.get_by_text(re.compile(r"^Done: 1 line,"))).to_be_visible(timeout=60_000)


def test_the_progress_box_is_painted_and_clear_of_the_note(running_app, page, monkeypatch):
    """The render's progress is drawn in its note's block. Gradio places it absolutely, over the note: while
    the note was empty (0 px tall, overflow auto) the box was cut off entirely, so a tester saw no progress
    for a whole first line; once the note said something, the two were painted on each other. Checked where
    it counts, by what the browser paints at the progress text's place."""
    url, studio = running_app
    _slow_decode(monkeypatch, studio, 3.0)
    _open(page, url)
    _start_render(page, "Alice: one two three.\nBob: four five six.", ("Alice", "Bob"))
    painted = """(words) => {
        const text = [...document.querySelectorAll('.csm-note .progress-level-inner')]
            .find((e) => e.textContent.includes(words));
        if (!text) return null;
        text.scrollIntoView({block: 'center'});
        const r = text.getBoundingClientRect();
        const at = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
        const note = text.closest('.block.csm-note').querySelector('.md');
        const n = note.getBoundingClientRect();
        const overlap = note.textContent.trim() !== '' && n.top < r.bottom && r.top < n.bottom;
        const b = text.closest('.block.csm-note').getBoundingClientRect();  // its block holds it (not clipped)
        const inside = r.top >= b.top - 1 && r.bottom <= b.bottom + 1;
        return {painted: !!at && (text.contains(at) || at.contains(text)) && inside, overlap,
                note: note.textContent.trim(), block: b.height};
    }"""
    def seen(words: str) -> dict:  # Gradio swaps the box out for a moment at each output: look a few times
        expect(page.get_by_text(words).first).to_be_attached(timeout=60_000)  # also in a live region
        got = None
        for _ in range(10):
            got = page.evaluate(painted, words)
            if got and got["painted"] and not got["overlap"]:
                break
            page.wait_for_timeout(100)
        return got

    first = seen("line 1/2 · Alice · decoding")
    assert first and first["painted"] and not first["overlap"], first  # was cut off: the note was empty
    second = seen("line 2/2 · Bob · decoding")
    assert second and second["painted"] and not second["overlap"], second
    assert second["note"], second  # the note said something by then (line 1 is done), shown beside the box
    expect(page.get_by_text(re.compile(r"^Done: 2 lines,"))).to_be_visible(timeout=60_000)


def test_cancel_ends_the_render_without_an_error_badge_and_is_off_when_idle(running_app, page, monkeypatch):
    """Cancel is on only while a render runs (it used to say "Cancelled." with nothing running). It no longer
    uses Gradio's cancel, which often left a red Error badge on the note (every time with three renders at
    once): the render ends itself at its next step and says so, and Render comes back."""
    from conftest import slow_lines

    url, studio = running_app
    slow_lines(monkeypatch, studio, 4.0)
    _open(page, url)
    cancel, render = page.get_by_role("button", name="Cancel"), page.get_by_role("button", name="Render", exact=True)
    page.get_by_role("tab", name="Script").click()
    expect(cancel).to_be_disabled()
    _start_render(page, "Alice: one two three.\nBob: four five six.\nAlice: seven eight.", ("Alice", "Bob"))
    expect(cancel).to_be_enabled()
    expect(page.get_by_text(re.compile(r"line 1/3 · Alice"))).to_be_attached(timeout=60_000)
    cancel.click()
    expect(page.get_by_text("Cancelled.", exact=True)).to_be_visible(timeout=5_000)
    expect(render).to_be_enabled()
    expect(cancel).to_be_disabled()
    page.wait_for_timeout(1500)
    expect(page.locator(".error")).to_have_count(0)


def test_an_uploaded_clip_that_cannot_be_used_is_named_on_upload(app_url, page, tmp_path):
    """A text file renamed .wav, or a clip over 30 s, used to be named only at Save (the upload showed a 0:00
    player and nothing else); its header is read on upload now, and a good clip clears the note."""
    _open(page, app_url)
    clip = _block(page, "Reference clip (1-30 s of one voice)")
    fake = tmp_path / "fake.wav"
    fake.write_text("this is not audio at all\n" * 50)
    clip.locator("input[type=file]").set_input_files(str(fake))
    expect(page.get_by_text(re.compile(r"This clip cannot be used: could not read fake\.wav as audio"))).to_be_visible()
    clip.get_by_role("button", name="Clear").click()
    long = tmp_path / "long.wav"
    sf.write(str(long), np.zeros(24_000 * 40, dtype=np.float32), 24_000)
    clip.locator("input[type=file]").set_input_files(str(long))
    expect(page.get_by_text(re.compile(r"This clip is 40\.0 s long: a voice profile keeps at most 30 s"))).to_be_visible()
    clip.get_by_role("button", name="Clear").click()
    clip.locator("input[type=file]").set_input_files(str(_wav(tmp_path / "good.wav")))
    expect(page.get_by_text(re.compile(r"This clip"))).to_have_count(0)


def test_the_profile_selection_stays_where_the_tester_acted(app_url, page, tmp_path):
    """Save, rename and import keep that profile selected; delete selects nothing; a row click selects."""
    _open(page, app_url)
    profile = page.get_by_label("Profile", exact=True)
    _save_voice(page, tmp_path, "Alice")
    _save_voice(page, tmp_path, "Carol")
    expect(profile).to_have_value("Carol")
    page.get_by_label("New name").fill("Dana")
    page.get_by_role("button", name="Rename").click()
    expect(page.get_by_text("Renamed to Dana.")).to_be_visible()
    expect(profile).to_have_value("Dana")

    library = page.get_by_role("grid", name="Your voices")
    library.get_by_role("gridcell", name="Alice", exact=True).click()
    expect(profile).to_have_value("Alice")
    expect(page.get_by_label("Transcript of this profile")).to_have_value("hello there")
    library.get_by_role("gridcell", name="Dana", exact=True).click()
    expect(profile).to_have_value("Dana")

    page.get_by_label("Yes, delete it").check()
    page.get_by_role("button", name="Delete", exact=True).click()
    expect(page.get_by_text("Deleted Dana.")).to_be_visible()
    expect(profile).to_have_value("")
    expect(library.get_by_role("gridcell", name="Alice", exact=True)).to_be_visible()


def test_a_transcript_edit_never_lands_on_another_profile(running_app, page, tmp_path, monkeypatch):
    """Type a transcript for Alice, switch to Bob and press Save transcript before Bob's transcript
    arrived (a slow server): nothing is written onto Bob; once it arrived, saving works."""
    import sys
    import time

    url, studio = running_app
    _open(page, url)
    _save_voice(page, tmp_path, "Alice", "words of alice")
    _save_voice(page, tmp_path, "Bob", "words of bob")
    key = next(d.parent.name.removeprefix("visitor-") for d in studio.profiles_root.glob("visitor-*/bob"))
    profile = page.get_by_label("Profile", exact=True)
    box = page.get_by_label("Transcript of this profile")
    profile.fill("Alice")
    profile.press("Enter")
    expect(box).to_have_value("words of alice")

    library = studio.library

    def slow_library(k):  # only the transcript box's loading is slow
        if sys._getframe(1).f_code.co_name == "profile_transcript":
            time.sleep(3)
        return library(k)

    monkeypatch.setattr(studio, "library", slow_library)
    box.fill("edited for alice")
    profile.fill("Bob")
    profile.press("Enter")
    page.get_by_role("button", name="Save transcript").click()
    expect(page.get_by_test_id("toast-body").filter(has_text="nothing was saved")).to_be_visible()
    assert studio.library(key).get("Bob").transcript == "words of bob"
    assert studio.library(key).get("Alice").transcript == "words of alice"

    expect(box).to_have_value("words of bob", timeout=15_000)
    box.fill("better words of bob")
    page.get_by_role("button", name="Save transcript").click()
    expect(page.get_by_text("Transcript of Bob saved.")).to_be_visible()
    assert studio.library(key).get("Bob").transcript == "better words of bob"


@pytest.mark.parametrize("size", [(1440, 900), (390, 844)], ids=["desktop", "phone"])
def test_the_header_is_one_short_line(app_url, page, size):
    """Model, device and the offline warning in one line; the details are on the Status tab."""
    width, height = size
    _open(page, app_url, width, height)
    header = page.locator(".prose").filter(has_text="Offline demo: random untrained weights").first
    expect(header).to_be_visible()
    assert "Tokenizer" not in header.inner_text() and "libraries" not in header.inner_text()
    assert header.bounding_box()["height"] < (120 if width < 600 else 60)
    _shot(page, f"studio-voices-{width}.png")
    page.get_by_role("tab", name="Script").click()
    _shot(page, f"studio-script-{width}.png")
    title = page.get_by_role("heading", level=1)
    assert title.bounding_box()["height"] < 60  # one line, on a phone too
    expect(page.get_by_role("button", name="More tabs")).to_be_hidden()  # every tab in view, none in a "..." menu
    page.get_by_role("tab", name="Status").click()
    expect(page.get_by_text("Tokenizer:")).to_be_visible()


def test_quick_says_which_seed_it_used(app_url, page):
    """A random seed (-1) is drawn before generating, so the message can name it for a re-run."""
    _open(page, app_url, 1440, 900)
    page.get_by_role("tab", name="Quick").click()
    max_s = page.get_by_label("number input for Max seconds")
    max_s.fill("1")
    max_s.press("Enter")
    page.get_by_role("button", name="Speak").click()
    expect(page.get_by_text(re.compile(r"s, seed \d+, NOT watermarked\."))).to_be_visible(timeout=120_000)
    _shot(page, "studio-quick-1440.png")


def test_quick_stop_keeps_what_was_said(running_app, page, monkeypatch):
    """Stop ends Quick's stream at once, and the audio made until then comes back as the Download file,
    with how long it is and its seed. Before, Stop cancelled the event and left nothing to keep."""
    url, studio = running_app
    real = studio.engine.stream

    def slow(*args, cancel, **kwargs):  # a chunk (0.88 s of audio), then a pause, as on a slow machine
        for chunk in real(*args, cancel=cancel, **kwargs):
            yield chunk
            for _ in range(40):
                if cancel():
                    return
                time.sleep(0.1)

    monkeypatch.setattr(studio.engine, "stream", slow)
    _open(page, url, 1280, 900)
    page.get_by_role("tab", name="Quick").click()
    speak, stop = page.get_by_role("button", name="Speak"), page.get_by_role("button", name="Stop")
    expect(stop).to_be_disabled()  # nothing to stop yet
    page.get_by_label("Text", exact=True).fill("A long sentence that the tester stops halfway through.")
    speak.click()
    expect(speak).to_be_disabled()  # a second Speak used to be dropped without a word
    expect(stop).to_be_enabled()
    expect(page.get_by_text(re.compile(r"^0\.88 s… "))).to_be_visible(timeout=60_000)  # one chunk made
    stop.click()
    stopped = page.get_by_text(re.compile(r"^Stopped at 0\.88 s \(seed \d+, NOT watermarked\): the file holds"))
    expect(stopped).to_be_visible(timeout=10_000)
    expect(speak).to_be_enabled()
    expect(stop).to_be_disabled()  # so a second Stop cannot write "Stopped." over this answer
    expect(page.locator(".error")).to_have_count(0)  # no red Error badge on the player, file or note
    link = _block(page, "Download").get_by_role("link").first
    expect(link).to_be_visible()
    got = page.request.get(link.get_attribute("href"))
    assert got.ok
    audio, rate = sf.read(io.BytesIO(got.body()))
    assert rate == 24_000 and len(audio) == round(0.88 * 24_000)
    _shot(page, "studio-quick-stopped.png")


def test_quick_stop_before_any_audio_says_so_and_offers_no_old_file(running_app, page, monkeypatch):
    """A Stop before the first chunk (a long prefill, a busy server) says at once that nothing was made and
    empties Download, which had gone on offering the previous utterance's file: with no audio made, Gradio
    closed the stopped utterance only when its worker ended, after Stop had stopped waiting."""
    import app

    url, studio = running_app
    real = app.StreamConfig
    slow_first = {"on": False}

    def slow(*args, **kwargs):  # 8 s in the handler before its first yield, as a voice prompt being encoded
        if slow_first["on"]:
            time.sleep(8)
        return real(*args, **kwargs)

    monkeypatch.setattr(app, "StreamConfig", slow)
    _open(page, url, 1280, 900)
    page.get_by_role("tab", name="Quick").click()
    speak, stop = page.get_by_role("button", name="Speak"), page.get_by_role("button", name="Stop")
    page.get_by_label("Text", exact=True).fill("A first sentence, said to the end.")
    speak.click()
    link = _block(page, "Download").get_by_role("link").first
    expect(link).to_be_visible(timeout=60_000)  # the first utterance's file
    expect(speak).to_be_enabled()
    slow_first["on"] = True
    page.get_by_label("Text", exact=True).fill("A second one, stopped before it says anything.")
    speak.click()
    expect(stop).to_be_enabled()
    page.wait_for_timeout(1000)
    stop.click()
    expect(page.get_by_text("Stopped before any audio was made: nothing to download.")).to_be_visible(timeout=2_500)
    expect(_block(page, "Download").get_by_role("link")).to_have_count(0)
    expect(speak).to_be_enabled(timeout=30_000)  # once the stopped utterance has ended itself (after the 8 s)
    expect(page.get_by_text("Stopped before any audio was made: nothing to download.")).to_be_visible()
    expect(page.locator(".error")).to_have_count(0)  # no red Error badge (Gradio's cancel left them)


def _start_render(page, script: str, speakers=("Alice", "Bob"), takes: int = 1):
    """Render `script` with no reference voice for `speakers`, 1 s per line, `takes` takes; not waited for."""
    page.get_by_role("tab", name="Script").click()
    page.get_by_label("Script", exact=True).fill(script)
    for speaker in speakers:
        _choose(page, f"Voice for {speaker}", "(none) no reference voice")
        page.wait_for_timeout(300)
    page.get_by_label("number input for Max seconds per line").fill("1")
    page.get_by_label("number input for Takes per line").fill(str(takes))
    page.get_by_label("number input for Takes per line").press("Enter")
    page.get_by_role("button", name="Render", exact=True).click()


def _render_two_lines(page, script: str, takes: int = 1):
    _start_render(page, script, takes=takes)
    expect(page.get_by_text(re.compile(r"^Done: 2 lines"))).to_be_visible(timeout=120_000)


def _redrawn(page, act, message: str, timeout=120_000):
    """Do `act`, wait for its `message`, then for the per-line editor to be drawn again from the new
    result: an action's message comes before the redraw, and the redraw sets every field from the
    result, so a field filled before it lands goes back to its old value."""
    drawing = "() => [...document.querySelector('.csm-line-head').classList].find(c => c.startsWith('csm-draw-'))"
    before = page.evaluate(drawing)
    act()
    expect(page.get_by_text(re.compile(message))).to_be_visible(timeout=timeout)
    page.wait_for_function(f"() => ({drawing})() !== {before!r}", timeout=timeout)


def test_each_line_can_be_retaken_edited_and_retimed(running_app, page):
    """The per-line editor: takes to switch between, a new take, a text edit re-rendered on its own,
    a pause typed for one line; the timeline follows, and a click on a line plays from there."""
    url, studio = running_app
    _open(page, url, 1440, 900)
    _render_two_lines(page, "Alice: Hello there.\n[pause 1s]\nBob: Hi.", takes=2)
    takes = page.locator(".block").filter(has=page.get_by_text(re.compile("^Takes of line 1"))).last
    expect(takes.get_by_role("radio")).to_have_count(2)
    expect(page.get_by_label("Pause before (s)").nth(1)).to_have_value("1")

    _redrawn(page, page.get_by_role("button", name="New take").first.click, r"^New take of line 1")
    expect(takes.get_by_role("radio")).to_have_count(3)
    _redrawn(page, takes.get_by_role("radio").nth(2).check, r"^Line 1: take 3 kept", timeout=30_000)
    expect(page.get_by_text(re.compile(r"Line 2 heard an earlier version"))).to_be_visible()
    heads = page.locator(".prose.csm-line-head")  # the stale line says so itself, not only the notice above the editor
    expect(heads.nth(1)).to_contain_text("heard an earlier version of a line")
    expect(heads.nth(0)).not_to_contain_text("heard an earlier version")
    _redrawn(page, page.get_by_role("button", name="Re-render line 2").click, r"^Re-rendered line\(s\) 2")
    expect(page.get_by_text(re.compile(r"Line 2 heard an earlier version"))).to_have_count(0)
    expect(heads.nth(1)).not_to_contain_text("heard an earlier version")

    page.get_by_label("Text of line 2").fill("Hi there, Alice.")
    _redrawn(page, page.get_by_role("button", name="Re-render with this text").nth(1).click,
             r"^Line 2 re-rendered with the new text")
    expect(page.get_by_label("Text of line 2")).to_have_value("Hi there, Alice.")
    # the edit is in the script too, so the next Render says it (it used to say "Hi." again)
    expect(page.get_by_label("Script", exact=True)).to_have_value("Alice: Hello there.\n[pause 1s]\nBob: Hi there, Alice.")
    pause = page.get_by_label("Pause before (s)").nth(1)
    pause.fill("2")
    _redrawn(page, lambda: pause.press("Enter"), r"^Pause before line 2 set")
    expect(page.get_by_label("Pause before (s)").nth(1)).to_have_value("2")
    # this page's last rendering, as the server keeps it for a reload (kept before the page is answered)
    result = next(last[3] for last in list(studio._last.values()) if "[pause 1s]" in last[0])
    assert result.clips[1].line.text == "Hi there, Alice." and result.pause_before_ms(1) == 2000
    assert result.clips[0].take == 2

    blocks = page.locator(".csmv-b")
    expect(blocks).to_have_count(2)
    audio = page.locator("audio.csmv-audio")
    blocks.nth(1).click()
    page.wait_for_function("() => document.querySelector('audio.csmv-audio').currentTime > 2.5")
    assert audio.evaluate("a => !a.paused") or audio.evaluate("a => a.currentTime") > 2.5
    _shot(page, "studio-editor-1440.png")


def test_a_reload_keeps_the_script_and_reopens_the_last_rendering(app_url, page):
    _open(page, app_url, 1440, 900)
    _render_two_lines(page, "Alice: Kept after a reload.\nBob: Me too.", takes=2)
    page.get_by_label("number input for Temperature").fill("0.7")
    page.get_by_label("number input for Temperature").press("Enter")
    page.wait_for_timeout(500)
    page.reload()
    expect(page.get_by_label("Profile", exact=True)).to_be_attached()
    page.get_by_role("tab", name="Script").click()
    expect(page.get_by_label("Script", exact=True)).to_have_value("Alice: Kept after a reload.\nBob: Me too.")
    expect(page.get_by_label("number input for Temperature")).to_have_value("0.7")
    # the speaker rows are drawn again once the draft's map is back: on a loaded machine that took > 5 s
    expect(page.get_by_label("Voice for Bob")).to_have_value("(none) no reference voice", timeout=20_000)
    page.get_by_label("number input for Takes per line").fill("1")
    page.get_by_label("number input for Takes per line").press("Enter")
    page.get_by_role("button", name="Reopen the last rendering").click()
    expect(page.get_by_text(re.compile(r"^Reopened the last rendering: Done: 2 lines"))).to_be_visible()
    expect(page.get_by_label("Text of line 2")).to_have_value("Me too.")
    expect(page.get_by_label("number input for Takes per line")).to_have_value("2")  # the rendering's, set back
    expect(page.get_by_text(re.compile(r"kept-after-a-reload-.*\.zip"))).to_be_visible()


def test_a_voice_recorded_with_the_microphone_is_saved_and_renders(app_url, tmp_path):
    """The page's other way in: the Reference clip's microphone. Chromium's fake capture device
    (a beeping tone, granted without a prompt) stands in for a tester's microphone."""
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=[*CHROMIUM_ARGS, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"],
            viewport={"width": 390, "height": 844}, permissions=["microphone"])  # a phone, where testers record
        try:
            page = context.pages[0] if context.pages else context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.set_default_timeout(30_000)
            page.goto(app_url)
            page.get_by_role("tab", name="Voices").click()
            clip = _block(page, "Reference clip (1-30 s of one voice)")
            clip.get_by_label("Record audio").click()
            clip.get_by_role("button", name="Record", exact=True).click()
            page.wait_for_timeout(3_000)
            clip.get_by_role("button", name=re.compile("^Stop")).first.click()
            expect(clip.locator("audio, .waveform-container").first).to_be_attached()
            page.get_by_label("Transcript (exactly what the clip says)").fill("a tone from the microphone")
            page.get_by_label("Profile name").fill("Mic")
            page.get_by_role("button", name="Save voice profile").click()
            saved = page.get_by_text(re.compile(r"Saved Mic \((\d+\.\d) s\)"))
            expect(saved).to_be_visible()
            assert 1.0 <= float(re.search(r"\((\d+\.\d) s\)", saved.inner_text()).group(1)) <= 30.0

            page.get_by_role("tab", name="Quick").click()
            page.get_by_label("Text", exact=True).fill("Hello.")
            page.get_by_label("Voice profile").click()
            page.get_by_role("option", name="Mic", exact=True).click()
            page.get_by_role("button", name="Speak").click()
            expect(page.get_by_text(re.compile(r"\d+\.\d\d s, seed \d+"))).to_be_visible(timeout=120_000)
            assert errors == []
        finally:
            context.close()


def test_the_live_player_plays_a_slow_render_through_without_stopping(running_app, page, monkeypatch):
    """Lines made slower than they play (as csm-1b on two CPU cores makes them): "Playing while rendering"
    holds them until what it holds lasts, then plays to the end without stopping. Before, it started on
    the first lines (their text suggested they were short) and the browser, reloading Gradio's HLS
    playlist only as often as its longest segment (a whole line), looked for the next line too late."""
    from conftest import slow_lines

    url, studio = running_app
    slow_lines(monkeypatch, studio, 1.6)  # ~1.6x slower than real time
    _open(page, url, 1440, 900)
    page.get_by_role("tab", name="Script").click()
    page.get_by_label("Script", exact=True).fill("Alice: One.\nBob: Two.\nAlice: Three.\nBob: Four.")
    for speaker in ("Alice", "Bob"):
        _choose(page, f"Voice for {speaker}", "(none) no reference voice")
        page.wait_for_timeout(300)
    page.get_by_label("number input for Max seconds per line").fill("2")
    page.get_by_label("number input for Max seconds per line").press("Enter")
    page.evaluate("""() => { window.__play = []; setInterval(() => {
        const a = [...document.querySelectorAll('audio')].find(x => x.src);
        if (a) window.__play.push([performance.now(), a.currentTime, a.ended]); }, 100); }""")
    page.get_by_role("button", name="Render", exact=True).click()
    expect(page.get_by_text(re.compile(r"^Done: 4 lines"))).to_be_visible(timeout=120_000)
    page.wait_for_function("() => window.__play.length && window.__play[window.__play.length - 1][2]", timeout=60_000)
    samples = page.evaluate("() => window.__play")
    playing = [s for s in samples if s[1] > 0 and not s[2]]
    assert playing, samples[-5:]
    stopped = sum(b[0] - a[0] for a, b in zip(playing, playing[1:]) if b[1] - a[1] < 0.01) / 1000
    played = playing[-1][1] - playing[0][1]
    stops = [(round(a[0] / 1000, 1), round(a[1], 2)) for a, b in zip(playing, playing[1:]) if b[1] - a[1] < 0.01]
    assert played > 6.0 and stopped < 1.0, (played, stopped, stops)  # before: 7.6 s of stops


def test_a_line_action_on_the_page_leaves_renders_batched(page, tmp_path):
    """The per-line editor's buttons are made at run time (inside gr.render), after the queue was set
    up, and had Gradio's default concurrency limit of 1. Gradio lowers a concurrency group's limit to
    the lowest of its events', so after one New take on any page every generation of every visitor
    ran one at a time (found by a hostile-visitor pass: renders went from batched to IN_QUEUE)."""
    import threading

    import torch
    from conftest import launch
    from gradio_client import Client

    import app as app_module
    from csm_multi.codec import MimiCodec, build_mimi
    from csm_multi.config import get_preset
    from csm_multi.engine import Engine
    from csm_multi.model import CSM
    from csm_multi.studio import Studio
    from csm_multi.text import ByteTokenizer

    torch.manual_seed(0)
    model = CSM(get_preset("tiny")).init_random_(seed=1).eval()  # its own: a scheduler owns its caches
    engine = Engine(model, ByteTokenizer(), MimiCodec(build_mimi(None)), watermark=False)
    engine.serve(max_rows=8)
    studio = Studio(engine, tmp_path / "profiles", outputs_root=tmp_path / "out")
    url, demo = launch(studio)
    try:
        _open(page, url)
        _start_render(page, "Alice: one two three.", ("Alice",))
        expect(page.get_by_text(re.compile(r"^Done: 1 line,"))).to_be_visible(timeout=120_000)
        expect(page.get_by_role("button", name="New take")).to_have_count(1)  # the editor is drawn
        _redrawn(page, page.get_by_role("button", name="New take").first.click, r"^New take of line 1")
        assert demo._queue.event_queue_per_concurrency_id["gpu"].concurrency_limit == app_module.generation_slots(engine)

        before = dict(engine.scheduler.stats()["batch_sizes"])
        mapping = {"headers": ["speaker", "profile"], "data": [["A", "(none)"]]}

        def render(i):
            Client(url, verbose=False).predict(f"batched-after-take-{i}", "A: A line of a few words.", mapping, 0.9,
                                               50, i, 3, 0, "conversational", api_name="/render_script")
        threads = [threading.Thread(target=render, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        after = engine.scheduler.stats()["batch_sizes"]
        assert any(size >= 2 and after[size] > before.get(size, 0) for size in after), (before, after)
    finally:
        demo.close()
        engine.stop_serving()


def test_tabs_follow_arrow_keys_and_slider_resets_are_named_after_their_slider(app_url, page):
    """The ARIA tabs pattern (Gradio's tabs take no arrow keys) and named reset buttons (Gradio names every
    one "Reset to default value"), from app.PAGE_HEAD; and the bidi isolation of quoted names and file names
    from app.PAGE_CSS."""
    page.set_default_timeout(30_000)
    page.goto(app_url)
    tabs = page.locator('[role="tablist"] [role="tab"]:visible')
    expect(tabs.first).to_be_visible()
    names = [t.strip() for t in tabs.all_inner_texts()]
    assert names[:2] == ["Voices", "Script"], names

    def selected() -> str:
        return page.locator('[role="tab"][aria-selected="true"]:visible').inner_text().strip()

    tabs.first.click()
    expect(page.locator('[role="tab"][aria-selected="true"]:visible')).to_have_text(names[0])
    page.keyboard.press("ArrowRight")
    expect(page.locator('[role="tab"][aria-selected="true"]:visible')).to_have_text(names[1])
    assert page.evaluate("document.activeElement.getAttribute('role')") == "tab"
    assert page.evaluate("document.activeElement.textContent.trim()") == names[1]
    page.keyboard.press("End")
    expect(page.locator('[role="tab"][aria-selected="true"]:visible')).to_have_text(names[-1])
    page.keyboard.press("ArrowRight")  # wraps to the first
    expect(page.locator('[role="tab"][aria-selected="true"]:visible')).to_have_text(names[0])
    page.keyboard.press("ArrowLeft")  # and back to the last
    expect(page.locator('[role="tab"][aria-selected="true"]:visible')).to_have_text(names[-1])
    page.keyboard.press("Home")
    expect(page.locator('[role="tab"][aria-selected="true"]:visible')).to_have_text(names[0])
    assert selected() == names[0]
    # the open tab names its panel (Gradio gives them no ids); closed tabs control nothing; the panel is
    # not labelled by its tab, so "Script" still names one element, the Script box
    page.keyboard.press("ArrowRight")
    open_tab = page.locator('[role="tab"][aria-selected="true"]:visible')
    expect(open_tab).to_have_text(names[1])
    panel_id = open_tab.get_attribute("aria-controls")
    assert panel_id and page.locator(f"#{panel_id}").get_attribute("role") == "tabpanel"
    expect(page.get_by_label("Script", exact=True)).to_have_count(1)
    assert page.locator(f"#{panel_id}").get_by_role("button", name="Render").count() >= 1  # the Script panel
    assert tabs.first.get_attribute("aria-controls") is None
    page.keyboard.press("Home")
    expect(tabs.first).to_have_attribute("aria-controls", re.compile(r".+"))
    # Tab leaves the list at once (only the open tab is a Tab stop), for the open panel's first control
    expect(tabs.nth(1)).to_have_attribute("tabindex", "-1")
    expect(tabs.first).to_have_attribute("tabindex", "0")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.getAttribute('role')") != "tab"

    # every reset button on the page (all tabs are in the DOM) is named after its slider
    page.get_by_role("tab", name="Script").click()
    resets = page.locator("button.reset-button")
    expect(resets.first).to_be_attached()
    labels = [resets.nth(i).get_attribute("aria-label") for i in range(resets.count())]
    assert labels and all(label.startswith("Reset ") and label.endswith(" to its default") for label in labels), labels
    assert "Reset to default value" not in labels
    assert "Reset Takes per line to its default" in labels, labels  # its title, not its info line too
    assert "Reset Temperature to its default" in labels, labels

    # quoted names (code) and a download's file name keep their own direction
    styles = page.evaluate("""() => {
        const code = document.createElement('code');
        const holder = document.createElement('div');
        holder.className = 'file-preview-holder';
        const stem = document.createElement('span');
        stem.className = 'stem';
        holder.append(stem);
        document.body.append(code, holder);
        const got = [getComputedStyle(code).unicodeBidi, getComputedStyle(stem).unicodeBidi];
        code.remove(); holder.remove();
        return got;
    }""")
    assert styles == ["isolate", "plaintext"], styles


_NAME_XS = """(root) => {
  const out = {};
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  let node;
  while ((node = walker.nextNode())) {
    for (const name of ['مايا', 'سلمى', 'رامي']) {
      const i = node.textContent.indexOf(name);
      if (i < 0 || name in out) continue;
      const range = document.createRange();
      range.setStart(node, i);
      range.setEnd(node, i + name.length);
      out[name] = range.getBoundingClientRect().x;
    }
  }
  return out;
}"""


def test_right_to_left_names_keep_their_order_in_the_question_about_missing_voices(app_url, page):
    """Three Arabic speakers without a voice: the question and its "Render anyway" button list them in the
    order written, left to right as the English sentence runs (unisolated, the commas between right-to-left
    names joined them into one right-to-left run: the list read backwards)."""
    page.set_default_timeout(30_000)
    page.goto(app_url)
    page.get_by_role("tab", name="Script").click()
    page.get_by_label("Script", exact=True).fill("[مايا] مرحبا بكم.\n[سلمى] أهلا وسهلا.\n[رامي] بخير.")
    page.get_by_role("button", name="Render", exact=True).click()
    note = page.locator(".prose.csm-note").filter(has_text="no voice yet")
    expect(note).to_be_visible()
    button = page.get_by_role("button", name=re.compile("without a reference voice"))
    expect(button).to_be_visible()
    for where in (note, button):
        xs = where.evaluate(_NAME_XS)
        assert set(xs) == {"مايا", "سلمى", "رامي"}, xs
        assert xs["مايا"] < xs["سلمى"] < xs["رامي"], xs
