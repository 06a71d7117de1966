#!/usr/bin/env bash
# The model, training and command tests again on transformers 5.x (what most users have; the GPU image has
# 5.x), in a second environment: .venv5 (scripts/setup_transformers5.sh: the same pinned CPU torch,
# transformers 5.x, huggingface_hub 1.x, tokenizers from PyPI, no AdapterHub `adapters`, whose parity tests
# skip here with that reason). Only the suites that depend on transformers; -x stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_transformers5.sh
. .venv5/bin/activate
python -c "import transformers, huggingface_hub, sys; print('transformers', transformers.__version__, \
'huggingface_hub', huggingface_hub.__version__); sys.exit(0 if transformers.__version__.startswith('5.') else 1)"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
python -m pytest tests/model tests/training tests/cli -x -q -p no:cacheprovider -n "${PYTEST_WORKERS:-auto}" "$@"
