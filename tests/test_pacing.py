"""pacing.Pacer: streamed audio made slower than real time is held back just long enough that the
player, once started, never waits for the next chunk; made faster, nothing is held."""

from __future__ import annotations

import pytest

from csm_multi.pacing import SECONDS_PER_CHAR, LineLengths, Pacer, expected_seconds

CHUNK = 0.88  # the app's chunks: 11 frames of 80 ms


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def play(length: float, rtf: float, expected: float, wait: float = 1.0, max_s: float = 30.0):
    """Chunks of `length` s of audio made at `rtf` after `wait` s (queue and prompt): (when playback
    starts, how long the player then waits for chunks in all)."""
    clock = Clock()
    pacer = Pacer(expected, max_s, CHUNK, clock=clock)
    clock.now = wait
    arrivals, start, made = [], None, 0.0
    while made < length - 1e-9:
        size = min(CHUNK, length - made)
        clock.now += size * rtf
        made += size
        arrivals.append((clock.now, made - size, size))
        if pacer.add(size) and start is None:
            start = clock.now
    start = start if start is not None else clock.now  # the app hands over what is held at the end
    pause = 0.0  # how long the player has waited for chunks so far
    for at, offset, size in arrivals:
        due = start + offset + pause
        if at > due:
            pause += at - due
    return start, pause


@pytest.mark.parametrize("rtf", [1.3, 2.0, 3.0, 7.0])
@pytest.mark.parametrize("length", [2.0, 5.0, 12.0, 25.0])
def test_slower_than_real_time_playback_starts_late_enough_never_to_pause(rtf, length):
    start, pause = play(length, rtf, expected=length)
    assert pause == pytest.approx(0.0, abs=1e-9)
    # and not much later than it has to: the least is length x (rtf - 1), give or take a chunk
    assert start - 1.0 <= length * (rtf - 1) + 2 * CHUNK * rtf
    if length >= 12.0 and rtf <= 3.0:  # long and not too slow: well before the last chunk is made
        assert start < 1.0 + length * rtf - 2 * CHUNK * rtf


@pytest.mark.parametrize("wait", [0.1, 30.0])
def test_faster_than_real_time_nothing_is_held_even_after_a_long_queue(wait):
    clock = Clock()
    pacer = Pacer(expected_seconds("Hello there, how are you today?"), 30.0, CHUNK, clock=clock)
    clock.now = wait + CHUNK * 0.3
    first = pacer.add(CHUNK)
    assert first is (wait < 1.0)  # a queue longer than the chunk: the speed is measured first
    clock.now += CHUNK * 0.3
    assert pacer.add(CHUNK) and pacer.rtf == pytest.approx(0.3) and pacer.wait_s() == 0.0
    clock.now += CHUNK * 0.3
    assert pacer.add(CHUNK)  # once playing, every chunk goes straight on


def test_the_wait_shown_is_known_after_two_chunks_and_falls_to_zero():
    clock = Clock()
    pacer = Pacer(10.0, 30.0, CHUNK, clock=clock)
    clock.now = 3.0
    assert not pacer.add(CHUNK) and pacer.wait_s() is None  # one chunk: no speed yet
    waits = []
    while not pacer.playing:
        clock.now += CHUNK * 4.0
        pacer.add(CHUNK)
        waits.append(pacer.wait_s())
    assert waits[0] > waits[-2] > 0 and waits[-1] == 0.0
    assert pacer.rtf == pytest.approx(4.0)
    # what it said after the second chunk is when playback did start
    assert waits[0] == pytest.approx(CHUNK * 4.0 * (len(waits) - 1))


def test_an_utterance_longer_than_guessed_raises_the_guess_but_not_past_the_limit():
    clock = Clock()
    pacer = Pacer(expected_s=1.0, max_s=4.0, chunk_s=CHUNK, clock=clock)
    clock.now = 1.0
    pacer.add(CHUNK)
    clock.now += 2 * CHUNK
    pacer.add(CHUNK)  # 1.76 s made of a guessed 1.0: at least what was made is left to hold for
    assert pacer.needed_s() == pytest.approx(CHUNK)
    assert pacer.playing  # what is made already covers the rest of the (raised) guess
    capped = Pacer(expected_s=100.0, max_s=4.0, chunk_s=CHUNK, clock=clock)
    clock.now += 1.0
    capped.add(CHUNK)
    clock.now += 2 * CHUNK
    capped.add(CHUNK)
    assert capped.needed_s() == pytest.approx((4.0 - 2 * CHUNK) * 1.0 + CHUNK)  # the limit caps the guess


