"""CudaMemoryManager with fake allocator statistics: when it clears, how the interval adapts, CPU no-op."""

from __future__ import annotations

import pytest
import torch

from csm_multi.memory import CudaMemoryManager

GiB = 2**30


class FakeCuda:
    """Allocator + device counters the test sets; `clear()` releases the unused cache like empty_cache."""

    def __init__(self, allocated=1 * GiB, reserved=1 * GiB, total=80 * GiB, others=0):
        self.allocated, self.reserved, self.total, self.others = allocated, reserved, total, others
        self.calls = self.cleared = 0

    def stats(self) -> dict[str, int]:
        self.calls += 1
        return {"allocated": self.allocated, "reserved": self.reserved,
                "free": self.total - self.reserved - self.others, "total": self.total}

    def clear(self) -> None:
        self.cleared += 1
        self.reserved = self.allocated


def manager(fake: FakeCuda, **kw) -> CudaMemoryManager:
    return CudaMemoryManager(stats_fn=fake.stats, clear_fn=fake.clear, **kw)


def run(m: CudaMemoryManager, steps: int) -> int:
    return sum(m.step() for _ in range(steps))


def test_checks_only_every_interval():
    fake = FakeCuda()
    m = manager(fake, min_interval=8, max_interval=8)
    run(m, 7)
    assert fake.calls == 0
    run(m, 1)
    assert fake.calls == 1
    run(m, 16)
    assert m.stats()["checks"] == fake.calls == 3 and m.stats()["steps"] == 24


def test_no_clear_under_low_pressure():
    fake = FakeCuda(allocated=10 * GiB, reserved=12 * GiB)  # 1/6 unused, device 15% used
    m = manager(fake)
    assert run(m, 1000) == 0 and fake.cleared == 0
    s = m.stats()
    assert s["clears"] == 0 and s["checks"] > 0
    assert s["last_reserved"] == 12 * GiB and s["last_allocated"] == 10 * GiB


def test_clears_when_much_of_the_reserved_memory_is_unused():
    fake = FakeCuda(allocated=6 * GiB, reserved=10 * GiB)  # 40% unused > 25%
    m = manager(fake, min_interval=4)
    assert run(m, 4) == 1
    assert fake.cleared == 1 and fake.reserved == 6 * GiB
    assert run(m, 100) == 0  # nothing left to release


def test_unused_fraction_threshold_is_configurable():
    fake = FakeCuda(allocated=6 * GiB, reserved=10 * GiB)
    assert run(manager(fake, reserved_unused_fraction=0.5, min_interval=1), 50) == 0


def test_clears_under_device_pressure():
    # Only 10% of the cache is unused, but other processes fill the device: release what we can.
    fake = FakeCuda(allocated=9 * GiB, reserved=10 * GiB, total=80 * GiB, others=65 * GiB)
    m = manager(fake, min_interval=1)
    assert m.step() is True and fake.cleared == 1


def test_pressure_without_anything_to_release_does_not_clear():
    fake = FakeCuda(allocated=10 * GiB, reserved=10 * GiB, total=80 * GiB, others=65 * GiB)
    assert run(manager(fake, min_interval=1), 20) == 0


def test_interval_grows_while_quiet_and_stays_bounded():
    fake = FakeCuda()
    m = manager(fake, min_interval=8, max_interval=64)
    seen = []
    for _ in range(2000):
        m.step()
        seen.append(m.stats()["interval"])
    assert seen[0] == 8 and max(seen) == 64 and seen[-1] == 64
    assert sorted(set(seen)) == [8, 16, 32, 64]
    assert m.stats()["checks"] < 2000 // 32  # mostly skipped once quiet


def test_interval_halves_after_clears_down_to_min():
    fake = FakeCuda()
    m = manager(fake, min_interval=8, max_interval=256)
    run(m, 2000)
    assert m.interval == 256
    intervals = []
    for _ in range(6):  # keep the cache wasteful: every check clears
        fake.reserved = fake.allocated * 2
        before = m.stats()["clears"]
        while m.stats()["clears"] == before:
            m.step()
        intervals.append(m.interval)
    assert intervals == [128, 64, 32, 16, 8, 8]


def test_cpu_is_a_counting_noop():
    fake = FakeCuda(allocated=0, reserved=10 * GiB)  # would clear if it looked
    m = CudaMemoryManager("cpu", stats_fn=fake.stats, clear_fn=fake.clear, min_interval=1)
    assert run(m, 100) == 0 and fake.calls == 0 and not m.active
    assert m.stats() == {"steps": 100, "checks": 0, "clears": 0, "interval": 1, "shrinks": 0, "releases": 0,
                         "last_reserved": 0, "last_allocated": 0}


def test_default_device_without_cuda_is_a_noop(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in (None, "cuda"):
        m = CudaMemoryManager(device)
        assert not m.active and m.device.type == "cpu"
        assert run(m, 10) == 0 and m() is False and m.stats()["steps"] == 11


def test_bad_settings():
    for kw in ({"reserved_unused_fraction": 0}, {"pressure": 1.5}, {"min_interval": 0},
               {"min_interval": 10, "max_interval": 5}):
        with pytest.raises(ValueError):
            CudaMemoryManager("cpu", **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_counters():
    m = CudaMemoryManager("cuda", min_interval=1)
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    del x  # the cache now holds at least one unused 64 MiB block
    reserved, allocated = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
    assert m.step() is (reserved - allocated > 0.25 * reserved)
    assert m.stats()["last_reserved"] == reserved and m.stats()["last_allocated"] == allocated
    if m.stats()["clears"]:
        assert torch.cuda.memory_reserved() < reserved


def test_rows_allowed_shrinks_the_batch_only_under_pressure_that_clearing_does_not_fix():
    fake = FakeCuda(allocated=10 * GiB, reserved=30 * GiB, total=32 * GiB)  # crowded, but 20 GiB is unused cache
    m = manager(fake)
    assert m.rows_allowed(active=5, max_rows=8) == 8 and fake.cleared == 1  # clearing was enough
    fake.others = 20 * GiB  # another process now holds the memory: still crowded after a clear
    assert m.rows_allowed(active=5, max_rows=8) == 5  # nobody new joins; the batch shrinks as rows finish
    assert m.rows_allowed(active=2, max_rows=8) == 2 and m.rows_allowed(active=0, max_rows=8) == 1
    assert m.stats()["shrinks"] == 3
    fake.others = 0
    assert m.rows_allowed(active=2, max_rows=8) == 8  # pressure gone: the full batch again
    assert CudaMemoryManager("cpu").rows_allowed(active=3, max_rows=4) == 4


def test_crowded_device_releases_our_rebuildable_caches_first():
    """All of the reserved memory is in use (nothing unused to clear), but part of it is the prefix
    cache: under pressure it is dropped and the freed cache cleared; without pressure it stays."""
    fake = FakeCuda(allocated=10 * GiB, reserved=10 * GiB, total=80 * GiB, others=65 * GiB)
    m = manager(fake, min_interval=1)
    dropped = []

    def drop_prefix_cache():
        dropped.append(True)
        fake.allocated -= 4 * GiB

    m.releasers.append(drop_prefix_cache)
    assert m.step() is True and dropped == [True] and fake.cleared == 1
    assert m.stats()["releases"] == 1
    fake.others = 0  # pressure gone: the cache is kept
    assert run(m, 40) == 0 and dropped == [True]
    fake.others = 74 * GiB  # still crowded after dropping it again: then the batch shrinks
    assert m.rows_allowed(active=3, max_rows=8) == 3 and len(dropped) == 2
