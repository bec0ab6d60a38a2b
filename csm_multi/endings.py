"""Line endings: pad a line's text so CSM finishes its last word, then trim the silence after it.

CSM often stops on the last phoneme (SesameAILabs/csm#119); the maintainers' workaround is to
give the model something to say after the final punctuation and cut it off afterwards. So
`pad_line` ends the text with a full stop and a short pause (" ..."), and `trim_clip` finds where
speech ends (energy of 10 ms frames against the clip's loudest frame) and drops what follows,
keeping a margin with a short fade-out. Pure text and tensor functions: no model, no files.
Waveforms are (S,) float at 24 kHz; codes (K, T) with one frame per 1920 samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SAMPLE_RATE, SAMPLES_PER_FRAME

FILLER = " ..."  # a pause to generate after the final punctuation; trimmed away as silence
ANALYSIS_SAMPLES = SAMPLE_RATE // 100  # 10 ms energy frames
TRIM_DB = 40.0  # frames more than this below the loudest frame are silence
SILENT_DBFS = -60.0  # a clip whose loudest frame is below this holds no speech: left as it is
FADE_MS = 20  # raised-cosine fade over the kept margin, so the cut never clicks

_TERMINAL = ".!?。！？؟।‼⁇⁈⁉"
_ELLIPSIS = ("...", "…")
_SOFT = ",;:，；：、"  # continuation marks at the very end: replaced by a full stop
_DASHES = "-–—"  # an interrupted line ("But I—") is meant to stop abruptly: left alone
_CLOSERS = "\"'”’»›)]」』》）"


def _full_stop(text: str) -> str:
    """The full stop of the script the last letter is written in."""
    last = next((c for c in reversed(text) if c.isalnum()), "")
    if "\u3040" <= last <= "\u30ff" or "\u3400" <= last <= "\u9fff":  # kana, CJK ideographs
        return "。"
    if "\u0900" <= last <= "\u097f":  # Devanagari
        return "।"
    return "."


def end_sentence(text: str) -> str:
    """`text` stripped, ending in sentence punctuation (inside closing quotes/brackets).

    Text with no letter or digit, and lines ending in a dash, come back stripped but unchanged.
    """
    text = text.strip()
    core = text.rstrip(_CLOSERS)
    closers = text[len(core):]
    if not any(c.isalnum() for c in core) or core.endswith(tuple(_DASHES)):
        return text
    if core.endswith(_ELLIPSIS) or core.endswith(tuple(_TERMINAL)):
        return text
    return core.rstrip(_SOFT).rstrip() + _full_stop(core) + closers


def pad_line(text: str, filler: str = FILLER) -> str:
    """The text to send to the model: `end_sentence(text)` + `filler`.

    A line that already trails off ("Well...") has its pause and gets no filler; neither does one
    left unchanged by `end_sentence` (no letters, or an intended cut-off with a dash).
    """
    ended = end_sentence(text)
    core = ended.rstrip(_CLOSERS)
    if core.endswith(_ELLIPSIS) or not core.endswith(tuple(_TERMINAL)):
        return ended
    return ended + filler


def speech_bounds(audio: torch.Tensor, threshold_db: float = TRIM_DB) -> tuple[int, int] | None:
    """(S,) -> [start, end) in samples, from the first to the last 10 ms frame within
    `threshold_db` of the loudest frame; None for an empty, non-finite or silent clip."""
    x = audio.detach().to("cpu", torch.float64).flatten()
    n = x.numel()
    if n == 0 or not torch.isfinite(x).all():
        return None
    frames = torch.nn.functional.pad(x, (0, -n % ANALYSIS_SAMPLES)).view(-1, ANALYSIS_SAMPLES)
    rms = frames.pow(2).mean(dim=1).sqrt()
    loudest = float(rms.max())
    if loudest < 10 ** (SILENT_DBFS / 20):
        return None
    active = torch.nonzero(rms >= loudest * 10 ** (-threshold_db / 20)).flatten()
    return int(active[0]) * ANALYSIS_SAMPLES, min(n, (int(active[-1]) + 1) * ANALYSIS_SAMPLES)


def _fade(n: int, dtype: torch.dtype) -> torch.Tensor:
    """(n,) raised-cosine gains from 1 down to exactly 0."""
    if n == 1:
        return torch.zeros(1, dtype=dtype)
    return (0.5 * (1 + torch.cos(torch.linspace(0, math.pi, n, dtype=torch.float64)))).to(dtype)


@dataclass(frozen=True)
class Trimmed:
    """A trimmed clip: `audio` (S',) = input[start:end] (faded at cut edges), `codes` (K, T') the
    frames that overlap it, T' = ceil(S' / 1920) (None when no codes were given)."""

    audio: torch.Tensor
    codes: torch.Tensor | None
    start: int
    end: int


def trim_clip(audio: torch.Tensor, codes: torch.Tensor | None = None, *, margin_ms: int = 120,
              leading: bool = False, threshold_db: float = TRIM_DB, fade_ms: int = FADE_MS) -> Trimmed:
    """Drop the silence after the last speech frame, keeping `margin_ms` and fading it out.

    With `leading`, silence before the first speech frame goes too, keeping at least `margin_ms`:
    the cut is moved back to a frame boundary (a multiple of 1920 samples) so the kept codes still
    line up with the audio. Fades only ever cover the kept margin, never speech. Empty, silent or
    non-finite clips come back unchanged. `codes` (K, T) must have one frame per 1920 samples.
    """
    n = audio.numel()
    bounds = speech_bounds(audio, threshold_db)
    if bounds is None:
        return Trimmed(audio, codes, 0, n)
    first, last = bounds
    margin = SAMPLE_RATE * margin_ms // 1000
    fade = SAMPLE_RATE * fade_ms // 1000
    end = min(n, last + margin)
    start = max(0, first - margin) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME if leading else 0
    out = audio[start:end].clone()
    if end < n and (tail := min(fade, end - last)) > 0:
        out[-tail:] *= _fade(tail, out.dtype)
    if start > 0 and (head := min(fade, first - start)) > 0:
        out[:head] *= _fade(head, out.dtype).flip(0)
    if codes is not None:
        codes = codes[:, start // SAMPLES_PER_FRAME:-(-end // SAMPLES_PER_FRAME)]
    return Trimmed(out, codes, start, end)
