#!/usr/bin/env bash
# run-example.sh: installs the dependencies keel needs to build and run (not the test ones),
# builds the keel command line (build/release) and runs the example: lists the models of
# examples/models, scores examples/heart_sample.txt with the "heart" model and classifies
# examples/digits_sample.txt with the ONNX "digits" model in process, then starts keel serve and
# sends it one heart row and one PNG image of a digit (the "digits_image" model, which
# preprocesses images). Run as root (or with sudo) on a fresh Debian 12 machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== install dependencies"
bash scripts/install-deps.sh

echo "== build (build/release)"
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBUILD_TESTING=OFF
ninja -C build/release keel_cli keel_model_check

keel=build/release/keel
repo=examples/models
sample=examples/heart_sample.txt

echo
echo "== $keel models --model-repository $repo"
"$keel" models --model-repository "$repo"

echo
echo "== $keel infer --model-repository $repo --model heart --label-first $sample"
echo "   (first column: the true label, 1 = heart disease; second: the model's probability)"
"$keel" infer --model-repository "$repo" --model heart --label-first "$sample"

# The ONNX example: a small CNN on 8x8 handwritten digits (scripts/train-digits.py). Each line
# of the sample is a true label and 64 pixels; the model answers 10 probabilities.
echo
echo "== $keel infer --model-repository $repo --model digits --input pixels --label-first examples/digits_sample.txt"
echo "   (true digit, the model's most probable digit and its probability)"
"$keel" infer --model-repository "$repo" --model digits --input pixels --label-first \
    examples/digits_sample.txt |
    awk -F'\t' '{ best = 2; for (i = 3; i <= NF; i++) if ($i > $best) best = i;
                  printf "true %s  predicted %d  p=%.3f\n", $1, best - 2, $best }'

# The same model over HTTP: start `keel serve` on a free port, send one KServe V2 infer request
# (the first sample row without missing values), print the answer, and stop the server with SIGTERM (it drains and
# exits 0). Set KEEL_EXAMPLE_SERVE=1 to keep the server running on port 8000 instead.
echo
if [[ "${KEEL_EXAMPLE_SERVE:-0}" == 1 ]]; then
    echo "== $keel serve --model-repository $repo   (Ctrl-C stops it; see docs/OPERATIONS.md)"
    exec "$keel" serve --model-repository "$repo"
fi
echo "== $keel serve --model-repository $repo --http-port 0   (one request, then SIGTERM)"
listen=$(mktemp)
"$keel" serve --model-repository "$repo" --http-port 0 --grpc-port -1 --log-level warn >"$listen" &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$listen"' EXIT
for _ in $(seq 100); do
    grep -q 'port=' "$listen" && break
    sleep 0.1
done
port=$(sed -n 's/.*port=\([0-9][0-9]*\).*/\1/p' "$listen")
[[ -n "$port" ]] || { echo "run-example: keel serve did not start" >&2; exit 1; }
row=$(grep -v '^#' "$sample" | grep -v nan | head -1 | cut -d' ' -f2-) # JSON has no NaN: a row without missing values
body="{\"id\":\"example-1\",\"inputs\":[{\"name\":\"features\",\"shape\":[1,13],\"datatype\":\"FP32\",\"data\":[$(echo "$row" | tr ' ' ',')]}]}"
echo "POST http://127.0.0.1:$port/v2/models/heart/infer"
echo "$body"
curl -sS -X POST -H 'Content-Type: application/json' -d "$body" \
    "http://127.0.0.1:$port/v2/models/heart/infer"
echo

# An image: the digits CNN behind keel's image preprocessing (examples/models/digits_image).
# The request carries the PNG file itself (base64 in JSON, a BYTES tensor); a preprocessing
# worker decodes it, converts it to gray, resizes it to 8x8 and scales it for the model.
image=examples/images/7_96.png
echo
echo "== an image through keel serve: $image (a 7 drawn at 96x96; more in examples/images)"
body="{\"id\":\"example-2\",\"inputs\":[{\"name\":\"image\",\"shape\":[1],\"datatype\":\"BYTES\",\"data\":[\"$(base64 -w0 "$image")\"]}]}"
echo "POST http://127.0.0.1:$port/v2/models/digits_image/infer"
echo "${body:0:110}...\"]}]}"
answer=$(curl -sS -X POST -H 'Content-Type: application/json' -d "$body" \
    "http://127.0.0.1:$port/v2/models/digits_image/infer")
echo "$answer"
# The 10 probabilities are the output's "data" array; the prediction is the largest.
echo "$answer" | sed -n 's/.*"data":\[\([^]]*\)\].*/\1/p' | tr ',' '\n' |
    awk '{ if (NR == 1 || $1 + 0 > best) { best = $1 + 0; digit = NR - 1 } }
         END { if (NR != 10) { print "run-example: no 10 probabilities in the answer" > "/dev/stderr"; exit 1 }
               printf "predicted digit %d (p=%.3f)\n", digit, best }'
echo
kill -TERM "$server"
wait "$server"
echo "keel serve drained and exited $?; run it yourself with: $keel serve --model-repository $repo"
