"""csm-multi installed (`pip install --no-deps -e .`, done by setup.sh): it runs from any folder, as
`python -m csm_multi`, `csm-multi` and `csm-multi-app`; setup.sh reinstalls when pyproject.toml changes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from csm_multi.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(tmp_path: Path) -> dict[str, str]:
    """No PYTHONPATH and no CSM_* settings: only the installed package can be found."""
    names = {s.env for s in SETTINGS.values()} | {"PYTHONPATH"}
    return {**{k: v for k, v in os.environ.items() if k not in names}, "HF_HUB_OFFLINE": "1",
            "XDG_DATA_HOME": str(tmp_path / "xdg")}


@pytest.mark.slow
def test_cli_and_app_run_from_any_folder(tmp_path):
    for script in ("csm-multi", "csm-multi-app"):
        assert (BIN / script).is_file(), f"{BIN / script} is missing: run ./setup.sh (it does `pip install -e .`)"
    commands = [[sys.executable, "-m", "csm_multi", "info", "--model", "tiny", "--no-watermark"],
                [str(BIN / "csm-multi"), "info", "--model", "tiny", "--no-watermark"],
                [str(BIN / "csm-multi-app"), "--help"]]
    procs = [subprocess.Popen(c, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    results = [(p.communicate(timeout=300), p.returncode) for p in procs]
    for ((_, err), rc), command in zip(results, commands, strict=True):
        assert rc == 0, f"{command}: {err}"
    assert "tiny (random weights" in results[0][0][0] and "tiny (random weights" in results[1][0][0]
    assert "--profiles-dir" in results[2][0][0] and "--shared-library" in results[2][0][0]
    assert {p.name for p in tmp_path.iterdir()} <= {"xdg"}  # nothing written to the working directory


def test_setup_sh_reinstalls_when_pyproject_changes(tmp_path):
    """setup.sh's stamp covers requirements*.txt and pyproject.toml; the editable install is one of its steps."""
    for name in ("setup.sh", "requirements.txt", "requirements-nodeps.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls.log"
    stub = venv / "bin" / "python"  # records what setup.sh asks of the venv's python
    stub.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n')
    stub.chmod(0o755)

    def setup() -> list[str]:
        before = calls.read_text().splitlines() if calls.exists() else []
        subprocess.run(["bash", str(tmp_path / "setup.sh")], env={**os.environ, "VENV": str(venv)}, check=True,
                       capture_output=True, timeout=60)
        return (calls.read_text().splitlines() if calls.exists() else [])[len(before):]

    first = setup()
    assert any("install" in c and "--no-deps -e ." in c for c in first), first
    assert setup() == []  # up to date: nothing runs
    with open(tmp_path / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    assert any("--no-deps -e ." in c for c in setup())
    assert setup() == []
