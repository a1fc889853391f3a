#!/usr/bin/env bash
# request_cost.sh: where a batched batch-1 HTTP request's time goes, by part: the syscalls,
# the server's CPU per request for the HTTP exchange alone and for inference, and XGBoost's
# own cost per row raw and inside the server.
#
# DESIGN
# A benchmark run by hand (never by the test suite): it measures and never fails on a number.
# The goal of issue 12 compares served req/s with raw batch-1 calls/s; both sides here are
# stated as CPU time per request on the server's core, which does not depend on whether the
# generator or the server saturates first (in the HTTP-only rows both do). Steps:
#   1. bench/syscall_cost.c (built here with cc): ns per futex_wake, epoll_wait(0), getppid
#      on $SERVER_CPU.
#   2. One keel serve on $SERVER_CPU (one HTTP thread, one inference thread). With the
#      generator on $GEN_CPU at $CONNS connections, for each load: requests/s, the server's
#      CPU per request (utime+stime from /proc/PID/stat around the run), the generator's busy
#      share. Loads: keel perf GET /v2/health/live; wrk GET /v2/health/live; wrk POSTing the
#      batch-1 body to /v2/health/live (read and dropped, answered 405: the exchange of the
#      very bytes, no model); wrk and keel perf with the batch-1 body to $MODEL (ref_b0:
#      dynamic batching, max_queue_delay 0). For the inference loads also the model's own
#      statistics over the run: average executed batch and compute_infer per backend call.
#      And keel perf's two loads against bench/mhd_floor.c (built here with cc, a second
#      server on $SERVER_CPU, idle while keel serve is measured and the other way round): the
#      floor of the exchange, what libmicrohttpd and the kernel cost for the very requests
#      and answers of perf_live and perf_infer when the server does none of keel's work.
#      And keel perf's ref_b0 requests against mhd_model (bench/mhd_floor.c built with
#      FLOOR_MODEL in build-bench, a third server on $SERVER_CPU): the floor plus the work no
#      V2 server skips for them (keel's JSON decode and encode, one XGBoost call per HTTP turn
#      over the turn's rows), without keel's runtime (row model_infer).
#      $ROUNDS rounds, each load once per round in the same order.
#   3. System calls per request (perf stat on the server's syscalls:sys_enter_* tracepoints,
#      2 s under keel perf) for the inference and the GET load.
#   4. Raw XGBoost on $SERVER_CPU (bench_infer --callgrind raw, its own clocks): us per call
#      and per row at batch 1, 8 and 64.
#
# Usage: bench/request_cost.sh   Environment: CONNS (8), SECS (3), ROUNDS (2), MODEL (ref_b0),
#   SERVER_CPU (0), GEN_CPU (1).
# The floor's rows bound the goal: floor_infer's us/req plus the model's us per row (the batch,
#   us/call column of perf_infer divided by its batch) is the least a batched request can cost
#   a libmicrohttpd server here; against raw's us per call it gives the best served/raw ratio
#   possible, and perf_infer's us/req minus that sum is keel's own work. model_infer's req/s
#   over raw's batch-1 calls/s is the served/raw a server doing only the necessary work
#   reaches (its us/req includes its model calls).
# Needs: a Release build with KEEL_BUILD_BENCH=ON in build-bench and ref_b0
#   (`bench/suite.sh batching` makes both), wrk, perf (linux-perf), cc, libmicrohttpd-dev,
#   curl, /usr/bin/time. The floor rows speak for ref_b0 only (mhd_floor answers its requests).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build="build-bench"
repo=$build/bench-models
conns=${CONNS:-8}
secs=${SECS:-3}
rounds=${ROUNDS:-2}
model=${MODEL:-ref_b0}
scpu=${SERVER_CPU:-0}
gcpu=${GEN_CPU:-1}
keel=$build/keel
body=$build/bench-results/suite/body_b1.json
for tool in wrk perf cc curl /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "request_cost: $tool not found" >&2; exit 1; }
done
[[ -x "$keel" && -x "$build/bench_infer" ]] || { echo "request_cost: build-bench not built" >&2; exit 1; }
[[ -f "$repo/$model/config.json" && -f "$body" ]] ||
    { echo "request_cost: no $model or $body (run bench/suite.sh batching once)" >&2; exit 1; }
