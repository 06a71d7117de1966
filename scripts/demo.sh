#!/usr/bin/env bash
# The MAD-X demo, offline on the CPU: sets up .venv as scripts/setup.sh does, then runs `madx demo`.
#   bash scripts/demo.sh                       # writes ./madx_demo_out (refuses a non-empty directory)
#   bash scripts/demo.sh --output /tmp/d       # any `madx demo` option passes through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/madx demo "$@"
