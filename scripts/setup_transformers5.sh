#!/usr/bin/env bash
# Creates .venv5 (if missing): the same pinned CPU torch as .venv, then madx_fast with transformers 5.x,
# huggingface_hub 1.x and tokenizers from PyPI, and the test tools, but without AdapterHub's `adapters`
# (adapters 1.3 pins transformers 4.57; its parity tests skip with that reason here), with TensorBoard and
# accelerate (Hugging Face's Trainer) as in .venv's dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv5/bin/python ]; then
  python3 -m venv .venv5
fi
. .venv5/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e . "transformers>=5,<6" "huggingface_hub>=1,<2" tokenizers \
  "pytest>=8" pytest-benchmark pytest-xdist pytest-timeout hypothesis tensorboard "accelerate>=0.26"
