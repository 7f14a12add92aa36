#!/usr/bin/env bash
# Set up .venv and serve the shipped models/ on 127.0.0.1:8500 (metrics on :8501).
# Extra arguments go to `rnnserve serve` (see `rnnserve serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/rnnserve serve "$@"
