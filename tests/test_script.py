"""Dialogue scripts: syntaxes, line numbers in errors, speakers, limits, and a fuzz test."""

from __future__ import annotations

import re
import sys
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csm_multi.errors import ScriptError
from csm_multi.script import (ScriptLine, ScriptProblems, check_speakers, clean_line_text, clean_utterance,
                              parse_script, speakers)

MAX_PAUSE_MS = 10_000  # the documented limit of one pause
BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"  # dropped from spoken text


def problems(text: str, **limits) -> list[tuple[int, str]]:
    with pytest.raises(ScriptError) as info:
        parse_script(text, **limits)
    return info.value.problems


def test_module_does_not_import_torch():
    import csm_multi.script as mod

    assert "torch" not in mod.__dict__
    with open(mod.__file__) as f:
        assert "import torch" not in f.read()


def test_all_three_syntaxes():
    text = "Alice: Hello there.\n[Bob] Hi Alice!\n[Carol]: Morning, both."
    assert parse_script(text) == [
        ScriptLine(1, "Alice", "Hello there."),
        ScriptLine(2, "Bob", "Hi Alice!"),
        ScriptLine(3, "Carol", "Morning, both."),
    ]


def test_comments_blank_lines_and_whitespace_keep_source_numbers():
    text = "# scene 1\n\n   Alice :   Hello.   \n\t# aside\n\r\n  [ Bob ]   Hi.  \n"
    assert parse_script(text) == [ScriptLine(3, "Alice", "Hello."), ScriptLine(6, "Bob", "Hi.")]


def test_crlf_and_bom():
    assert parse_script("\ufeffAlice: a\r\nBob: b\r\n") == [ScriptLine(1, "Alice", "a"), ScriptLine(2, "Bob", "b")]


def test_colon_inside_text_belongs_to_text():
    assert parse_script("Alice: Note: it's 10:30.")[0].text == "Note: it's 10:30."
    assert parse_script("[Alice] Time: 10:30")[0].text == "Time: 10:30"


def test_full_width_colon():
    assert parse_script("アリス：こんにちは")[0] == ScriptLine(1, "アリス", "こんにちは")


def test_line_without_speaker_is_an_error_with_hint():
    [(number, msg)] = problems("Alice: Hello\nand this continues\nBob: Hi")
    assert number == 2
    assert "no speaker" in msg and "Name: text" in msg and "line 1" in msg  # continuation hint
    assert "line 2:" in str(ScriptProblems([(number, msg)]))


def test_many_errors_collected_with_line_numbers():
    text = "Alice: ok\nno marker here\n[Unclosed hi\n: empty name\nBob:\n" + "x" * 50 + ": long name\nBob: fine"
    found = problems(text)
    assert [n for n, _ in found] == [2, 3, 4, 5, 6]
    msgs = dict(found)
    assert "]" in msgs[3]
    assert "empty" in msgs[4]
    assert "nothing to say" in msgs[5]
    assert "40" in msgs[6]
    assert all(" — " in m for m in msgs.values())  # every problem says how to fix it


def test_error_listing_is_capped():
    text = "\n".join(f"bad line {i}" for i in range(30))
    with pytest.raises(ScriptError) as info:
        parse_script(text)
    assert len(info.value.problems) == 30
    message = str(info.value)
    assert "line 20:" in message and "line 21:" not in message
    assert "and 10 more" in message


def test_empty_script():
    for text in ("", "   \n\n", "# only a comment\n"):
        [(number, msg)] = problems(text)
        assert number == 0 and "empty" in msg


def test_limits():
    [(number, msg)] = problems("Alice: a\nBob: b\nAlice: c", max_lines=2)
    assert number == 3 and "limit is 2" in msg
    [(number, msg)] = problems("Alice: short\nBob: " + "y" * 11, max_chars_per_line=10)
    assert number == 2 and "11 characters" in msg and "limit is 10" in msg
    assert parse_script("Bob: " + "y" * 10, max_chars_per_line=10)[0].text == "y" * 10
    with pytest.raises(ValueError):
        parse_script("Alice: a", max_lines=0)


def test_speaker_names_case_insensitive_first_spelling_shown():
    lines = parse_script("alice: one\nBOB: two\nAlice: three\nbob: four\nMary  Ann: five\nmary ann: six")
    assert [line.speaker for line in lines] == ["alice", "BOB", "alice", "BOB", "Mary Ann", "Mary Ann"]
    assert speakers(lines) == ["alice", "BOB", "Mary Ann"]


