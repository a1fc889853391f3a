#!/bin/sh
# train-reference.sh: builds the benchmark's reference model repository.
#
# DESIGN
# The reference model is an XGBoost binary classifier of 100 trees of depth 6 over 20 FP32
# features, trained by the xgboost command-line tool (Debian package xgboost) on a synthetic
# data set: 5000 rows whose 20 features are uniform on [0, 1) and whose label is a fixed
# nonlinear function of features 1-7 plus noise (features 8-20 carry no signal). The
# pseudo-random numbers come from a Park-Miller generator written in awk (every product stays
# below 2^53, so mawk and gawk compute identical doubles), and training is single-threaded with
# a fixed seed: running the script again gives the same files.
#
# Nothing is committed: the repository is written under OUT (default build-bench/bench-models),
# which .gitignore's build-*/ already covers. It holds two models over the same model.json,
# differing only in instance_group.count, because keel reads the instance count from
# config.json:
#   OUT/ref_i1/config.json, OUT/ref_i1/1/model.json   instance count 1
#   OUT/ref_i2/config.json, OUT/ref_i2/1/model.json   instance count 2
#   OUT/train.libsvm                                   the training data (1-based features)
# Usage: bench/train-reference.sh [OUT]   (XGBOOST may name another xgboost binary)
set -eu

XGBOOST=${XGBOOST:-xgboost}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/build-bench/bench-models}
ROWS=5000
FEATURES=20

command -v "$XGBOOST" >/dev/null 2>&1 || {
    echo "train-reference: '$XGBOOST' not found (apt-get install xgboost)" >&2
    exit 1
}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/keel-bench-train.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM

# One libsvm line per row: label, then all 20 features as index:value with 1-based indices.
# The label thresholds a nonlinear score near its median, so the classes are about balanced
# and 100 depth-6 trees have real structure to fit.
awk -v rows="$ROWS" -v nf="$FEATURES" 'BEGIN {
    state = 20240601
    for (r = 0; r < rows; r++) {
        for (j = 1; j <= nf; j++) {
            state = (state * 16807) % 2147483647
            x[j] = state / 2147483647
        }
        noise = 0
        for (k = 0; k < 4; k++) {
            state = (state * 16807) % 2147483647
            noise += state / 2147483647
        }
        noise = (noise - 2) * 0.6
        score = 2 * sin(6.2831853 * x[1]) + 4 * (x[2] - 0.5) * (x[3] - 0.5) * 4 \
                - 8 * (x[4] - 0.5) * (x[4] - 0.5) + (x[5] > 0.6 ? 1 : -0.5) \
                + 1.5 * x[6] * x[7] + noise
        line = (score > 0 ? 1 : 0)
        for (j = 1; j <= nf; j++)
            line = line " " j ":" sprintf("%.6f", x[j])
        print line
    }
}' >"$WORK/train.libsvm"

# indexing_mode=1 maps libsvm feature k to column k-1: 20 columns, none unused.
cat >"$WORK/train.conf" <<'EOF'
booster = gbtree
objective = binary:logistic
max_depth = 6
eta = 0.3
num_round = 100
nthread = 1
seed = 0
data = "train.libsvm?format=libsvm&indexing_mode=1"
model_out = "model.json"
EOF
(cd "$WORK" && "$XGBOOST" train.conf >train.log 2>&1) || {
    cat "$WORK/train.log" >&2
    exit 1
}
grep -q "\"num_feature\":\"$FEATURES\"" "$WORK/model.json" || {
    echo "train-reference: the trained model does not have $FEATURES features" >&2
    exit 1
}
grep -q '"num_trees":"100"' "$WORK/model.json" || {
    echo "train-reference: the trained model does not have 100 trees" >&2
    exit 1
}

for count in 1 2; do
    dir="$OUT/ref_i$count"
    mkdir -p "$dir/1"
    cp "$WORK/model.json" "$dir/1/model.json"
    cat >"$dir/config.json" <<EOF
{
  "name": "ref_i$count",
  "backend": "xgboost",
  "max_batch_size": 256,
  "input": [
    { "name": "features", "data_type": "TYPE_FP32", "dims": [$FEATURES] }
  ],
  "output": [
    { "name": "probability", "data_type": "TYPE_FP32", "dims": [1] }
  ],
  "instance_group": [
    { "count": $count, "kind": "KIND_CPU" }
  ]
}
EOF
done
cp "$WORK/train.libsvm" "$OUT/train.libsvm"

echo "train-reference: wrote $OUT (ref_i1, ref_i2: 100 trees, depth 6, $FEATURES features)"
