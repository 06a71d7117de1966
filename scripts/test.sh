#!/usr/bin/env bash
# Sets up .venv and runs the test suite, spread over the machine's cores (pytest-xdist; PYTEST_WORKERS=1
# runs it in one process). Without a GPU the Triton kernels run through Triton's interpreter
# (TRITON_INTERPRET=1); GPU-only tests (bf16, CUDA backend) skip with a reason.
#
#   bash scripts/test.sh                          the whole suite (tests/)
#   bash scripts/test.sh tests/cli -k version     only the paths given (any pytest options pass through)
#   MADX_NO_SETUP=1 bash scripts/test.sh ...      without the setup step (.venv already set up)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MADX_NO_SETUP:-}" ]; then
  bash scripts/setup.sh
fi
. .venv/bin/activate
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
# The whole suite unless an argument names a test path (a file or directory, optionally with ::test).
targets=(tests)
for arg in "$@"; do
  case "$arg" in
    -*) ;;
    *) if [ -e "${arg%%::*}" ]; then targets=(); fi ;;
  esac
done
python -m pytest "${targets[@]}" -q -p no:cacheprovider -n "${PYTEST_WORKERS:-auto}" --benchmark-disable-gc \
  --benchmark-columns=median,rounds "$@"