def test_speaker_name_with_control_character_is_rejected():
    [(number, msg)] = problems("Al\x00ice: hi")
    assert number == 1 and "control" in msg


def test_control_characters_stripped_unicode_kept():
    rtl = "\u05e9\u05dc\u05d5\u05dd \u200fעולם"  # Hebrew with a right-to-left mark
    emoji = "hi 👩\u200d👩\u200d👧 🎉"  # ZWJ family sequence
    lines = parse_script(f"Dana: {rtl}\nEve: a\x07b\x1bc\td\nملك: {emoji}")
    assert lines[0].text == rtl
    assert lines[1].text == "abc\td"
    assert lines[2] == ScriptLine(3, "ملك", emoji)


def test_bidi_overrides_are_dropped_and_invisible_only_text_is_nothing_to_say():
    """A right-to-left override kept in a line showed the rest of it reversed on the page (timeline,
    Lines editor) and changes nothing that is said; a line of zero-width characters only was rendered
    as if it said something. Marks and joiners inside real text stay (test above)."""
    [line] = parse_script("Ann: evil \u202etext with RTL\u202c end, \u2067isolated\u2069 too")
    assert line.text == "evil text with RTL end, isolated too"
    for invisible in ("\u200b\u200b", "\u200d", " \u200f\u2060 ", "\u202e", "\ufeff"):
        [(number, msg)] = problems(f"Ann: {invisible}")
        assert number == 1 and "nothing to say" in msg, (invisible, msg)
        assert clean_utterance(invisible) == ""  # Quick and the speech API: "write some text"
    with pytest.raises(ScriptError, match="empty"):
        clean_line_text("\u200b")
    assert clean_line_text("new\nBob: more\r\nend") == "new Bob: more end"  # an edit is one line: breaks are spaces
    assert clean_utterance("a\u202eb\u200dc") == "ab\u200dc"


def test_terminal_colour_codes_pasted_from_a_console_are_dropped_whole():
    [line] = parse_script("Alice: \x1b[1;31mRed\x1b[0m alert, \x1b[2Kreally")
    assert line.text == "Red alert, really"  # not "[1;31mRed[0m ..." spoken aloud


def test_check_speakers_accepts_known_any_case():
    lines = parse_script("Alice: a\nbob: b")
    check_speakers(lines, ["ALICE", "Bob"])
    check_speakers(lines, {"alice": "voice-1", "bob": None})


def test_check_speakers_names_unknown_speakers_with_line_numbers():
    lines = parse_script("Alice: a\nZed: b\n# c\nAlice: d\nzed: e\nYan: f")
    with pytest.raises(ScriptError) as info:
        check_speakers(lines, {"Alice": object(), "Bob": object()})
    err = info.value
    assert [n for n, _ in err.problems] == [2, 6]
    message = str(err)
    assert "'Zed' (lines 2, 5)" in message and "'Yan' (line 6)" in message
    assert "Alice, Bob" in message  # lists the known names


def test_check_speakers_with_nothing_known_and_single_string():
    lines = parse_script("Alice: a")
    with pytest.raises(ScriptError, match="none are set up"):
        check_speakers(lines, [])
    check_speakers(lines, "alice")  # one name, not its characters


def test_script_error_is_a_csm_error():
    from csm_multi.errors import CsmError

    assert issubclass(ScriptProblems, ScriptError) and issubclass(ScriptProblems, CsmError)


# ---- pause tags ------------------------------------------------------------------------------
def pauses(text: str) -> list[tuple[int, str, str, int | None]]:
    return [(line.number, line.speaker, line.text, line.pause_before_ms) for line in parse_script(text)]


def test_pause_on_its_own_line_sets_the_next_utterance():
    assert pauses("Alice: Hi.\n[pause 1.5s]\nBob: Hello.\nAlice: Bye.") == [
        (1, "Alice", "Hi.", None), (3, "Bob", "Hello.", 1500), (4, "Alice", "Bye.", None)]


def test_pause_units_spellings_and_case():
    for tag, ms in [("[pause 300ms]", 300), ("[pause 2 s]", 2000), ("[PAUSE 0.25S]", 250), ("[Pause .5 sec]", 500),
                    ("[pause 1 second]", 1000), ("[ pause 40 MS ]", 40), ("[pause 0s]", 0), ("[pause1s]", 1000)]:
        assert parse_script(f"A: one\n{tag}\nB: two")[1].pause_before_ms == ms, tag


