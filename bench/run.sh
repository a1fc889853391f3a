#!/usr/bin/env bash
# run.sh: the whole benchmark, from a clean checkout to the numbers in docs/PERFORMANCE.md.
#
# DESIGN
# 1. Configures and builds a Release tree in build-bench/ (cmake -G Ninja, KEEL_BUILD_BENCH=ON).
# 2. Trains the reference model into build-bench/bench-models/ unless it is already there
#    (bench/train-reference.sh; deterministic, nothing is committed).
# 3. Prints the machine (nproc, CPU model, kernel, load average, compiler, XGBoost version),
#    runs bench_infer (the timed table) and bench/callgrind.sh (instructions per call).
# Everything printed is also saved under build-bench/bench-results/. A benchmark measures and
# never fails on a number; the script exits non-zero only if a step breaks.
#
# Usage: bench/run.sh
# Environment: BENCH_ROUNDS (5), BENCH_SECONDS (1.0), BENCH_DEPTH (8) for bench_infer;
#   ITER_B1, ITER_B64 for callgrind.sh; SKIP_CALLGRIND=1 skips the callgrind step.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
build="$root/build-bench"
repo="$build/bench-models"
results="$build/bench-results"
rounds=${BENCH_ROUNDS:-5}
seconds=${BENCH_SECONDS:-1.0}
depth=${BENCH_DEPTH:-8}

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKEEL_BUILD_BENCH=ON >/dev/null
ninja -C "$build" bench_infer

if [[ ! -f "$repo/ref_i1/1/model.json" || ! -f "$repo/ref_i2/1/model.json" ]]; then
    sh bench/train-reference.sh "$repo"
fi
mkdir -p "$results"

cmd=("$build/bench_infer" --model-repository "$repo" --rounds "$rounds" --seconds "$seconds"
    --depth "$depth")
{
    echo "date:     $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "nproc:    $(nproc)"
    echo "cpu:      $(grep -m1 '^model name' /proc/cpuinfo | sed 's/^[^:]*: *//')"
    echo "kernel:   $(uname -sr)"
    echo "load:     $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min, before the run)"
    echo "compiler: $(cc --version | head -n1)"
    echo "xgboost:  $(dpkg-query -W -f '${Version}' libxgboost-dev 2>/dev/null || echo unknown)"
    echo "command:  ${cmd[*]#"$root/"}"
    echo
} | tee "$results/machine.txt"

"${cmd[@]}" | tee "$results/bench_infer.txt"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$results/bench_infer.txt"

if [[ "${SKIP_CALLGRIND:-0}" != 1 ]]; then
    echo
    OUT="$build/callgrind" sh bench/callgrind.sh "$build" "$repo" | tee "$results/callgrind.txt"
fi

echo
echo "run.sh: results saved in ${results#"$root/"}/ (machine.txt, bench_infer.txt, callgrind.txt);"
echo "        callgrind files and callgrind_annotate --inclusive=yes output in build-bench/callgrind/."
echo "        Copy the tables, the machine lines and the command into docs/PERFORMANCE.md."
