#!/usr/bin/env bash
# onnx.sh: the onnx backend's numbers in docs/PERFORMANCE.md ("ONNX models").
#
# Builds a Release tree in build-bench/ (as bench/run.sh does), then for each example model
# (digits) and PyTorch test model (mlp, cnn, squeezenet):
#   - in process: bench/bench_onnx.c, once with instance_count 1 and once with 4, each in a
#     fresh process (RSS deltas of one process would mix in the allocator's reuse);
#   - served: bench/bench_onnx_http.py against `keel serve`, instance_count 1 and 4.
# Memory per context = (RSS with 4 contexts - RSS with 1) / 3, after every context has run.
# Prints a markdown table; a benchmark measures, it does not pass or fail.
# Usage: bench/onnx.sh [ITERS]   (default 2000; squeezenet uses ITERS/10)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=build-bench
iters=${1:-2000}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKEEL_BUILD_BENCH=ON \
    -DBUILD_TESTING=OFF >/dev/null
ninja -C "$build" -j2 bench_onnx keel_cli keel_model_check >/dev/null

echo "| model | file | in-process p50 / p99 (us) | raw OpenCV p50 / p99 (us) | served p50 / p99 (us) | per context, in process | per context, served |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for m in digits mlp cnn squeezenet; do
    if [[ $m == digits ]]; then f=examples/models/digits/1/model.onnx; else f=tests/data/onnx/$m/model.onnx; fi
    n=$iters
    [[ $m == squeezenet ]] && n=$((iters / 10))
    read -r _ _ t1 k50 k99 r50 r99 < <("$build/bench_onnx" "$f" 1 "$n")
    read -r _ _ t4 _ _ _ _ < <("$build/bench_onnx" "$f" 4 "$((n / 10 > 10 ? n / 10 : 10))")
    read -r _ s1 h50 h99 < <(/usr/bin/python3 bench/bench_onnx_http.py "$build/keel" "$f" 1 "$n")
    read -r _ s4 _ _ < <(/usr/bin/python3 bench/bench_onnx_http.py "$build/keel" "$f" 4 10)
    size=$(stat -c %s "$f")
    printf '| %s | %d KiB | %s / %s | %s / %s | %s / %s | %d KiB | %d KiB |\n' "$m" $((size / 1024)) \
        "$k50" "$k99" "$r50" "$r99" "$h50" "$h99" $(((t4 - t1) / 3)) $(((s4 - s1) / 3))
done
