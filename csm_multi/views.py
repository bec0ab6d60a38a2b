"""Pictures of a rendered dialogue for the web page: the timeline and the context-window bars.

Pure functions from manifest rows (`RenderResult.manifest()`) to self-contained HTML strings (inline
CSS and SVG, no external assets, no `<script>`). Every text from a script or a profile is escaped.
Clicking a timeline block seeks the page's `<audio>` and plays: that behaviour is `TIMELINE_JS`,
meant for `gr.HTML(js_on_load=TIMELINE_JS)` (Gradio inserts HTML via innerHTML, so scripts in the
value never run). Knows nothing of models, tensors or Gradio; numpy only for `line_peaks`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

import numpy as np

# Graphic colours with >= 3:1 contrast on both white and Gradio's dark background (#0b0f19, #1f2937),
# so one palette serves light and dark themes (WCAG 1.4.11). Never the only cue: lanes carry names.
SPEAKER_COLOURS = ("#3b82f6", "#d55e00", "#059669", "#a855f7", "#d97706", "#db2777", "#0891b2", "#6366f1")
CONTEXT_KINDS = (  # key in "context_split", legend text, colour, CSS pattern class
    ("voices", "voice prompts", "#a855f7", "solid"),
    ("lines", "earlier lines", "#3b82f6", "stripes"),
    ("text", "new line's text", "#d97706", "dots"),
    ("speak", "room to speak", "#059669", "grid"),
)
PX_PER_S = 24.0  # timeline scale before it stretches to fill a wider page
MIN_TRACK_PX = 480  # the timeline's least width, but on a phone (there it fits the screen when it can)
PHONE_TRACK_PX = 230  # about what a 390 px phone shows of it beside the names
PX_PER_PEAK = 2  # at most one waveform bar per 2 px of block: bounds the HTML for long dialogues

_CSS_VARS = (".csmv,.csmv-ctx{--csmv-fg:var(--body-text-color,#1f2937);"
             "--csmv-muted:#4b5563;--csmv-bg:var(--background-fill-primary,#fff);--csmv-bg2:var(--background-fill-secondary,#f3f4f6);"
             "--csmv-line:var(--border-color-primary,#d1d5db)}"
             ".dark .csmv,.dark .csmv-ctx{--csmv-muted:#9ca3af}")

_TIMELINE_CSS = _CSS_VARS + """
.csmv{font:13px/1.3 var(--font,system-ui,sans-serif);color:var(--csmv-fg)}
.csmv audio{width:100%;height:36px;margin:0 0 6px}
.csmv-hint{color:var(--csmv-muted);font-size:12px;margin:0 0 4px}
.csmv-scroll{overflow-x:auto;scroll-padding-left:6.5rem;overscroll-behavior-x:contain;border:1px solid var(--csmv-line);border-radius:6px}
.csmv-grid{display:flex;min-width:100%;width:max-content}
.csmv-names{position:sticky;left:0;z-index:3;flex:0 0 6.5rem;width:6.5rem;min-width:0;background:var(--csmv-bg);border-right:1px solid var(--csmv-line)}
.csmv-name{height:56px;box-sizing:border-box;padding:4px 6px;border-left:5px solid;overflow:hidden;
 text-overflow:ellipsis;white-space:nowrap;font-weight:600;line-height:46px}
.csmv-axisname{height:22px}
.csmv-area{position:relative;flex:1 0 auto;min-width:""" + str(MIN_TRACK_PX) + """px}
.csmv-swipe{display:none}
.csmv-lane{position:relative;height:56px;border-bottom:1px dashed var(--csmv-line)}
.csmv-b{position:absolute;top:4px;bottom:4px;min-width:3px;box-sizing:border-box;margin:0;padding:0;overflow:hidden;
 border:1px solid var(--c);border-left-width:3px;border-radius:4px;background:var(--csmv-bg2);color:var(--csmv-fg);
 font:inherit;text-align:left;cursor:default}
