#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install rnnserve into it, with extras given as arguments:
#   scripts/setup.sh            runtime only
#   scripts/setup.sh dev        + test and lint tools
# Re-running is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "rnnserve needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
extras=$(IFS=,; echo "$*")
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
