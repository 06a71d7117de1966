#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite, spread over the machine's cores (pytest-xdist; PYTEST_WORKERS=1
# runs it in one process). Without a GPU the Triton kernels run through Triton's interpreter
# (TRITON_INTERPRET=1); GPU-only tests (bf16, CUDA backend) skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
python -m pytest tests -q -p no:cacheprovider -n "${PYTEST_WORKERS:-auto}" --benchmark-disable-gc \
  --benchmark-columns=median,rounds "$@"
