#!/usr/bin/env bash
# Everything that needs a GPU in one command that ends within a time budget (default 540 s) on a lent
# H100/H200, most valuable results first. Run it from the repository root with the wheels of
# `python3 scripts/gpu_wheels.py prepare` in .whl/ beside the tree (see docs/benchmarks.md):
#
#   bash scripts/gpu_session.sh                 # on the GPU machine (python3 there holds torch)
#   bash scripts/gpu_session.sh --rehearsal     # on a CPU: the same phases at tiny sizes (CI runs this)
#   BUDGET=480 OUT=gpu_out WHEELS=.whl bash scripts/gpu_session.sh
#   PHASES="a d" bash scripts/gpu_session.sh    # only these phases
#
# Phases; each runs under its own timeout, cut to what is left of the budget, and a failing phase never
# stops the next:
#   a   versions and device; the carried wheels installed into their own --target folders and checked;
#       the CUDA backend starts building in the background
#   b   GPU correctness: the op, property, NaN and fused-model tests in bf16/fp16/fp32 (pytest-xdist,
#       pytest-timeout); CUDA-backend and training tests wait for phase e
#   c   bench_ops: fused Triton vs eager at the target shapes (H=768, d 48/384, NICE; bf16)
#   d   bench_train: MLM, NER, inference; madx_fast fused vs AdapterHub in one process (the AdapterHub set
#       first on PYTHONPATH), peak memory, --profile; one run per workload
#   e1  the CUDA backend (built since phase a): its GPU tests, then bench_ops for it
#   e2  the training GPU tests (the training set first on PYTHONPATH)
#   e3  the paper-size MLM row (--lang-rf 2), fused vs AdapterHub; bench_mixed (8 languages in one batch)
#   e4  bench_ops extras: fp32, then torch.compile (bf16)
# Output: $OUT/session.log (all output), $OUT/summary.txt (the key tables, also printed at the end),
# $OUT/gpu_session.tar.gz (every log and JSON, repacked after each phase: a run cut short still returns
# what it has). Exit status: the number of phases that failed (in a rehearsal, skipped ones count too).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
MODE=gpu
if [ "${1:-}" = "--rehearsal" ]; then MODE=rehearsal; shift; fi
if [ $# -gt 0 ]; then echo "usage: bash scripts/gpu_session.sh [--rehearsal]" >&2; exit 64; fi
OUT="${OUT:-gpu_out}"
WHEELS="$(cd "${WHEELS:-.whl}" 2>/dev/null && pwd || echo "${WHEELS:-.whl}")"
PY="${PYTHON:-python3}"
STANDIN="${STANDIN:-}"           # rehearsal: a --target folder with the GPU image's transformers/hub/tokenizers
if [ "$MODE" = gpu ]; then BUDGET="${BUDGET:-540}"; else BUDGET="${BUDGET:-900}"; fi
RESERVE=15                       # seconds kept for the last packing and the summary
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/madx_gpu_session.XXXXXX")"
SITE="$WORK/site"
mkdir -p "$WORK/logs" "$WORK/json" "$SITE"
trap 'rm -rf "$WORK"' EXIT        # everything in it is in the archive by then
: > "$OUT/summary.txt"
: > "$OUT/session.log"
exec > >(tee -a "$OUT/session.log") 2>&1
START=$(date +%s)
DEADLINE=$((START + BUDGET))
BASE_PATH="$REPO${STANDIN:+:$STANDIN}"
export PYTHONUNBUFFERED=1 MODE REPO WORK SITE PY WHEELS BASE_PATH
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$([ "$MODE" = gpu ] && echo 4 || echo 2)}"
export TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$MODE" = gpu ]; then
  unset TRITON_INTERPRET
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" TRITON_DEFAULT_FP_FUSION=1
  NPROC=$(nproc)
  export XDIST=$(( NPROC > 12 ? 10 : (NPROC > 2 ? NPROC - 2 : 1) ))
else
  export TRITON_INTERPRET=1 XDIST=2
fi
FAILED=0
echo "# madx_fast GPU session ($MODE), budget ${BUDGET} s, started $(date -u +%FT%TZ); results in $OUT"

summary() { printf '%s\n' "$@" >> "$OUT/summary.txt"; }
pack() {  # every log and JSON so far, replaced atomically
  tar -czf "$OUT/gpu_session.tar.gz.part" -C "$WORK" logs json 2>/dev/null \
    && mv -f "$OUT/gpu_session.tar.gz.part" "$OUT/gpu_session.tar.gz"
}
table_of() {  # the benchmark tables in a log: each from its header line to the next blank line
  awk -v head="$2" 'index($0, head) == 1 {on = 1} on && /^$/ {on = 0} on {print}' "$1"
}

