#!/usr/bin/env bash
# Issue 12's CPU targets, against the static-cache baseline, for a quiet machine (tens of minutes on two cores).
#   scripts/bench_static.sh [OUT_DIR]        (default: assets/benchmarks)
# Every bench below is one process, its methods interleaved (each repeat runs every method once), medians of 5.
#   dycoke:tau=1   reselects at every step (tau >= 1 always reselects)
#   dycoke:tau=-1  selects once, at the first step (a cosine is never below -1)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-assets/benchmarks}"
mkdir -p "$out"
methods="baseline,dycoke,dycoke:tau=1,dycoke:tau=-1,ttm,dp"

# Targets: a DyCoke decode step never slower than the baseline's at 8, 32, 64 frames (tau=1 and tau=-1);
# DyCoke's 32-frame decode speed-up >= 1.5x; TTFT at 32 frames >= 90% of the analytic ceiling; TTM + selection
# overhead <= 2% of latency. All against the static-cache baseline of the same run.
python -m dycoke.bench --preset mini --frames 8,32,64 --methods "$methods" --cache static --repeats 5 --warmup 1 \
    --out "$out/static-cpu-2core.json" --html "$out/static-cpu-2core.html"

# The same grid on the dynamic cache (DynamicCache, DP deciding on the host): what the static cache changes.
python -m dycoke.bench --preset mini --frames 8,32,64 --methods "$methods" --cache dynamic --repeats 5 --warmup 1 \
    --out "$out/dynamic-cpu-2core.json" --html "$out/dynamic-cpu-2core.html"

# The static cache with a compiled decoding step (inductor; a failure is a note in the JSON and the run goes on
# uncompiled, so read settings.compile.notes and each row's "compiled").
python -m dycoke.bench --preset mini --frames 8,32 --methods "$methods" --cache static --compile --repeats 5 \
    --warmup 1 --out "$out/static-compile-cpu-2core.json" --html "$out/static-compile-cpu-2core.html"

# Target: a new video's decode + preprocessing time at most half of before issue 12 (720p shared clip, 32 frames).
python scripts/time_preprocessing.py --repeats 5 --committed --frames 32 | tee "$out/preprocessing-cpu-2core.txt"