export KEEL_MODEL_CHECK=$PWD/$build/keel-model-check
out=$(mktemp -d)
spid=
fpid=
mpid=
helper_pid=
cleanup() {
    [[ -n "$spid" ]] && kill "$spid" 2>/dev/null
    [[ -n "$fpid" ]] && kill "$fpid" 2>/dev/null
    [[ -n "$mpid" ]] && kill "$mpid" 2>/dev/null
    [[ -n "$helper_pid" ]] && kill "$helper_pid" 2>/dev/null
    rm -rf "$out"
}
trap cleanup EXIT

echo "== 1. one system call"
cc -O2 -o "$out/syscall_cost" bench/syscall_cost.c
taskset -c "$scpu" "$out/syscall_cost"

# Batch-1 rows for keel perf's --input-data (as bench/ab_perf.sh).
awk 'NR <= 256 { for (i = 1; i <= 20; i++) v[i] = 0
                 for (i = 2; i <= NF; i++) { split($i, kv, ":"); v[kv[1]] = kv[2] }
                 line = v[1]; for (i = 2; i <= 20; i++) line = line " " v[i]; print line }' \
    "$repo/train.libsvm" >"$out/rows.txt"
cat >"$out/post.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$body", "rb"); wrk.body = f:read("*a"); f:close()
EOF

taskset -c "$scpu" "$keel" serve --model-repository "$repo" --http-port 0 --grpc-port -1 \
    --http-threads 1 --worker-threads 1 --log-level warn >"$out/port" 2>&1 &
spid=$!
port=
for _ in $(seq 200); do
    port=$(sed -n 's/.*port=\([0-9]*\).*/\1/p' "$out/port" | head -n1)
    [[ -n "$port" ]] && curl -fs "127.0.0.1:$port/v2/models/$model/ready" >/dev/null && break
    port=
    sleep 0.05
done
[[ -n "$port" ]] || { echo "request_cost: keel serve did not start" >&2; cat "$out/port" >&2; exit 1; }
url=http://127.0.0.1:$port

# Starts a bench/mhd_floor.c program on the server's core and waits until it answers: sets
# helper_pid (the caller records it for cleanup at once) and helper_port.
start_helper() { # program [args...]
    [[ -x "$1" ]] || { echo "request_cost: $1 not built" >&2; exit 1; }
    taskset -c "$scpu" "$@" >"$out/helper.port" &
    helper_pid=$!
    helper_port=
    for _ in $(seq 100); do
        helper_port=$(sed -n 's/^port=//p' "$out/helper.port")
        [[ -n "$helper_port" ]] && curl -fs "127.0.0.1:$helper_port/v2/health/live" >/dev/null &&
            return
        helper_port=
        sleep 0.05
    done
    echo "request_cost: $1 did not start" >&2
    exit 1
}
cc -O2 -o "$out/mhd_floor" bench/mhd_floor.c -lmicrohttpd
start_helper "$out/mhd_floor"
fpid=$helper_pid fport=$helper_port
start_helper "$build/mhd_model" "$repo/$model/1/model.json"
mpid=$helper_pid mport=$helper_port

stats() { # port -> "requests executions compute_infer_ns" (keel's, or mhd_model's)
    curl -sf "127.0.0.1:$1/v2/models/$model/stats" | /usr/bin/python3 -c '
import json, sys
s = json.load(sys.stdin)["model_stats"][0]
print(s["inference_stats"]["success"]["count"], s["execution_count"],
      s["inference_stats"]["compute_infer"]["ns"])'
}
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