# phase NAME CAP MIN FUNCTION: run FUNCTION under a timeout of min(CAP, what is left), when at least MIN
# seconds are left; its output goes to $WORK/logs/NAME.log and to the session log.
phase() {
  local name=$1 cap=$2 min=$3 fn=$4 left limit rc t0 status
  if [ -n "${PHASES:-}" ] && [[ " $PHASES " != *" $name "* ]]; then return; fi
  left=$((DEADLINE - $(date +%s) - RESERVE))
  if [ "$left" -lt "$min" ]; then
    status="skipped (${left} s left, needs ${min})"
    [ "$MODE" = rehearsal ] && FAILED=$((FAILED + 1))
  else
    limit=$(( cap < left ? cap : left ))
    echo; echo "=== phase $name (up to ${limit} s) ==="
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c "$fn" 2>&1 | tee "$WORK/logs/$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then status="ok"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT after ${limit} s"; FAILED=$((FAILED + 1))
    else status="FAILED (exit $rc)"; FAILED=$((FAILED + 1)); fi
    status="$status in $(( $(date +%s) - t0 )) s"
  fi
  echo "phase $name: $status"
  summary "" "== phase $name: $status"
  [ "$(type -t "summarize_$name")" = function ] && [ -f "$WORK/logs/$name.log" ] && "summarize_$name"
  pack
}

in_set() {  # in_set SET CMD...: run CMD with the carried wheel set SET first on PYTHONPATH
  local set=$1; shift
  PYTHONPATH="$SITE/$set:$BASE_PATH" "$@"
}
export -f in_set

# ---- a: versions, device, wheels -------------------------------------------------------------------------
phase_a() {
  set -e
  if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  else
    echo "no nvidia-smi / no GPU here"
  fi
  PYTHONPATH="$BASE_PATH" "$PY" - <<'EOF'
import platform, torch, triton, transformers, tokenizers, huggingface_hub, numpy
print(f"python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton "
      f"{triton.__version__}; transformers {transformers.__version__}; tokenizers {tokenizers.__version__}; "
      f"huggingface_hub {huggingface_hub.__version__}; numpy {numpy.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
else:
    print("device: CPU (Triton interpreter)")
EOF
  for set in adapterhub training; do
    ls "$WHEELS/$set/"*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS/$set: run python3 scripts/gpu_wheels.py prepare"; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/$set" \
      "$WHEELS/$set/"*.whl
    in_set "$set" "$PY" "$REPO/scripts/gpu_wheels.py" check "$SITE/$set"
  done
  in_set adapterhub "$PY" -c "import adapters, transformers, tokenizers, huggingface_hub as h; print('adapterhub set:',
      'adapters', adapters.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__,
      'huggingface_hub', h.__version__)"
  in_set training "$PY" -c "import datasets, seqeval.metrics, tokenizers, dill, multiprocess; print('training set:',
      'datasets', datasets.__version__, 'tokenizers', tokenizers.__version__, 'seqeval ok')"
}
summarize_a() { grep -E "^(python|device|adapterhub set|training set|name|NVIDIA|clash|# [0-9]+ requirements)" "$WORK/logs/a.log" >> "$OUT/summary.txt" || true; }

# The CUDA backend's JIT build (minutes of nvcc) runs beside phases b-d; phase e1 waits for it.
start_cuda_build() {
  ( cd "$REPO" && MAX_JOBS="${MAX_JOBS:-4}" PYTHONPATH="$BASE_PATH" timeout "$((BUDGET - 60))" "$PY" -c \
      "import madx_fast.kernels.cuda as m; print('CUDA backend ready:', m.__name__)" \
      > "$WORK/logs/cuda_build.log" 2>&1; echo $? > "$WORK/cuda_build.rc" ) &
  CUDA_BUILD_PID=$!
}

