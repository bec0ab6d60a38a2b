"""Dialogue scripts: text as people write it -> numbered `ScriptLine`s (speaker, text).

One utterance per line, `Name: text`, `[Name] text` or `[Name]: text`; blank lines and lines
starting with `#` are ignored. Pause tags (`[pause 1.5s]`, `[pause 300ms]`) set the silence before
an utterance: on a line of their own or at the start of a text, before that utterance; at the end of
a text, before the next one; in the middle, they split the line into two utterances of the same
speaker and source line number. Consecutive tags add up (at most `MAX_PAUSE_MS` in all).
Every problem is collected and reported at once with its source line number and a hint. Speakers
compare case-insensitively and display with their first spelling. Control characters are dropped
from the text and refused in names, as are bidi overrides (which can disguise a name); right-to-left
scripts are ordinary text.
This module knows nothing about torch, models, audio or voice profiles: it only reads text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import ScriptError

MAX_NAME_CHARS = 40
MAX_PAUSE_MS = 10_000  # one pause, all its tags together
MAX_LISTED_PROBLEMS = 20
_MAX_LISTED_LINES = 10  # line numbers shown per unknown speaker

_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what editors count as lines (not str.splitlines' \f, \x1c, ...)
_COLONS = ":\uff1a"  # ASCII and full-width (CJK) colon
# Bidi embeddings, overrides and isolates: in a name they make "Alice" and "\u202eecilA" look alike
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # terminal colour/cursor codes pasted from a console
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# `[pause ...]`: the word "pause" (any case) not followed by a letter, then the duration up to "]"
_PAUSE_TAG = re.compile(r"\[\s*pause(?![^\W\d_])([^\[\]]*)\]", re.IGNORECASE)
_PAUSE_OPEN = re.compile(r"\[\s*pause(?![^\W\d_])", re.IGNORECASE)  # what is left of a tag missing its "]"
_UNCLOSED = "`[pause` without its closing `]` — write `[pause 1.5s]` or `[pause 300ms]`"
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|milliseconds?|s|secs?|seconds?)", re.IGNORECASE)


@dataclass(frozen=True)
class ScriptLine:
    """One utterance: 1-based source line `number`, `speaker` (display spelling), `text` (no pause
    tags), and `pause_before_ms`, the silence before it (None: the render's default)."""

    number: int
    speaker: str
    text: str
    pause_before_ms: int | None = None


class ScriptProblems(ScriptError):
    """A `ScriptError` that lists every problem found: `problems` = [(line number or 0, message)]."""

    def __init__(self, problems: list[tuple[int, str]], header: str = "The script has problems"):
        self.problems = list(problems)
        shown = [f"  line {n}: {msg}" if n > 0 else f"  {msg}" for n, msg in self.problems[:MAX_LISTED_PROBLEMS]]
        if len(self.problems) > MAX_LISTED_PROBLEMS:
            shown.append(f"  ... and {len(self.problems) - MAX_LISTED_PROBLEMS} more")
        count = len(self.problems)
        super().__init__(f"{header} ({count} problem{'s' * (count != 1)}):\n" + "\n".join(shown))


def speaker_key(name: str) -> str:
    """How speaker names compare: whitespace runs collapsed, case folded (`Mary  ann` == `mary Ann`)."""
    return " ".join(name.split()).casefold()


def parse_script(text: str, *, max_lines: int = 500, max_chars_per_line: int = 1000) -> list[ScriptLine]:
    """Script text -> utterances in order. Raises `ScriptProblems` (a `ScriptError`) listing every problem."""
    if max_lines < 1 or max_chars_per_line < 1:
        raise ValueError("max_lines and max_chars_per_line must be >= 1")
    problems: list[tuple[int, str]] = []
    lines: list[ScriptLine] = []
    display: dict[str, str] = {}  # speaker key -> first spelling
    previous = 0  # number of the last utterance line, for continuation hints
    pending, pending_line = None, 0  # the pause waiting for the next utterance, and where its last tag is
    for number, raw in enumerate(_LINE_BREAK.split(text.removeprefix("\ufeff")), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parsed = _line_events(stripped, previous)
        if isinstance(parsed, str):
            problems.append((number, parsed))
            pending = None  # it was meant for this line
            continue
        name, events = parsed
        for event in events:
            if isinstance(event, int):
                over = pending is not None and pending > MAX_PAUSE_MS
                pending, pending_line = (pending or 0) + event, number
                if pending > MAX_PAUSE_MS and not over:
                    problems.append((number, (f"the pauses here add up to {pending / 1000:g} s, the limit is"
                                             f" {MAX_PAUSE_MS / 1000:g} s — shorten or remove some")))
                continue
            previous = number
            if len(event) > max_chars_per_line:
                problems.append((number, (f"the text is {len(event)} characters, the limit is {max_chars_per_line}"
                                         f" — split it into several lines for {name}")))
            else:
                lines.append(ScriptLine(number, display.setdefault(speaker_key(name), name), event, pending))
            pending = None
    if pending is not None:
        problems.append((pending_line, ("a pause after the last line has nothing to come before — delete it, or"
                                       " write the line it comes before")))
    if len(lines) > max_lines:
        problems.append((lines[max_lines].number, (f"the script has {len(lines)} lines to speak, the limit is"
                                                  f" {max_lines} — split it into parts of at most {max_lines}")))
    if not lines and not problems:
        problems.append((0, "the script is empty — write one line per utterance, e.g. `Alice: Hello there.`"))
    if problems:
        raise ScriptProblems(problems, "The script could not be read")
    return lines


def clean_line_text(text: str, max_chars_per_line: int = 1000) -> str:
    """A line's edited text as `parse_script` would keep it (control characters dropped, stripped).

    Raises `ScriptProblems` when it is empty, longer than `max_chars_per_line`, or holds a pause
    tag: an edited line stays one utterance, and its pause is set apart from its text.
    """
    said = _clean_text(_LINE_BREAK.sub(" ", text)) if isinstance(text, str) else ""  # one line: breaks are spaces
    if not said:
        problem = "the new text is empty — write what the line should say"
    elif _PAUSE_OPEN.search(said):
        problem = "the new text holds a pause tag — set the line's pause on its own, or edit the script"
    elif len(said) > max_chars_per_line:
        problem = f"the new text is {len(said)} characters, the limit is {max_chars_per_line} — shorten it"
    else:
        return said
    raise ScriptProblems([(0, problem)], "The line's text cannot be used")


def with_line_text(script: str, number: int, speaker: str, text: str) -> str | None:
    """`script` with its source line `number` saying `text` (the per-line editor's edit, written back
    so that the next Render says it too), or None where that line no longer holds exactly one
    utterance of `speaker` (the script changed since, or a mid-line pause made it two utterances).

    The line keeps its speaker as written (`Name:` or `[Name]`) and its pauses, before and after the
    text; `text` is a line's text as `clean_line_text` returns it. Line breaks are kept as they are.
    """
    parts = re.split(r"(\r\n|\r|\n)", script)  # lines at the even places, their breaks between
    at = 2 * (number - 1)
    if number < 1 or at >= len(parts):
        return None
    raw = parts[at]
    stripped = raw.strip()
    if not stripped or stripped.startswith("#"):
        return None
    parsed = _line_events(stripped, 0)
    if isinstance(parsed, str):
        return None
    name, events = parsed
    texts = [i for i, e in enumerate(events) if isinstance(e, str)]
    if name is None or len(texts) != 1 or speaker_key(name) != speaker_key(speaker):
        return None
    if events[texts[0]] == text:
        return script
    tag = lambda ms: f"[pause {ms / 1000:g}s]"  # noqa: E731
    before = " ".join(tag(e) for e in events[: texts[0]])
    after = " ".join(tag(e) for e in events[texts[0] + 1:])
    marker = f"[{name}]" if _PAUSE_TAG.sub("", stripped).lstrip().startswith("[") else f"{name}:"
    line = " ".join(x for x in (marker, before, text, after) if x)
    indent = raw[: len(raw) - len(raw.lstrip())]
    again = _line_events(line, 0)
    if isinstance(again, str) or again[0] != name or again[1] != [*events[: texts[0]], text, *events[texts[0] + 1:]]:
        return None  # written back, it would not read as this line with this text
    parts[at] = indent + line
    return "".join(parts)


def speakers(lines: Iterable[ScriptLine]) -> list[str]:
    """Speaker names in order of first appearance, unique case-insensitively (first spelling)."""
    seen: dict[str, str] = {}
    for line in lines:
        seen.setdefault(speaker_key(line.speaker), line.speaker)
    return list(seen.values())


def speaker_lines(lines: Iterable[ScriptLine]) -> dict[str, tuple[str, list[int]]]:
    """Speaker key -> (first spelling, the script line numbers it speaks), in order of appearance."""
    found: dict[str, tuple[str, list[int]]] = {}
    for line in lines:
        found.setdefault(speaker_key(line.speaker), (line.speaker, []))[1].append(line.number)
    return found


def lines_label(numbers: list[int]) -> str:
    """[2, 4] -> "lines 2, 4" (at most `_MAX_LISTED_LINES` numbers, then "and N more")."""
    where = ", ".join(map(str, numbers[:_MAX_LISTED_LINES]))
    if len(numbers) > _MAX_LISTED_LINES:
        where += f" and {len(numbers) - _MAX_LISTED_LINES} more"
    return f"line{'s' * (len(numbers) > 1)} {where}"


def check_speakers(lines: Iterable[ScriptLine], known: Iterable[str] | Mapping[str, object]) -> None:
    """Raise `ScriptProblems` naming each speaker not in `known` (names or a mapping's keys) and its lines."""
    names = [known] if isinstance(known, str) else list(known)
    known_keys = {speaker_key(n) for n in names}
    choices = ", ".join(sorted(set(names), key=str.casefold)) if names else "none are set up yet"
    problems = [(numbers[0], (f"unknown speaker {name!r} ({lines_label(numbers)}) — add a voice for {name!r} or use"
                             f" a known speaker ({choices})"))
                for key, (name, numbers) in speaker_lines(lines).items() if key not in known_keys]
    if not problems:
        return
    raise ScriptProblems(problems, "The script names speakers without a voice")


# ---- internals ------------------------------------------------------------------------------
def _line_events(line: str, previous: int) -> tuple[str | None, list[int | str]] | str:
    """A stripped, non-comment line -> (speaker or None, its pauses (ms) and texts in order), or a
    problem message. Pause tags before the speaker count as if written at the start of the text."""
    lead: list[int | str] = []
    while match := _PAUSE_TAG.match(line):
        ms = _pause_ms(match, at_start=not lead)
        if isinstance(ms, str):
            return ms
        lead.append(ms)
        line = line[match.end():].lstrip()
    if not line:
        return None, lead  # pauses on a line of their own
    if _PAUSE_OPEN.match(line):
        return _UNCLOSED
    parsed = _parse_line(line, previous)
    if isinstance(parsed, str):
        return parsed
    name, events = parsed
    return name, lead + events


def _parse_line(line: str, previous: int) -> tuple[str, list[int | str]] | str:
    """A stripped, non-comment line -> (speaker, its texts and pauses), or a problem message with a hint."""
    if line.startswith("["):
        end = line.find("]")
        if end < 0:
            return "'[' without a closing ']' — write `[Name] text`"
        name, rest = line[1:end], line[end + 1:].lstrip()
        if rest[:1] and rest[0] in _COLONS:
            rest = rest[1:]
        marker = f"[{name.strip()}]"
    else:
        cut = min((i for i in (line.find(c) for c in _COLONS) if i >= 0), default=-1)
        if cut < 0:
            hint = f"; if it continues line {previous}, join the two lines" if previous else ""
            return f"no speaker — start the line with `Name: text` or `[Name] text`{hint}"
        name, rest = line[:cut], line[cut + 1:]
        marker = f"{name.strip()}:"
    name = " ".join(name.split())
    if not name:
        return "the speaker name is empty — write `Name: text`"
    if len(name) > MAX_NAME_CHARS:
        hint = f", or if this line continues line {previous}, join the two lines" if previous else ""
        return (f"the speaker name is {len(name)} characters, the limit is {MAX_NAME_CHARS} — use a shorter"
                f" name{hint}")
    if any(unreadable(c) or c in _BIDI_CONTROLS for c in name):
        return f"the speaker name {name!r} contains control characters or invalid text — retype the name"
    if _PAUSE_OPEN.search(name):
        return f"the speaker name {name!r} holds a pause tag — put the pause in the text: `Name: [pause 1s] text`"
    said = _clean_text(rest)
    if not said:
        return f"nothing to say after {marker} — write the text, or delete the line"
    events = _split_pauses(said)
    if isinstance(events, str):
        return events
    if not any(isinstance(e, str) for e in events):
        return f"nothing to say after {marker} but a pause — write the text, or put the pause on a line of its own"
    return name, events


def _split_pauses(text: str) -> list[int | str] | str:
    """A line's text -> its pieces (stripped, non-empty) and pauses (ms) in order, or a problem.

    Punctuation cut off by a tag stays with its words ("Wait [pause 1s]." -> "Wait.", then the
    pause), so no utterance is only a full stop or a quote mark.
    """
    events: list[int | str] = []
    tags = list(_PAUSE_TAG.finditer(text))
    texts = [text[a.end() if a else 0:b.start() if b else len(text)] for a, b in zip([None, *tags], [*tags, None])]
    for part, tag in zip(texts, [*tags, None]):  # text, tag, text, tag, ..., text
        if _PAUSE_OPEN.search(part):
            return _UNCLOSED
        if part := part.strip():
            events.append(part)
        if tag is not None:
            ms = _pause_ms(tag)
            if isinstance(ms, str):
                return ms
            events.append(ms)
    worded = [i for i, e in enumerate(events) if isinstance(e, str) and _has_words(e)]
    if not worded:
        return events
    loose = [i for i, e in enumerate(events) if isinstance(e, str) and i not in worded]
    for i in loose:  # after the words before it, else before the words after it
        before = [j for j in worded if j < i]
        if before:
            events[before[-1]] += events[i]
    leading = "".join(events[i] for i in loose if i < worded[0])
    events[worded[0]] = leading + events[worded[0]]
    return [e for i, e in enumerate(events) if i not in loose]


def _pause_ms(tag: re.Match, at_start: bool = False) -> int | str:
    """A matched `[pause ...]` tag -> milliseconds, or a problem message with a hint."""
    spec, written = tag[1].strip(), tag[0] if len(tag[0]) <= 40 else tag[0][:36] + "...]"
    found = _DURATION.fullmatch(spec)
    if found is None:
        if spec.startswith("-"):
            return f"{written} is negative — a pause is a duration such as `[pause 1.5s]` or `[pause 300ms]`"
        if re.fullmatch(r"[0-9.]+", spec):
            return f"{written} has no unit — write `[pause {spec}s]` or `[pause {spec}ms]`"
        name = " ".join(tag[0][1:-1].split())
        hint = ""
        if at_start and not any(c.isdigit() for c in spec) and len(name) <= MAX_NAME_CHARS:  # `[Pause Man] Hi`
            hint = f"; for a speaker named {name!r}, write `{name}: text`"
        return f"{written} is not a duration — write `[pause 1.5s]` or `[pause 300ms]`{hint}"
    ms = float(found[1]) * (1 if found[2].lower().startswith("m") else 1000)
    if not ms <= MAX_PAUSE_MS:
        return f"{written} is longer than the limit of {MAX_PAUSE_MS / 1000:g} s — use a shorter pause"
    return round(ms)


def _has_words(text: str) -> bool:
    return any(c.isalnum() for c in text)


# The bidirectional controls (_BIDI_CONTROLS: embeddings, overrides, isolates) change only how text is
# shown, never what is said, and an override left open shows the rest of a line reversed on the page
# (the timeline, the Lines editor): dropped from spoken text. The marks (LRM, RLM, ALM) and the joiners stay.
_NO_BIDI_CONTROLS = dict.fromkeys(map(ord, _BIDI_CONTROLS))
_INVISIBLE = {"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"}  # controls, format characters, surrogates, spaces


def _spoken(text: str) -> str:
    """`text` without bidirectional controls, or "" when nothing visible is left (only zero-width
    spaces, joiners, marks or blanks: nothing to say)."""
    text = text.translate(_NO_BIDI_CONTROLS)
    return text if any(unicodedata.category(c) not in _INVISIBLE for c in text) else ""


def _clean_text(text: str) -> str:
    """Drop control characters except tab and bidirectional controls; keep everything else (RTL marks,
    emoji joiners) as written. "" when nothing visible is left."""
    return _spoken(drop_controls(text, keep="\t")).strip()


def drop_controls(text: str, keep: str = "") -> str:
    """`text` without terminal escape sequences (ESC [ ... m), control characters (but `keep`) and
    unpaired surrogates (not text at all: no encoding can write them, yet JSON can carry them and a
    browser can send them)."""
    return "".join(c for c in _ANSI_ESCAPE.sub("", text) if c in keep or not unreadable(c))


def unreadable(c: str) -> bool:
    """A control character or an unpaired surrogate: nothing to read or speak."""
    return unicodedata.category(c) in ("Cc", "Cs")


def clean_utterance(text: str) -> str:
    """One utterance as every entry point hands it to the engine (Quick, the speech API): control
    characters but tab and line breaks, unpaired surrogates and bidirectional controls dropped, as in a
    script; ends stripped; "" when nothing visible is left."""
    return _spoken(drop_controls(text, keep="\t\n\r")).strip()