echo
echo "== 2. server CPU per request, $conns connections, server CPU $scpu, generator CPU $gcpu"
printf '%-34s %9s %14s %14s %10s %16s\n' load req/s "server busy" "server us/req" "gen busy" "batch, us/call"
for _ in $(seq "$rounds"); do
    for load in perf_live wrk_live wrk_post405 wrk_infer perf_infer floor_live floor_infer \
        model_infer; do
        pid=$spid
        p=$port
        [[ $load == floor_* ]] && pid=$fpid && p=$fport
        [[ $load == model_* ]] && pid=$mpid && p=$mport
        s0=$(stats "$port")
        [[ $load == model_* ]] && s0=$(stats "$mport")
        c0=$(ticks "$pid")
        t0=$(date +%s.%N)
        case $load in
        perf_* | floor_* | model_* )
            if [[ $load == *_live ]]; then a=(--endpoint /v2/health/live); else
                a=(-m "$model" -b 1 --input-data "$out/rows.txt"); fi
            /usr/bin/time -f "%U %S" -o "$out/gen" taskset -c "$gcpu" "$keel" perf -u "127.0.0.1:$p" \
                "${a[@]}" --concurrency-range "$conns" -d "$secs" --warmup 0 --no-progress \
                -f "$out/perf.csv" >"$out/gen.log" 2>&1 ||
                { echo "request_cost: keel perf failed" >&2; cat "$out/gen.log" >&2; exit 1; }
            rps=$(awk -F, 'NR == 2 { print $7 }' "$out/perf.csv")
            ;;
        wrk_* )
            path=/v2/health/live
            a=()
            [[ $load == wrk_live ]] || a=(-s "$out/post.lua")
            [[ $load == wrk_infer ]] && path=/v2/models/$model/infer
            /usr/bin/time -f "%U %S" -o "$out/gen" taskset -c "$gcpu" wrk -t1 -c"$conns" -d"${secs}s" \
                "${a[@]}" "$url$path" >"$out/gen.log" 2>&1
            rps=$(awk '/Requests\/sec/ { print $2 }' "$out/gen.log")
            ;;
        esac
        t1=$(date +%s.%N)
        c1=$(ticks "$pid")
        s1=$(stats "$port")
        [[ $load == model_* ]] && s1=$(stats "$mport")
        read -r gu gs <"$out/gen"
        extra=-
        if [[ $load == perf_infer || $load == wrk_infer || $load == model_infer ]]; then
            extra=$(awk -v a="$s0" -v b="$s1" 'BEGIN { split(a, x, " "); split(b, y, " ")
                n = y[1] - x[1]; e = y[2] - x[2]
                if (e > 0) printf "%.1f, %.1f", n / e, (y[3] - x[3]) / e / 1000; else print "-" }')
        fi
        awk -v l="$load" -v r="$rps" -v c=$((c1 - c0)) -v hz="$hz" -v gu="$gu" -v gs="$gs" \
            -v w="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" -v x="$extra" 'BEGIN {
            printf "%-34s %9.0f %13.0f%% %14.2f %9.0f%% %16s\n", l, r, c / hz / w * 100,
                c / hz / (r * w) * 1e6, (gu + gs) / w * 100, x }'
    done
done

echo
echo "== 3. system calls per request (perf stat, 2 s)"
ev=syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendmsg
ev=$ev,syscalls:sys_enter_sendto,syscalls:sys_enter_futex,syscalls:sys_enter_write
for load in infer live; do
    if [[ $load == live ]]; then a=(--endpoint /v2/health/live); else
        a=(-m "$model" -b 1 --input-data "$out/rows.txt"); fi
    taskset -c "$gcpu" "$keel" perf -u "127.0.0.1:$port" "${a[@]}" --concurrency-range "$conns" \
        -d 4 --warmup 0 --no-progress >/dev/null 2>&1 &
    gp=$!
    sleep 1
    perf stat -x, -e "$ev" -p "$spid" -o "$out/pstat" -- sleep 2 >/dev/null 2>&1
    wait "$gp" || true
    # Requests: every one is read by exactly one recvfrom that returns it (the server keeps
    # its connections; a request fits one read), so recvfrom counts them.
    awk -F, -v l="$load" '/syscalls/ { split($3, a, ":"); n[a[2]] = $1 }
        END { r = n["sys_enter_recvfrom"]; if (r == 0) { print l ": no requests"; exit }
              printf "%-6s", l
              for (k in n) printf "  %s %.2f", substr(k, 11), n[k] / r
              printf "\n" }' "$out/pstat"
done

echo
echo "== 4. raw XGBoost on CPU $scpu"
for b in 1 8 64; do
    it=$((300000 / b))
    ((it >= 3000)) || it=3000
    taskset -c "$scpu" "$build/bench_infer" --model-repository "$repo" --callgrind raw --batch "$b" \
        --iterations "$it" | awk -v b="$b" '/^callgrind mode=raw/ {
            for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            c = v["iterations"] / v["seconds"]
            printf "batch %2d: %8.0f calls/s  %6.2f us/call  %5.2f us/row\n", b, c, 1e6 / c, 1e6 / c / b }'
done
