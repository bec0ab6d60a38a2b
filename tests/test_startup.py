"""Starting the app and the CLI as a user does (subprocesses): one-line start-up errors, the
environment variables both read, and a temp dir that killed runs do not fill with torch's folders."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csm_multi import tempdirs
from csm_multi.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
HUB_MESSAGE = "cannot reach the Hugging Face hub for sesame/csm-1b"
linux_only = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="owners are read from /proc")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Offline, its own temp dir and data dir, no CSM_* settings from outside."""
    names = {s.env for s in SETTINGS.values()}
    env = {k: v for k, v in os.environ.items() if k not in names}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update(HF_HUB_OFFLINE="1", XDG_DATA_HOME=str(tmp_path / "xdg"), TMPDIR=str(tmp_path / "tmp"), **extra)
    return env


def _run_all(*commands: tuple[list[str], dict[str, str]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run commands side by side (each imports torch for seconds); their results in order."""
    procs = [subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv, env in commands]
    done = []
    for argv, p in zip(commands, procs, strict=True):
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(argv, p.returncode, out, err))
    return done


def _boot_time() -> float:
    return next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))


def _torch_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / tempdirs.TORCH_TEMPLATE).exists())


@pytest.fixture(scope="module")
def leftover(tmp_path_factory) -> Path:
    """A real torch import-time folder, left as a killed process leaves it (os._exit skips atexit)."""
    tmp = tmp_path_factory.mktemp("killed")
    subprocess.run([sys.executable, "-c", "import os, torch.distributed.nn; os._exit(0)"], check=True, timeout=300,
                   env={**os.environ, "TMPDIR": str(tmp)})
    [folder] = _torch_folders(tmp)
    assert tempdirs._NAME.fullmatch(folder.name)
    return folder


def _plant(leftover: Path, root: Path, name: str, mtime: float | None) -> Path:
    folder = root / name
    shutil.copytree(leftover, folder)
    if mtime is not None:
        for path in (folder / tempdirs.TORCH_TEMPLATE, folder):
            os.utime(path, (mtime, mtime))
    return folder


@pytest.mark.slow
def test_app_start_up_error_is_one_message_and_debug_shows_the_traceback(tmp_path):
    argv = [sys.executable, str(ROOT / "app.py"), "--model", "csm-1b", "--profiles-dir", str(tmp_path / "voices")]
    plain, debug = _run_all((argv, _env(tmp_path)), ([*argv, "--debug"], _env(tmp_path)))
    assert plain.returncode == 2 and f"error: {HUB_MESSAGE}" in plain.stderr
    assert "Traceback" not in plain.stderr and "Traceback" not in plain.stdout
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "WeightsUnavailableError" in debug.stderr
    assert f"error: {HUB_MESSAGE}" in debug.stderr


@pytest.mark.slow
def test_cli_reads_csm_model_and_fails_in_one_line(tmp_path):
    """CSM_MODEL=csm-1b (not the `auto` default, which would fall back to tiny offline) reaches the
    loader; its error is one line, and --debug adds the traceback."""
    argv = [sys.executable, "-m", "csm_multi", "info"]
    env = _env(tmp_path, CSM_MODEL="csm-1b")
    plain, debug = _run_all((argv, env), ([*argv, "--debug"], env))
    [line] = plain.stderr.strip().splitlines()
    assert plain.returncode == 2 and line.startswith(f"error: {HUB_MESSAGE}")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and f"error: {HUB_MESSAGE}" in debug.stderr


@linux_only
def test_sweep_removes_only_dead_processes_torch_folders(tmp_path, leftover, monkeypatch):
    old = _boot_time() - 60  # no live process started before boot, so none can own it
    stale = _plant(leftover, tmp_path, "tmpstale001", old)
    young = _plant(leftover, tmp_path, "tmpyoung001", None)  # made now: this test process (torch loaded) may own it
    extra = _plant(leftover, tmp_path, "tmpextra001", old)
    (extra / "notes.txt").write_text("not torch's")
    renamed = _plant(leftover, tmp_path, "build_cache", old)
    (tmp_path / "elsewhere").mkdir()
    linked = tmp_path / "tmplink0001"
    linked.symlink_to(_plant(leftover, tmp_path / "elsewhere", "tmptarget01", old), target_is_directory=True)

    assert tempdirs.sweep(tmp_path, min_age_s=0) == [stale]
    assert young.exists() and extra.exists() and renamed.exists() and (linked / tempdirs.TORCH_TEMPLATE).exists()

    again = _plant(leftover, tmp_path, "tmpstale002", old)
    with monkeypatch.context() as m:  # without /proc no owner can be ruled out
        m.setattr(tempdirs, "_torch_process_starts", lambda: None)
        assert tempdirs.sweep(tmp_path, min_age_s=0) == [] and again.exists()
    assert tempdirs.sweep(tmp_path) == [again]  # the default minimum age (10 minutes) keeps only the young one
    assert young.exists()


@linux_only
@pytest.mark.slow
def test_cli_start_sweeps_stale_folders_and_leaves_none_of_its_own(tmp_path, leftover):
    env = _env(tmp_path)
    tmp = Path(env["TMPDIR"])
    stale = _plant(leftover, tmp, "tmpstale001", _boot_time() - 60)
    young = _plant(leftover, tmp, "tmpyoung001", None)
    [done] = _run_all(([sys.executable, "-m", "csm_multi", "profiles", "--profiles-dir", str(tmp_path / "v"), "list"],
                       env))
    assert done.returncode == 0, done.stderr
    assert _torch_folders(tmp) == [young] and not stale.exists()


@linux_only
@pytest.mark.slow
def test_killed_app_leaves_no_torch_folder(tmp_path, leftover):
    """The app drops its own torch folder at start-up, so SIGKILL leaves none; its start sweeps a stale one."""
    env = _env(tmp_path)
    tmp = Path(env["TMPDIR"])
    stale = _plant(leftover, tmp, "tmpstale001", _boot_time() - 60)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--no-watermark",
                                "--asr-model", "none", "--port", str(port), "--profiles-dir", str(tmp_path / "voices")],
                               env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "Running on" not in log.read_text() and time.monotonic() < deadline:
            assert app.poll() is None, log.read_text()
            time.sleep(0.5)
        assert "Running on" in log.read_text(), log.read_text()
        while stale.exists() and time.monotonic() < deadline:  # the sweeper thread runs as the server starts
            time.sleep(0.2)
        assert _torch_folders(tmp) == []
    finally:
        app.send_signal(signal.SIGKILL)
        app.wait(timeout=60)
    assert _torch_folders(tmp) == [] and (tmp / "gradio").is_dir()  # gradio's own folder: bounded by delete_cache


@pytest.mark.slow
def test_released_folder_is_gone_at_once_and_exit_stays_quiet(tmp_path):
    env = _env(tmp_path)
    code = ("import torch.distributed.nn.jit.instantiator as i, pathlib, sys; from csm_multi.tempdirs import "
            "release_torch_scratch as r; d = pathlib.Path(i.INSTANTIATED_TEMPLATE_DIR_PATH); assert d.exists(); "
            "assert r() == d and not d.exists() and str(d) not in sys.path and r() == d")
    [done] = _run_all(([sys.executable, "-c", code], env))
    assert done.returncode == 0 and done.stderr == "" and list(Path(env["TMPDIR"]).iterdir()) == []


def test_app_and_cli_read_the_same_environment_variables(tmp_path, monkeypatch, capsys):
    """One table (settings.py) feeds both: the same CSM_* values reach the app's and the CLI's engine."""
    import app as app_module
    from csm_multi import CsmError, loaders
    from csm_multi.cli import main as cli

    env = {"CSM_MODEL": "csm-1b", "CSM_CHECKPOINT": str(tmp_path / "ckpt"), "CSM_DEVICE": "cpu",
           "CSM_QUANTIZE": "int8", "CSM_TOKENIZER_REPO": "./tok", "CSM_TRUST_TOKENIZER": "1",
           "CSM_ASR_MODEL": "./whisper", "CSM_PROFILES_DIR": str(tmp_path / "libraries"),
           "CSM_PREFIX_CACHE_MB": "64"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen: dict[str, dict] = {"app": {}, "cli": {}}
    fake_engine = type("E", (), {"device": "cpu", "info": type("I", (), {})()})()

    def building(who):
        return lambda model, **kw: seen[who].update(kw, model=model) or fake_engine

    def stop(*args, **kwargs):  # the app's Studio: record where its libraries go, then end start-up here
        seen["app"]["profiles_dir"] = args[1]
        raise CsmError("stopped by the test")

    monkeypatch.setattr(app_module, "build_engine", building("app"))
    monkeypatch.setattr(app_module, "build_transcriber", lambda source, device=None: seen["app"].update(asr=source))
    monkeypatch.setattr(app_module, "Studio", stop)
    assert app_module.main([]) == 2 and "error: stopped by the test" in capsys.readouterr().err
    monkeypatch.setattr(loaders, "build_engine", building("cli"))
    assert cli(["info"]) == 0
    app, command_line = seen["app"], seen["cli"]
    assert {k: app[k] for k in command_line} == command_line == {
        "model": "csm-1b", "checkpoint": str(tmp_path / "ckpt"), "device": "cpu", "quantize": "int8",
        "tokenizer_repo": "./tok", "trust_tokenizer": True, "watermark": True, "prefix_cache_mb": 64}
    assert app["asr"] == "./whisper" and app["profiles_dir"] == str(tmp_path / "libraries")
    assert cli(["profiles", "list"]) == 0
    assert f"no profiles in {tmp_path / 'libraries' / 'shared'}" in capsys.readouterr().out