# ---- b: GPU correctness --------------------------------------------------------------------------------
# CUDA-backend tests (ids with "cuda") need the extension (phase e1); the compile check is a CPU job. Test
# phases print one line per test (-v): a phase cut by its timeout still shows what passed and failed.
B_ARGS="tests -v -p no:cacheprovider -ra --durations=10 --ignore=tests/training --ignore=tests/cli \
--ignore=tests/kernels/cuda --ignore=tests/kernels/triton/test_sm90_compile.py --ignore=tests/benchmarks \
--ignore=tests/scripts"
export B_ARGS
phase_b() {
  if [ "$MODE" = gpu ]; then
    PYTHONPATH="$BASE_PATH" "$PY" -m pytest $B_ARGS -k "not cuda" -n "$XDIST" --timeout 150 \
      --junitxml="$WORK/logs/b.xml"
  else  # the GPU selection is collected and checked; a few tests run with the same plugins
    PYTHONPATH="$BASE_PATH" "$PY" -m pytest $B_ARGS -k "not cuda" --collect-only -qq > "$WORK/logs/b_selection.txt"
    tail -1 "$WORK/logs/b_selection.txt"
    # what phase b must never run on the GPU machine (moved test files would otherwise slip in): the compile
    # check and this rehearsal (CPU jobs, PyPI), the CUDA-backend and training tests (phase e)
    if grep -E "test_sm90_compile|tests/scripts/|tests/kernels/cuda/|tests/training/|tests/cli/|tests/benchmarks/" \
         "$WORK/logs/b_selection.txt"; then echo "phase b's selection holds tests it must leave out"; exit 1; fi
    PYTHONPATH="$BASE_PATH" "$PY" -m pytest tests/ops/test_bf16_interpreter.py tests/ops/test_interpreter_support.py \
      -q -p no:cacheprovider -ra -k "not cuda" -n "$XDIST" --timeout 150 --junitxml="$WORK/logs/b.xml"
  fi
}
summarize_b() {  # the failures and the totals (or, when cut short, the count of lines per outcome so far)
  grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)|collected" "$WORK/logs/b.log" | tail -25 >> "$OUT/summary.txt" || true
  grep -oE " (PASSED|FAILED|ERROR|SKIPPED) " "$WORK/logs/b.log" | sort | uniq -c | tr '\n' ' ' >> "$OUT/summary.txt"
  echo >> "$OUT/summary.txt"
}

# ---- c: op benchmark ---------------------------------------------------------------------------------------
phase_c() {
  if [ "$MODE" = gpu ]; then
    PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_ops.py --backends eager triton --dtypes bfloat16 \
      --tokens 65536 8192 --json "$WORK/json/bench_ops.json"
  else
    PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_ops.py --quick --reps 1 --backends eager triton --tokens 64 \
      --json "$WORK/json/bench_ops.json"
  fi
}
summarize_c() { table_of "$WORK/logs/c.log" "op " >> "$OUT/summary.txt"; grep -E "bandwidth|failed" "$WORK/logs/c.log" >> "$OUT/summary.txt" || true; }

# ---- d: training-step benchmark vs AdapterHub ---------------------------------------------------------------
phase_d() {
  local size="" impl="fused graphs eager adapterhub hub+patch" rc=0
  [ "$MODE" = gpu ] && size="--profile 3" || { size="--size tiny --warmup 1 --iters 1 --profile 1"; impl="fused adapterhub hub+patch"; }
  for w in mlm ner infer; do
    in_set adapterhub "$PY" benchmarks/bench_train.py --workloads "$w" --impl $impl $size \
      --json "$WORK/json/bench_train_$w.json" || rc=1
    grep -q "adapterhub" "$WORK/json/bench_train_$w.json" 2>/dev/null || { echo "no AdapterHub row for $w"; rc=1; }
  done
  return $rc
}
summarize_d() {
  grep -E "^# (device|adapterhub)" "$WORK/logs/d.log" | sort -u >> "$OUT/summary.txt" || true
  table_of "$WORK/logs/d.log" "workload " >> "$OUT/summary.txt"
}

# ---- e: with what is left -----------------------------------------------------------------------------------
# the CUDA backend's GPU tests: tests/kernels/cuda/test_gpu.py (not the CPU-emulator tests) and the
# backend="cuda" cases of the shared suites
E1_TESTS="tests/kernels/cuda/test_gpu.py tests/ops/test_adapter.py tests/ops/test_nice.py tests/ops/test_nan.py \
-k 'test_gpu_ or (cuda and not emulated)' -v -p no:cacheprovider -ra"
export E1_TESTS
phase_e1() {
  while [ ! -f "$WORK/cuda_build.rc" ]; do sleep 2; done
  tail -5 "$WORK/logs/cuda_build.log"
  if [ "$(cat "$WORK/cuda_build.rc")" != 0 ]; then
    echo "CUDA backend unavailable (see cuda_build.log)"
    if [ "$MODE" = rehearsal ] && grep -q "CPU-only" "$WORK/logs/cuda_build.log"; then  # expected without a GPU
      eval PYTHONPATH="\$BASE_PATH" "\$PY" -m pytest $E1_TESTS --collect-only | tail -1  # the GPU selection collects
      exit $?
    fi
    exit 1
  fi
  local rc=0
  eval PYTHONPATH="\$BASE_PATH" "\$PY" -m pytest $E1_TESTS -n 4 --timeout 200 --junitxml="\$WORK/logs/e1.xml" || rc=1
  PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_ops.py --backends eager cuda --dtypes bfloat16 --tokens 65536 \
    --json "$WORK/json/bench_ops_cuda.json" || rc=1
  return $rc
}
summarize_e1() { grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)|unavailable" "$WORK/logs/e1.log" | tail -15 >> "$OUT/summary.txt" || true; table_of "$WORK/logs/e1.log" "op " >> "$OUT/summary.txt"; }

