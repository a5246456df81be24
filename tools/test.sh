#!/usr/bin/env bash
# The whole test suite: bootstrap, lint (ruff), types (mypy strict), then pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
.venv/bin/ruff check pmxfs tests tools
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
