#!/usr/bin/env bash
# Create .venv, install csm-multi's dependencies and csm-multi itself (editable, so `csm-multi`,
# `csm-multi-app` and `python -m csm_multi` run from any folder). Idempotent: re-runs only when the
# requirements files or pyproject.toml change. moshi and silentcipher are installed without their
# stale pins (see README "Dependencies"); csm-multi with --no-deps (requirements.txt is the source).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV="${VENV:-.venv}"
stamp="$VENV/.csm-multi-installed"
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt
"$VENV/bin/python" -m pip install -qq --no-deps -e .  # -qq: not setuptools' editable-install banner
"$VENV/bin/python" -c "import torch, torchaudio, torchtune, moshi.models, silentcipher, transformers, gradio" 2>/dev/null \
  || { echo "setup.sh: the installed packages do not import together; see README 'Dependencies'" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup.sh: environment ready in $VENV"
