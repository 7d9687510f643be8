#!/usr/bin/env bash
# Installs animevq (editable) with its test extras into .venv at the repository root, and
# Chromium for the SwanLab dashboard test. Works on a stock Debian 12 / Ubuntu 24.04, whose
# pip refuses system-wide installs (PEP 668): everything goes into the virtual environment,
# created with python3 -m venv on first use. Afterwards run .venv/bin/animevq, or
# `source .venv/bin/activate` and then animevq.
#
#   PYTHON=python3.12 bash scripts/setup.sh          # another interpreter for the venv
#   ANIMEVQ_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
#                                                    # CPU-only PyTorch, without the CUDA wheels (several GB)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv

as_root() {
    if [ "$(id -u)" = "0" ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else return 1; fi
}

if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$VENV"  # none yet, or one left without pip by a python3 that lacked ensurepip
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        # Debian and Ubuntu ship venv's pip bootstrap separately (python3-venv).
        if command -v apt-get >/dev/null 2>&1 && as_root apt-get update -qq \
            && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; then
            "$PYTHON" -m venv "$VENV"
        else
            echo "setup.sh: '$PYTHON -m venv' failed; install python3-venv (apt-get install python3-venv) and rerun" >&2
            exit 1
        fi
    fi
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ -n "${ANIMEVQ_TORCH_INDEX:-}" ]; then
    "${PIP[@]}" torch torchvision --index-url "$ANIMEVQ_TORCH_INDEX"
fi
"${PIP[@]}" -e ".[test]"

if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && as_root apt-get update -qq \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
        :
    else
        echo "setup.sh: Chromium not found; the dashboard test needs it (apt-get install chromium)" >&2
    fi
fi
echo "setup.sh: animevq is installed in $VENV (run $VENV/bin/animevq, or source $VENV/bin/activate first)"
