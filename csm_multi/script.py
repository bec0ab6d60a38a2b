"""Dialogue scripts: text as people write it -> numbered `ScriptLine`s (speaker, text).

One utterance per line, `Name: text`, `[Name] text` or `[Name]: text`; blank lines and lines
starting with `#` are ignored. Every problem is collected and reported at once with its source line
number and a hint. Speakers compare case-insensitively and display with their first spelling.
Control characters are dropped from the text and refused in names, as are bidi overrides (which can
disguise a name); right-to-left scripts are ordinary text.
This module knows nothing about torch, models, audio or voice profiles: it only reads text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import ScriptError

MAX_NAME_CHARS = 40
MAX_LISTED_PROBLEMS = 20
_MAX_LISTED_LINES = 10  # line numbers shown per unknown speaker

_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what editors count as lines (not str.splitlines' \f, \x1c, ...)
_COLONS = ":\uff1a"  # ASCII and full-width (CJK) colon
# Bidi embeddings, overrides and isolates: in a name they make "Alice" and "\u202eecilA" look alike
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # terminal colour/cursor codes pasted from a console
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass(frozen=True)
class ScriptLine:
    """One utterance: 1-based source line `number`, `speaker` (display spelling), `text`."""

    number: int
    speaker: str
    text: str


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
    for number, raw in enumerate(_LINE_BREAK.split(text.removeprefix("\ufeff")), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parsed = _parse_line(stripped, previous)
        if isinstance(parsed, str):
            problems.append((number, parsed))
            continue
        name, said = parsed
        previous = number
        if len(said) > max_chars_per_line:
            problems.append((number, f"the text is {len(said)} characters, the limit is {max_chars_per_line}"
                                     f" — split it into several lines for {name}"))
            continue
        lines.append(ScriptLine(number, display.setdefault(speaker_key(name), name), said))
    if len(lines) > max_lines:
        problems.append((lines[max_lines].number, f"the script has {len(lines)} lines to speak, the limit is"
                                                  f" {max_lines} — split it into parts of at most {max_lines}"))
    if not lines and not problems:
        problems.append((0, "the script is empty — write one line per utterance, e.g. `Alice: Hello there.`"))
    if problems:
        raise ScriptProblems(problems, "The script could not be read")
    return lines


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
    problems = [(numbers[0], f"unknown speaker {name!r} ({lines_label(numbers)}) — add a voice for {name!r} or use"
                             f" a known speaker ({choices})")
                for key, (name, numbers) in speaker_lines(lines).items() if key not in known_keys]
    if not problems:
        return
    raise ScriptProblems(problems, "The script names speakers without a voice")


# ---- internals ------------------------------------------------------------------------------
def _parse_line(line: str, previous: int) -> tuple[str, str] | str:
    """A stripped, non-comment line -> (speaker, text), or a problem message with a hint."""
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
    if any(unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS for c in name):
        return f"the speaker name {name!r} contains control characters — retype the name"
    said = _clean_text(rest)
    if not said:
        return f"nothing to say after {marker} — write the text, or delete the line"
    return name, said


def _clean_text(text: str) -> str:
    """Drop control characters except tab; keep everything else (RTL marks, emoji joiners) as written."""
    return drop_controls(text, keep="\t").strip()


def drop_controls(text: str, keep: str = "") -> str:
    """`text` without terminal escape sequences (ESC [ ... m) and control characters (but `keep`)."""
    return "".join(c for c in _ANSI_ESCAPE.sub("", text) if c in keep or unicodedata.category(c) != "Cc")
