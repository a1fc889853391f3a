#!/usr/bin/env bash
# xthread_free.sh: how many of an in-process run's frees release memory another thread
# allocated, and from where.
#
# DESIGN
# A benchmark run by hand (never by the test suite); it counts and never fails on a number.
# It builds bench/xthread_free.c (an LD_PRELOAD library, xthread_free.c's DESIGN) into
# build-bench and runs bench_infer's fixed-count async mode under it (--callgrind async
# without valgrind: the same calls, nothing dumped), on 1 and on 2 worker threads, then
# prints the totals and each cross-thread free site with its frames resolved by addr2line.
# With glibc's allocator a steady stream of cross-thread frees slows both threads' other
# allocations (docs/PERFORMANCE.md, "Session 6"), so on two workers the count per call should
# stay near zero.
#
# Usage: bench/xthread_free.sh   Environment: ITERATIONS (50000), DEPTH (8).
# Needs: gcc, addr2line (binutils), the reference model (bench/train-reference.sh; made here
# if missing) and build-bench (bench/run.sh builds it; built here if missing).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=build-bench
repo=$build/bench-models
iters=${ITERATIONS:-50000}
depth=${DEPTH:-8}

[[ -x "$build/bench_infer" ]] || {
    cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKEEL_BUILD_BENCH=ON >/dev/null
    ninja -C "$build" bench_infer >/dev/null
}
[[ -f "$repo/ref_i1/1/model.json" ]] || OUT="$repo" sh bench/train-reference.sh "$repo" >/dev/null
gcc -O2 -Wall -Wextra -shared -fPIC -o "$build/xthread_free.so" bench/xthread_free.c -ldl -lpthread

for inst in 1 2; do
    log=$(LD_PRELOAD="$PWD/$build/xthread_free.so" "$build/bench_infer" --model-repository "$repo" \
        --callgrind async --batch 1 --iterations "$iters" --instances "$inst" --depth "$depth" 2>&1)
    calls=$(sed -n 's/.*short=\([0-9]*\) iterations=\([0-9]*\).*/\1 \2/p' <<<"$log" |
        awk -v i="$iters" '{w = int(i / 10); if (w < 100) w = 100; print w + $1 + $2}')
    total=$(grep 'xthread_free: frees' <<<"$log")
    echo "async w$inst/i$inst d$depth, $calls calls: ${total#xthread_free: }"
    # Sites with at least one free per 100 calls, frames resolved.
    awk -v min=$((calls / 100)) '
        /xthread_free: site/ { show = ($4 >= min); if (show) print "  " substr($0, 15); next }
        /xthread_free:     / && show { print "    " substr($0, 19) }' <<<"$log" |
        while IFS= read -r line; do
            if [[ "$line" =~ ^(.*)\(\+(0x[0-9a-f]+)\)(.*)$ ]]; then
                f=$(addr2line -f -e "${BASH_REMATCH[1]// /}" "${BASH_REMATCH[2]}" | head -n1)
                echo "      $f (${BASH_REMATCH[1]// /}+${BASH_REMATCH[2]})"
            else
                echo "$line"
            fi
        done
done