button.csmv-b{cursor:pointer}
.csmv-b:hover,.csmv-b:focus-visible{outline:2px solid var(--c);outline-offset:1px;z-index:2}
.csmv-b.csmv-on{box-shadow:inset 0 0 0 2px var(--c)}
.csmv-b svg{position:absolute;left:0;right:0;top:15px;bottom:0;width:100%;height:calc(100% - 15px)}
.csmv-b svg path{stroke:var(--c);stroke-width:1.5px;fill:none}
.csmv-lab{position:absolute;top:0;left:0;right:0;display:block;height:15px;padding:0 4px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;
 font-size:11px;line-height:15px;border-bottom:1px solid var(--csmv-line)}
.csmv-lab b{font-weight:700;margin-right:4px}
.csmv-p{position:absolute;top:18px;bottom:18px;box-sizing:border-box;border:1px dashed var(--csmv-muted);
 border-radius:3px;color:var(--csmv-muted);font-size:10px;line-height:18px;text-align:center;overflow:hidden;white-space:nowrap}
.csmv-axis{position:relative;height:22px;font-size:11px;color:var(--csmv-muted)}
.csmv-tick{position:absolute;top:0;height:100%;border-left:1px solid var(--csmv-line);padding-left:3px;white-space:nowrap}
.csmv-playhead{position:absolute;top:0;bottom:0;left:0;width:0;border-left:2px solid var(--csmv-fg);z-index:2;
 pointer-events:none;display:none}
.csmv-playing .csmv-playhead{display:block}
@media (max-width:520px){.csmv-names{flex-basis:4.5rem;width:4.5rem}.csmv-scroll{scroll-padding-left:4.5rem}
 .csmv-area{min-width:0}.csmv-swipe{display:inline}}
"""

_BARS_CSS = _CSS_VARS + """
.csmv-ctx{font:13px/1.35 var(--font,system-ui,sans-serif);color:var(--csmv-fg)}
.csmv-legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:0 0 8px;padding:0;list-style:none}
.csmv-legend li{display:flex;align-items:center;gap:5px}
.csmv-sw{display:inline-block;width:18px;height:12px;border-radius:2px;border:1px solid var(--csmv-line)}
.csmv-row{margin:0 0 8px}
.csmv-head{display:flex;flex-wrap:wrap;gap:2px 10px;justify-content:space-between}
.csmv-head span:last-child{color:var(--csmv-muted);font-variant-numeric:tabular-nums}
.csmv-bar{display:flex;height:16px;border:1px solid var(--csmv-line);border-radius:3px;overflow:hidden;background:var(--csmv-bg)}
.csmv-seg{height:100%;box-sizing:border-box;border-right:1px solid var(--csmv-bg);color:#fff;font-size:10px;
 line-height:16px;text-align:center;overflow:hidden;white-space:nowrap;text-shadow:0 0 2px #000}
.csmv-free{background:transparent;color:var(--csmv-muted);text-shadow:none}
.csmv-stripes{background-image:repeating-linear-gradient(45deg,rgba(255,255,255,.35) 0 3px,transparent 3px 7px)}
.csmv-dots{background-image:radial-gradient(rgba(255,255,255,.55) 1.2px,transparent 1.3px);background-size:5px 5px}
.csmv-grid2{background-image:linear-gradient(90deg,rgba(255,255,255,.35) 1px,transparent 1px),
 linear-gradient(rgba(255,255,255,.35) 1px,transparent 1px);background-size:6px 6px}
.csmv-drop{color:var(--csmv-muted);font-size:12px}
"""

# Runs once per component (Gradio keeps `element` across value updates and patches its children), so
# every listener is delegated from `element`; `timeupdate` does not bubble, hence the capture phase.
TIMELINE_JS = """
const audioOf = () => element.querySelector('audio.csmv-audio');
element.addEventListener('click', (event) => {
  const block = event.target.closest ? event.target.closest('.csmv-tl [data-start]') : null;
  const audio = audioOf();
  if (!block || !audio || !element.contains(block)) return;
  const go = () => { audio.currentTime = Number(block.dataset.start) || 0; const p = audio.play(); if (p) p.catch(() => {}); };
  if (audio.readyState >= 1) go(); else { audio.addEventListener('loadedmetadata', go, { once: true }); audio.load(); }
});
const follow = (event) => {
  const audio = event.target;
  if (!(audio instanceof HTMLAudioElement) || !audio.classList.contains('csmv-audio')) return;
  const tl = element.querySelector('.csmv-tl');
  if (!tl) return;
  const now = audio.currentTime, total = Number(tl.dataset.total) || audio.duration || 1;
  tl.classList.toggle('csmv-playing', !audio.paused || now > 0);
  const head = tl.querySelector('.csmv-playhead');
  if (head) head.style.left = (Math.min(now / total, 1) * 100) + '%';
  tl.querySelectorAll('[data-start]').forEach((b) => {
    const s = Number(b.dataset.start), on = now >= s && now < s + Number(b.dataset.dur);
    b.classList.toggle('csmv-on', on);
    if (on) b.setAttribute('aria-current', 'true'); else b.removeAttribute('aria-current');
  });
};
['timeupdate', 'seeked', 'play', 'pause'].forEach((name) => element.addEventListener(name, follow, true));
"""


def line_peaks(audio, points: int) -> list[float]:
    """`points` peak levels (max |sample| per equal slice, clipped to 0..1) of a 1-D signal (S,).

    A signal shorter than `points` repeats its samples; an empty one gives zeros."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"points must be a whole number >= 1, got {points!r}")
    a = np.asarray(audio, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"line_peaks wants 1-D audio (S,), got shape {a.shape}")
    if a.size == 0:
        return [0.0] * points
    a = np.abs(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=1.0))
    starts = (np.arange(points) * a.size) // points  # repeated starts when S < points: reduceat takes a[start]
    return [round(float(v), 3) for v in np.minimum(np.maximum.reduceat(a, starts), 1.0)]