phase_e2() {
  if [ "$MODE" = gpu ]; then
    in_set training "$PY" -m pytest tests/training -m gpu -v -p no:cacheprovider -ra --timeout 300 \
      --junitxml="$WORK/logs/e2.xml"
  else  # no GPU tests run here: the GPU selection collects; the training set's packages in use
    in_set training "$PY" -m pytest tests/training -m gpu -q -p no:cacheprovider --collect-only | tail -1
    in_set training "$PY" -m pytest tests/training/test_data.py tests/training/test_metrics.py \
      -q -p no:cacheprovider -ra -k "hf or seqeval or squad or f1" --timeout 300 --junitxml="$WORK/logs/e2.xml"
  fi
}
summarize_e2() { grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped)" "$WORK/logs/e2.log" | tail -15 >> "$OUT/summary.txt" || true; }

phase_e3() {  # the paper-size language adapter, then mixed-language inference (8 languages in one batch)
  local size="" mixed="" rc=0
  [ "$MODE" = gpu ] || { size="--size tiny --warmup 1 --iters 1"; mixed="--size tiny --backend eager --warmup 1 --iters 1"; }
  in_set adapterhub "$PY" benchmarks/bench_train.py --lang-rf 2 --workloads mlm --impl fused adapterhub $size \
    --json "$WORK/json/bench_train_mlm_rf2.json" || rc=1
  PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_mixed.py $mixed --json "$WORK/json/bench_mixed.json" || rc=1
  return $rc
}
summarize_e3() { table_of "$WORK/logs/e3.log" "workload " >> "$OUT/summary.txt"; grep -E "^(# size|impl |eager |graphs |# (eager|graphs): mixed)" "$WORK/logs/e3.log" >> "$OUT/summary.txt" || true; }

phase_e4() {  # fp32 first (quick); torch.compile last (each case compiles for tens of seconds)
  if [ "$MODE" = gpu ]; then
    PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_ops.py --backends eager triton --dtypes float32 --tokens 65536 \
      --json "$WORK/json/bench_ops_fp32.json" || return 1
    PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_ops.py --backends eager compile --dtypes bfloat16 --tokens 65536 \
      --json "$WORK/json/bench_ops_compile.json"
  else
    PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_ops.py --quick --reps 1 --backends eager triton --dtypes float16 \
      --tokens 64 --json "$WORK/json/bench_ops_extras.json"
  fi
}
summarize_e4() { table_of "$WORK/logs/e4.log" "op " >> "$OUT/summary.txt"; }

export -f phase_a phase_b phase_c phase_d phase_e1 phase_e2 phase_e3 phase_e4

CUDA_BUILD_PID=""
if [ -z "${PHASES:-}" ] || [[ " $PHASES " == *" e1 "* ]]; then start_cuda_build; fi
#     name cap  min  function (caps in seconds: a budget of 540 s leaves e1-e4 what a-d do not use)
phase a   60   20   phase_a
phase b   200  60   phase_b
phase c   90   30   phase_c
phase d   170  60   phase_d
phase e1  150  60   phase_e1
phase e2  150  60   phase_e2
phase e3  90   45   phase_e3
phase e4  120  40   phase_e4
if [ -n "$CUDA_BUILD_PID" ] && kill -0 "$CUDA_BUILD_PID" 2>/dev/null; then  # a build still running: stop it
  pkill -TERM -P "$CUDA_BUILD_PID" 2>/dev/null; kill "$CUDA_BUILD_PID" 2>/dev/null
fi
cp "$WORK/logs/cuda_build.log" "$WORK/logs/cuda_build.final.log" 2>/dev/null
pack
summary "" "== $(( $(date +%s) - START )) s of ${BUDGET}; ${FAILED} phases failed; everything: $OUT/gpu_session.tar.gz"
echo; echo "################ summary ################"
cat "$OUT/summary.txt"
exit "$FAILED"
