#!/bin/sh
# callgrind.sh: instructions per call of raw XGBoost and of keel, counted by callgrind.
#
# DESIGN
# For each batch size and each mode (raw, sync, async) it runs
#   valgrind --tool=callgrind bench_infer --callgrind MODE --batch B --iterations N
# bench_infer warms up, zeroes callgrind's counters, makes N/5 calls and dumps them (part 1,
# which also carries a fixed excess of callgrind's own), then makes exactly N calls and dumps
# them (CALLGRIND_DUMP_STATS_AT), so the part file <out>.2 holds those N calls from every thread
# (callgrind sums threads by default) and nothing of model loading or teardown. Its
# "summary:" line divided by N is the instruction count per call; keel's overhead per request
# is keel's count minus raw's. OMP_WAIT_POLICY=PASSIVE keeps the OpenMP pool threads that
# XGBoost's model load starts from spinning (counted instructions that are no call's cost). Callgrind counts user-space instructions only: the time keel
# spends waking threads (futex system calls, the scheduler, an idle CPU coming back) is not
# in these numbers; bench_infer's cpu and csw columns show that part.
#
# It also writes callgrind_annotate --inclusive=yes for every run and prints, for the keel
# sync run at batch 1, the inclusive cost per call of the functions on keel's request path.
#
# Usage: bench/callgrind.sh [BUILD_DIR] [MODEL_REPOSITORY]
#   defaults: build-bench and BUILD_DIR/bench-models. Environment: ITER_B1 (20000) and
#   ITER_B64 (2000) iterations, OUT (BUILD_DIR/callgrind) for the callgrind files.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-$ROOT/build-bench}
REPO=${2:-$BUILD/bench-models}
ITER_B1=${ITER_B1:-20000}
ITER_B64=${ITER_B64:-2000}
OUT=${OUT:-$BUILD/callgrind}
BENCH="$BUILD/bench_infer"

command -v valgrind >/dev/null 2>&1 || {
    echo "callgrind: valgrind not found (apt-get install valgrind)" >&2
    exit 1
}
[ -x "$BENCH" ] || {
    echo "callgrind: $BENCH not built (run bench/run.sh)" >&2
    exit 1
}
[ -d "$REPO/ref_i1" ] || {
    echo "callgrind: no reference model in $REPO (run bench/train-reference.sh)" >&2
    exit 1
}
mkdir -p "$OUT"

# Runs one mode; prints its instructions per call.
count() {
    mode=$1 batch=$2 iters=$3
    base="$OUT/$mode-b$batch.out"
    rm -f "$base" "$base".*
    OMP_WAIT_POLICY=PASSIVE valgrind --tool=callgrind --callgrind-out-file="$base" "$BENCH" --model-repository "$REPO" \
        --callgrind "$mode" --batch "$batch" --iterations "$iters" >"$OUT/$mode-b$batch.log" 2>&1 || {
        cat "$OUT/$mode-b$batch.log" >&2
        echo "callgrind: $mode batch $batch failed" >&2
        exit 1
    }
    [ -f "$base.2" ] || {
        echo "callgrind: no dump $base.2 (was bench_infer built with valgrind/callgrind.h?)" >&2
        exit 1
    }
    callgrind_annotate --inclusive=yes --threshold=100 "$base.2" >"$OUT/$mode-b$batch.annotate.txt"
    awk -v n="$iters" '/^summary:/ { printf "%.0f\n", $2 / n; exit }' "$base.2"
}

echo "instructions per call (callgrind, user space, all threads), files in $OUT"
echo
echo "| batch | raw Ir/call | keel sync Ir/call | keel async Ir/call | sync - raw | async - raw |"
echo "|------:|------------:|------------------:|-------------------:|-----------:|------------:|"
for batch in 1 64; do
    if [ "$batch" = 1 ]; then iters=$ITER_B1; else iters=$ITER_B64; fi
    raw=$(count raw "$batch" "$iters")
    sync=$(count sync "$batch" "$iters")
    async=$(count async "$batch" "$iters")
    printf '| %5s | %11s | %17s | %18s | %10s | %11s |\n' "$batch" "$raw" "$sync" "$async" \
        $((sync - raw)) $((async - raw))
done

# Inclusive cost per request of the functions on keel's path (sync, batch 1). Static helpers
# that the compiler inlined do not appear; their cost is in their caller. malloc, free and
# snprintf count every caller, XGBoost's included.
echo
echo "keel sync, batch 1: inclusive instructions per request (callgrind_annotate --inclusive=yes)"
echo
echo "| function | Ir/request |"
echo "|---|---:|"
for fn in keel_infer keel_infer_submit sync_done keel__worker_main run_leased complete \
    keel__request_bind_inputs keel__request_clear_outputs xgb_run XGBoosterPredictFromDense \
    keel__request_emit keel__strdup keel__malloc keel__now_ns keel__unix_ms snprintf \
    pthread_mutex_lock@@GLIBC_2.2.5 pthread_mutex_unlock@@GLIBC_2.2.5 \
    pthread_cond_wait@@GLIBC_2.3.2 pthread_cond_signal@@GLIBC_2.3.2 malloc free; do
    awk -v fn="$fn" -v n="$ITER_B1" '
        index($0, ":" fn " [") > 0 {
            c = $1; gsub(",", "", c)
            printf "| %s | %.0f |\n", fn, c / n
            exit
        }' "$OUT/sync-b1.annotate.txt"
done
