#!/usr/bin/env bash
# callgrind_http.sh: instructions per HTTP request of `keel serve`, counted by callgrind.
#
# DESIGN
# A benchmark run by hand (never by the test suite); it measures and never fails on a number.
# It starts `keel serve` (one HTTP thread, one inference thread, no preprocessing workers:
# valgrind 3.19 lacks pidfd_open, which they need) under valgrind --tool=callgrind with the
# extra server arguments given, warms it up with keel perf at concurrency 1, zeroes the
# counters (callgrind_control -z), runs keel perf at concurrency 1 for SECS seconds, dumps
# (callgrind_control -d) and divides the dump's total (its "summary:" line, every event since
# the zeroing; the "totals:" line carries a fixed few million more per dump, which weighs on
# runs with few requests) by the requests the server counted
# (the model's success count from /stats; for GET /v2/health/live, keel perf's count). The
# total is user-space instructions of every server thread, so it is independent of the load
# on the machine: unlike wall-clock numbers it can be taken on a busy machine. It is the same
# method as bench/suite.sh's `ir` section, for one server configuration, and it also writes
# callgrind_annotate (inclusive and exclusive) for every measurement, which is where the
# per-function breakdown in docs/PERFORMANCE.md comes from.
# Under callgrind a model runs ~50x slower, so `--infer-on-http-thread auto` would find the
# reference model slow and hand it to an inference thread; the script passes
# --inline-max-us 1000000 so that auto takes the inline path it takes on a real machine
# (give `--infer-on-http-thread off` to measure the hand-off instead).
#
# Usage: bench/callgrind_http.sh [keel serve args...]
#   e.g. bench/callgrind_http.sh --http-connection-memory 16k
# Environment: BUILD (build-bench, a Release build with KEEL_BUILD_BENCH=ON), SECS (5),
#   BATCHES ("1 64"), LIVE (1: also GET /v2/health/live), OUT (BUILD/callgrind-http), TAG
#   (a name for the files, default "run"), MODEL (ref_i1; ref_b0 is its copy with dynamic
#   batching that bench/suite.sh batching makes), CONC (1: keel perf's concurrency; with a
#   batching model and CONC 64 the server forms batches, and Ir/request is the batched path).
# Needs: valgrind, curl, the reference model (bench/train-reference.sh; bench/suite.sh makes
#   it and the rows file).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=${BUILD:-build-bench}
repo="$build/bench-models"
secs=${SECS:-5}
batches=${BATCHES:-1 64}
live=${LIVE:-1}
out=${OUT:-$build/callgrind-http}
tag=${TAG:-run}
model=${MODEL:-ref_i1}
conc=${CONC:-1}
keel="$build/keel"
mkdir -p "$out"

command -v valgrind >/dev/null || { echo "callgrind_http: valgrind not found" >&2; exit 1; }
[[ -x "$keel" ]] || { echo "callgrind_http: $keel not built" >&2; exit 1; }
[[ -f "$repo/$model/1/model.json" ]] ||
    { echo "callgrind_http: no reference model in $repo (run bench/suite.sh ir once)" >&2; exit 1; }
rows="$out/rows.txt"
# Rows of numbers for keel perf's --input-data, from the training data (as bench/suite.sh).
awk 'NR <= 256 { for (i = 1; i <= 20; i++) v[i] = 0
                 for (i = 2; i <= NF; i++) { split($i, kv, ":"); v[kv[1]] = kv[2] }
                 line = v[1]; for (i = 2; i <= 20; i++) line = line " " v[i]; print line }' \
    "$repo/train.libsvm" >"$rows"

vpid=
cleanup() {
    if [[ -n "$vpid" ]]; then
        kill "$vpid" 2>/dev/null || true
        wait "$vpid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# The model's success (requests) and execution (backend calls) counts.
counts() {
    curl -s "http://127.0.0.1:$port/v2/models/$model/stats" |
        /usr/bin/python3 -c 'import json,sys; s = json.load(sys.stdin)["model_stats"][0]; print(s["inference_stats"]["success"]["count"], s["execution_count"])'
}

# Zeroes the counters, runs keel perf with the given args, dumps; prints the dump's total.
measure() { # name perf-args...
    local name=$1 dump total
    shift
    rm -f "$cg".*
    callgrind_control -z "$vpid" >/dev/null 2>&1
    "$keel" perf -u "127.0.0.1:$port" --concurrency-range "$conc" -d "$secs" --warmup 0 --no-progress \
        "$@" >/dev/null
    callgrind_control -d "$vpid" >/dev/null 2>&1
    dump="$out/$tag-$name.cg"
    mv "$(ls "$cg".* | head -n1)" "$dump"
    callgrind_annotate --inclusive=yes --threshold=100 "$dump" >"$out/$tag-$name.incl.txt"
    callgrind_annotate --threshold=100 "$dump" >"$out/$tag-$name.self.txt"
    total=$(awk '/^summary:/ { print $2; exit }' "$dump")
    echo "${total//,/}"
}

cg="$out/$tag.cg"
rm -f "$cg" "$cg".*
pf=$(mktemp)
OMP_WAIT_POLICY=PASSIVE valgrind --tool=callgrind --callgrind-out-file="$cg" \
    "$keel" serve --model-repository "$repo" --http-port 0 --grpc-port -1 --http-threads 1 \
    --worker-threads 1 --log-level warn --preprocess-workers 0 --inline-max-us 1000000 "$@" >"$pf" 2>"$out/$tag.log" &
vpid=$!
for _ in $(seq 3000); do grep -q port= "$pf" && break; sleep 0.1; done
port=$(sed -n 's/.*port=\([0-9]*\).*/\1/p' "$pf")
rm -f "$pf"
[[ -n "$port" ]] || { echo "callgrind_http: keel serve did not start:" >&2; tail "$out/$tag.log" >&2; exit 1; }

echo "| what | requests | requests/execution | Ir/request |"
echo "|---|---:|---:|---:|"
for b in $batches; do
    "$keel" perf -u "127.0.0.1:$port" -m "$model" -b "$b" --concurrency-range "$conc" -d 2 --warmup 0 \
        --no-progress --input-data "$rows" >/dev/null
    read -r n0 x0 < <(counts)
    total=$(measure "b$b" -m "$model" -b "$b" --input-data "$rows")
    read -r n1 x1 < <(counts)
    n=$((n1 - n0))
    # The stats request between zero and dump is counted too; it is negligible.
    printf '| batch %s infer, %s, concurrency %s | %s | %s | %s |\n' "$b" "$model" "$conc" "$n" \
        "$(awk -v n="$n" -v x="$((x1 - x0))" 'BEGIN { printf "%.1f", (x > 0 ? n / x : 0) }')" \
        "$((total / n))"
done
if [[ $live == 1 ]]; then
    total=$(measure live --endpoint /v2/health/live -f "$out/$tag-live.csv")
    n=$(awk -F, 'NR == 2 { print $5 + $6 }' "$out/$tag-live.csv")
    printf '| GET /v2/health/live, concurrency %s | %s | - | %s |\n' "$conc" "$n" "$((total / n))"
fi
echo
echo "annotations: $out/$tag-*.incl.txt (inclusive), $out/$tag-*.self.txt (exclusive)"
