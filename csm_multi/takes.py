"""Takes: score candidate renderings of one line so the best can be chosen (lower score is better).

A candidate is judged on three things: how many words a transcript of it gets wrong against the
line's text (word error rate, case and punctuation ignored), whether the model ended it itself
(a candidate that ran to the maximum length is "cut off"), and how much silence it had after its
last speech before trimming. The transcriber is injected, `(S,) 24 kHz float tensor -> text`; without
one the WER is unmeasured (None) and candidates rank on their endings alone.
Pure functions on tensors and text: no model, no files, no UI; `render.py` generates the candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from .config import SAMPLE_RATE
from .endings import speech_bounds
from .errors import TranscriptionError

MAX_TAKES = 4  # candidates generated per line in one batch
MAX_CANDIDATES = 12  # candidates kept per line (a render's takes plus those added later)
CUT_OFF_PENALTY = 1.0  # as bad as a transcript with every word wrong
SILENT_PENALTY = 1.0  # no speech at all
TAIL_FREE_S = 1.0  # silence after the last word that costs nothing (the padded ending's pause)
TAIL_WEIGHT = 0.1  # per second of silence beyond that: a tie-breaker, far below one wrong word in ten

Transcribe = Callable[[torch.Tensor], str]


@dataclass(frozen=True)
class TakeScore:
    """How one candidate did. `wer`: word error rate of its transcript (None: not measured),
    `cut_off`: it ran to the maximum length, `tail_s`: seconds of silence after its last speech
    before trimming (its whole length when `silent`, i.e. it holds no speech)."""

    wer: float | None
    cut_off: bool
    tail_s: float
    silent: bool = False

    @property
    def score(self) -> float:
        """One number, lower is better: WER (0 when unmeasured) + penalties for a cut-off or silent
        candidate + `TAIL_WEIGHT` per second of silent tail beyond `TAIL_FREE_S`."""
        return ((self.wer or 0.0) + CUT_OFF_PENALTY * self.cut_off + SILENT_PENALTY * self.silent
                + TAIL_WEIGHT * max(0.0, self.tail_s - TAIL_FREE_S))

    def as_dict(self) -> dict:
        return {"wer": self.wer, "cut_off": self.cut_off, "tail_s": self.tail_s, "silent": self.silent,
                "score": round(self.score, 4)}


def ending_score(audio: torch.Tensor, frames: int, max_frames: int) -> TakeScore:
    """The score of a candidate from its untrimmed audio (S,) and its frame count (WER unmeasured);
    `tail_s` to the millisecond."""
    bounds = speech_bounds(audio)
    n = audio.numel()
    tail = n - bounds[1] if bounds is not None else n
    return TakeScore(wer=None, cut_off=frames >= max_frames, tail_s=round(tail / SAMPLE_RATE, 3), silent=bounds is None)


def normalise(text: str) -> str:
    """Words compared case- and punctuation-blind: "Hello, World!" -> "hello world"."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.casefold()).split())


def word_error_rate(reference: str, hypothesis: str) -> float | None:
    """WER of `hypothesis` against `reference` after `normalise` (to 4 decimals); None when the
    reference has no words."""
    import jiwer  # only when a transcriber is in use

    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return None
    if not hyp:
        return 1.0  # every word deleted (jiwer refuses empty hypotheses in some versions)
    return round(float(jiwer.wer(ref, hyp)), 4)


def measure(score: TakeScore, audio: torch.Tensor, text: str, transcriber: Transcribe | None) -> TakeScore:
    """`score` with its WER: `audio` (the trimmed clip, as listeners hear it) transcribed against `text`.

    Unchanged without a transcriber or when already measured. A silent candidate is not sent to the
    transcriber, and one it hears no words in (`TranscriptionError`) counts as all words wrong.
    """
    if transcriber is None or score.wer is not None:
        return score
    if score.silent:
        heard = ""
    else:
        try:
            heard = transcriber(audio)
        except TranscriptionError:
            heard = ""
    return replace(score, wer=word_error_rate(text, heard))


def best(scores: Sequence[TakeScore | None]) -> int:
    """Index of the lowest score (the first on ties; an unscored candidate ranks last)."""
    if not scores:
        raise ValueError("no candidates to choose from")
    return min(range(len(scores)), key=lambda i: (scores[i] is None, scores[i].score if scores[i] else 0.0, i))
