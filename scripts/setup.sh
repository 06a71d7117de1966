#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned CPU build of torch first, then madx_fast with its dev extras.
# A plain `torch` requirement could otherwise pull a multi-GB CUDA build on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
