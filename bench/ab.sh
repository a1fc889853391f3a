#!/usr/bin/env bash
# ab.sh: the served throughput of two keel builds, same machine, same run (A/B).
#
# DESIGN
# A benchmark, run by hand: it measures and never fails on a number. For each of ROUNDS
# interleaved rounds, each binary in turn serves the reference model (bench/train-reference.sh:
# 100 trees, depth 6, 20 FP32 features) pinned to CPU $SERVER_CPU with one HTTP thread, and
# wrk (pinned to CPU $GEN_CPU, 1 thread, $CONNS connections, $SECS s after a 1 s warm-up) sends
# V2 JSON infer requests of batch 1 and batch 64. Prints per binary and batch the median req/s
# with its spread (min..max) and p99, and the median of the per-round ratios B/A. Used to show
# that a refactoring (issue 17) left the serving path as fast as before.
# Usage: bench/ab.sh KEEL_A KEEL_B   Environment: ROUNDS (5), SECS (3), CONNS (8),
#   SERVER_CPU (0), GEN_CPU (1), MODEL (ref_i1; ref_b0 is its copy with dynamic_batching,
#   made by `bench/suite.sh batching`), BATCHES ("1 64").
#   Needs wrk, xgboost (for the reference model), /usr/bin/python3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $# -eq 2 ]] || { echo "usage: bench/ab.sh KEEL_A KEEL_B" >&2; exit 2; }
bins=("$1" "$2")
rounds=${ROUNDS:-5}
secs=${SECS:-3}
conns=${CONNS:-8}
scpu=${SERVER_CPU:-0}
gcpu=${GEN_CPU:-1}
model=${MODEL:-ref_i1}
read -r -a batches <<<"${BATCHES:-1 64}"
repo=build-bench/bench-models
out=$(mktemp -d)
trap 'rm -rf "$out"; [[ -n "${spid:-}" ]] && kill "$spid" 2>/dev/null || true' EXIT
[[ -f "$repo/ref_i1/1/model.json" ]] || OUT="$repo" sh bench/train-reference.sh "$repo" >/dev/null
[[ -d "$repo/$model" ]] || { echo "ab: no model $model in $repo" >&2; exit 1; }
for b in "${batches[@]}"; do
    /usr/bin/python3 - "$repo/train.libsvm" "$b" "$out/body_b$b.json" <<'PY'
import json, sys
path, batch, body = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = []
with open(path) as f:
    for line in f:
        vals = [0.0] * 20
        for tok in line.split()[1:]:
            i, v = tok.split(":")
            vals[int(i) - 1] = float(v)
        rows.append(vals)
        if len(rows) == batch:
            break
with open(body, "w") as f:
    json.dump({"inputs": [{"name": "features", "shape": [batch, 20], "datatype": "FP32",
                           "data": [x for r in rows for x in r]}]}, f)
PY
    cat >"$out/b$b.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$out/body_b$b.json", "rb"); wrk.body = f:read("*a"); f:close()
LUA
done

start() { # binary -> sets port, spid
    local log="$out/serve.log"
    taskset -c "$scpu" "$1" serve --model-repository "$repo" --http-port 0 --grpc-port -1 --http-threads 1 \
        >"$log" 2>/dev/null &
    spid=$!
    port=""
    for _ in $(seq 1 200); do
        port=$(sed -n 's/.*msg=listening address=[^ ]* port=\([0-9]*\).*/\1/p' "$log" | head -n 1)
        [[ -n "$port" ]] && break
        sleep 0.05
    done
    [[ -n "$port" ]] || { echo "ab: $1 did not start" >&2; exit 1; }
    # A binary copied away from its build directory finds no keel-model-check and serves
    # every request a 503, which wrk would count as requests: the model must be ready.
    for _ in $(seq 1 200); do
        curl -sf "http://127.0.0.1:$port/v2/models/$model/ready" >/dev/null && return 0
        sleep 0.05
    done
    echo "ab: $1: model $model not ready:" >&2
    tail -n 5 "$log" >&2
    exit 1
}

wrk_run() { # port batch secs -> "rps p99_us"; any non-2xx answer or socket error stops the run
    taskset -c "$gcpu" wrk -t1 -c"$conns" -d"$3s" --latency -s "$out/b$2.lua" \
        "http://127.0.0.1:$1/v2/models/$model/infer" | awk '
        /Non-2xx or 3xx responses|Socket errors/ { print "ab: wrk: " $0 > "/dev/stderr"; bad = 1 }
        /Requests\/sec/ { rps = $2 }
        $1 == "99%" { v = $2; u = 1
            if (v ~ /us$/) u = 1; else if (v ~ /ms$/) u = 1000; else if (v ~ /s$/) u = 1e6
            sub(/[a-z]+$/, "", v); p99 = v * u }
        END { if (bad) exit 1; printf "%.0f %.0f\n", rps, p99 }'
}

for r in $(seq 1 "$rounds"); do
    for i in 0 1; do
        start "${bins[$i]}"
        for b in "${batches[@]}"; do
            wrk_run "$port" "$b" 1 >/dev/null
            res=$(wrk_run "$port" "$b" "$secs")
            echo "$r $i $b $res" >>"$out/rows"
        done
        kill "$spid"
        wait "$spid" 2>/dev/null || true
        spid=""
    done
done

echo "A = ${bins[0]}"
echo "B = ${bins[1]}"
echo "model $model, rounds $rounds x ${secs}s, $conns connections, server CPU $scpu, wrk CPU $gcpu"
echo
echo "| batch | build | req/s median (min..max) | p99 us median | B/A median (min..max) |"
echo "|---:|---|---:|---:|---:|"
for b in "${batches[@]}"; do
    for i in 0 1; do
        awk -v b="$b" -v i="$i" -v rounds="$rounds" '
            $3 == b && $2 == i { rps[n + 0] = $4; p99[n + 0] = $5; n++ }
            $3 == b { key = $1; if ($2 == 0) a[key] = $4; else bb[key] = $4 }
            function med(x, m,   s, j, k, t) { for (j = 0; j < m; j++) s[j] = x[j]
                for (j = 0; j < m; j++) for (k = j + 1; k < m; k++) if (s[k] < s[j]) { t = s[j]; s[j] = s[k]; s[k] = t }
                return m % 2 ? s[int(m / 2)] : (s[m / 2 - 1] + s[m / 2]) / 2 }
            END {
                lo = hi = rps[0]; for (j = 1; j < n; j++) { if (rps[j] < lo) lo = rps[j]; if (rps[j] > hi) hi = rps[j] }
                ratio = ""
                if (i == 1) { m = 0; for (k in a) if ((k in bb) && a[k] > 0) r[m++] = bb[k] / a[k]
                    rl = rh = r[0]; for (j = 1; j < m; j++) { if (r[j] < rl) rl = r[j]; if (r[j] > rh) rh = r[j] }
                    ratio = sprintf("%.3f (%.3f..%.3f)", med(r, m), rl, rh) }
                printf "| %d | %s | %.0f (%.0f..%.0f) | %.0f | %s |\n", b, i ? "B" : "A", med(rps, n), lo, hi, med(p99, n), ratio
            }' "$out/rows"
    done
done
