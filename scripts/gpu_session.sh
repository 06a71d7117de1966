#!/usr/bin/env bash
# Everything that needs a GPU in one command that ends within a time budget (default 540 s) on a lent
# H100/H200, most valuable results first. Run it from the repository root with the wheels of
# `python3 scripts/gpu_wheels.py prepare` in .whl/ beside the tree (see docs/benchmarks.md):
#
#   bash scripts/gpu_session.sh                 # on the GPU machine (python3 there holds torch)
#   bash scripts/gpu_session.sh --rehearsal     # on a CPU: the same phases at tiny sizes (CI runs this)
#   BUDGET=480 OUT=gpu_out WHEELS=.whl bash scripts/gpu_session.sh
#   PHASES="a c" bash scripts/gpu_session.sh    # only these phases
#
# Phases, most valuable first (the timings before any test); each runs under its own timeout, cut to what is
# left of the budget, and a failing phase never stops the next:
#   a   versions and device; the carried wheels installed into their own --target folders and checked
#   b   bench_ops: fused Triton vs eager at the target shapes (H=768, d 48/384, NICE; bf16; 65536 and 4096)
#   c   bench_train: MLM, NER, inference; madx_fast fused (and from CUDA graphs) vs AdapterHub in one process
#       per workload (the AdapterHub set first on PYTHONPATH), peak memory, --profile 2
#   d   the paper-size MLM row (--lang-rf 2), fused vs AdapterHub; bench_mixed (8 languages in one batch)
#   e   GPU correctness: the op, property, NaN and fused-model tests in bf16/fp16/fp32 (pytest-xdist,
#       pytest-timeout); the CUDA backend starts building, under nice -n 19, when this phase starts
#   f   the training GPU tests (the training set first on PYTHONPATH)
#   g   the CUDA backend (built since phase e): its GPU tests, then bench_ops for it
#   h   extras: bench_train's eager and hub+patch rows; bench_ops in fp32 and under torch.compile
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
# A rehearsal's caps only catch a hang: a loaded 2-core CI machine runs the interpreter several times slower
# than an idle one, so each phase gets 5x its GPU cap in wall time (2400 s in all) but, per process, no more
# CPU time than the GPU cap (ulimit -S -t: SIGXCPU, exit 152): its cost is its work (~2.5 CPU-minutes),
# whatever the load.
if [ "$MODE" = gpu ]; then BUDGET="${BUDGET:-540}"; else BUDGET="${BUDGET:-2400}"; fi
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
# seconds are left (in a rehearsal: 5 x CAP, and CAP CPU-seconds per process); its output goes to
# $WORK/logs/NAME.log and to the session log.
phase() {
  local name=$1 cap=$2 min=$3 fn=$4 left limit rc t0 status
  if [ -n "${PHASES:-}" ] && [[ " $PHASES " != *" $name "* ]]; then return; fi
  left=$((DEADLINE - $(date +%s) - RESERVE))
  local limits=""
  if [ "$MODE" = rehearsal ]; then limits="ulimit -S -t $cap; "; cap=$((cap * 5)); fi
  if [ "$left" -lt "$min" ]; then
    status="skipped (${left} s left, needs ${min})"
    [ "$MODE" = rehearsal ] && FAILED=$((FAILED + 1))
  else
    limit=$(( cap < left ? cap : left ))
    echo; echo "=== phase $name (up to ${limit} s) ==="
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c "$limits$fn" 2>&1 | tee "$WORK/logs/$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then status="ok"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT after ${limit} s"; FAILED=$((FAILED + 1))
    elif [ "$rc" -eq 152 ]; then status="OVER ITS CPU CAP (${2} CPU-s per process)"; FAILED=$((FAILED + 1))
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

# The CUDA backend's JIT build (minutes of nvcc) starts after the timings, at the lowest CPU priority, beside
# the tests of phase e; phase g waits for it.
CUDA_BUILD_PID=""
start_cuda_build() {
  if [ -n "$CUDA_BUILD_PID" ] || { [ -n "${PHASES:-}" ] && [[ " $PHASES " != *" g "* ]]; }; then return; fi
  local left=$((DEADLINE - $(date +%s) - RESERVE))
  [ "$left" -gt 30 ] || return
  ( cd "$REPO" && MAX_JOBS="${MAX_JOBS:-4}" PYTHONPATH="$BASE_PATH" timeout "$left" nice -n 19 "$PY" -c \
      "import madx_fast.kernels.cuda as m; print('CUDA backend ready:', m.__name__)" \
      > "$WORK/logs/cuda_build.log" 2>&1; echo $? > "$WORK/cuda_build.rc" ) &
  CUDA_BUILD_PID=$!
  echo "$CUDA_BUILD_PID" > "$WORK/cuda_build.pid"
}

# ---- b: op benchmark ---------------------------------------------------------------------------------------
phase_b() {
  if [ "$MODE" = gpu ]; then
    PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_ops.py --backends eager triton --dtypes bfloat16 \
      --tokens 65536 4096 --json "$WORK/json/bench_ops.json"
  else
    PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_ops.py --quick --reps 1 --backends eager triton --tokens 64 \
      --json "$WORK/json/bench_ops.json"
  fi
}
summarize_b() { table_of "$WORK/logs/b.log" "op " >> "$OUT/summary.txt"; grep -E "bandwidth|failed" "$WORK/logs/b.log" >> "$OUT/summary.txt" || true; }

# ---- c: training-step benchmark vs AdapterHub ---------------------------------------------------------------
# One process per workload, the rows the targets compare (fused, its CUDA graphs, AdapterHub); madx_fast eager
# and hub+patch wait for phase h.
phase_c() {
  local size="--warmup 2 --iters 5 --profile 2" impl="fused graphs adapterhub" rc=0
  [ "$MODE" = gpu ] || { size="--size tiny --warmup 1 --iters 1 --profile 1"; impl="fused adapterhub"; }
  for w in mlm ner infer; do
    in_set adapterhub "$PY" benchmarks/bench_train.py --workloads "$w" --impl $impl $size \
      --json "$WORK/json/bench_train_$w.json" || rc=1
    grep -q "adapterhub" "$WORK/json/bench_train_$w.json" 2>/dev/null || { echo "no AdapterHub row for $w"; rc=1; }
  done
  return $rc
}
summarize_c() {
  grep -E "^# (device|adapterhub)" "$WORK/logs/c.log" | sort -u >> "$OUT/summary.txt" || true
  table_of "$WORK/logs/c.log" "workload " >> "$OUT/summary.txt"
}

# ---- d: the paper-size language adapter, then mixed-language inference (8 languages in one batch) -----------
phase_d() {
  local size="--warmup 2 --iters 5" mixed="--warmup 2 --iters 5" rc=0
  [ "$MODE" = gpu ] || { size="--size tiny --warmup 1 --iters 1"; mixed="--size tiny --backend eager --warmup 1 --iters 1"; }
  in_set adapterhub "$PY" benchmarks/bench_train.py --lang-rf 2 --workloads mlm --impl fused adapterhub $size \
    --json "$WORK/json/bench_train_mlm_rf2.json" || rc=1
  PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_mixed.py $mixed --json "$WORK/json/bench_mixed.json" || rc=1
  return $rc
}
summarize_d() { table_of "$WORK/logs/d.log" "workload " >> "$OUT/summary.txt"; grep -E "^(# size|impl |eager |graphs |# (eager|graphs): mixed)" "$WORK/logs/d.log" >> "$OUT/summary.txt" || true; }

# ---- e: GPU correctness --------------------------------------------------------------------------------------
# CUDA-backend tests (ids with "cuda") need the extension (phase g); the compile check is a CPU job. Test
# phases print one line per test (-v): a phase cut by its timeout still shows what passed and failed.
E_ARGS="tests -v -p no:cacheprovider -ra --durations=10 --ignore=tests/training --ignore=tests/cli \
--ignore=tests/kernels/cuda --ignore=tests/kernels/triton/test_sm90_compile.py --ignore=tests/benchmarks \
--ignore=tests/scripts"
export E_ARGS
phase_e() {
  if [ "$MODE" = gpu ]; then
    PYTHONPATH="$BASE_PATH" "$PY" -m pytest $E_ARGS -k "not cuda" -n "$XDIST" --timeout 150 \
      --junitxml="$WORK/logs/e.xml"
  else  # the GPU selection is collected and checked; a few tests run with the same plugins
    PYTHONPATH="$BASE_PATH" "$PY" -m pytest $E_ARGS -k "not cuda" --collect-only -qq > "$WORK/logs/e_selection.txt"
    tail -1 "$WORK/logs/e_selection.txt"
    # what phase e must never run on the GPU machine (moved test files would otherwise slip in): the compile
    # check and this rehearsal (CPU jobs, PyPI), the CUDA-backend and training tests (phases f and g)
    if grep -E "test_sm90_compile|tests/scripts/|tests/kernels/cuda/|tests/training/|tests/cli/|tests/benchmarks/" \
         "$WORK/logs/e_selection.txt"; then echo "phase e's selection holds tests it must leave out"; exit 1; fi
    PYTHONPATH="$BASE_PATH" "$PY" -m pytest tests/ops/test_bf16_interpreter.py tests/ops/test_interpreter_support.py \
      -q -p no:cacheprovider -ra -k "not cuda" -n "$XDIST" --timeout 150 --junitxml="$WORK/logs/e.xml"
  fi
}
summarize_e() {  # the failures and the totals (or, when cut short, the count of lines per outcome so far)
  grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)|collected" "$WORK/logs/e.log" | tail -25 >> "$OUT/summary.txt" || true
  grep -oE " (PASSED|FAILED|ERROR|SKIPPED) " "$WORK/logs/e.log" | sort | uniq -c | tr '\n' ' ' >> "$OUT/summary.txt"
  echo >> "$OUT/summary.txt"
}

