#!/usr/bin/env bash
# Measures the wall time of `madx demo` from a cold start: a fresh output directory and an empty model cache
# (so the small base model is pretrained, as on a first run). Prints the figure and writes it as JSON.
#   bash scripts/time_demo.sh [RESULT_JSON [DEMO_ARGS...]]  # default RESULT_JSON: madx_demo_timing.json
#   bash scripts/time_demo.sh t1.json --threads 1        # any `madx demo` flags (threads, shorter schedules)
#   MADX=/path/to/venv/bin/madx bash scripts/time_demo.sh   # time an existing install (else .venv is set up)
#   WARM=1 bash scripts/time_demo.sh                     # second run with the cached base model (also timed)
set -euo pipefail
cd "$(dirname "$0")/.."
result="${1:-madx_demo_timing.json}"
shift || true
if [ -z "${MADX:-}" ]; then
  bash scripts/setup.sh
  MADX="$PWD/.venv/bin/madx"
fi
python_bin="$(dirname "$MADX")/python"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python_bin" - "$MADX" "$work" "$result" "${WARM:-0}" "$@" <<'PY'
import json, os, platform, resource, subprocess, sys, time

madx, work, result, warm, demo_args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5:]
cache = os.path.join(work, "cache")


def run(out):
    cmd = [madx, "demo", "--output-dir", out, "--cache-dir", cache, "--no-progress", *demo_args]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        sys.exit(f"madx demo failed with status {proc.returncode}")
    summary = json.load(open(os.path.join(out, "demo_summary.json")))
    return {"command": " ".join([*cmd[:2], *demo_args]) + " (fresh --output-dir and --cache-dir)",
            "wall_time_s": round(wall, 1), "torch_threads": summary.get("torch_threads"),
            "stage_times_s": {k: round(v, 1) for k, v in summary["timings_s"].items()},
            "load_average_at_start": round(load, 2), "table": proc.stdout}


cold = run(os.path.join(work, "cold"))
record = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(), "cold": cold,
          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
try:
    import torch, transformers
    record.update(torch=torch.__version__, transformers=transformers.__version__)
except ImportError:
    pass
if warm:
    record["warm"] = run(os.path.join(work, "warm"))
print(cold["table"])
with open(result, "w") as f:
    json.dump(record, f, indent=2)
print(f"madx demo {' '.join(demo_args)}, cold start: {cold['wall_time_s']} s wall on {record['cpu_count']} CPU(s), "
      f"{cold['torch_threads']} torch thread(s) (load average {cold['load_average_at_start']} at start); "
      f"stages: {cold['stage_times_s']}")
if warm:
    print(f"madx demo, cached base model: {record['warm']['wall_time_s']} s wall")
print(f"written to {result}")
PY