def timeline_html(manifest: Sequence[Mapping], peaks: Sequence[Sequence[float] | None] | None,
                  audio_url: str | None, total_s: float, px_per_s: float = PX_PER_S) -> str:
    """One lane per speaker, each line a block at `start_s` wide `duration_s` with its waveform, pauses
    as dashed gaps, a time axis; with `audio_url`, an `<audio>` and blocks as buttons (see TIMELINE_JS).

    `peaks[i]`: 0..1 levels of row i (e.g. `line_peaks(clip, 120)`), drawn relative to the loudest line.
    Blocks are numbered by position 1..N; the text is each block's title. Width: `px_per_s` per second
    (at least MIN_TRACK_PX, and the page width; on a phone it fits the screen when it can, and a longer one
    says to swipe); what does not fit scrolls sideways with the names kept in view."""
    if peaks is not None and len(peaks) != len(manifest):
        raise ValueError(f"peaks has {len(peaks)} rows but the manifest has {len(manifest)}")
    if not manifest:
        return f'<div class="csmv"><style>{_TIMELINE_CSS}</style><p class="csmv-hint">Nothing rendered yet.</p></div>'
    starts = [max(0.0, _num(m.get("start_s"))) for m in manifest]
    durs = [max(0.0, _num(m.get("duration_s"))) for m in manifest]
    total = max([_num(total_s), *(s + d for s, d in zip(starts, durs)), 1e-3])
    width = math.ceil(total * px_per_s)  # the area grows to the page's width, and to MIN_TRACK_PX but on a phone
    loudest = max((max(p, default=0.0) for p in peaks or [] if p), default=0.0) or 1.0

    lanes: dict[object, int] = {}  # speaker key -> lane, in order of first line
    names: list[str] = []
    for m in manifest:
        key = m.get("speaker_id", str(m.get("speaker", "")).casefold())
        if key not in lanes:
            lanes[key] = len(names)
            names.append(str(m.get("speaker", "")))
    rows: list[list[str]] = [[] for _ in names]
    prev_end = 0.0
    for i, m in enumerate(manifest):
        lane = lanes[m.get("speaker_id", str(m.get("speaker", "")).casefold())]
        pause = m.get("pause_before_s")
        pause = starts[i] - prev_end if pause is None else _num(pause)
        if i and pause > 0.005:
            rows[lane].append(_pause(min(pause, starts[i]), starts[i], total, i + 1, pause * px_per_s))
        rows[lane].append(_block(i, m, starts[i], durs[i], total, lane, peaks[i] if peaks else None, loudest,
                                 playable=bool(audio_url), px=durs[i] * px_per_s))
        prev_end = starts[i] + durs[i]

    name_cells = "".join(f'<div class="csmv-name" style="border-color:{_colour(k)}" title="{escape(n)}" dir="auto">{escape(n)}</div>'
                         for k, n in enumerate(names))
    lane_divs = "".join(f'<div class="csmv-lane" role="group" aria-label="{escape(n)}">{"".join(r)}</div>'
                        for n, r in zip(names, rows))
    player = (f'<audio class="csmv-audio" controls preload="metadata" src="{escape(audio_url)}"'
              f' aria-label="The dialogue"></audio>' if audio_url else "")
    hint = ("Click a line to play the dialogue from there." if audio_url else "Line timing and waveforms.")
    hint += f" {len(manifest)} line{'' if len(manifest) == 1 else 's'}, {_clock(total)}."
    if width > PHONE_TRACK_PX:  # wider than a phone shows: say so there (its scrollbars are hidden)
        hint += ' <span class="csmv-swipe">Swipe the timeline sideways for the rest.</span>'

    return (f'<div class="csmv"><style>{_TIMELINE_CSS}</style>{player}'
            f'<p class="csmv-hint">{hint}</p>'
            f'<div class="csmv-scroll csmv-tl" data-total="{total:.3f}" role="region" tabindex="0"'
            f' aria-label="Dialogue timeline, {len(names)} speakers, {len(manifest)} lines">'
            f'<div class="csmv-grid"><div class="csmv-names">{name_cells}<div class="csmv-axisname"></div></div>'
            f'<div class="csmv-area" style="width:{width}px">{lane_divs}{_axis(total, px_per_s)}'
            f'<div class="csmv-playhead" aria-hidden="true"></div></div></div></div></div>')