# ---- f: the training GPU tests ----------------------------------------------------------------------------
phase_f() {
  if [ "$MODE" = gpu ]; then
    in_set training "$PY" -m pytest tests/training -m gpu -v -p no:cacheprovider -ra --timeout 300 \
      --junitxml="$WORK/logs/f.xml"
  else  # no GPU tests run here: the GPU selection collects; the training set's packages in use
    in_set training "$PY" -m pytest tests/training -m gpu -q -p no:cacheprovider --collect-only | tail -1
    in_set training "$PY" -m pytest tests/training/test_data.py tests/training/test_metrics.py \
      -q -p no:cacheprovider -ra -k "hf or seqeval or squad or f1" --timeout 300 --junitxml="$WORK/logs/f.xml"
  fi
}
summarize_f() { grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped)" "$WORK/logs/f.log" | tail -15 >> "$OUT/summary.txt" || true; }

# ---- g: the CUDA backend (built since phase e) --------------------------------------------------------------
# its GPU tests: tests/kernels/cuda/test_gpu.py (not the CPU-emulator tests) and the backend="cuda" cases of
# the shared suites
G_TESTS="tests/kernels/cuda/test_gpu.py tests/ops/test_adapter.py tests/ops/test_nice.py tests/ops/test_nan.py \
-k 'test_gpu_ or (cuda and not emulated)' -v -p no:cacheprovider -ra"
export G_TESTS
phase_g() {
  [ -f "$WORK/cuda_build.pid" ] || { echo "the CUDA backend's build never started"; exit 1; }
  while [ ! -f "$WORK/cuda_build.rc" ]; do sleep 2; done
  tail -5 "$WORK/logs/cuda_build.log"
  if [ "$(cat "$WORK/cuda_build.rc")" != 0 ]; then
    echo "CUDA backend unavailable (see cuda_build.log)"
    if [ "$MODE" = rehearsal ] && grep -q "CPU-only" "$WORK/logs/cuda_build.log"; then  # expected without a GPU
      eval PYTHONPATH="\$BASE_PATH" "\$PY" -m pytest $G_TESTS --collect-only | tail -1  # the GPU selection collects
      exit $?
    fi
    exit 1
  fi
  local rc=0
  eval PYTHONPATH="\$BASE_PATH" "\$PY" -m pytest $G_TESTS -n 4 --timeout 200 --junitxml="\$WORK/logs/g.xml" || rc=1
  PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_ops.py --backends eager cuda --dtypes bfloat16 --tokens 65536 \
    --json "$WORK/json/bench_ops_cuda.json" || rc=1
  return $rc
}
summarize_g() { grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)|unavailable" "$WORK/logs/g.log" | tail -15 >> "$OUT/summary.txt" || true; table_of "$WORK/logs/g.log" "op " >> "$OUT/summary.txt"; }

