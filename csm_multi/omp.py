"""OpenMP thread pools: keep the generating thread's OpenMP workers awake.

One job: free a thread's idle libgomp pool when its work is done, so that the thread that
generates keeps libgomp's fast hand-off. Knows no model.

Why. PyTorch's CPU kernels (fbgemm's int8 products, oneDNN, elementwise ops) split their work with
OpenMP, and on Linux the wheels use GNU libgomp. libgomp gives every thread that starts a parallel
region its own pool of worker threads, and keeps it until that thread ends. Between regions its
workers spin for a few milliseconds before sleeping, which is what makes the ~13,000 small regions
of a csm-1b frame cheap. But once libgomp manages more threads than there are CPUs (two pools on
two cores: the main thread's, from loading the model, and the scheduler's), it cuts the spin to
~100 iterations (`gomp_throttled_spin_count_var`; no environment variable raises it), and every
region pays a futex wake-up. Measured on the project's 2-core EPYC at csm-1b size int8: a line
took 1.2-1.4x as long on a `threading.Thread` as on the main thread, and as long again once the
main thread's pool was freed (README, "Generation off the main thread").

So each thread gives its pool back when its unit of work ends (`released`, `work`): the main thread
after loading, a request thread after a decode or a watermark pass, the scheduler when it goes
idle. A thread running the frame loop marks itself as holding (`holding`) and keeps its pool.
Freeing is `omp_pause_resource_all(omp_pause_hard)` (OpenMP 5.0) and costs a thread join; the next
region makes a new pool (one pthread_create). Where torch does not use libgomp (macOS's libomp,
a build without OpenMP) every call here is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

F = TypeVar("F", bound=Callable)

_OMP_PAUSE_HARD = 2  # omp_pause_resource_t: omp_pause_soft = 1, omp_pause_hard = 2
_local = threading.local()
_lock = threading.Lock()
_pause: Callable[[int], int] | None = None
_looked = False


def libgomp_path() -> str | None:
    """The libgomp torch has loaded, or None. Other wheels may bring their own copies (sentencepiece
    does); each copy has its own pools, and only torch's runs torch's kernels."""
    import torch

    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:  # address perms offset device inode [path]
                parts = line.split(maxsplit=5)
                path = parts[5].strip() if len(parts) == 6 else ""
                if path.startswith("/") and "libgomp" in path.rsplit("/", 1)[-1] and path not in found:
                    found.append(path)
    except OSError:  # not Linux
        return None
    site = os.path.dirname(os.path.dirname(os.path.realpath(torch.__file__)))
    mine = [p for p in found if os.path.realpath(p).startswith((os.path.join(site, "torch") + os.sep,
                                                                 os.path.join(site, "torch.libs") + os.sep))]
    if mine:
        return mine[0]
    return found[0] if len(found) == 1 else None  # a system libgomp torch links to; ambiguous: none


def _pause_fn() -> Callable[[int], int] | None:
    global _pause, _looked
    if _looked:
        return _pause
    with _lock:
        if not _looked:
            path = libgomp_path()
            if path is not None:
                try:
                    fn = ctypes.CDLL(path).omp_pause_resource_all  # the loaded library, not a second copy
                    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                    _pause = fn
                except (OSError, AttributeError):  # an old libgomp without OpenMP 5.0
                    _pause = None
            _looked = True
    return _pause


def available() -> bool:
    """True when pools can be freed here (torch runs on libgomp with OpenMP 5.0's pause)."""
    return _pause_fn() is not None


def release() -> bool:
    """Free the calling thread's OpenMP pool now (unless it is `holding`, or inside a parallel
    region). True when a pool was freed or there was none."""
    if getattr(_local, "holding", 0):
        return False
    fn = _pause_fn()
    return fn is not None and fn(_OMP_PAUSE_HARD) == 0


@contextmanager
def work() -> Iterator[None]:
    """A unit of work: when the outermost one on this thread ends, its pool is freed."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth = max(_local.depth - 1, 0)
        if _local.depth == 0:
            release()


def released(fn: F) -> F:
    """`fn` as a unit of work (`work`). Not for generators: Gradio may resume one on another thread."""

    @functools.wraps(fn)
    def function(*args, **kwargs):
        with work():
            return fn(*args, **kwargs)
    return function  # type: ignore[return-value]


@contextmanager
def holding() -> Iterator[None]:
    """This thread keeps its pool while inside (the frame loop): units of work in it free nothing."""
    _local.holding = getattr(_local, "holding", 0) + 1
    try:
        yield
    finally:
        _local.holding -= 1
