#!/usr/bin/env bash
# Installs animevq and everything its tests need on a fresh Debian/Ubuntu machine with
# Python >= 3.10: the package (editable) with its test extras, and Chromium for the
# SwanLab dashboard test (through apt-get when run as root; otherwise install it yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "setup.sh: Chromium not found; the dashboard test needs it (apt-get install chromium)" >&2
    fi
fi
