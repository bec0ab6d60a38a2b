"""views: the timeline and context bars as HTML, checked by parsing what they draw; one browser check
that clicking a block in a real `gr.HTML` seeks and plays the dialogue."""

from __future__ import annotations

import re
import socket
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from csm_multi.views import (
    CONTEXT_KINDS,
    SPEAKER_COLOURS,
    TIMELINE_JS,
    context_bars_html,
    line_peaks,
    timeline_html,
)

CHROMIUM = "/usr/bin/chromium"
HOSTILE = '<script>alert(1)</script>"\'${alert(2)}{{x}}'


class Elements(HTMLParser):
    """Every start tag as (tag, attrs, text inside it up to the next tag), and the page's plain text."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.items: list[tuple[str, dict[str, str], list[str]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.items.append((tag, {k: v or "" for k, v in attrs}, []))

    def handle_data(self, data):
        self.text.append(data)
        if self.items:
            self.items[-1][2].append(data)

    def having(self, cls: str) -> list[dict[str, str]]:
        return [a for _, a, _ in self.items if cls in a.get("class", "").split()]

    def texts(self, cls: str) -> list[str]:
        return ["".join(t) for _, a, t in self.items if cls in a.get("class", "").split()]


def row(i: int, speaker: str, start: float, dur: float, **extra) -> dict:
    return {"index": i, "line": i + 1, "speaker": speaker, "text": f"text {i + 1}", "start_s": start,
            "duration_s": dur, **extra}


def dialogue() -> list[dict]:
    return [row(0, "Alice", 0.0, 2.0, pause_before_s=0.0), row(1, "Bob", 2.5, 1.5, pause_before_s=0.5),
            row(2, "alice", 5.0, 3.0, pause_before_s=1.0)]


def style(attrs: dict[str, str], prop: str) -> float:
    return float(re.search(rf"(?:^|;){prop}:([\d.]+)%", attrs["style"]).group(1))


# ---- line_peaks -----------------------------------------------------------------------------------
def test_line_peaks_finds_the_loud_slice():
    audio = np.zeros(10_000)
    audio[7_000:7_100] = -0.8  # a burst in the 8th tenth; sign does not matter
    peaks = line_peaks(audio, 10)
    assert len(peaks) == 10
    assert peaks[7] == pytest.approx(0.8)
    assert max(peaks[:7] + peaks[8:]) == 0.0


def test_line_peaks_bounds_and_odd_inputs():
    assert line_peaks(np.array([2.0, -3.0, np.nan, 0.1]), 4) == [1.0, 1.0, 0.0, 0.1]  # clipped to 0..1
    assert line_peaks(np.zeros(0), 5) == [0.0] * 5
    assert line_peaks(np.array([0.5, 0.25]), 4) == [0.5, 0.5, 0.25, 0.25]  # shorter than points
    assert line_peaks([0.1, 0.2, 0.3], 1) == [0.3]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            line_peaks(np.ones(10), bad)
    with pytest.raises(ValueError, match="1-D"):
        line_peaks(np.ones((2, 10)), 4)


# ---- timeline -------------------------------------------------------------------------------------
def test_one_lane_per_speaker_in_order_of_first_line():
    manifest = [row(0, "Bob", 0, 1), row(1, "Alice", 1.5, 1), row(2, "BOB", 3, 1), row(3, "Cy", 4.5, 1)]
    page = Elements(timeline_html(manifest, None, None, 6.0))
    assert page.texts("csmv-name") == ["Bob", "Alice", "Cy"]  # speakers compare case-insensitively
    lanes = [a["aria-label"] for a in page.having("csmv-lane")]
    assert lanes == ["Bob", "Alice", "Cy"]
    colours = [re.search(r"border-color:(#\w+)", a["style"]).group(1) for a in page.having("csmv-name")]
    assert colours == list(SPEAKER_COLOURS[:3])


def test_blocks_sit_at_their_start_with_their_duration():
    page = Elements(timeline_html(dialogue(), None, "/a.wav", 8.0))
    blocks = page.having("csmv-b")
    assert [(float(b["data-start"]), float(b["data-dur"])) for b in blocks] == [(0, 2), (5, 3), (2.5, 1.5)]  # by lane
    third = next(b for b in blocks if b["data-start"] == "5.000")
    assert style(third, "left") == pytest.approx(100 * 5 / 8)
    assert style(third, "width") == pytest.approx(100 * 3 / 8)


def test_total_grows_to_cover_the_last_line_and_axis_ticks_in_seconds():
    page = Elements(timeline_html(dialogue(), None, None, 1.0))  # total shorter than the lines: use their end
    assert page.having("csmv-tl")[0]["data-total"] == "8.000"
    assert page.texts("csmv-tick") == ["0 s", "5 s"]
    long = Elements(timeline_html([row(0, "A", 0, 130)], None, None, 130))
    assert long.texts("csmv-tick")[:3] == ["0:00", "0:05", "0:10"] and long.texts("csmv-tick")[-1] == "2:10"


def test_lines_numbered_by_position_with_text_as_title():
    manifest = [row(0, "A", 0, 1), row(1, "B", 2, 1)]
    manifest[0]["line"], manifest[1]["line"] = 7, 9  # source line numbers of the script
    html = timeline_html(manifest, None, None, 3)
    blocks = Elements(html).having("csmv-b")
    assert [b["title"].split(" · ")[0] for b in blocks] == ["Line 1 (script line 7)", "Line 2 (script line 9)"]
    assert blocks[0]["title"].endswith("\ntext 1")
    assert re.findall(r'class="csmv-lab" dir="auto" aria-hidden="true"><b>(\d+)</b>', html) == ["1", "2"]


def test_names_and_texts_take_their_own_direction():
    """An Arabic or Hebrew line is laid out right to left in its block, so the block's cut (an ellipsis)
    falls at its end, not its start; names too. Before, an RTL line showed only its last words."""
    page = Elements(timeline_html([row(0, "مايا", 0, 1, text="البداية هنا ثم النهاية."), row(1, "Bob", 1, 1)], None, None, 2))
    assert [a.get("dir") for a in page.having("csmv-lab")] == ["auto", "auto"]
    assert [a.get("dir") for a in page.having("csmv-name")] == ["auto", "auto"]


def test_with_audio_blocks_are_buttons_that_the_script_can_seek():
    page = Elements(timeline_html(dialogue(), None, '/gradio_api/file=/x/"d".wav', 8))
    audio = [a for tag, a, _ in page.items if tag == "audio"]
    assert len(audio) == 1 and audio[0]["src"] == '/gradio_api/file=/x/"d".wav' and "csmv-audio" in audio[0]["class"]
    buttons = [a for tag, a, _ in page.items if tag == "button"]
    assert len(buttons) == 3 and all(b["type"] == "button" and "data-start" in b for b in buttons)
    assert all(b["aria-label"].startswith("Play from line") for b in buttons)
    # the script looks for exactly what the HTML provides
    for hook in ("audio.csmv-audio", ".csmv-tl [data-start]", ".csmv-playhead", "dataset.start", "dataset.dur",
                 "dataset.total", "currentTime", ".play()"):
        assert hook in TIMELINE_JS
    assert page.having("csmv-playhead")


def test_without_audio_nothing_pretends_to_play():
    page = Elements(timeline_html(dialogue(), None, None, 8))
    assert not [t for t, _, _ in page.items if t in ("audio", "button")]
    assert all(b["role"] == "img" and b["aria-label"].startswith("Line ") for b in page.having("csmv-b"))


def test_pauses_drawn_from_the_manifest_or_the_gap():
    page = Elements(timeline_html(dialogue(), None, None, 8))
    pauses = sorted((style(p, "left"), style(p, "width"), p["title"]) for p in page.having("csmv-p"))
    assert [(round(left * 8 / 100, 3), round(width * 8 / 100, 3), title) for left, width, title in pauses] == [
        (2.0, 0.5, "pause of 0.50 s before line 2"), (4.0, 1.0, "pause of 1.00 s before line 3")]
    older = [{k: v for k, v in r.items() if k != "pause_before_s"} for r in dialogue()]  # rows before the key
    titles = sorted(p["title"] for p in Elements(timeline_html(older, None, None, 8)).having("csmv-p"))
    assert titles == ["pause of 0.50 s before line 2", "pause of 1.00 s before line 3"]
    none = [row(0, "A", 0, 1, pause_before_s=0.0), row(1, "B", 1, 1, pause_before_s=0.0)]
    assert not Elements(timeline_html(none, None, None, 2)).having("csmv-p")


def test_waveforms_scaled_to_the_loudest_line_and_bounded_by_width():
    peaks = [[0.5] * 100, [0.25] * 100, [0.0] * 100]
    html = timeline_html(dialogue(), peaks, None, 8)
    paths = re.findall(r'<path vector-effect="non-scaling-stroke" d="([^"]+)"', html)
    assert len(paths) == 3
    bars = [re.findall(r"M(\d+) (\d+)v(\d+)", d) for d in paths]  # lane order: line 1, line 3, line 2
    assert {int(v) for _, _, v in bars[0]} == {92}  # the loudest line fills 2 * 46 of the 100-high box
    assert {int(v) for _, _, v in bars[2]} == {46}
    assert {int(v) for _, _, v in bars[1]} == {2}  # silence stays a visible hairline
    # a 1.5 s block is 36 px at 24 px/s: at most 18 bars however many peaks were given
    assert len(bars[2]) == 18 and len(bars[0]) == 24
    with pytest.raises(ValueError, match="peaks has 2 rows"):
        timeline_html(dialogue(), peaks[:2], None, 8)


def test_every_text_is_escaped():
    manifest = [row(0, HOSTILE, 0, 1, text=HOSTILE), row(1, "B", 1.5, 1, text="a & b </div>")]
    html = timeline_html(manifest, [[0.5], None], 'x"><script>alert(4)</script>', 3)
    assert "<script" not in html.lower()
    page = Elements(html)
    assert page.texts("csmv-name")[0] == HOSTILE
    assert HOSTILE in page.having("csmv-b")[0]["title"]
    assert [a["src"] for t, a, _ in page.items if t == "audio"] == ['x"><script>alert(4)</script>']
    bars = context_bars_html([{"speaker": HOSTILE, "context": [HOSTILE], "dropped": [HOSTILE],
                               "context_positions": 10}])
    assert "<script" not in bars.lower() and HOSTILE in "".join(Elements(bars).text)


def test_empty_dialogue():
    assert "Nothing rendered yet" in timeline_html([], None, None, 0)
    assert "Nothing rendered yet" in context_bars_html([])


def test_two_hundred_lines_of_ten_seconds_stay_small():
    rng = np.random.default_rng(0)
    manifest = [row(i, "AB"[i % 2], i * 10.4, 10.0, pause_before_s=0.4 if i else 0.0) for i in range(200)]
    peaks = [line_peaks(rng.standard_normal(240_000) * 0.3, 200) for _ in manifest]
    html = timeline_html(manifest, peaks, "/d.wav", 2080)
    assert len(html) < 400_000  # about 355 KB: waveforms capped at one bar per 2 px
    assert len(Elements(html).having("csmv-b")) == 200
    split = {"voices": 300, "lines": 700, "text": 25, "speak": 1000}
    bars = context_bars_html([{**m, "context_split": split, "context": ["profile:A", "line 3"]} for m in manifest])
    assert len(bars) < 250_000


def test_palette_readable_on_light_and_dark():
    def luminance(colour: str) -> float:
        c = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        c = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    def contrast(a: str, b: str) -> float:
        hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
        return (hi + 0.05) / (lo + 0.05)

    for colour in (*SPEAKER_COLOURS, *(c for _, _, c, _ in CONTEXT_KINDS)):
        for background in ("#ffffff", "#0b0f19", "#1f2937"):  # white, Gradio dark body and block
            assert contrast(colour, background) >= 3, (colour, background)
    assert len(set(SPEAKER_COLOURS)) == len(SPEAKER_COLOURS)


# ---- context bars ---------------------------------------------------------------------------------
def test_context_split_drawn_to_scale_with_numbers():
    m = {"speaker": "Alice", "context": ["profile:Bob", "profile:Alice", "line 1", "line 2"], "dropped": ["line 0"],
         "context_positions": 1000, "context_split": {"voices": 300, "lines": 700, "text": 24, "speak": 1000}}
    page = Elements(context_bars_html([m], window=2048))
    segs = page.having("csmv-seg")
    assert [s["title"].split(":")[0] for s in segs] == ["voice prompts", "earlier lines", "new line's text",
                                                        "room to speak", "free"]
    assert [round(style(s, "width") * 2048 / 100) for s in segs] == [300, 700, 24, 1000, 24]
    assert segs[0]["title"] == "voice prompts: 300 positions (profile:Bob, profile:Alice)"
    assert segs[1]["title"] == "earlier lines: 700 positions (line 1, line 2)"
    summary = page.having("csmv-bar")[0]
    assert summary["role"] == "img" and summary["aria-label"] == (
        "Line 1, Alice: 2024 of 2048 positions (voice prompts 300, earlier lines 700, new line's text 24,"
        " room to speak 1000, free 24)")
    assert "dropped: line 0" in "".join(page.text)
    legend = "".join(page.text)
    assert all(label in legend for _, label, _, _ in CONTEXT_KINDS) and "free" in legend


def test_rows_without_a_split_show_one_context_segment():
    page = Elements(context_bars_html([{"speaker": "A", "context_positions": 512, "context": ["line 1"]}], 2048))
    segs = page.having("csmv-seg")
    assert [s["title"] for s in segs] == ["context: 512 positions (line 1)", "not itemised: 1536 positions"]
    assert style(segs[0], "width") == pytest.approx(25.0)
    empty = {"speaker": "A", "context_positions": 512, "context_split": {}}
    assert Elements(context_bars_html([empty], 2048)).having("csmv-seg")[0]["title"] == "context: 512 positions"


def test_over_the_window_is_said_not_hidden():
    m = {"speaker": "A", "context_split": {"voices": 100, "lines": 0, "text": 10, "speak": 100}}
    page = Elements(context_bars_html([m], window=200))
    assert "over the window by 10" in page.having("csmv-bar")[0]["aria-label"]
    assert sum(style(s, "width") for s in page.having("csmv-seg")) == pytest.approx(100.0)
    drawn = [seg["title"].split(":")[0] for seg in page.having("csmv-seg")]
    assert drawn == ["voice prompts", "new line's text", "room to speak"]  # no empty "lines", no "free"
    with pytest.raises(ValueError):
        context_bars_html([m], window=0)


def test_no_script_and_no_external_assets():
    for html in (timeline_html(dialogue(), [[0.2, 0.4]] * 3, "/d.wav", 8), context_bars_html(dialogue())):
        assert "<script" not in html and "http" not in html and "url(" not in html and "@import" not in html


# ---- in a real browser ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_clicking_a_block_plays_from_its_line_in_gradio(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    gr = pytest.importorskip("gradio")
    import soundfile as sf

    sr, manifest, parts, t = 24_000, [], [], 0.0
    for i, speaker in enumerate(["Alice", HOSTILE, "Alice", "Bob"]):
        gap = 0.4 if i else 0.0
        parts.append(np.zeros(int(gap * sr)))
        t += gap
        tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * np.arange(int(1.5 * sr)) / sr)
        parts.append(tone)
        manifest.append(row(i, speaker, round(t, 3), 1.5, pause_before_s=gap, text=HOSTILE))
        t += 1.5
    wav = tmp_path / "dialogue.wav"
    sf.write(str(wav), np.concatenate(parts).astype(np.float32), sr)
    peaks = [line_peaks(np.asarray(p), 60) for p in parts[1::2]]
    value = timeline_html(manifest, peaks, f"gradio_api/file={wav}", t)

    with gr.Blocks() as demo:
        gr.HTML(value, js_on_load=TIMELINE_JS, apply_default_css=False, elem_id="timeline")
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, allowed_paths=[str(tmp_path)])
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone: the timeline scrolls
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.querySelector('#timeline audio.csmv-audio')?.readyState >= 1",
                                   timeout=30_000)
            block = page.locator("#timeline .csmv-b[data-start='5.700']")
            block.click()
            page.wait_for_function("!document.querySelector('#timeline audio').paused", timeout=10_000)
            now = page.locator("#timeline audio").evaluate("a => a.currentTime")
            assert 5.7 <= now < 7.0
            assert block.get_attribute("aria-current") == "true"
            assert page.locator("#timeline .csmv-name").nth(1).inner_text() == HOSTILE
            assert dialogs == []  # nothing from the script ran
            browser.close()
    finally:
        demo.close()


def test_on_a_phone_a_short_timeline_fits_and_a_long_one_says_to_swipe(tmp_path):
    """At 390 px the timeline kept a 480 px least width, so even a 4 s dialogue hid its later lines
    past the edge of its box, with no scrollbar to show it (phones hide them). Now it fits the screen
    when it can, and one that cannot says to swipe; on a desktop both keep their least width."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    short = [row(0, "Alice", 0.0, 1.8), row(1, "Bob", 2.0, 1.8)]
    long = [row(i, "AB"[i % 2], 4.0 * i, 3.8) for i in range(8)]
    page_of = {}
    for name, manifest in (("short", short), ("long", long)):
        page_of[name] = tmp_path / f"{name}.html"
        page_of[name].write_text(f"<!doctype html><meta name=viewport content='width=device-width'>"
                                 f"<body style='margin:0;padding:0 40px'>{timeline_html(manifest, None, None, 0)}",
                                 encoding="utf-8")
    seen = {}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        for width in (390, 1280):
            page = browser.new_page(viewport={"width": width, "height": 800})
            for name, path in page_of.items():
                page.goto(path.as_uri())
                seen[width, name] = page.evaluate("""() => {
                    const box = document.querySelector('.csmv-scroll');
                    return {hidden: box.scrollWidth - box.clientWidth,
                            area: document.querySelector('.csmv-area').getBoundingClientRect().width,
                            swipe: getComputedStyle(document.querySelector('.csmv-swipe') || document.body)
                                   .display !== 'none' && !!document.querySelector('.csmv-swipe')};
                }""")
        browser.close()
    assert seen[390, "short"]["hidden"] <= 1 and not seen[390, "short"]["swipe"]  # all of it in view
    assert seen[390, "long"]["hidden"] > 100 and seen[390, "long"]["swipe"]  # 31 s at 24 px/s: swipe, and it says so
    for name in ("short", "long"):
        assert seen[1280, name]["area"] >= 480 and not seen[1280, name]["swipe"]