def test_expected_seconds_counts_characters_with_whitespace_collapsed():
    assert expected_seconds("Hello   there,\n friend.") == pytest.approx(len("Hello there, friend.") * SECONDS_PER_CHAR)
    assert 1.0 < expected_seconds("The quick brown fox jumps over the lazy dog.") < 5.0


def play_script(lengths: list[float], guesses: list[float], rtf: float, revise: bool, wait: float = 2.0):
    """Whole lines of `lengths` s made one after another at `rtf`, the page guessing `guesses`: (when playback
    starts, how long the player then waits for lines in all), as the Script tab paces them."""
    clock = Clock()
    pacer = Pacer(sum(guesses), 30.0 * len(lengths), max(guesses), clock=clock)
    estimate = LineLengths(guesses)
    clock.now = wait
    arrivals, start, made = [], None, 0.0
    for i, size in enumerate(lengths):
        clock.now += size * rtf
        arrivals.append((clock.now, made, size))
        made += size
        if revise:
            pacer.revise(*estimate.finished(i, size))
        if pacer.add(size) and start is None:
            start = clock.now
    start = start if start is not None else clock.now
    pause = 0.0
    for at, offset, _ in arrivals:
        if at > start + offset + pause:
            pause += at - (start + offset + pause)
    return start, pause


@pytest.mark.parametrize("rtf", [1.2, 1.5, 3.0])
@pytest.mark.parametrize("longer", [1.0, 2.0, 3.0])
def test_script_lines_longer_than_guessed_revise_the_guess_and_do_not_pause(rtf, longer):
    """Random weights run every line to its limit, far past its text's guess; a slow voice runs past it
    too. The finished lines correct the guess for the rest, and playback then never waits."""
    guesses = [2.0, 2.5, 1.5, 2.0, 3.0, 2.0]
    lengths = [g * longer for g in guesses]
    start, pause = play_script(lengths, guesses, rtf, revise=True)
    assert pause == pytest.approx(0.0, abs=1e-9)
    total = sum(lengths)
    assert start - 2.0 <= total * (rtf - 1) + 2 * max(lengths) * rtf  # and not much later than needed


def test_without_the_revision_lines_longer_than_guessed_pause():
    guesses = [2.0, 2.5, 1.5, 2.0, 3.0, 2.0]
    start, pause = play_script([g * 3 for g in guesses], guesses, 1.5, revise=False)
    assert pause > 1.0


def test_lines_shorter_than_guessed_start_sooner_with_the_revision():
    guesses = [4.0] * 6
    lengths = [2.0] * 6
    revised, pause = play_script(lengths, guesses, 2.0, revise=True)
    assert pause == pytest.approx(0.0, abs=1e-9)
    plain, _ = play_script(lengths, guesses, 2.0, revise=False)
    assert revised < plain


def test_line_lengths_scale_the_lines_to_come_by_the_finished_ones():
    est = LineLengths([2.0, 4.0, 2.0])
    assert est.finished(0, 3.0) == pytest.approx((3.0 + 1.5 * 6.0, 1.5 * 4.0))
    assert est.finished(2, 1.0) == pytest.approx((4.0 + 1.0 * 4.0, 4.0))  # out of order (fast mode) is fine
    assert est.finished(1, 5.0) == pytest.approx((9.0, 0.0))
    assert est.finished(7, 1.0) == pytest.approx((9.0, 0.0))  # an index it does not know changes nothing


def test_a_margin_holds_that_much_more_audio_and_still_never_pauses():
    """The page's players receive what is handed over up to ~1 s later (HLS playlist reloads): a margin
    of m seconds starts playback once P >= (L - P)(r - 1) + c + m."""
    for margin in (0.0, 1.0):
        clock = Clock()
        pacer = Pacer(10.0, 30.0, CHUNK, clock=clock, margin_s=margin)
        clock.now = 1.0
        pacer.add(CHUNK)
        while not pacer.playing:
            clock.now += CHUNK * 2.0
            pacer.add(CHUNK)
        assert pacer.made_s >= (10.0 - pacer.made_s) * 1.0 + CHUNK + margin
        assert pacer.made_s - CHUNK < (10.0 - pacer.made_s + CHUNK) * 1.0 + CHUNK + margin  # not a chunk later