def test_pause_at_the_start_of_a_text_sets_that_line_and_at_the_end_the_next():
    assert pauses("Alice: [pause 1s] Well.\nBob: Fine. [pause 700ms]\nAlice: Good.") == [
        (1, "Alice", "Well.", 1000), (2, "Bob", "Fine.", None), (3, "Alice", "Good.", 700)]
    # before the speaker counts as the start of the text
    assert pauses("A: x\n[pause 2s] [Bob] Late.") == [(1, "A", "x", None), (2, "Bob", "Late.", 2000)]


def test_pause_in_the_middle_splits_the_line_keeping_speaker_and_number():
    assert pauses("Intro: Hi.\n[Alice] Wait. [pause 1s] Did you hear that? [pause 300ms] No?") == [
        (1, "Intro", "Hi.", None), (2, "Alice", "Wait.", None), (2, "Alice", "Did you hear that?", 1000),
        (2, "Alice", "No?", 300)]


def test_consecutive_pauses_add_up():
    text = "A: one [pause 1s]\n[pause 500ms][pause 250ms]\n\n# a comment between\n[pause 1s]\nB: [pause 0.25s] two"
    assert parse_script(text)[1].pause_before_ms == 1000 + 500 + 250 + 1000 + 250


def test_punctuation_cut_off_by_a_tag_stays_with_its_words():
    assert pauses('A: Wait [pause 1s].\nB: "[pause 500ms] Hi," she said.') == [
        (1, "A", "Wait.", None), (2, "B", '"Hi," she said.', 1500)]


def test_speaker_brackets_still_work_and_a_pause_is_never_a_speaker():
    assert pauses("[Alice] hi\n[pause 1s]\n[Bob]: yo") == [(1, "Alice", "hi", None), (3, "Bob", "yo", 1000)]
    assert pauses("Pause: I am a speaker called Pause.") == [(1, "Pause", "I am a speaker called Pause.", None)]
    lines = parse_script("[pause 1s] [Carol] hi\nDan: [pause 2s] ok")
    assert speakers(lines) == ["Carol", "Dan"]


def test_pause_problems_are_reported_with_line_numbers_and_hints():
    text = ("Alice: hi\n[pause abc]\nBob: x [pause 5 minutes] y\n[pause -1s]\nA: x\n[pause 2]\nA: x\n"
            "A: far [pause 6s][pause 6s] too long\nB: [pause 1s]\nPause Man [pause 1s]: hi\nA: last\n[pause 1s]")
    found = problems(text)
    assert [n for n, _ in found] == [2, 3, 4, 6, 8, 9, 10, 12]
    for unclosed in ("A: wait [pause 1s", "[pause [B] hi", "A: [pause"):
        [(number, msg)] = problems(unclosed)
        assert number == 1 and "without its closing" in msg, unclosed
    msgs = dict(found)
    assert "[pause abc] is not a duration" in msgs[2] and "pause abc: text" in msgs[2]  # in case it names a speaker
    assert "[pause 5 minutes] is not a duration" in msgs[3] and "speaker" not in msgs[3]
    assert "negative" in msgs[4]
    assert "no unit" in msgs[6] and "[pause 2s]" in msgs[6]
    assert "add up to 12 s" in msgs[8] and "limit is 10 s" in msgs[8]
    assert "nothing to say after B: but a pause" in msgs[9]
    assert "holds a pause tag" in msgs[10]
    assert "after the last line" in msgs[12]
    assert all(" — " in m for m in msgs.values())


def test_one_pause_longer_than_the_limit_is_a_problem_however_it_is_written():
    [(number, msg)] = problems("A: x\n[pause 10.001s]\nB: y")
    assert number == 2 and "longer than the limit of 10 s" in msg
    assert parse_script(f"A: x\n[pause {MAX_PAUSE_MS}ms]\nB: y")[1].pause_before_ms == MAX_PAUSE_MS
    [(number, msg)] = problems("A: x [pause " + "9" * 400 + "s] y")  # no float overflow
    assert number == 1 and "longer than the limit" in msg and len(msg) < 200


def test_a_pause_before_the_first_line_is_kept_for_it():
    assert pauses("[pause 2s]\nA: late start") == [(2, "A", "late start", 2000)]


