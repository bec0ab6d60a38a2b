"""When to start playing audio that is generated slower than real time, so that it does not pause.

One job: decide, chunk by chunk, whether the page should hold streamed audio back or hand over
everything it has. Knows no model and no web page.

Why. On two CPU cores csm-1b makes audio 3-7x slower than real time. A player that starts on the
first 0.88 s chunk then stops for seconds before each next one: what a tester hears as broken audio.
Players of streamed media buffer instead: they start once what they hold lasts until the rest
arrives. Here: with P seconds made after `elapsed` wall seconds (real-time factor r = elapsed / P),
the rest R = L - P of an utterance of L seconds arrives in chunks of c seconds, chunk k at k·c·r
from now; playback started now needs it at P + (k-1)·c. So nothing pauses if P >= R·(r - 1) + c.
L is not known until the model ends the utterance, so it is estimated from the text (~14 characters
a second, English read aloud), never below what was made, never above the length limit; for a
script, whose lines arrive whole, `LineLengths` corrects the estimate and the chunk size as lines
finish. Where generation is faster than real time (a GPU, the tiny preset) everything is handed over
at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

SECONDS_PER_CHAR = 0.07  # ~14 characters (spaces included) a second: English read aloud


def expected_seconds(text: str) -> float:
    """A guess at how long `text` takes to say."""
    return len(" ".join(text.split())) * SECONDS_PER_CHAR


@dataclass
class Pacer:
    """Feed it each chunk's length as it is made (`add`); it says when to hand everything over.

    `expected_s`: the guessed length of the whole (`expected_seconds`); `max_s`: the limit the
    generation stops at; `chunk_s`: the longest piece that arrives at once; `margin_s`: seconds of
    audio held beyond that, for a player that receives what is handed over after a varying delay
    (an HLS player reloading its playlist every second or so). The speed is measured from the first
    chunk on, so time spent waiting in a queue or on the prompt does not count; the first chunk
    alone is handed over at once when even that time was shorter than its audio.
    """

    expected_s: float
    max_s: float
    chunk_s: float
    clock: Callable[[], float] = time.monotonic
    margin_s: float = 0.0
    made_s: float = 0.0
    playing: bool = False
    created: float = field(default=0.0)
    first_at: float | None = None
    first_s: float = 0.0

    def __post_init__(self) -> None:
        self.created = self.clock()

    @property
    def rtf(self) -> float:
        """Wall seconds per second of audio since the first chunk (0 until a second one came)."""
        after = self.made_s - self.first_s
        return (self.clock() - self.first_at) / after if self.first_at is not None and after > 0 else 0.0

    def revise(self, expected_s: float, chunk_s: float | None = None) -> None:
        """A better guess at the whole's length (and at the longest piece to come), e.g. from `LineLengths`."""
        self.expected_s = expected_s
        if chunk_s is not None and chunk_s > 0:
            self.chunk_s = chunk_s

    def needed_s(self) -> float:
        """Seconds of audio to hold before playback can start and not pause."""
        length = min(max(self.expected_s, self.made_s), self.max_s)
        return max(length - self.made_s, 0.0) * max(self.rtf - 1.0, 0.0) + self.chunk_s + self.margin_s

    def add(self, seconds: float) -> bool:
        """A chunk of `seconds` was made: True when what is held should be handed over now (and,
        once playback has started, for every later chunk)."""
        self.made_s += seconds
        if self.first_at is None:
            self.first_at, self.first_s = self.clock(), seconds
            if self.first_at - self.created <= seconds:  # faster than real time, waiting included
                self.playing = True
        elif not self.playing and (self.rtf <= 1.0 or self.made_s >= self.needed_s()):
            self.playing = True
        return self.playing

    def wait_s(self) -> float | None:
        """How long from now until playback starts, if the speed holds (0 once it has; None until
        the speed is known). It starts at the first chunk that brings the audio made to P* =
        (L·(r - 1) + c + m) / r, where P >= (L - P)·(r - 1) + c + m first holds."""
        if self.playing:
            return 0.0
        r = self.rtf
        if not r:
            return None
        length = min(max(self.expected_s, self.made_s), self.max_s)
        target = min((length * (r - 1.0) + self.chunk_s + self.margin_s) / r, length) if r > 1.0 else self.made_s
        chunks = math.ceil(max(target - self.made_s, 0.0) / self.chunk_s - 1e-9)
        return chunks * self.chunk_s * r


@dataclass
class LineLengths:
    """A script's length, from a guess per line (`expected_seconds` plus its pause), corrected as its lines
    finish: the lines not yet made are scaled by how long the finished ones ran against their guesses.
    A voice that speaks slower than the guess, or a model that runs every line to its limit (random
    weights do), would otherwise have the player start too soon and pause between lines.

    `finished(index, seconds)` takes a line's real length (its pause included) and returns the
    revised (whole length, longest line to come) for `Pacer.revise`.
    """

    guesses: Sequence[float]
    made: dict[int, float] = field(default_factory=dict)

    def finished(self, index: int, seconds: float) -> tuple[float, float]:
        if 0 <= index < len(self.guesses):
            self.made[index] = seconds
        guessed = sum(self.guesses[i] for i in self.made)
        ratio = sum(self.made.values()) / guessed if guessed > 0 else 1.0
        rest = [g * ratio for i, g in enumerate(self.guesses) if i not in self.made]
        return sum(self.made.values()) + sum(rest), max(rest, default=0.0)