# ---- h: extras, with what is left -------------------------------------------------------------------------------
phase_h() {  # bench_train's other rows, then bench_ops in fp32 (quick) and under torch.compile (tens of s a case)
  local rc=0
  if [ "$MODE" = gpu ]; then
    in_set adapterhub "$PY" benchmarks/bench_train.py --impl eager adapterhub hub+patch --warmup 2 --iters 5 \
      --json "$WORK/json/bench_train_extras.json" || rc=1
    PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_ops.py --backends eager triton --dtypes float32 --tokens 65536 \
      --json "$WORK/json/bench_ops_fp32.json" || rc=1
    PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_ops.py --backends eager compile --dtypes bfloat16 --tokens 65536 \
      --json "$WORK/json/bench_ops_compile.json" || rc=1
  else
    in_set adapterhub "$PY" benchmarks/bench_train.py --impl eager adapterhub hub+patch --workloads ner --size tiny \
      --warmup 1 --iters 1 --json "$WORK/json/bench_train_extras.json" || rc=1
    PYTHONPATH="$BASE_PATH" "$PY" benchmarks/bench_ops.py --quick --reps 1 --backends eager triton --dtypes float16 \
      --tokens 64 --json "$WORK/json/bench_ops_extras.json" || rc=1
  fi
  return $rc
}
summarize_h() { table_of "$WORK/logs/h.log" "workload " >> "$OUT/summary.txt"; table_of "$WORK/logs/h.log" "op " >> "$OUT/summary.txt"; }

export -f phase_a phase_b phase_c phase_d phase_e phase_f phase_g phase_h

#     name cap  min  function (caps in seconds; a budget of 540 s: the timings by ~330 s, then the tests)
phase a   45   20   phase_a
phase b   90   30   phase_b
phase c   150  60   phase_c
phase d   90   40   phase_d
start_cuda_build
phase e   150  60   phase_e
phase f   100  45   phase_f
phase g   100  45   phase_g
phase h   120  40   phase_h
if [ -n "$CUDA_BUILD_PID" ] && kill -0 "$CUDA_BUILD_PID" 2>/dev/null; then  # a build still running: stop it
  pkill -TERM -P "$CUDA_BUILD_PID" 2>/dev/null; kill "$CUDA_BUILD_PID" 2>/dev/null
fi
cp "$WORK/logs/cuda_build.log" "$WORK/logs/cuda_build.final.log" 2>/dev/null
pack
summary "" "== $(( $(date +%s) - START )) s of ${BUDGET}; ${FAILED} phases failed; everything: $OUT/gpu_session.tar.gz"
echo; echo "################ summary ################"
cat "$OUT/summary.txt"
exit "$FAILED"
