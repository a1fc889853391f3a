#!/usr/bin/env bash
# fuzz.sh BUILD_DIR: runs every libFuzzer driver (fuzz/README.md) for a bounded time from its
# committed corpus; what scripts/test.sh's asan stage runs after configuring with
# -DKEEL_BUILD_FUZZ=ON.
#
# Each driver starts from fuzz/corpus/<name>/ (read only) plus a scratch directory under the
# build dir, which receives the new inputs it finds (they are not committed). A crash, leak,
# timeout or out-of-memory stops that driver, writes its input to fuzz/corpus/<name>/ as
# crash-<sha1> (leak-, timeout-, oom-) so it is kept, replayed by every later run until the bug
# is fixed, and can be committed, and makes this script exit 1 after the other drivers ran.
#
# KEEL_FUZZ_SECS: seconds per driver (default 30; five drivers, so two and a half minutes in all).
# The caller may put a command in front of each run (e.g. setarch -R) through KEEL_FUZZ_PREFIX.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=${1:?usage: fuzz.sh BUILD_DIR}
secs=${KEEL_FUZZ_SECS:-30}
read -r -a prefix <<<"${KEEL_FUZZ_PREFIX:-}"
drivers=(fuzz_v2codec fuzz_config fuzz_pbtxt fuzz_onnx_proto fuzz_image)
# The corpus folder of each driver and its input size cap (the seed MLP is 15 KB).
declare -A corpus=([fuzz_v2codec]=v2codec [fuzz_config]=config [fuzz_pbtxt]=pbtxt [fuzz_onnx_proto]=onnx
    [fuzz_image]=image)
declare -A maxlen=([fuzz_v2codec]=8192 [fuzz_config]=8192 [fuzz_pbtxt]=8192 [fuzz_onnx_proto]=20000
    [fuzz_image]=20000)

failed=()
for d in "${drivers[@]}"; do
    bin="$build/$d"
    seeds="fuzz/corpus/${corpus[$d]}"
    work="$build/fuzz-work/${corpus[$d]}"
    if [[ ! -x "$bin" ]]; then
        echo "fuzz.sh: $bin is missing (configure with -DKEEL_BUILD_FUZZ=ON and clang)" >&2
        failed+=("$d (not built)")
        continue
    fi
    if [[ ! -d "$seeds" ]]; then
        echo "fuzz.sh: no corpus $seeds for $d" >&2
        failed+=("$d (no corpus)")
        continue
    fi
    mkdir -p "$work"
    echo "fuzz.sh: $d for ${secs}s from $seeds"
    log="$build/fuzz-work/$d.log"
    # -timeout: one input running longer than 20 s is a hang; -rss_limit_mb: a decode that
    # needs more than 2 GiB is a bug (the drivers cap sizes far below that).
    if "${prefix[@]}" "$bin" -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 \
        -max_len="${maxlen[$d]}" -print_final_stats=1 -artifact_prefix="$seeds/" \
        "$work" "$seeds" >"$log" 2>&1; then
        grep -E '^stat::number_of_executed_units|^Done [0-9]+ runs' "$log" | tail -n 2 || true
    else
        echo "fuzz.sh: $d FAILED; its input is kept under $seeds/ (last lines of $log):" >&2
        tail -n 40 "$log" >&2
        failed+=("$d")
    fi
done
if ((${#failed[@]} > 0)); then
    echo "fuzz.sh: failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: ${#drivers[@]} drivers ran ${secs}s each without a crash, leak or hang"
