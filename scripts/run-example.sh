#!/usr/bin/env bash
# run-example.sh: installs the dependencies, builds the keel command line (build/release) and
# runs the example: lists the models of examples/models, then scores examples/heart_sample.txt
# with the "heart" model. Run as root (or with sudo) on a fresh Debian 12 machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== install dependencies"
bash scripts/install-deps.sh

echo "== build (build/release)"
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBUILD_TESTING=OFF
ninja -C build/release keel_cli

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
