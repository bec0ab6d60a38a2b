"""OpenMP pools (omp.py): a thread's libgomp pool is freed when its unit of work ends, kept while it
holds the frame loop, and the scheduler frees its own when idle. Observed as the process's threads
(libgomp keeps one worker thread per extra OpenMP thread of every pool). Linux, 2+ torch threads."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

from csm_multi import SamplingConfig, omp
from csm_multi.codec import MimiCodec, build_mimi
from csm_multi.config import get_preset
from csm_multi.engine import Engine
from csm_multi.model import CSM
from csm_multi.text import ByteTokenizer

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task"),
    pytest.mark.skipif(torch.get_num_threads() < 2, reason="one OpenMP thread makes no pool"),
]

BIG = torch.randn(1000, 1000)  # big enough for torch to split an elementwise op over its threads


@pytest.fixture(autouse=True)
def two_threads():
    """Two intra-op threads in every thread these tests start (an earlier test may have left torch's
    setting for new threads at 1, e.g. a tiny model's scheduler)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def threads() -> int:
    """The process's threads, once the count has stood still for 0.15 s (an ending thread's libgomp
    workers leave a moment after it)."""
    count, since, deadline = len(os.listdir("/proc/self/task")), time.monotonic(), time.monotonic() + 5
    while time.monotonic() - since < 0.15 and time.monotonic() < deadline:
        time.sleep(0.01)
        now = len(os.listdir("/proc/self/task"))
        if now != count:
            count, since = now, time.monotonic()
    return count


def parallel_op() -> float:
    return float((BIG + BIG).sum())


def on_a_thread(fn):
    """fn() on a new thread; its result and the process's threads just before it ended."""
    out = {}

    def body():
        torch.set_num_threads(2)
        out["before"] = threads()
        out["value"] = fn()
        out["after"] = threads()

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return out


def test_torch_uses_a_libgomp_we_can_pause():
    assert omp.libgomp_path() is not None and "libgomp" in os.path.basename(omp.libgomp_path())
    assert omp.available()


def test_a_released_unit_of_work_frees_its_pool_and_a_plain_call_keeps_it():
    plain = on_a_thread(parallel_op)
    assert plain["after"] > plain["before"]  # the thread's pool: a worker thread is still there
    freed = on_a_thread(omp.released(parallel_op))
    assert freed["after"] == freed["before"]
    assert freed["value"] == pytest.approx(plain["value"], rel=1e-5)


def test_only_the_outermost_unit_frees_and_holding_keeps_the_pool():
    def nested():
        with omp.work():
            omp.released(parallel_op)()
            inside = threads()
        return inside

    out = on_a_thread(nested)
    assert out["value"] > out["before"]  # the inner unit left the pool to the outer one
    assert out["after"] == out["before"]

    def held():
        with omp.holding():
            omp.released(parallel_op)()
            return threads()

    out = on_a_thread(held)
    assert out["value"] > out["before"] and out["after"] > out["before"]


def test_the_scheduler_frees_its_pool_when_idle_and_so_does_a_waiting_caller():
    model = CSM(get_preset("tiny")).init_random_(seed=1).eval()
    engine = Engine(model, ByteTokenizer(), MimiCodec(build_mimi(None)), watermark=False)

    def serve_one():
        parallel_op()  # this thread has a pool now ...
        start = threads()
        engine.serve(max_rows=2, threads=2)  # a tiny model's scheduler would run on one thread: no pool
        codes, _, _ = engine.generate_codes("Hello there.", 0, (), SamplingConfig(seed=3, max_audio_length_ms=800))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and threads() > start:  # the scheduler's step ends, then it idles
            time.sleep(0.05)
        idle = threads()
        engine.stop_serving()
        return start, idle, codes.shape[-1]

    out = on_a_thread(serve_one)
    start, idle, frames = out["value"]
    assert frames > 0
    # ... which it gave back; the scheduler's thread is there (+1), its pool is not (it is idle)
    assert idle == start, (start, idle)


def test_the_apps_handlers_leave_no_idle_pool_on_their_threads():
    """Every event handler of the page is wrapped (app._answered_in_place): a plain handler's thread
    frees its pool when it returns, a generator handler's after each step it yields."""
    import app as app_module

    handler = app_module._answered_in_place(lambda: parallel_op(), None)
    out = on_a_thread(handler)
    assert out["after"] == out["before"] and out["value"] == pytest.approx(parallel_op(), rel=1e-5)

    def steps():
        yield parallel_op()
        yield parallel_op()

    seen = []

    def pull():
        for value in app_module._answered_in_place(steps, None)():
            seen.append((value, threads()))
        return len(seen)

    out = on_a_thread(pull)
    assert out["value"] == 2 and all(count == out["before"] for _, count in seen), (out, seen)
