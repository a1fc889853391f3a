#!/usr/bin/env bash
# http.sh: served/raw throughput of `keel serve` over HTTP (KServe V2 JSON) against raw XGBoost.
#
# DESIGN
# The reference model (100 trees, depth 6, 20 FP32 features; bench/train-reference.sh) is served
# by `keel serve` pinned to CPU 0 with one HTTP thread and one inference worker; wrk (Debian)
# drives it from CPU 1 over keep-alive connections. "raw" is XGBoostPredictFromDense on one
# thread pinned to CPU 0 (bench_infer --callgrind raw, timed), i.e. the backend's speed on the
# same core the server gets. Rounds are interleaved (raw, served, raw, served, ...) and the
# median ratio is reported with its spread. Bodies are V2 JSON built from the training rows.
# A benchmark: it measures and never fails on a number.
#
# Usage: bench/http.sh   Environment: ROUNDS (3), SECONDS_PER_RUN (5), CONNS (8),
#   INFER_ON_HTTP_THREAD (auto, the default of keel serve; or on, off)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)
build="$root/build-bench"
repo="$build/bench-models"
out="$build/bench-results"
rounds=${ROUNDS:-3}
secs=${SECONDS_PER_RUN:-5}
conns=${CONNS:-8}
mkdir -p "$out"

command -v wrk >/dev/null || { echo "http.sh: wrk not found (apt-get install wrk)" >&2; exit 1; }
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKEEL_BUILD_BENCH=ON >/dev/null
ninja -C "$build" bench_infer keel_cli >/dev/null
[[ -f "$repo/ref_i1/1/model.json" ]] || OUT="$repo" bash bench/train-reference.sh >/dev/null

# V2 JSON bodies at batch 1 and 64 from the first rows of the training data.
for b in 1 64; do
    /usr/bin/python3 - "$repo/train.libsvm" "$b" >"$out/body_b$b.json" <<'PY'
import json, sys
path, batch = sys.argv[1], int(sys.argv[2])
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
flat = [x for r in rows for x in r]
print(json.dumps({"inputs": [{"name": "features", "shape": [batch, 20], "datatype": "FP32",
                              "data": flat}]}))
PY
done

port_file=$(mktemp)
taskset -c 0 "$build/keel" serve --model-repository "$repo" --http-port 0 --grpc-port -1 --http-threads 1 \
    --worker-threads 1 --infer-on-http-thread "${INFER_ON_HTTP_THREAD:-auto}" --log-level warn \
    >"$port_file" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$port_file"' EXIT
for _ in $(seq 100); do grep -q port= "$port_file" && break; sleep 0.1; done
port=$(sed -n 's/.*port=\([0-9]*\).*/\1/p' "$port_file")
[[ -n "$port" ]] || { echo "http.sh: keel serve did not start" >&2; exit 1; }

raw_calls_per_s() { # batch
    # bench_infer's own clock around the measured calls (not the model load, warm-up and
    # short run a wall clock around the process would add: docs/PERFORMANCE.md "Correction").
    local iters=$((200000 / $1))
    taskset -c 0 "$build/bench_infer" --model-repository "$repo" --callgrind raw --batch "$1" \
        --iterations "$iters" | awk '/^callgrind mode=raw/ {
            for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            if (v["seconds"] > 0) { printf "%.0f", v["iterations"] / v["seconds"]; found = 1 } }
            END { if (!found) exit 1 }'
}

served() { # batch -> "req/s p50 p99"
    local lua
    lua=$(mktemp --suffix .lua)
    cat >"$lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$out/body_b$1.json", "rb"); wrk.body = f:read("*a"); f:close()
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.0f %.1f %.1f %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99), summary.errors.status + summary.errors.connect
    + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
EOF
    taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" -s "$lua" \
        "http://127.0.0.1:$port/v2/models/ref_i1/infer" | sed -n 's/^RESULT //p'
    rm -f "$lua"
}

echo "keel serve over HTTP (V2 JSON) vs raw XGBoost, reference model ref_i1, $conns connections"
echo "server: CPU 0, 1 HTTP thread, 1 worker, --infer-on-http-thread ${INFER_ON_HTTP_THREAD:-auto}; wrk: CPU 1; raw: 1 thread on CPU 0"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '| batch | round | raw calls/s | served req/s | served/raw | p50 ms | p99 ms | errors |\n'
printf '|---:|---:|---:|---:|---:|---:|---:|---:|\n'
for b in 1 64; do
    served "$b" >/dev/null # warm-up
    ratios=()
    for r in $(seq "$rounds"); do
        raw=$(raw_calls_per_s "$b")
        read -r rps p50 p99 errs < <(served "$b")
        ratio=$(awk -v a="$rps" -v b="$raw" 'BEGIN { printf "%.3f", a / b }')
        ratios+=("$ratio")
        printf '| %d | %d | %s | %s | %s | %.3f | %.3f | %s |\n' "$b" "$r" "$raw" "$rps" \
            "$ratio" "$(awk -v x="$p50" 'BEGIN{print x/1000}')" \
            "$(awk -v x="$p99" 'BEGIN{print x/1000}')" "$errs"
    done
    printf '| %d | median | | | **%s** (%s..%s) | | | |\n' "$b" \
        "$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')" \
        "$(printf '%s\n' "${ratios[@]}" | sort -n | head -1)" \
        "$(printf '%s\n' "${ratios[@]}" | sort -n | tail -1)"
done
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
