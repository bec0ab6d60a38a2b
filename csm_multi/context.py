"""What context fits CSM's window: choose profile prompts and earlier lines by priority, within budget.

A context item takes `positions` of the backbone window (its text tokens + its audio frames + one EOS
frame); the new line's text and the frames still to generate are `reserved`. `ContextBudget.plan`
keeps items in this priority, each only if it fits what is left (greedy, never over the window):

  1. the current speaker's profile prompt(s);
  2. earlier lines, newest first, as one unbroken run: the first line that does not fit ends the
     run, and every older line is dropped too (the model never hears a reply without what preceded
     it; this is "trimming the oldest");
  3. the other speakers' profile prompts, in the order given, skipping any that do not fit.

Prompt order of what is kept: every kept profile in the order given, then lines chronologically
(by `order`). The order stays put from one line to the next whoever speaks, as the reference's own
demo orders its prompts, so one line's prompt starts with the previous line's and the backbone
state of that start is reused (prefix.py). (Until this prefix cache, the current speaker's profile
came last, nearest the conversation: then the order changed whenever the speaker did.)
This module knows nothing about tokens, tensors, models or scripts: it only does arithmetic on
sizes; `payload` (e.g. a `Segment`) is carried along untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import ContextTooLongError

PROFILE = "profile"
LINE = "line"


@dataclass(frozen=True)
class ContextItem:
    """One candidate context segment. `order`: place in the conversation (larger = newer; profiles -1)."""

    kind: str  # PROFILE | LINE
    label: str  # shown to people: "profile:alice", "line 12"
    speaker: str
    positions: int
    order: int = -1
    payload: object = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in (PROFILE, LINE):
            raise ValueError(f"context item kind must be {PROFILE!r} or {LINE!r}, got {self.kind!r}")
        if self.positions < 0:
            raise ValueError(f"context item {self.label!r} has negative size {self.positions}")


@dataclass(frozen=True)
class Dropped:
    """An item left out of the prompt, and why."""

    item: ContextItem
    reason: str

    @property
    def label(self) -> str:
        return self.item.label

    def __str__(self) -> str:
        return f"{self.item.label} ({self.reason})"


@dataclass
class ContextPlan:
    """The chosen context: `kept` in prompt order, `dropped` with reasons; sizes in window positions."""

    kept: list[ContextItem]
    dropped: list[Dropped]
    used: int
    reserved: int
    window: int

    @property
    def free(self) -> int:
        """Positions left unused after the kept context and the reservation."""
        return self.window - self.reserved - self.used


class ContextBudget:
    """Plans the context of each generated line for a backbone window of `window` positions."""

    def __init__(self, window: int = 2048):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window

    def plan(self, current_speaker: str, profiles: Sequence[ContextItem], history: Sequence[ContextItem],
             reserved: int) -> ContextPlan:
        """Pick context for `current_speaker`'s next line; `reserved` = its text positions + max frames.

        Speakers compare case-insensitively. Raises `ContextTooLongError` when `reserved` alone exceeds
        the window (nothing could make it fit).
        """
        if reserved < 0:
            raise ValueError(f"reserved must be >= 0, got {reserved}")
        if reserved > self.window:
            raise ContextTooLongError(
                f"the new line needs {reserved} positions (its text + the frames to generate) but the window"
                f" holds {self.window} — shorten the line or lower the maximum audio length")
        current = current_speaker.casefold()
        lines = sorted(history, key=lambda item: item.order)  # chronological; stable for ties
        prompt = [*profiles, *lines]  # prompt order; indices below point into it
        own = [i for i, p in enumerate(profiles) if p.speaker.casefold() == current]
        others = [i for i, p in enumerate(profiles) if p.speaker.casefold() != current]
        first_line = len(profiles)

        free = self.window - reserved
        kept = [False] * len(prompt)
        dropped: list[Dropped] = []

        def take(i: int, what: str) -> bool:
            nonlocal free
            item = prompt[i]
            if item.positions <= free:
                free -= item.positions
                kept[i] = True
                return True
            dropped.append(Dropped(item, f"{what} needs {item.positions} positions, {free} free after"
                                         f" reserving {reserved} for the new line"))
            return False

        for i in own:
            take(i, "the current speaker's profile")
        newest_first = range(len(prompt) - 1, first_line - 1, -1)
        for n, i in enumerate(newest_first):
            if not take(i, "this line"):
                dropped.extend(Dropped(prompt[j], f"older than {prompt[i].label}, which did not fit")
                               for j in newest_first[n + 1:])
                break
        for i in others:
            take(i, "another speaker's profile")

        return ContextPlan(kept=[item for item, k in zip(prompt, kept) if k], dropped=dropped,
                           used=self.window - reserved - free, reserved=reserved, window=self.window)
