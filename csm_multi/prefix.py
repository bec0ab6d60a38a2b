"""Prefix caching: the backbone's KV state of prompts already computed, reused by prompts that start the same way.

A dialogue's context only grows at its end: voice prompts first (in a fixed order, see
`context.py`), then the earlier lines. When a line has been generated, the backbone's cache holds
its whole prompt plus the frames it made. The next line's prompt begins with that same run of
frames, up to where it differs (the previous line's transcript is its sentence without the filler
it was generated with, and its audio may be trimmed), so only the rest needs a prefill: the
previous line's audio and the new line's text, not every voice prompt and earlier line again.
LLM servers call this prefix caching (vLLM, SGLang).

`PrefixCache` keeps the KV state of finished rows (prompt + fed frames), and (through the
scheduler) of each prompt as soon as its prefill is done, each with the frames (tokens and mask) it
was computed from, in a least-recently-used store bounded in bytes. A new prompt takes the longest
common run of frames with any entry: position p's keys and values depend only on positions 0..p, so
the first m positions of an entry are valid for every prompt that shares them, and an entry helps
even when it diverges later (a new render with the same voices reuses the voice prompts of the last
one). An entry that is a prefix of a newer one is dropped: the newer one serves everything it did.

Only the backbone is cached (the depth decoder starts afresh every frame). The reused values are
those computed one frame at a time during generation, so they differ from a full prefill's by
float rounding only (tests: the same greedy codes, tiny preset, fp32). Knows nothing of text,
scripts or the scheduler: it copies cache slots of a model's `StaticKVCache`s.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

DEFAULT_MAX_MB = 512  # about 8,000 positions of csm-1b's fp32 backbone state (64 KiB each)
MIN_REUSE = 8  # shorter common runs are prefilled: copying them would save nothing worth having
MAX_ENTRIES = 256  # a lookup compares the prompt with every entry: keep that cheap for small models too


@dataclass
class _Entry:
    tokens: torch.Tensor  # (n, K+1) on CPU
    mask: torch.Tensor  # (n, K+1) bool on CPU
    keys: torch.Tensor  # (layers, H_kv, n, D) on the model's device
    values: torch.Tensor

    @property
    def length(self) -> int:
        return self.tokens.size(0)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size() + self.tokens.numel() * 9


def common_length(a_tokens: torch.Tensor, a_mask: torch.Tensor, b_tokens: torch.Tensor, b_mask: torch.Tensor) -> int:
    """Leading frames (rows of (S, K+1) tokens and masks) that two prompts share."""
    n = min(a_tokens.size(0), b_tokens.size(0))
    if n == 0:
        return 0
    same = ((a_tokens[:n] == b_tokens[:n]) & (a_mask[:n] == b_mask[:n])).all(dim=1)
    differ = (~same).nonzero()
    return int(differ[0, 0]) if differ.numel() else n


class PrefixCache:
    """KV states of finished prompts for `model`'s backbone (see the module doc): at most `max_bytes`
    and `max_entries` of them, the least recently used going first. Thread-safe; the copies run on
    the caller's thread (the one running the model). `hits`, `misses` and `reused` (positions not
    prefilled again) count its use."""

    def __init__(self, model, max_bytes: int = DEFAULT_MAX_MB << 20, min_reuse: int = MIN_REUSE,
                 max_entries: int = MAX_ENTRIES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"the prefix cache size must be a whole number of bytes >= 0, got {max_bytes!r}")
        self.model = model
        self.max_bytes = max_bytes
        self.min_reuse = min_reuse
        self.max_entries = max_entries
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest first
        self._next = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.reused = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "mb": round(sum(e.nbytes for e in self._entries.values()) / 2**20, 1),
                    "hits": self.hits, "misses": self.misses, "reused_positions": self.reused}

    def clear(self) -> None:
        """Drop every entry (e.g. under memory pressure, or when the weights change)."""
        with self._lock:
            self._entries.clear()

    def _layers(self):
        return [layer.attn.kv_cache for layer in self.model.backbone.layers]

    # ---- reuse ------------------------------------------------------------------------------
    def load(self, tokens: torch.Tensor, mask: torch.Tensor, row: int) -> int:
        """Copy the longest cached run of frames `tokens`/`mask` (S, K+1) start with into cache row
        `row` (slots 0..m-1) and return m: the positions the caller need not prefill (at most S - 1,
        so the prompt's last frame is always computed; 0 when nothing long enough is cached)."""
        if not self.enabled:
            return 0
        tokens, mask = tokens.cpu(), mask.cpu()
        with self._lock:
            best, best_id = 0, None
            for key, entry in self._entries.items():
                m = common_length(entry.tokens, entry.mask, tokens, mask)
                if m > best:
                    best, best_id = m, key
            best = min(best, tokens.size(0) - 1)
            if best < self.min_reuse or best_id is None:
                self.misses += 1
                return 0
            entry = self._entries[best_id]
            self._entries.move_to_end(best_id)
            self.hits += 1
            self.reused += best
        for i, kv in enumerate(self._layers()):
            kv.k_cache[row, :, :best] = entry.keys[i, :, :best]
            kv.v_cache[row, :, :best] = entry.values[i, :, :best]
        return best

    def store(self, tokens: torch.Tensor, mask: torch.Tensor, row: int) -> None:
        """Keep cache row `row`'s first S slots as the state of frames `tokens`/`mask` (S, K+1): the
        prompt and the frames fed back after it. Entries it extends are dropped; when an entry already
        extends it, nothing is stored."""
        n = tokens.size(0)
        if not self.enabled or n < self.min_reuse:
            return
        tokens, mask = tokens.cpu(), mask.cpu()
        with self._lock:
            for key, entry in list(self._entries.items()):
                m = common_length(entry.tokens, entry.mask, tokens, mask)
                if m == n:  # an entry already holds all of it
                    self._entries.move_to_end(key)
                    return
                if m == entry.length:  # the new state extends this entry
                    del self._entries[key]
        layers = self._layers()
        keys = torch.stack([kv.k_cache[row, :, :n] for kv in layers])
        values = torch.stack([kv.v_cache[row, :, :n] for kv in layers])
        entry = _Entry(tokens.clone(), mask.clone(), keys, values)
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            self._entries[self._next] = entry
            self._next += 1
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes or len(self._entries) > self.max_entries:
                _, old = self._entries.popitem(last=False)
                total -= old.nbytes


def fed_frames(prompt_tokens: torch.Tensor, prompt_mask: torch.Tensor,
               frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The frames a row's cache holds after generating: its prompt, then each generated frame
    (K,) fed back as the backbone's input (audio codes, no text)."""
    if not frames:
        return prompt_tokens, prompt_mask
    codes = torch.stack([f.cpu() for f in frames])  # (T, K)
    t, k = codes.shape
    tokens = torch.zeros(t, k + 1, dtype=prompt_tokens.dtype)
    tokens[:, :k] = codes
    mask = torch.zeros(t, k + 1, dtype=torch.bool)
    mask[:, :k] = True
    return torch.cat([prompt_tokens.cpu(), tokens]), torch.cat([prompt_mask.cpu(), mask])
