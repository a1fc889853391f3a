#!/usr/bin/env bash
# callgrind_grpc.sh: instructions per gRPC call (and per HTTP request, for comparison) of
# `keel serve` and of `keel perf`, counted by callgrind (issue 13).
#
# DESIGN
# A benchmark run by hand (never by the test suite); it measures and never fails on a number.
# Callgrind counts user-space instructions of every thread of a process, so its figures do
# not depend on the load of the machine: unlike wall-clock numbers they can be taken on a
# busy machine. Two sides, each measured for HTTP (V2 JSON), unary gRPC ModelInfer and gRPC
# ModelStreamInfer, at every batch size of BATCHES and every concurrency of CONCS:
#   server  `keel serve` under callgrind (as bench/callgrind_http.sh: one HTTP thread, one
#           inference thread, no preprocessing workers, --inline-max-us 1000000 so that
#           the model runs inline as it does outside valgrind; gRPC on --grpc-port 0), driven
#           by a native keel perf. Per row: warm-up, zero the counters (callgrind_control
#           -z), SECS seconds of load, dump (callgrind_control -d); the dump's total divided
#           by the requests the server counted in between (the model's success count from
#           /stats, read over HTTP: that one request is counted in the total, negligible).
#   client  `keel perf` under callgrind against a native `keel serve`. keel perf cannot be
#           zeroed from outside at the right moment, so each row runs it twice, for SECS and
#           for 2 * SECS, and takes the difference: (Ir(long) - Ir(short)) / (requests(long)
#           - requests(short)), which cancels the start (gRPC's init, the metadata call, the
#           channel) and the end. The requests are the server's success count around each
#           run (warm-up included, as the instructions are).
# Every dump is annotated (callgrind_annotate, inclusive and exclusive) under OUT, which is
# where a per-function breakdown comes from.
#
# Usage: bench/callgrind_grpc.sh [server|client|both] [extra keel serve args...]
#   e.g. bench/callgrind_grpc.sh server
# Environment: BUILD (build-bench, a Release build), SECS (4), BATCHES ("1"), CONCS ("1 8"),
#   PROTOS ("http grpc grpcstream"), OUT (BUILD/callgrind-grpc), TAG (a name for the files,
#   default "run"), PERF_ARGS (extra keel perf arguments, e.g. "--grpc-channels 2").
# Needs: valgrind, curl, the reference model (bench/train-reference.sh writes it into
#   BUILD/bench-models).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=${BUILD:-build-bench}
repo="$build/bench-models"
secs=${SECS:-4}
read -r -a batches <<<"${BATCHES:-1}"
read -r -a concs <<<"${CONCS:-1 8}"
read -r -a protos <<<"${PROTOS:-http grpc grpcstream}"
read -r -a perf_extra <<<"${PERF_ARGS:-}"
out=${OUT:-$build/callgrind-grpc}
tag=${TAG:-run}
keel="$build/keel"
side=${1:-server}
(($# > 0)) && shift
case "$side" in
server | client | both) ;;
*)
    echo "usage: bench/callgrind_grpc.sh [server|client|both] [keel serve args...]" >&2
    exit 2
    ;;
esac
mkdir -p "$out"

command -v valgrind >/dev/null || { echo "callgrind_grpc: valgrind not found" >&2; exit 1; }
[[ -x "$keel" ]] || { echo "callgrind_grpc: $keel not built" >&2; exit 1; }
[[ -f "$repo/ref_i1/1/model.json" ]] ||
    { echo "callgrind_grpc: no reference model in $repo (bench/train-reference.sh)" >&2; exit 1; }
rows="$out/rows.txt"
# Rows of numbers for keel perf's --input-data, from the training data (as bench/suite.sh).
awk 'NR <= 256 { for (i = 1; i <= 20; i++) v[i] = 0
                 for (i = 2; i <= NF; i++) { split($i, kv, ":"); v[kv[1]] = kv[2] }
                 line = v[1]; for (i = 2; i <= 20; i++) line = line " " v[i]; print line }' \
    "$repo/train.libsvm" >"$rows"

spid=
cleanup() {
    if [[ -n "$spid" ]]; then
        kill "$spid" 2>/dev/null || true
        wait "$spid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# Starts keel serve (prefixed by the given command, e.g. valgrind ...); sets spid, port, gport.
start_server() { # log prefix...
    local log=$1 pf
    shift
    pf=$(mktemp)
    OMP_WAIT_POLICY=PASSIVE "$@" "$keel" serve --model-repository "$repo" --http-port 0 \
        --grpc-port 0 --http-threads 1 --worker-threads 1 --log-level warn \
        --preprocess-workers 0 --inline-max-us 1000000 "${serve_extra[@]}" >"$pf" 2>"$log" &
    spid=$!
    for _ in $(seq 3000); do
        grep -q 'protocol=grpc.*port=' "$pf" && grep -v protocol=grpc "$pf" | grep -q port= && break
        sleep 0.1
    done
    port=$(grep -v protocol=grpc "$pf" | sed -n 's/.*port=\([0-9]*\).*/\1/p' | head -n1)
    gport=$( (grep protocol=grpc "$pf" || true) | sed -n 's/.*port=\([0-9]*\).*/\1/p' | head -n1)
    rm -f "$pf"
    [[ -n "$port" && -n "$gport" ]] ||
        { echo "callgrind_grpc: keel serve did not start:" >&2; tail "$log" >&2; exit 1; }
}

stop_server() {
    kill "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
    spid=
}

success() {
    curl -s "http://127.0.0.1:$port/v2/models/ref_i1/stats" |
        /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["model_stats"][0]["inference_stats"]["success"]["count"])'
}