def context_bars_html(manifest: Sequence[Mapping], window: int = 2048) -> str:
    """Per line, a bar of the `window` positions: voice prompts, earlier lines, the new text, room to speak, free.

    Reads per row `context_split` = {"voices", "lines", "text", "speak"} (positions each); a row without
    it (or with an empty one) shows `context_positions` as one "context" segment and the rest as "not
    itemised". Also shows `context` (kept labels, as titles) and `dropped`."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    legend = "".join(f'<li><span class="csmv-sw csmv-{_pattern(p)}" style="background-color:{c}" aria-hidden="true">'
                     f'</span>{escape(label)}</li>' for _, label, c, p in CONTEXT_KINDS)
    legend += '<li><span class="csmv-sw" aria-hidden="true"></span>free</li>'
    rows = "".join(_context_row(i, m, window) for i, m in enumerate(manifest))
    if not manifest:
        rows = '<p class="csmv-drop">Nothing rendered yet.</p>'
    return (f'<div class="csmv-ctx"><style>{_BARS_CSS}</style>'
            f'<p class="csmv-drop">What each line\'s prompt spends of the {window}-position context window.</p>'
            f'<ul class="csmv-legend" aria-label="Legend">{legend}</ul>{rows}</div>')


# ---- pieces --------------------------------------------------------------------------------------
def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def _colour(lane: int) -> str:
    return SPEAKER_COLOURS[lane % len(SPEAKER_COLOURS)]


def _pct(x: float, total: float) -> str:
    return f"{100 * x / total:.3f}%"


def _clock(t: float) -> str:
    return f"{t:.1f} s" if t < 60 else f"{int(t // 60)}:{t % 60:04.1f}"


def _block(i: int, m: Mapping, start: float, dur: float, total: float, lane: int, peaks, loudest: float,
           playable: bool, px: float) -> str:
    n, speaker, text = i + 1, str(m.get("speaker", "")), str(m.get("text", ""))
    source = m.get("line")
    where = f" (script line {source})" if source not in (None, n) else ""
    title = f"Line {n}{where} · {speaker} · {start:.2f}–{start + dur:.2f} s\n{text}"
    label = f"{'Play from line' if playable else 'Line'} {n}, {speaker}, at {start:.1f} s: {text}"
    tag = 'button type="button"' if playable else 'div role="img"'
    wave = _wave(peaks, loudest, max(1, int(px // PX_PER_PEAK))) if peaks else ""
    return (f'<{tag} class="csmv-b" data-start="{start:.3f}" data-dur="{dur:.3f}"'
            f' style="left:{_pct(start, total)};width:{_pct(dur, total)};--c:{_colour(lane)}"'
            f' title="{escape(title)}" aria-label="{escape(label)}">{wave}'
            f'<span class="csmv-lab" dir="auto" aria-hidden="true"><b>{n}</b>{escape(text)}</span></{tag.split()[0]}>')


def _wave(peaks: Sequence[float], loudest: float, most: int) -> str:
    """Mirrored bars in a 0..N x 0..100 box stretched to the block; at most `most` bars."""
    levels = [min(1.0, max(0.0, _num(p))) for p in peaks]
    if len(levels) > most:  # keep the peak of each group so short sounds stay visible
        levels = line_peaks(levels, most)
    d = "".join(f"M{x} {50 - h}v{2 * h}" for x, h in
                ((x, max(1, round(46 * v / loudest))) for x, v in enumerate(levels)))
    return (f'<svg viewBox="-0.5 0 {len(levels)} 100" preserveAspectRatio="none" aria-hidden="true" focusable="false">'
            f'<path vector-effect="non-scaling-stroke" d="{d}"/></svg>')


def _pause(pause: float, start: float, total: float, n: int, px: float) -> str:
    text = f"{pause:.1f} s" if px >= 26 else ""
    return (f'<div class="csmv-p" style="left:{_pct(start - pause, total)};width:{_pct(pause, total)}"'
            f' title="pause of {pause:.2f} s before line {n}">{text}</div>')


def _axis(total: float, px_per_s: float) -> str:
    step = next((s for s in (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800) if s * px_per_s >= 64), 3600)
    ticks = "".join(f'<span class="csmv-tick" style="left:{_pct(k * step, total)}">{_tick(k * step, total)}</span>'
                    for k in range(int(total // step) + 1))
    return f'<div class="csmv-axis" aria-hidden="true">{ticks}</div>'


def _tick(t: float, total: float) -> str:
    return f"{int(t // 60)}:{int(t % 60):02d}" if total >= 60 else f"{t:g} s"


def _pattern(p: str) -> str:
    return "grid2" if p == "grid" else p


def _context_row(i: int, m: Mapping, window: int) -> str:
    n, speaker = i + 1, str(m.get("speaker", ""))
    kept = [str(k) for k in m.get("context") or []]
    dropped = [str(d) for d in m.get("dropped") or []]
    split = m.get("context_split")
    if isinstance(split, Mapping) and split:
        parts = [(label, colour, pattern, max(0, int(_num(split.get(key)))), key)
                 for key, label, colour, pattern in CONTEXT_KINDS]
        rest_label = "free"
    else:
        parts = [("context", "#6b7280", "solid", max(0, int(_num(m.get("context_positions")))), "context")]
        rest_label = "not itemised"
    used = sum(p[3] for p in parts)
    free = window - used
    scale = max(window, used)
    segs = []
    for label, colour, pattern, size, key in parts:
        if not size:
            continue
        what = [k for k in kept if k.startswith("profile:")] if key == "voices" else (
            [k for k in kept if not k.startswith("profile:")] if key == "lines" else (kept if key == "context" else []))
        title = f"{label}: {size} positions" + (f" ({', '.join(what)})" if what else "")
        segs.append(f'<span class="csmv-seg csmv-{_pattern(pattern)}" style="width:{_pct(size, scale)};'
                    f'background-color:{colour}" title="{escape(title)}">{size if size * 28 >= scale else ""}</span>')
    if free > 0:
        segs.append(f'<span class="csmv-seg csmv-free" style="width:{_pct(free, scale)}"'
                    f' title="{rest_label}: {free} positions">{free if free * 28 >= scale else ""}</span>')
    numbers = ", ".join(f"{p[0]} {p[3]}" for p in parts) + (f", {rest_label} {free}" if free >= 0
                                                            else f", over the window by {-free}")
    summary = f"Line {n}, {speaker}: {used} of {window} positions ({numbers})"
    drop = (f'<div class="csmv-drop" title="{escape("; ".join(dropped))}">dropped: {escape(", ".join(dropped))}</div>'
            if dropped else "")
    return (f'<div class="csmv-row"><div class="csmv-head"><span><b>{n}</b> <bdi>{escape(speaker)}</bdi></span>'
            f'<span>{escape(numbers)}</span></div>'
            f'<div class="csmv-bar" role="img" aria-label="{escape(summary)}">{"".join(segs)}</div>{drop}</div>')
