#!/usr/bin/env bash
# suite.sh: issue 7's benchmark suite: keel's served throughput against raw XGBoost and
# against a FastAPI peer, keel perf against wrk, instructions per request, and a long soak.
#
# DESIGN
# A benchmark, run by hand (never by the test suite): it measures and never fails on a number.
# Everything runs on this machine's two cores with the server pinned to CPU $SERVER_CPU and the
# load generator to CPU $GEN_CPU (taskset), so the server has one core, like "raw", which is
# XGBoosterPredictFromDense on one thread pinned to the server's core (bench_infer --callgrind
# raw, timed). Rounds are interleaved (each round measures every contender once, in the same
# order) so slow drifts of a shared machine hit all of them; tables give the median and the
# spread (min..max) over the rounds, and ratios are medians of per-round ratios.
#
# Sections (each writes rows to $out/results.tsv; bench/suite_report.py turns them into the
# markdown tables of docs/PERFORMANCE.md):
#   gen      the generator is not the bottleneck: keel perf and wrk on GET /v2/health/live
#            (a static reply) against keel perf on inference, same server, same connections
#   wrk      keel perf and wrk on the same inference endpoint, interleaved (agreement)
#   nginx    the HTTP layer alone: wrk on keel's GET /v2/health/live against nginx (Debian's
#            nginx-light, one worker process, `return 200`, pinned to the server's core),
#            interleaved in each round
#   ratio    served/raw at batch 1 and 64, keel serve with --infer-on-http-thread auto (the
#            default), off and on, 8 connections (p50/p99 at 8 connections come from these)
#   grpc     gRPC vs HTTP on one server (--grpc-port 0 beside the HTTP port): raw XGBoost,
#            keel perf over HTTP (V2 JSON), over gRPC (unary ModelInfer, raw_input_contents)
#            and over gRPC streams (ModelStreamInfer), batch 1 and 64, interleaved in each
#            round; gRPC/HTTP req/s and served/raw for gRPC come from these
#   fastapi  keel vs bench/fastapi_peer.py (raw-body handler and pydantic handler), batch 1
#            and 64, one uvicorn process on the server's core
#   ir       instructions per request: keel serve under callgrind (counters zeroed, a timed
#            keel perf run at concurrency 1, dumped; divided by the requests the server's
#            statistics counted) against bench_infer's raw predict under callgrind, for
#            --infer-on-http-thread auto, off and on; and GET /v2/health/live (the HTTP
#            layer's own share) on the auto server
#   soak     keel soak, SOAK_SWAPS hot swaps under load of the example model, with a steady
#            phase first for the p99 ratio (server and soak pinned as above)
#   swapp99  p99 latency with a swap every 0.5 s (120 swaps) against 60 s without swaps
#   decode   bench_decode (FP32 JSON decode and encode, ns per number), its output as is
#   batching issue 12: batch-1 requests at 8 and 64 connections to ref_i1 (no batching) and
#            to copies with dynamic_batching (ref_b0: max_queue_delay 0; ref_bd: 100 us,
#            preferred 32), served req/s against raw batch-1 calls/s, the average executed
#            batch size (the statistics' inference_count / execution_count over the run),
#            p50/p99; and batch 64 to the ONNX digits example without and with batching.
#            Each round also measures what bounds the batch-1 rows: GET /v2/health/live at
#            the same connections (the HTTP exchange alone), raw batch-64 and batch-8 calls
#            (a batched row's backend cost at 64 and at 8 connections), and with wrk the
#            batch-1 body POSTed to /v2/health/live (405, no model: the exchange of the same
#            bytes) beside the same body to ref_b0; and keel perf's ref_b0 requests against
#            bench/mhd_floor.c (libmicrohttpd with keel's loop and none of keel's work, on the
#            server's core: the floor of the exchange, so the rows' gap above it is keel's own)
#            and against mhd_model (the same program with keel's JSON decode and encode and
#            one XGBoost call per HTTP turn: only the work no V2 server skips, none of keel's
#            runtime; its served/raw is what that work allows here)
# The report opens with issue 11's table: every row of it, from these sections.
#
# Usage: bench/suite.sh [SECTION...]   (default: all, in the order above)
# Environment: ROUNDS (5), SECS (3, seconds per measurement), CONNS (8), SOAK_SWAPS (2000),
#   SOAK_INTERVAL (0.02), SERVER_CPU (0), GEN_CPU (1).
# Needs: wrk, valgrind, cc and libmicrohttpd-dev (batching builds bench/mhd_floor.c), nginx (nginx-light) for nginx, and for fastapi Debian's python3-fastapi python3-uvicorn
# python3-xgboost python3-numpy under /usr/bin/python3 (bench/setup.sh installs them).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
build="$root/build-bench"
repo="$build/bench-models"
out="$build/bench-results/suite"
rounds=${ROUNDS:-5}
secs=${SECS:-3}
conns=${CONNS:-8}
scpu=${SERVER_CPU:-0}
gcpu=${GEN_CPU:-1}
sections=("$@")
((${#sections[@]} > 0)) || sections=(gen wrk nginx ratio batching grpc fastapi ir decode soak swapp99)
mkdir -p "$out"
results="$out/results.tsv"

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKEEL_BUILD_BENCH=ON >/dev/null
ninja -C "$build" bench_infer bench_decode keel_cli mhd_model >/dev/null
[[ -f "$repo/ref_i1/1/model.json" ]] || OUT="$repo" sh bench/train-reference.sh "$repo" >/dev/null
keel="$build/keel"

# V2 JSON bodies (batch 1 and 64) from the training rows, for wrk and for keel perf.
for b in 1 64; do
    /usr/bin/python3 - "$repo/train.libsvm" "$b" "$out/body_b$b.json" "$out/rows_b$b.txt" <<'PY'
import json, sys
path, batch, body, rows_out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = []
with open(path) as f:
    for line in f:
        vals = [0.0] * 20
        for tok in line.split()[1:]:
            i, v = tok.split(":")
            vals[int(i) - 1] = float(v)
        rows.append(vals)
        if len(rows) == 256:
            break
flat = [x for r in rows[:batch] for x in r]
with open(body, "w") as f:
    json.dump({"inputs": [{"name": "features", "shape": [batch, 20], "datatype": "FP32",
                           "data": flat}]}, f)
with open(rows_out, "w") as f:
    for r in rows[:1] if batch == 1 else rows:
        f.write(" ".join("%.6f" % x for x in r) + "\n")
PY
done

pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT

# Starts keel serve pinned to the server CPU with extra args; sets $port and $spid (and
# $gport when the args ask for gRPC with --grpc-port 0, which must come after the defaults).
start_keel() {
    local pf
    pf=$(mktemp)
    taskset -c "$scpu" "$keel" serve --model-repository "$repo" --http-port 0 --grpc-port -1 --http-threads 1 \
        --worker-threads 1 --log-level warn "$@" >"$pf" &
    spid=$!
    pids+=("$spid")
    for _ in $(seq 200); do
        grep -v protocol=grpc "$pf" | grep -q port= && { [[ " $* " != *" --grpc-port 0 "* ]] ||
            grep -q 'protocol=grpc.*port=' "$pf"; } && break
        sleep 0.05
    done
    port=$(grep -v protocol=grpc "$pf" | sed -n 's/.*port=\([0-9]*\).*/\1/p' | head -n1)
    gport=$( (grep protocol=grpc "$pf" || true) | sed -n 's/.*port=\([0-9]*\).*/\1/p' | head -n1)
    rm -f "$pf"
    [[ -n "$port" ]] || { echo "suite: keel serve did not start" >&2; exit 1; }
}

# A port nobody listens on now (the kernel picks it; a small race remains).
free_port() {
    /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# CPU seconds (user + system, all threads) a process has used so far.
cpu_of() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.4f", ($12 + $13) / hz }' \
        "/proc/$1/stat"
}

# keel perf at $conns connections for $secs s, every request measured (the server was warmed
# up by warm_up): prints "rps p50_ms p99_ms failed cpu_us gen_cpu_us", cpu_us being the CPU
# time the server process $2 used per request it answered (robust to a busy machine where
# throughput is not: it measures cost, not share of a core) and gen_cpu_us keel perf's own.
perf_run() { # port server-pid path-or-model batch [extra...]
    local port=$1 pid=$2 what=$3 batch=$4 c0 c1
    shift 4
    local args=(-u "127.0.0.1:$port" --concurrency-range "$conns" -d "$secs" --warmup 0
        --no-progress -f "$out/perf.csv")
    if [[ "$what" == /* ]]; then
        args+=(--endpoint "$what")
    else
        args+=(-m "$what" -b "$batch" --input-data "$out/rows_b64.txt")
    fi
    rm -f "$out/perf.csv"
    c0=$(cpu_of "$pid")
    # Exit status 1 (some requests failed) still writes the row; the failures are reported.
    taskset -c "$gcpu" "$keel" perf "${args[@]}" "$@" >"$out/perf.log" 2>&1 || true
    c1=$(cpu_of "$pid")
    [[ -s "$out/perf.csv" ]] || { echo "suite: keel perf failed:" >&2; cat "$out/perf.log" >&2; exit 1; }
    awk -F, -v cpu="$(awk -v a="$c0" -v b="$c1" 'BEGIN { print b - a }')" 'NR == 2 {
        n = $5 + $6
        printf "%s %.3f %.3f %s %.2f %.2f\n", $7, $9 / 1000, $11 / 1000, $6,
            (n > 0 ? cpu * 1e6 / n : 0), $17
    }' "$out/perf.csv"
}

# Starts a helper server (bench/mhd_floor.c's programs) on the server's core, waits for the
# "port=N" it prints, warms it up with ref_b0: sets helper_pid and helper_port.
start_helper() { # name program [args...]
    local name=$1
    shift
    [[ -x "$1" ]] || { echo "suite: $1 not built" >&2; exit 1; }
    taskset -c "$scpu" "$@" >"$out/$name.port" &
    helper_pid=$!
    pids+=("$helper_pid")
    helper_port=
    for _ in $(seq 100); do
        helper_port=$(sed -n 's/^port=//p' "$out/$name.port")
        [[ -n "$helper_port" ]] && break
        sleep 0.05
    done
    [[ -n "$helper_port" ]] || { echo "suite: $1 did not start" >&2; exit 1; }
    warm_up "$helper_port" ref_b0 1
}

warm_up() { # port model batch [extra...]: 1 s of load, unmeasured
    local port=$1 what=$2 batch=$3
    shift 3
    taskset -c "$gcpu" "$keel" perf -u "127.0.0.1:$port" -m "$what" -b "$batch" -d 1 \
        --warmup 0 --concurrency-range "$conns" --no-progress "$@" >/dev/null 2>&1 || true
}

# wrk at $conns connections for $secs s: prints "rps p50_ms p99_ms errors".
wrk_run() { # port path [body-file]
    local lua
    lua=$(mktemp --suffix .lua)
    if [[ -n "${3:-}" ]]; then
        cat >"$lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$3", "rb"); wrk.body = f:read("*a"); f:close()
EOF
    fi
    cat >>"$lua" <<'EOF'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.1f %.3f %.3f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, summary.errors.status
    + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
EOF
    taskset -c "$gcpu" wrk -t1 -c"$conns" -d"${secs}s" -s "$lua" "http://127.0.0.1:$1$2" |
        sed -n 's/^RESULT //p'
    rm -f "$lua"
}

raw_rate() { # batch -> "calls/s cpu_us_per_call" of raw XGBoost on the server's core
    # From bench_infer's own clocks around the measured calls: the process also loads the
    # model and makes a warm-up and a short run (0.3x the calls), which a wall clock around
    # the whole process would count as raw's time (before session 7 it did: raw rates 1.3-1.5x
    # too low, every served/raw ratio that much too high; docs/PERFORMANCE.md "Correction").
    local iters=$((300000 / $1)) line
    ((iters >= 3000)) || iters=3000
    line=$(taskset -c "$scpu" "$build/bench_infer" --model-repository "$repo" --callgrind raw \
        --batch "$1" --iterations "$iters")
    echo "$line" | awk '/^callgrind mode=raw/ {
        for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        if (v["seconds"] > 0) {
            printf "%.1f %.2f", v["iterations"] / v["seconds"], v["cpu_seconds"] * 1e6 / v["iterations"]
            found = 1
        } }
        END { if (!found) exit 1 }' || {
        echo "suite: no raw measurement from bench_infer" >&2
        return 1
    }
}

stats_rows() { # port model -> "inference_count execution_count" from the statistics
    curl -sf "http://127.0.0.1:$1/v2/models/$2/stats" | /usr/bin/python3 -c '
import json, sys
e = json.load(sys.stdin)["model_stats"][0]
print(e["inference_count"], e["execution_count"])'
}

avg_batch() { # "rows execs" before, after -> rows per execution over the run
    echo "$1 $2" | awk '{ d = $4 - $2; printf "%.2f", (d > 0 ? ($3 - $1) / d : 0) }'
}

row() { # section round key value...
    local IFS=$'\t'
    echo "$*" >>"$results"
}

machine() {
    echo "date:     $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "cpu:      $(grep -m1 '^model name' /proc/cpuinfo | sed 's/^[^:]*: *//'), $(nproc) CPUs"
    echo "kernel:   $(uname -sr)"
    echo "load:     $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "settings: rounds $rounds, $secs s per measurement, $conns connections, server CPU $scpu, generator CPU $gcpu"
}

{
    echo "# suite.sh ${sections[*]}"
    machine | sed 's/^/# /'
} >>"$results"
machine

for section in "${sections[@]}"; do
    echo "== $section ($(date -u +%H:%M:%S), load $(cut -d' ' -f1 /proc/loadavg))"
    case "$section" in
    gen)
        start_keel
        warm_up "$port" ref_i1 1
        for r in $(seq "$rounds"); do
            row gen "$r" perf_live $(perf_run "$port" "$spid" /v2/health/live 1)
            row gen "$r" wrk_live $(wrk_run "$port" /v2/health/live)
            row gen "$r" perf_infer_b1 $(perf_run "$port" "$spid" ref_i1 1)
        done
        stop_pid "$spid"
        ;;
    wrk)
        start_keel
        warm_up "$port" ref_i1 1
        for r in $(seq "$rounds"); do
            row wrk "$r" wrk_b1 $(wrk_run "$port" /v2/models/ref_i1/infer "$out/body_b1.json")
            row wrk "$r" perf_b1 $(perf_run "$port" "$spid" ref_i1 1 --input-data "$out/rows_b1.txt")
        done
        stop_pid "$spid"
        ;;
    nginx)
        command -v nginx >/dev/null || { echo "suite: nginx not found (nginx-light)" >&2; exit 1; }
        nport=$(free_port)
        ndir="$out/nginx"
        rm -rf "$ndir"
        mkdir -p "$ndir"
        cat >"$ndir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $ndir/nginx.pid;
error_log $ndir/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $ndir;
    proxy_temp_path $ndir;
    fastcgi_temp_path $ndir;
    uwsgi_temp_path $ndir;
    scgi_temp_path $ndir;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$nport;
        location / { return 200; }
    }
}
EOF
        # The master and its one worker both on the server's core (the worker inherits it).
        taskset -c "$scpu" nginx -p "$ndir" -c "$ndir/nginx.conf" -e "$ndir/error.log" \
            2>"$ndir/stderr.log" &
        npid=$!
        pids+=("$npid")
        up=0
        for _ in $(seq 100); do
            if curl -sf "http://127.0.0.1:$nport/" >/dev/null; then
                up=1
                break
            fi
            sleep 0.05
        done
        ((up)) || { echo "suite: nginx did not start:" >&2; cat "$ndir"/*.log >&2; exit 1; }
        start_keel
        wrk_run "$port" /v2/health/live >/dev/null # warm-up, unmeasured
        wrk_run "$nport" / >/dev/null
        for r in $(seq "$rounds"); do
            row nginx "$r" keel_live $(wrk_run "$port" /v2/health/live)
            row nginx "$r" nginx_return200 $(wrk_run "$nport" /)
        done
        stop_pid "$spid"
        stop_pid "$npid"
        ;;
    decode)
        "$build/bench_decode" --rounds "$rounds" | tee "$out/decode.txt"
        ;;
    batching)
        # Copies of ref_i1 with dynamic_batching, and the digits example with and without.
        for m in ref_b0 ref_bd; do
            rm -rf "${repo:?}/$m"
            cp -r "$repo/ref_i1" "$repo/$m"
        done
        /usr/bin/python3 - "$repo" "$root/examples/models" <<'PY'
import json, os, shutil, sys
repo, examples = sys.argv[1], sys.argv[2]
for m, db in (("ref_b0", {}), ("ref_bd", {"max_queue_delay_microseconds": 100,
                                           "preferred_batch_size": [32]})):
    p = os.path.join(repo, m, "config.json")
    cfg = json.load(open(p))
    cfg["name"] = m
    cfg["dynamic_batching"] = db
    json.dump(cfg, open(p, "w"))
for m, db in (("digits", None), ("digits_b", {})):
    d = os.path.join(repo, m)
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(os.path.join(examples, "digits"), d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["name"] = m
    cfg["instance_group"] = [{"count": 1, "kind": "KIND_CPU"}]
    if db is not None:
        cfg["dynamic_batching"] = db
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
with open(os.path.join(repo, "digits_rows.txt"), "w") as f:
    for i in range(256):
        f.write(" ".join("%.1f" % ((i * 7 + j * 3) % 17) for j in range(64)) + "\n")
PY
        start_keel
        cc -O2 -o "$build/mhd_floor" bench/mhd_floor.c -lmicrohttpd
        start_helper floor "$build/mhd_floor"
        floor_pid=$helper_pid floor_port=$helper_port
        start_helper model "$build/mhd_model" "$repo/ref_b0/1/model.json"
        model_pid=$helper_pid model_port=$helper_port
        saved_conns=$conns
        for m in ref_i1 ref_b0 ref_bd digits digits_b; do
            b=1
            [[ $m == digits* ]] && b=64
            extra=()
            [[ $m == digits* ]] && extra=(--input-data "$repo/digits_rows.txt")
            warm_up "$port" "$m" "$b" "${extra[@]}"
        done
        for r in $(seq "$rounds"); do
            rr=$(raw_rate 1)
            row batching "$r" raw_b1 $rr
            # The bound of the batch-1 rows: the same server's HTTP exchange alone (GET
            # /v2/health/live, same generator and connections) and a raw batch-64 call's
            # per-row cost; a batched request costs at least the one plus the other.
            rr=$(raw_rate 64) # assigned first: a failure inside $(...) in row's arguments
            row batching "$r" raw_b64 $rr # would not stop the script (set -e)
            # At 8 connections a batch holds at most 8 rows: its backend cost per row is a
            # raw batch-8 call's, not a batch-64 call's.
            rr=$(raw_rate 8)
            row batching "$r" raw_b8 $rr
            for c in 8 64; do
                conns=$c
                res=$(perf_run "$port" "$spid" /v2/health/live 1)
                row batching "$r" "live_c$c" $res
                # The exchange of the very bytes a batch-1 request sends: wrk POSTs the
                # batch-1 body to /v2/health/live, which reads and drops it and answers 405
                # with no model work; and, same generator and round, the same body to ref_b0
                # (batching on): keel's own cost is the gap between the two beyond the rows.
                res=$(wrk_run "$port" /v2/health/live "$out/body_b1.json")
                row batching "$r" "post_c$c" $res
                res=$(wrk_run "$port" /v2/models/ref_b0/infer "$out/body_b1.json")
                row batching "$r" "wrkb0_c$c" $res
                # The floor: keel perf's very ref_b0 requests to mhd_floor (none of keel's work).
                res=$(perf_run "$floor_port" "$floor_pid" ref_b0 1 --input-data "$out/rows_b1.txt")
                row batching "$r" "floor_c$c" $res
                # Only the necessary work: the same requests to mhd_model (keel's codec, one
                # XGBoost call per turn, none of keel's runtime).
                s0=$(stats_rows "$model_port" ref_b0)
                res=$(perf_run "$model_port" "$model_pid" ref_b0 1 --input-data "$out/rows_b1.txt")
                s1=$(stats_rows "$model_port" ref_b0)
                row batching "$r" "model_c$c" $res $(avg_batch "$s0" "$s1")
                for m in ref_i1 ref_b0 ref_bd; do
                    s0=$(stats_rows "$port" "$m")
                    res=$(perf_run "$port" "$spid" "$m" 1 --input-data "$out/rows_b1.txt")
                    s1=$(stats_rows "$port" "$m")
                    row batching "$r" "${m}_c$c" $res $(avg_batch "$s0" "$s1")
                done
                # The same requests in Triton's binary tensor extension (perf_analyzer's
                # default for HTTP): what the JSON text costs.
                s0=$(stats_rows "$port" ref_b0)
                res=$(perf_run "$port" "$spid" ref_b0 1 --input-data "$out/rows_b1.txt" \
                    --input-tensor-format binary)
                s1=$(stats_rows "$port" ref_b0)
                row batching "$r" "ref_b0bin_c$c" $res $(avg_batch "$s0" "$s1")
            done
            conns=8
            for m in digits digits_b; do
                s0=$(stats_rows "$port" "$m")
                res=$(perf_run "$port" "$spid" "$m" 64 --input-data "$repo/digits_rows.txt")
                s1=$(stats_rows "$port" "$m")
                row batching "$r" "${m}_b64" $res $(avg_batch "$s0" "$s1")
            done
            conns=$saved_conns
        done
        stop_pid "$floor_pid"
        stop_pid "$model_pid"
        stop_pid "$spid"
        ;;
    ratio)
        for mode in auto off on; do
            start_keel --infer-on-http-thread "$mode"
            warm_up "$port" ref_i1 1
            for r in $(seq "$rounds"); do
                for b in 1 64; do
                    rr=$(raw_rate "$b")
                    row ratio "$r" "raw_b$b" $rr
                    row ratio "$r" "keel_${mode}_b$b" $(perf_run "$port" "$spid" ref_i1 "$b")
                done
            done
            stop_pid "$spid"
        done
        ;;
    grpc)
        # One server, both protocols, the same model, core and settings; each round measures
        # raw, HTTP, gRPC unary and gRPC streams in turn at batch 1 and 64.
        start_keel --grpc-port 0
        [[ -n "$gport" ]] || { echo "suite: keel serve did not listen for gRPC" >&2; exit 1; }
        warm_up "$port" ref_i1 1
        warm_up "$gport" ref_i1 1 --protocol grpc
        warm_up "$gport" ref_i1 1 --protocol grpc --grpc-stream
        for r in $(seq "$rounds"); do
            for b in 1 64; do
                rr=$(raw_rate "$b")
                row grpc "$r" "raw_b$b" $rr
                row grpc "$r" "http_b$b" $(perf_run "$port" "$spid" ref_i1 "$b")
                row grpc "$r" "grpc_b$b" $(perf_run "$gport" "$spid" ref_i1 "$b" --protocol grpc)
                row grpc "$r" "grpcstream_b$b" \
                    $(perf_run "$gport" "$spid" ref_i1 "$b" --protocol grpc --grpc-stream)
            done
        done
        stop_pid "$spid"
        ;;
    fastapi)
        start_keel
        kport=$port
        kpid=$spid
        fport=$(free_port)
        taskset -c "$scpu" /usr/bin/python3 bench/fastapi_peer.py --mode raw --name ref_i1 \
            --model-file "$repo/ref_i1/1/model.json" --port "$fport" 2>"$out/peer_raw.log" &
        praw=$!
        pids+=("$praw")
        pport=$(free_port)
        taskset -c "$scpu" /usr/bin/python3 bench/fastapi_peer.py --mode pydantic --name ref_i1 \
            --model-file "$repo/ref_i1/1/model.json" --port "$pport" 2>"$out/peer_pyd.log" &
        ppyd=$!
        pids+=("$ppyd")
        for p in "$fport" "$pport"; do
            up=0
            for _ in $(seq 300); do
                if curl -sf "http://127.0.0.1:$p/v2/health/live" >/dev/null; then
                    up=1
                    break
                fi
                sleep 0.1
            done
            ((up)) || { echo "suite: the FastAPI peer on port $p did not start:" >&2
                cat "$out"/peer_*.log >&2; exit 1; }
        done
        warm_up "$kport" ref_i1 1
        warm_up "$fport" ref_i1 1 --input features:FP32:1x20
        warm_up "$pport" ref_i1 1 --input features:FP32:1x20
        for r in $(seq "$rounds"); do
            for b in 1 64; do
                row fastapi "$r" "keel_b$b" $(perf_run "$kport" "$kpid" ref_i1 "$b")
                # The peer has no V2 metadata endpoint: the request shape is given.
                row fastapi "$r" "fastapi_raw_b$b" \
                    $(perf_run "$fport" "$praw" ref_i1 1 --input "features:FP32:${b}x20")
                row fastapi "$r" "fastapi_pydantic_b$b" \
                    $(perf_run "$pport" "$ppyd" ref_i1 1 --input "features:FP32:${b}x20")
            done
        done
        stop_pid "$praw"
        stop_pid "$ppyd"
        stop_pid "$kpid"
        ;;
    ir)
        command -v valgrind >/dev/null || { echo "suite: valgrind not found" >&2; exit 1; }
        for b in 1 64; do
            iters=$((b == 1 ? 20000 : 2000))
            base="$out/raw-b$b.cg"
            rm -f "$base" "$base".*
            OMP_WAIT_POLICY=PASSIVE valgrind --tool=callgrind --callgrind-out-file="$base" \
                "$build/bench_infer" --model-repository "$repo" --callgrind raw --batch "$b" \
                --iterations "$iters" >/dev/null 2>&1
            raw_ir=$(awk -v n="$iters" '/^summary:/ { printf "%.0f", $2 / n; exit }' "$base.2")
            for mode in auto off on; do
                pf=$(mktemp)
                cg="$out/serve-$mode-b$b.cg"
                rm -f "$cg" "$cg".*
                OMP_WAIT_POLICY=PASSIVE valgrind --tool=callgrind --callgrind-out-file="$cg" \
                    "$keel" serve --model-repository "$repo" --http-port 0 --grpc-port -1 --http-threads 1 \
                    --worker-threads 1 --log-level warn --infer-on-http-thread "$mode" \
                    --preprocess-workers 0 \
                    >"$pf" 2>"$out/serve-cg.log" &
                vpid=$!
                pids+=("$vpid")
                # Under callgrind the start (model loads) is slow, more so on a busy machine.
                # No preprocessing workers: valgrind 3.19 lacks pidfd_open, which they need.
                for _ in $(seq 3000); do grep -q port= "$pf" && break; sleep 0.1; done
                port=$(sed -n 's/.*port=\([0-9]*\).*/\1/p' "$pf")
                rm -f "$pf"
                [[ -n "$port" ]] || { echo "suite: keel serve under callgrind did not start:" >&2
                    tail "$out/serve-cg.log" >&2; exit 1; }
                # Warm up (first requests fault in code and data), then count a timed run.
                "$keel" perf -u "127.0.0.1:$port" -m ref_i1 -b "$b" --concurrency-range 1 \
                    -d 2 --warmup 0 --no-progress --input-data "$out/rows_b64.txt" >/dev/null
                n0=$(curl -s "http://127.0.0.1:$port/v2/models/ref_i1/stats" |
                    /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["model_stats"][0]["inference_stats"]["success"]["count"])')
                callgrind_control -z "$vpid" >/dev/null
                "$keel" perf -u "127.0.0.1:$port" -m ref_i1 -b "$b" --concurrency-range 1 \
                    -d 5 --warmup 0 --no-progress --input-data "$out/rows_b64.txt" >/dev/null
                callgrind_control -d "$vpid" >/dev/null
                n1=$(curl -s "http://127.0.0.1:$port/v2/models/ref_i1/stats" |
                    /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["model_stats"][0]["inference_stats"]["success"]["count"])')
                dump=$(ls "$cg".* | sort -t. -k3 -n | head -n1)
                total=$(awk '/^summary:/ { print $2; exit }' "$dump")
                # The stats request between zero and dump is counted too; it is negligible.
                row ir 1 "serve_${mode}_b$b" "$total" "$((n1 - n0))" "$raw_ir"
                if [[ $b == 1 && $mode == auto ]]; then
                    # The HTTP layer alone: GET /v2/health/live (a static reply) on the same
                    # server; requests counted by keel perf (its CSV: ok + failed).
                    rm -f "$dump"
                    callgrind_control -z "$vpid" >/dev/null
                    "$keel" perf -u "127.0.0.1:$port" --endpoint /v2/health/live \
                        --concurrency-range 1 -d 5 --warmup 0 --no-progress -f "$out/live.csv" \
                        >/dev/null
                    callgrind_control -d "$vpid" >/dev/null
                    dump=$(ls "$cg".* | sort -t. -k3 -n | head -n1)
                    total=$(awk '/^summary:/ { print $2; exit }' "$dump")
                    row ir 1 "live_${mode}_b0" "$total" \
                        "$(awk -F, 'NR == 2 { print $5 + $6 }' "$out/live.csv")" "$raw_ir"
                fi
                stop_pid "$vpid"
            done
        done
        ;;
    soak)
        soakrepo="$out/soak-models"
        rm -rf "$soakrepo"
        cp -r examples/models "$soakrepo"
        # The server is started here (pinned to the server CPU) and keel soak, pinned to the
        # generator CPU, attaches to it: a server keel soak starts would share its CPU.
        pf=$(mktemp)
        taskset -c "$scpu" "$keel" serve --model-repository "$soakrepo" --http-port 0 --grpc-port -1 \
            --model-control-mode explicit --load-model heart --log-level warn >"$pf" &
        spid=$!
        pids+=("$spid")
        for _ in $(seq 200); do grep -q port= "$pf" && break; sleep 0.05; done
        port=$(sed -n 's/.*port=\([0-9]*\).*/\1/p' "$pf")
        rm -f "$pf"
        taskset -c "$gcpu" "$keel" soak --url "127.0.0.1:$port" --pid "$spid" -m heart \
            --swaps "${SOAK_SWAPS:-2000}" --swap-interval "${SOAK_INTERVAL:-0.02}" \
            --steady-secs 10 --concurrency "$conns" --sample-interval 0.5 --no-progress \
            --csv "$out/soak.csv" --svg "$out/soak.svg" | tee "$out/soak.txt" || true
        stop_pid "$spid"
        ;;
    swapp99)
        # p99 with a swap every 0.5 s against 60 s without: the soak section swaps 50 times a
        # second, which costs the server's only core a few per cent in model loads.
        soakrepo="$out/soak-models"
        rm -rf "$soakrepo"
        cp -r examples/models "$soakrepo"
        pf=$(mktemp)
        taskset -c "$scpu" "$keel" serve --model-repository "$soakrepo" --http-port 0 --grpc-port -1 \
            --model-control-mode explicit --load-model heart --log-level warn >"$pf" &
        spid=$!
        pids+=("$spid")
        for _ in $(seq 200); do grep -q port= "$pf" && break; sleep 0.05; done
        port=$(sed -n 's/.*port=\([0-9]*\).*/\1/p' "$pf")
        rm -f "$pf"
        taskset -c "$gcpu" "$keel" soak --url "127.0.0.1:$port" --pid "$spid" -m heart \
            --swaps 120 --swap-interval 0.5 --steady-secs 60 --concurrency "$conns" \
            --sample-interval 1 --no-progress | tee "$out/swapp99.txt" || true
        stop_pid "$spid"
        ;;
    *)
        echo "suite: unknown section '$section'" >&2
        exit 2
        ;;
    esac
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/load.txt"
/usr/bin/python3 bench/suite_report.py "$results" | tee "$out/report.md"
