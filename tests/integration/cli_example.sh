#!/usr/bin/env bash
# cli_example.sh: drives the real `keel` binary on the bundled example repository, as a user
# would, and checks its answers against the xgboost command-line tool's own predictions for
# the same rows (a reference no one on the team computed). Also checks exit codes.
# Usage: cli_example.sh <keel binary> <source dir> <xgboost cli>
set -euo pipefail

keel=$1
src=$(cd "$2" && pwd)
xgb=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

repo="$src/examples/models"
sample="$src/examples/heart_sample.txt"

# keel's answers: label <TAB> probability per row.
"$keel" infer --model-repository "$repo" --model heart --label-first "$sample" >"$work/keel.txt"
[ "$(wc -l <"$work/keel.txt")" -ge 1 ] || fail "keel infer printed nothing"

# The same rows as libsvm (absent features = nan), predicted by the xgboost tool.
awk '!/^#/ && NF > 0 {
        line = $1
        for (i = 2; i <= NF; i++) if ($i != "nan") line = line " " (i - 1) ":" $i
        print line
     }' "$sample" >"$work/rows.libsvm"
(cd "$work" && "$xgb" /dev/null task=pred model_in="$repo/heart/1/model.json" \
    "test:data=rows.libsvm?format=libsvm&indexing_mode=1" name_pred=pred.txt nthread=1 \
    >/dev/null 2>&1) || fail "xgboost tool prediction failed"

paste "$work/keel.txt" "$work/pred.txt" | awk -v OFS='\t' '
    { d = $2 - $3; if (d < 0) d = -d; if (d > 1e-6) { print "row " NR ": keel " $2 " xgboost " $3; bad = 1 } }
    END { exit bad }' || fail "keel and the xgboost tool disagree"
[ "$(wc -l <"$work/keel.txt")" -eq "$(wc -l <"$work/pred.txt")" ] || fail "row counts differ"

# models lists the example as READY.
"$keel" models --model-repository "$repo" | grep -E '^heart +1 +READY' >/dev/null ||
    fail "keel models does not show heart version 1 READY"

# Exit codes: usage error 2, runtime error 1, with a message naming the problem.
set +e
"$keel" infer --model-repository "$repo" >/dev/null 2>"$work/err"
[ $? -eq 2 ] || fail "missing --model should exit 2"
"$keel" infer --model-repository "$repo" --model nosuch "$sample" >/dev/null 2>"$work/err"
[ $? -eq 1 ] || fail "unknown model should exit 1"
grep -q nosuch "$work/err" || fail "error for an unknown model does not name it"
echo "1 2 3" | "$keel" infer --model-repository "$repo" --model heart - >/dev/null 2>"$work/err"
[ $? -eq 1 ] || fail "a short row should exit 1"
grep -q "shape" "$work/err" || fail "error for a short row does not mention the shape"
set -e
echo "cli_example: $(wc -l <"$work/keel.txt") rows match the xgboost tool; exit codes ok"
