#!/usr/bin/env bash
# The prepared GPU suite (issue 12): every result under OUT (default results/gpu-<device>).
#   bench/gpu.sh [OUT] [--dry-run]     --dry-run: the same steps on tiny-random on the CPU (about a minute of CPU time)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' || echo cpu)}"
exec python -m dycoke.bench --gpu-suite "$out" "${@:2}"