def test_an_edited_line_text_is_cleaned_and_checked():
    assert clean_line_text("  new\x07 words  ") == "new words"
    for bad, message in [("   ", "empty"), ("a [pause 1s] b", "pause tag"), ("x" * 11, "11 characters")]:
        with pytest.raises(ScriptError, match=message):
            clean_line_text(bad, max_chars_per_line=10)


# ---- properties -------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=400), st.text(alphabet="ab :：[]#\n\r\t\x00\x07\x1cé\u200f👩", max_size=200)))
def test_fuzz_parse_returns_lines_or_raises_script_error(text):
    try:
        lines = parse_script(text, max_lines=20, max_chars_per_line=50)
    except ScriptError as e:
        assert e.problems and all(isinstance(n, int) and n >= 0 for n, _ in e.problems)
        assert str(e)
    else:
        assert 1 <= len(lines) <= 20
        assert [line.number for line in lines] == sorted(line.number for line in lines)  # a split line repeats
        for line in lines:
            assert line.text and line.text == line.text.strip() and len(line.text) <= 50
            assert 1 <= len(line.speaker) <= 40
            assert not any(ord(c) < 32 and c != "\t" for c in line.text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["A: ", "[B] ", "hi", " ", "\n", "[pause ", "[Pause", "1", "0.5", "s", "ms", "]", ".",
                                 "-", "x", "12"]), max_size=40).map("".join))
def test_fuzz_scripts_full_of_pause_tags(text):
    try:
        lines = parse_script(text, max_chars_per_line=50)
    except ScriptError as e:
        assert e.problems and all(isinstance(n, int) and n >= 0 and " — " in m for n, m in e.problems)
    else:
        for line in lines:
            assert line.text.strip() and not re.search(r"\[\s*pause(?![a-z])", line.text.casefold())  # "[Pauses" is text
            name = line.speaker.casefold()  # "[pause 1s]" never reads as a speaker; "[PauseA] hi" may
            assert not re.match(r"pause(?![a-z])", name) and not re.search(r"\[\s*pause(?![a-z])", name)
            assert line.pause_before_ms is None or line.pause_before_ms <= MAX_PAUSE_MS


names = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="[]:：#"),
                min_size=1, max_size=40).map(lambda s: " ".join(s.split())).filter(lambda s: s and len(s) <= 40)
texts = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters=BIDI_CONTROLS),
                min_size=1, max_size=80).map(str.strip).filter(
    lambda s: s and s[0] not in ":：" and "pause" not in s.casefold()  # `[A] : x` reads as `[A]: x`
    and any(unicodedata.category(c) not in ("Cf", "Zs") for c in s))  # something visible to say


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(names, texts, st.sampled_from(["{n}: {t}", "[{n}] {t}", "[{n}]: {t}"])),
                min_size=1, max_size=10))
def test_round_trip_of_written_scripts(rows):
    text = "\n".join(form.format(n=n, t=t) for n, t, form in rows)
    lines = parse_script(text)
    assert [line.number for line in lines] == list(range(1, len(rows) + 1))
    assert [line.text for line in lines] == [t for _, t, _ in rows]
    assert [line.speaker.casefold() for line in lines] == [n.casefold() for n, _, _ in rows]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_an_edited_line_is_written_back_into_its_script_line():
    """The per-line editor's edit goes back into the script (the next Render says it too): the line
    keeps its speaker as written, its pauses and the script's other lines and line breaks; a line
    that no longer holds that speaker's one utterance is left alone (None)."""
    from csm_multi.script import with_line_text

    script = "# scene\nAlice: Hello there.\n[Bob] [pause 1s] Hi, Alice. [pause 0.5s]\r\nAlice: One [pause 1s] two.\n  王小明：你好"
    assert with_line_text(script, 2, "alice", "Good morning!") == script.replace("Hello there.", "Good morning!")
    bob = with_line_text(script, 3, "Bob", "Hey you.")
    assert bob == script.replace("Hi, Alice.", "Hey you.")
    assert [(ln.speaker, ln.text, ln.pause_before_ms) for ln in parse_script(bob)][1:3] == [
        ("Bob", "Hey you.", 1000), ("Alice", "One", 500)]
    assert with_line_text(script, 5, "王小明", "再见").endswith("\n  王小明: 再见")
    assert with_line_text(script, 2, "Alice", "Hello there.") == script  # nothing to change
    for number, speaker in ((1, "Alice"), (2, "Bob"), (4, "Alice"), (9, "Bob"), (0, "Alice")):
        assert with_line_text(script, number, speaker, "New words.") is None  # comment, other speaker, two utterances, none
