#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a lent CUDA machine (its image has torch, triton, transformers,
# pytest and hypothesis; nothing is installed): the GPU-only tests first (bf16, the CUDA backend, the fused
# model paths), then the benchmarks. Logs and JSON go to $OUT (default ./gpu_out).
#   bash scripts/gpu_session.sh            # tests + op, training-step and mixed-language benchmarks
#   bash scripts/gpu_session.sh tests      # only the tests
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
what="${1:-all}"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python -c "import torch, triton, transformers; \
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } \
  | tee "$OUT/device.txt"
python -m pytest tests -q -p no:cacheprovider -x --ignore=tests/training -k "not bench" 2>&1 | tee "$OUT/tests.log" | tail -15
# the GPU tests of the training stack: no sync in a whole step, the default fast path's curve vs eager
# (needs the training dependencies: datasets, seqeval, tokenizers)
python -m pytest tests/training -q -p no:cacheprovider -m gpu 2>&1 | tee "$OUT/tests_training.log" | tail -8
if [ "$what" = all ]; then
  python benchmarks/bench_ops.py --json "$OUT/bench_ops.json" 2>&1 | tee "$OUT/bench_ops.log"
  python benchmarks/bench_train.py --profile 5 --json "$OUT/bench_train.json" 2>&1 | tee "$OUT/bench_train.log"
  python benchmarks/bench_mixed.py --json "$OUT/bench_mixed.json" 2>&1 | tee "$OUT/bench_mixed.log"
fi
