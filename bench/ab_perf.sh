#!/usr/bin/env bash
# ab_perf.sh: served batch-1 throughput of two keel serve configurations (binary and
# arguments), both running at once, keel perf alternating between them in short rounds.
#
# DESIGN
# A benchmark run by hand (never by the test suite): it measures and never fails on a number.
# bench/ab.sh restarts each server per round and drives it with wrk for 3 s; on this VM, whose
# speed drifts within seconds (docs/PERFORMANCE.md, "two modes"), a ratio needs its two sides
# measured as close together as possible. So here both servers start once, pinned to the same
# core ($SERVER_CPU, one HTTP thread and one inference thread each; the idle one costs
# nothing), and each round runs keel perf (pinned to $GEN_CPU, batch-1 V2 JSON rows of the
# reference model, $CONNS connections) for $SECS s against one and then the other, the order
# swapped every round so neither side always runs second. Prints each round's req/s and B/A,
# then the median B/A with its spread (min..max) and each side's median req/s. A round where
# keel perf reports a failed request or no result stops the script.
#
# Usage: bench/ab_perf.sh "KEEL_A [serve args...]" "KEEL_B [serve args...]"
#   e.g. bench/ab_perf.sh build-bench/keel "build-bench/keel --http-connection-memory 8k"
# Environment: MODEL (ref_b0: the reference model with dynamic batching that
#   `bench/suite.sh batching` makes), CONNS (64), SECS (1), ROUNDS (21), SERVER_CPU (0),
#   GEN_CPU (1). Each binary must sit in its build directory (keel-model-check beside it).
# Needs: a Release build in build-bench (keel perf comes from it), the reference model.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $# -eq 2 ]] || { echo "usage: bench/ab_perf.sh \"KEEL_A [args]\" \"KEEL_B [args]\"" >&2; exit 2; }
repo=build-bench/bench-models
perf=build-bench/keel
model=${MODEL:-ref_b0}
conns=${CONNS:-64}
secs=${SECS:-1}
rounds=${ROUNDS:-21}
scpu=${SERVER_CPU:-0}
gcpu=${GEN_CPU:-1}
[[ -x "$perf" ]] || { echo "ab_perf: $perf not built" >&2; exit 1; }
[[ -f "$repo/$model/config.json" ]] || { echo "ab_perf: no model $model in $repo" >&2; exit 1; }
out=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$out"
}
trap cleanup EXIT

# Batch-1 rows for keel perf's --input-data, from the training data (as callgrind_http.sh).
awk 'NR <= 256 { for (i = 1; i <= 20; i++) v[i] = 0
                 for (i = 2; i <= NF; i++) { split($i, kv, ":"); v[kv[1]] = kv[2] }
                 line = v[1]; for (i = 2; i <= 20; i++) line = line " " v[i]; print line }' \
    "$repo/train.libsvm" >"$out/rows.txt"

ports=()
for side in 0 1; do
    spec=$1
    [[ $side -eq 1 ]] && spec=$2
    read -r -a cmd <<<"$spec"
    taskset -c "$scpu" "${cmd[0]}" serve --model-repository "$repo" --http-port 0 --grpc-port -1 \
        --http-threads 1 --worker-threads 1 --log-level warn "${cmd[@]:1}" >"$out/port$side" &
    pids+=($!)
    port=
    for _ in $(seq 200); do
        port=$(sed -n 's/.*port=\([0-9]*\).*/\1/p' "$out/port$side" | head -n1)
        [[ -n "$port" ]] && curl -fs "127.0.0.1:$port/v2/models/$model/ready" >/dev/null && break
        port=
        sleep 0.05
    done
    [[ -n "$port" ]] || { echo "ab_perf: server '$spec' did not get ready" >&2; exit 1; }
    ports+=("$port")
done

run() { # port -> req/s
    rm -f "$out/perf.csv"
    taskset -c "$gcpu" "$perf" perf -u "127.0.0.1:$1" -m "$model" -b 1 --concurrency-range "$conns" \
        -d "$2" --warmup 0 --no-progress --input-data "$out/rows.txt" -f "$out/perf.csv" \
        >"$out/perf.log" 2>&1 || true
    awk -F, 'NR == 2 { if ($6 != 0 || $7 <= 0) exit 1; print $7 }' "$out/perf.csv" 2>/dev/null || {
        echo "ab_perf: keel perf failed or counted failed requests:" >&2
        cat "$out/perf.log" >&2
        exit 1
    }
}

run "${ports[0]}" 2 >/dev/null
run "${ports[1]}" 2 >/dev/null
echo "A = $1"
echo "B = $2"
echo "model $model, $conns connections, $rounds rounds x ${secs}s, server CPU $scpu, keel perf CPU $gcpu"
for r in $(seq "$rounds"); do
    if ((r % 2)); then
        a=$(run "${ports[0]}" "$secs")
        b=$(run "${ports[1]}" "$secs")
    else
        b=$(run "${ports[1]}" "$secs")
        a=$(run "${ports[0]}" "$secs")
    fi
    echo "$r $a $b" | tee -a "$out/rounds"
done | awk '{ printf "round %2d  A %9.0f  B %9.0f  B/A %.3f\n", $1, $2, $3, $3 / $2 }'
/usr/bin/python3 - "$out/rounds" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1])]
ratios = sorted(b / a for _, a, b in rows)
print("median req/s: A %.0f, B %.0f" % (statistics.median(a for _, a, _ in rows),
                                        statistics.median(b for _, _, b in rows)))
print("B/A median %.3f (%.3f..%.3f) over %d rounds" % (statistics.median(ratios), ratios[0],
                                                        ratios[-1], len(ratios)))
PY
