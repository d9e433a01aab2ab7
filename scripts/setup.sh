#!/usr/bin/env bash
# Sets up patchslim on a fresh machine: system packages the tests use (when run as root), then a
# virtual environment in .venv with requirements.txt. Safe to rerun; a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  # Fashion-MNIST (the bundled model's full test set) and Chromium (the real-browser test).
  if ! [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist chromium >/dev/null
  fi
else
  echo "setup: not root; skipping 'apt-get install dataset-fashion-mnist chromium' (tests that need them skip)" >&2
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# patchslim itself, editable (its dependencies are the ones above): the `patchslim` command in .venv/bin.
if [ ! -x .venv/bin/patchslim ]; then
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
fi
