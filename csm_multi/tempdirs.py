"""The system temp dir: what importing torch leaves there, and the sweep that keeps it bounded.

Importing torchtune imports torchao, which imports `torch.distributed.nn` (via `_shard`), whose
`jit/instantiator.py` makes a `tmpXXXXXXXX/` folder holding `_remote_module_non_scriptable.py` (for
RPC RemoteModule) and removes it only at a clean exit: every killed app or CLI run leaves one. So

- `release_torch_scratch()`, at start-up, removes this process's folder at once (the module it holds
  is already imported; csm-multi never scripts a RemoteModule), so a later kill leaves nothing;
- `sweep()` removes such folders left by processes that are gone (at start-up, then every hour with
  `start_sweeper`). A folder is removed only when all of these hold: torch's name pattern, a real
  folder of our user holding nothing but that file (and its `__pycache__`), the file's text is
  torch's template, it is older than `min_age_s`, and no live Python process of ours with torch loaded
  started before the folder was made (read from /proc; without /proc nothing is removed). Processes
  in another PID namespace sharing this temp dir are invisible here: hence the minimum age.

Other temp files are bounded where they are made: Gradio's by the app's `delete_cache`, the app's
outputs by Studio's hourly prune. Knows no model and no UI.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("csm_multi.tempdirs")

TORCH_TEMPLATE = "_remote_module_non_scriptable.py"
_INSTANTIATOR = "torch.distributed.nn.jit.instantiator"
_NAME = re.compile(r"tmp[a-z0-9_]{8}")  # tempfile.mkdtemp's names
_SIGNATURE = (b"import torch.distributed.rpc as rpc", b"_remote_forward")
_MAX_TEMPLATE_BYTES = 64 * 1024
_CLOCK_SLACK_S = 2.0  # /proc start times are whole seconds since boot plus clock ticks


def release_torch_scratch() -> Path | None:
    """Remove the folder torch made in the temp dir when this process imported it; its path, or None."""
    instantiator = sys.modules.get(_INSTANTIATOR)
    scratch = getattr(instantiator, "_TEMP_DIR", None)
    if not isinstance(scratch, tempfile.TemporaryDirectory):
        return None
    path = Path(scratch.name)
    scratch.cleanup()  # torch's own finaliser, detached: its atexit call then finds nothing to do
    if str(path) in sys.path:
        sys.path.remove(str(path))
    return path


def sweep(root: str | Path | None = None, *, min_age_s: float = 600) -> list[Path]:
    """Remove the torch import-time folders in `root` (default: the temp dir) whose process is
    gone; returns the folders removed. Errors are logged, never raised."""
    root = Path(root or tempfile.gettempdir())
    now = time.time()
    candidates = []
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                born = _torch_scratch_birth(entry) if _NAME.fullmatch(entry.name) else None
                if born is not None and now - born >= min_age_s:
                    candidates.append((Path(entry.path), born))
    except OSError as e:
        log.debug("cannot list %s: %s", root, e)
        return []
    if not candidates:
        return []
    torch_starts = _torch_process_starts()
    if torch_starts is None:  # no /proc: owners cannot be ruled out
        return []
    removed = []
    for path, born in candidates:
        if any(start <= born + _CLOCK_SLACK_S for start in torch_starts):
            continue  # a live torch process old enough to have made it
        try:
            shutil.rmtree(path)
            removed.append(path)
        except OSError as e:
            log.debug("cannot remove %s: %s", path, e)
    if removed:
        log.info("removed %d temp folder(s) left by killed torch processes in %s", len(removed), root)
    return removed


def start_sweeper(interval_s: float = 3600, root: str | Path | None = None, **kwargs) -> threading.Event:
    """Sweep now and then every `interval_s` seconds on a daemon thread; set the returned event to stop."""
    stop = threading.Event()

    def loop():
        while True:
            sweep(root, **kwargs)
            if stop.wait(interval_s):
                return

    threading.Thread(target=loop, name="csm-multi-temp-sweep", daemon=True).start()
    return stop


def _torch_scratch_birth(entry: os.DirEntry) -> float | None:
    """When torch wrote the folder's template, if `entry` is exactly such a folder of ours; else None."""
    try:
        if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
            return None
        names = set(os.listdir(entry.path))
        if TORCH_TEMPLATE not in names or not names <= {TORCH_TEMPLATE, "__pycache__"}:
            return None
        template = Path(entry.path, TORCH_TEMPLATE)
        st = template.lstat()
        if not template.is_file() or template.is_symlink() or st.st_size > _MAX_TEMPLATE_BYTES:
            return None
        text = template.read_bytes()
        if not all(s in text for s in _SIGNATURE):
            return None
        return min(st.st_mtime, entry.stat(follow_symlinks=False).st_mtime)
    except (OSError, AttributeError):  # gone meanwhile, unreadable, or no getuid (Windows)
        return None


def _torch_process_starts() -> list[float] | None:
    """Start times (epoch seconds) of the live processes of our user that may have torch imported
    (the instantiator is Python, so its owner is a Python process); None without /proc."""
    proc = Path("/proc")
    try:
        boot = next(float(line.split()[1]) for line in (proc / "stat").read_text().splitlines()
                    if line.startswith("btime "))
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, AttributeError):
        return None
    uid, starts = os.getuid(), []
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            if (proc / pid).stat().st_uid != uid:
                continue
            fields = (proc / pid / "stat").read_text().rsplit(")", 1)[1].split()
            start = boot + int(fields[19]) / ticks  # field 22, starttime
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        if _may_have_torch(proc / pid):
            starts.append(start)
    return starts


def _may_have_torch(folder: Path) -> bool:
    """Has torch's Python bindings mapped; where the maps are unreadable, is a Python process."""
    try:
        with open(folder / "maps", encoding="utf-8", errors="replace") as maps:
            return any("libtorch_python" in line for line in maps)
    except OSError:
        try:
            return "python" in (folder / "cmdline").read_bytes().decode(errors="replace").lower()
        except OSError:
            return True
