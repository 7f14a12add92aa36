#!/usr/bin/env bash
# Set up .venv with the dev and training extras, lint, and run the whole test suite.
# Extra arguments go to pytest (for example: scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev train
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/hadolint Dockerfile
.venv/bin/mypy server client
# pytest exits 5 when it collects no tests; with `set -e` that fails the run, as it should.
.venv/bin/python -m pytest "$@"
