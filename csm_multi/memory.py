"""CUDA allocator-cache clearing driven by memory pressure, not by a fixed frame count.

`CudaMemoryManager.step()` is called once per generated frame. Every `interval` steps it reads the
allocator and device counters and calls `torch.cuda.empty_cache()` only when the cache holds much
unused memory or the device is nearly full; the interval shrinks after a clear and grows after a
quiet check. This module knows nothing about models, frames or generation: it counts calls and
reads memory statistics (injectable, so tests need no GPU). On CPU it only counts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MemoryStats = dict[str, int]  # allocated, reserved (this process's allocator), free, total (device), bytes


class CudaMemoryManager:
    """Clears the CUDA caching allocator when it pays off; a counting no-op on CPU / without CUDA.

    Clears when (reserved - allocated) > `reserved_unused_fraction` * reserved, or when device usage
    (total - free) / total > `pressure` and the cache holds anything unused (otherwise a clear frees
    nothing and only costs a device sync). `stats_fn() -> {allocated, reserved, free, total}` and
    `clear_fn()` replace the torch calls (tests); with them the manager is active unless `device` is
    a CPU device.
    """

    def __init__(self, device: torch.device | str | int | None = None, *, reserved_unused_fraction: float = 0.25,
                 pressure: float = 0.90, min_interval: int = 8, max_interval: int = 256,
                 stats_fn: Callable[[], MemoryStats] | None = None, clear_fn: Callable[[], None] | None = None):
        if not 0 < reserved_unused_fraction < 1:
            raise ValueError(f"reserved_unused_fraction must be in (0, 1), got {reserved_unused_fraction}")
        if not 0 < pressure <= 1:
            raise ValueError(f"pressure must be in (0, 1], got {pressure}")
        if not 1 <= min_interval <= max_interval:
            raise ValueError(f"need 1 <= min_interval <= max_interval, got {min_interval} and {max_interval}")
        self.reserved_unused_fraction = reserved_unused_fraction
        self.pressure = pressure
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.device = _resolve(device, injected=stats_fn is not None)
        if stats_fn is not None:
            self.active = self.device is None or self.device.type != "cpu"
        else:
            self.active = self.device is not None and self.device.type == "cuda"
        self._stats_fn = stats_fn or self._torch_stats
        self._clear_fn = clear_fn or self._torch_clear
        # Called, before the allocator's cache is cleared, while the device is crowded: caches of our
        # own that can be rebuilt (the engine's prefix cache), so their memory goes back too.
        self.releasers: list[Callable[[], None]] = []
        self.releases = 0
        self.interval = min_interval  # look early; back off while quiet
        self.steps = self.checks = self.clears = self.shrinks = 0
        self.last_reserved = self.last_allocated = 0
        self._since_check = 0

    def step(self) -> bool:
        """Count one frame; every `interval` frames check the counters. True when the cache was cleared."""
        self.steps += 1
        if not self.active:
            return False
        self._since_check += 1
        if self._since_check < self.interval:
            return False
        self._since_check = 0
        return self.check()

    __call__ = step  # usable directly as an `on_frame` callback

    def check(self) -> bool:
        """Read the counters now, clear if needed, and adapt the interval. True when cleared."""
        if not self.active:
            return False
        self.checks += 1
        s = self._stats_fn()
        allocated, reserved = int(s["allocated"]), int(s["reserved"])
        free, total = int(s["free"]), int(s["total"])
        self.last_allocated, self.last_reserved = allocated, reserved
        unused = reserved - allocated
        wasteful = unused > self.reserved_unused_fraction * reserved
        over = total > 0 and (total - free) / total > self.pressure
        if over and self.releasers:  # what they free becomes unused cache, cleared below
            self._release()
        crowded = over and (unused > 0 or bool(self.releasers))
        if wasteful or crowded:
            self._clear_fn()
            self.clears += 1
            self.interval = max(self.min_interval, self.interval // 2)
            return True
        self.interval = min(self.max_interval, self.interval * 2)
        return False

    def rows_allowed(self, active: int, max_rows: int) -> int:
        """Generation rows a scheduler may run now (its `row_budget`): `max_rows`, or while the device
        stays over `pressure` after clearing the cache, no more than run now, so the batch shrinks as
        rows finish (a running row is never stopped for memory). Always `max_rows` when inactive."""
        if not self.active:
            return max_rows
        for attempt in range(2):
            s = self._stats_fn()
            total, free = int(s["total"]), int(s["free"])
            if total <= 0 or (total - free) / total <= self.pressure:
                return max_rows
            if attempt == 0 and (self.releasers or int(s["reserved"]) > int(s["allocated"])):
                self._release()  # what can be rebuilt, then the unused cache: maybe that is all the pressure was
                self._clear_fn()
                self.clears += 1
        self.shrinks += 1
        return max(1, min(active, max_rows))

    def _release(self) -> None:
        for release in self.releasers:
            release()
        if self.releasers:
            self.releases += 1

    def stats(self) -> dict[str, int]:
        return {"steps": self.steps, "checks": self.checks, "clears": self.clears, "interval": self.interval,
                "shrinks": self.shrinks, "releases": self.releases, "last_reserved": self.last_reserved, "last_allocated": self.last_allocated}

    # ---- torch backends (used only when nothing is injected) -----------------------------------
    def _torch_stats(self) -> MemoryStats:
        free, total = torch.cuda.mem_get_info(self.device)
        return {"allocated": torch.cuda.memory_allocated(self.device),
                "reserved": torch.cuda.memory_reserved(self.device), "free": free, "total": total}

    def _torch_clear(self) -> None:
        with torch.cuda.device(self.device):  # empty_cache acts on the current device
            torch.cuda.empty_cache()


def _resolve(device: torch.device | str | int | None, injected: bool) -> torch.device | None:
    """The device to watch; None when nothing is given and stats are injected. Probes CUDA only here."""
    if device is None:
        if injected:
            return None
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not injected:
        if not torch.cuda.is_available():
            return torch.device("cpu")  # asked for CUDA without it: count only
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device
