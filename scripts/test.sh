#!/usr/bin/env bash
# Run the whole test suite (unit, model and end-to-end tests) plus the static checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check lightmem tests
.venv/bin/lint-imports
.venv/bin/pytest -q -ra "$@"
