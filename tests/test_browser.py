"""End to end in a real browser: the Gradio app (tiny preset, random weights) in headless Debian Chromium,
driven by Playwright for Python. Uses /usr/bin/chromium (apt package `chromium`); never downloads a browser.

Saves a voice profile from an uploaded WAV, renders a two-line script with it, and leaves a full-page
screenshot in tests/artifacts/browser-render.png.
"""

from __future__ import annotations

import os
import re
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
    mapping = page.get_by_role("grid", name="Speaker → voice profile ((none) = no reference)")
    expect(mapping.get_by_role("row", name="Alice Alice", exact=True)).to_be_visible()  # speaker Alice -> profile Alice
    max_s = page.get_by_label("number input for Max seconds per line")
    max_s.fill("1")
    max_s.press("Enter")
    page.get_by_role("button", name="Render", exact=True).click()

    expect(page.get_by_text(re.compile(r"^Done: 2 lines"))).to_be_visible(timeout=120_000)
    dialogue = _block(page, "Dialogue")
    expect(dialogue.locator("audio, a[download]").first).to_be_attached()
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
    mapping = page.get_by_role("grid", name="Speaker → voice profile ((none) = no reference)")
    expect(mapping.get_by_role("row", name="Alice Alice", exact=True)).to_be_visible()
    expect(mapping.get_by_role("row", name="Bob (none)", exact=True)).to_be_visible()

    page.get_by_role("tab", name="Voices").click()
    page.get_by_label("New name").fill("Alicia")
    page.get_by_role("button", name="Rename").click()
    expect(page.get_by_text("Renamed to Alicia.")).to_be_visible()
    page.get_by_role("tab", name="Script").click()
    expect(mapping.get_by_role("row", name="Alice Alicia", exact=True)).to_be_visible()

    page.get_by_role("tab", name="Voices").click()
    page.get_by_label("Yes, delete it").check()
    page.get_by_role("button", name="Delete", exact=True).click()
    expect(page.get_by_text("Deleted Alicia.")).to_be_visible()
    page.get_by_role("tab", name="Script").click()
    expect(mapping.get_by_role("row", name="Alice (none)", exact=True)).to_be_visible()


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
    if width > 600:  # on a phone the Status tab sits in the tabs' overflow menu
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
