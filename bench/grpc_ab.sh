#!/usr/bin/env bash
# grpc_ab.sh: issue 13's gRPC/HTTP throughput ratio, before and after a change, in one run.
#
# DESIGN
# A benchmark, run by hand (never by the test suite): it measures and never fails on a number.
# Two Release builds of keel (directories holding `keel` and `keel-model-check`, e.g. a build of
# main and one of a branch) each start one `keel serve` (HTTP and gRPC on the same server,
# --http-threads 1 --worker-threads 1, pinned to CPU $SERVER_CPU like bench/suite.sh), serving
# ref_i1 of build-bench/bench-models (bench/train-reference.sh makes it). Each round measures,
# for every build in turn and every batch size and concurrency, keel perf over HTTP (V2 JSON)
# and over gRPC (unary ModelInfer, and ModelStreamInfer streams) against that build's server,
# with that build's keel perf pinned to CPU $GEN_CPU. Rounds are interleaved, so the drifts of
# a shared machine hit both builds and all protocols alike; the table gives per build the
# median and the spread (min..max) over the rounds of the per-round gRPC/HTTP req/s ratios
# (the issue's measure; unary and stream), of the req/s, and of the server's CPU time per
# request (us, all threads; robust on a busy machine, where throughput is not). Rows go to
# $OUT/grpc_ab.tsv.
#
# Usage: bench/grpc_ab.sh BEFORE_DIR AFTER_DIR
# Environment: ROUNDS (5), SECS (3, per measurement), CONCS ("8"), BATCHES ("1 64"),
#   SERVER_CPU (0), GEN_CPU (1), OUT (build-bench/bench-results/grpc_ab).
# A build of a revision: git worktree add /tmp/keel-before REV && cmake -S /tmp/keel-before
#   -B /tmp/keel-before/b -G Ninja -DCMAKE_BUILD_TYPE=Release && ninja -C /tmp/keel-before/b
#   keel_cli keel-model-check
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
(($# == 2)) || { echo "usage: bench/grpc_ab.sh BEFORE_DIR AFTER_DIR" >&2; exit 2; }
dirs=("$1" "$2")
names=(before after)
repo="$root/build-bench/bench-models"
out=${OUT:-$root/build-bench/bench-results/grpc_ab}
rounds=${ROUNDS:-5}
secs=${SECS:-3}
read -r -a concs <<<"${CONCS:-8}"
read -r -a batches <<<"${BATCHES:-1 64}"
scpu=${SERVER_CPU:-0}
gcpu=${GEN_CPU:-1}
for d in "${dirs[@]}"; do
    [[ -x "$d/keel" && -x "$d/keel-model-check" ]] || {
        echo "grpc_ab: $d has no keel and keel-model-check" >&2
        exit 2
    }
done
[[ -f "$repo/ref_i1/1/model.json" ]] || OUT="$repo" sh bench/train-reference.sh "$repo" >/dev/null
mkdir -p "$out"
results="$out/grpc_ab.tsv"
: >"$results"

# 256 feature rows of the training data, for keel perf's --input-data.
/usr/bin/python3 - "$repo/train.libsvm" "$out/rows.txt" <<'PY'
import sys
rows = []
with open(sys.argv[1]) as f:
    for line in f:
        vals = [0.0] * 20
        for tok in line.split()[1:]:
            i, v = tok.split(":")
            vals[int(i) - 1] = float(v)
        rows.append(vals)
        if len(rows) == 256:
            break
with open(sys.argv[2], "w") as f:
    for r in rows:
        f.write(" ".join("%.6f" % x for x in r) + "\n")
PY

pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT

# Starts build $1's server; sets spid[$1], hport[$1], gport[$1].
declare -a spid hport gport
start() {
    local i=$1 pf
    pf=$(mktemp)
    taskset -c "$scpu" "${dirs[$i]}/keel" serve --model-repository "$repo" --http-port 0 \
        --grpc-port 0 --http-threads 1 --worker-threads 1 --log-level warn >"$pf" &
    spid[$i]=$!
    pids+=("${spid[$i]}")
    for _ in $(seq 200); do
        grep -q 'protocol=grpc.*port=' "$pf" && grep -v protocol=grpc "$pf" | grep -q port= && break
        sleep 0.05
    done
    hport[$i]=$(grep -v protocol=grpc "$pf" | sed -n 's/.*port=\([0-9]*\).*/\1/p' | head -n1)
    gport[$i]=$(grep protocol=grpc "$pf" | sed -n 's/.*port=\([0-9]*\).*/\1/p' | head -n1)
    rm -f "$pf"
    [[ -n "${hport[$i]}" && -n "${gport[$i]}" ]] || {
        echo "grpc_ab: ${dirs[$i]}/keel serve did not start" >&2
        exit 1
    }
}

cpu_of() { # CPU seconds (user + system, all threads) of process $1 so far
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.4f", ($12 + $13) / hz }' \
        "/proc/$1/stat"
}

# keel perf of build $1 against its server: prints "rps cpu_us_per_request".
measure() { # build http|grpc|grpcstream batch concurrency duration
    local i=$1 proto=$2 b=$3 c=$4 d=$5 port c0 c1 extra=()
    port=${hport[$i]}
    [[ "$proto" == grpc* ]] && port=${gport[$i]}
    [[ "$proto" == grpcstream ]] && extra=(--grpc-stream) && proto=grpc
    rm -f "$out/perf.csv"
    c0=$(cpu_of "${spid[$i]}")
    taskset -c "$gcpu" "${dirs[$i]}/keel" perf -u "127.0.0.1:$port" -m ref_i1 -b "$b" \
        --input-data "$out/rows.txt" --concurrency-range "$c" -d "$d" --warmup 0 --no-progress \
        --protocol "$proto" "${extra[@]}" -f "$out/perf.csv" >"$out/perf.log" 2>&1 || true
    c1=$(cpu_of "${spid[$i]}")
    [[ -s "$out/perf.csv" ]] || { echo "grpc_ab: keel perf failed:" >&2; cat "$out/perf.log" >&2; exit 1; }
    awk -F, -v cpu="$(awk -v a="$c0" -v b="$c1" 'BEGIN { print b - a }')" 'NR == 2 {
        n = $5 + $6
        printf "%s %.2f\n", $7, (n > 0 ? cpu * 1e6 / n : 0)
    }' "$out/perf.csv"
}

for i in 0 1; do
    start "$i"
    for p in http grpc grpcstream; do
        measure "$i" "$p" 1 8 1 >/dev/null # warm-up: models loaded, estimates measured
    done
done
for r in $(seq "$rounds"); do
    for b in "${batches[@]}"; do
        for c in "${concs[@]}"; do
            for i in 0 1; do
                read -r hr hc < <(measure "$i" http "$b" "$c" "$secs")
                read -r gr gc < <(measure "$i" grpc "$b" "$c" "$secs")
                read -r sr sc < <(measure "$i" grpcstream "$b" "$c" "$secs")
                printf '%s\t%s\tb%s\tc%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "${names[$i]}" "$r" "$b" "$c" \
                    "$hr" "$gr" "$sr" "$hc" "$gc" "$sc" | tee -a "$results"
            done
        done
    done
done

# Medians and spreads over the rounds, per build, batch and concurrency.
/usr/bin/python3 - "$results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, rnd, b, c, hr, gr, sr, hc, gc, sc = line.split("\t")
    rows.setdefault((b, c, name), []).append(tuple(float(x) for x in (hr, gr, sr, hc, gc, sc)))
def cell(xs, fmt):
    return (fmt + " (" + fmt + ".." + fmt + ")") % (statistics.median(xs), min(xs), max(xs))
print("| batch | conc | build | gRPC/HTTP req/s | stream/HTTP req/s | HTTP req/s | gRPC req/s "
      "| stream req/s | HTTP us/req | gRPC us/req | stream us/req |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for (b, c, name), v in sorted(rows.items(), key=lambda kv: (int(kv[0][0][1:]), int(kv[0][1][1:]),
                                                            kv[0][2] != "before")):
    def ratio(k):
        return cell([x[k] / x[0] if x[0] > 0 else 0 for x in v], "%.2f")
    def col(k, f):
        return cell([x[k] for x in v], f)
    print("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
        b[1:], c[1:], name, ratio(1), ratio(2), col(0, "%.0f"), col(1, "%.0f"), col(2, "%.0f"),
        col(3, "%.1f"), col(4, "%.1f"), col(5, "%.1f")))
PY