# keel perf's arguments for protocol $1, batch $2, concurrency $3, duration $4.
perf_args() {
    local p=$1 b=$2 c=$3 d=$4 u=$port extra=()
    case "$p" in
    grpc) u=$gport extra=(--protocol grpc) ;;
    grpcstream) u=$gport extra=(--protocol grpc --grpc-stream) ;;
    esac
    echo -u "127.0.0.1:$u" -m ref_i1 -b "$b" --input-data "$rows" --concurrency-range "$c" \
        -d "$d" --warmup 0 --no-progress "${extra[@]}" "${perf_extra[@]}"
}

annotate() { # dump name
    callgrind_annotate --inclusive=yes --threshold=100 "$1" >"$out/$tag-$2.incl.txt"
    callgrind_annotate --threshold=100 "$1" >"$out/$tag-$2.self.txt"
}

# The dump's "summary:" (every event since the counters were zeroed: the PROGRAM TOTALS of
# callgrind_annotate). Its "totals:" line, which bench/callgrind_http.sh read until 2026-12-05, is a few
# million larger per dump whatever the load (seen here: 0.6 to 5 M), which inflates rows with
# few requests; on a busy machine a row may hold only a few hundred.
total_of() { awk '/^summary:/ { gsub(",", "", $2); print $2; exit }' "$1"; }

declare -a serve_extra=("$@")

server_side() {
    local cg="$out/$tag-server.cg" p b c n0 n total dump
    rm -f "$cg" "$cg".*
    start_server "$out/$tag-server.log" valgrind --tool=callgrind --callgrind-out-file="$cg"
    echo "server side (keel serve under callgrind), Ir per request:"
    echo "| protocol | batch | concurrency | requests | Ir/request |"
    echo "|---|---:|---:|---:|---:|"
    for b in "${batches[@]}"; do
        for c in "${concs[@]}"; do
            for p in "${protos[@]}"; do
                # shellcheck disable=SC2046
                "$keel" perf $(perf_args "$p" "$b" "$c" 2) >/dev/null || true
                n0=$(success)
                rm -f "$cg".*
                callgrind_control -z "$spid" >/dev/null 2>&1
                # shellcheck disable=SC2046
                "$keel" perf $(perf_args "$p" "$b" "$c" "$secs") >/dev/null || true
                callgrind_control -d "$spid" >/dev/null 2>&1
                n=$(($(success) - n0))
                dump="$out/$tag-server-$p-b$b-c$c.cg"
                mv "$(ls "$cg".* | head -n1)" "$dump"
                annotate "$dump" "server-$p-b$b-c$c"
                total=$(total_of "$dump")
                printf '| %s | %s | %s | %s | %s |\n' "$p" "$b" "$c" "$n" "$((total / n))"
            done
        done
    done
    stop_server
}

client_side() {
    local p b c d n0 n1 t1 t2 r1 r2 dump
    start_server "$out/$tag-client-server.log"
    echo "client side (keel perf under callgrind), Ir per request (difference of two runs):"
    echo "| protocol | batch | concurrency | requests | Ir/request |"
    echo "|---|---:|---:|---:|---:|"
    for b in "${batches[@]}"; do
        for c in "${concs[@]}"; do
            for p in "${protos[@]}"; do
                for d in "$secs" "$((2 * secs))"; do
                    dump="$out/$tag-client-$p-b$b-c$c-d$d.cg"
                    n0=$(success)
                    # shellcheck disable=SC2046
                    valgrind --tool=callgrind --callgrind-out-file="$dump" \
                        "$keel" perf $(perf_args "$p" "$b" "$c" "$d") >/dev/null 2>&1 || true
                    n1=$(success)
                    if [[ $d == "$secs" ]]; then
                        t1=$(total_of "$dump") r1=$((n1 - n0))
                    else
                        t2=$(total_of "$dump") r2=$((n1 - n0))
                        annotate "$dump" "client-$p-b$b-c$c"
                    fi
                done
                printf '| %s | %s | %s | %s | %s |\n' "$p" "$b" "$c" "$((r2 - r1))" \
                    "$(((t2 - t1) / (r2 - r1)))"
            done
        done
    done
    stop_server
}

[[ $side == client ]] || server_side
[[ $side == server ]] || client_side
echo
echo "annotations: $out/$tag-*.incl.txt (inclusive), $out/$tag-*.self.txt (exclusive)"
