#!/usr/bin/env bash
# lockstat.sh: the runtime lock (rt->mu) per in-process request: acquisitions, how many found
# it taken, and how long it was held.
#
# DESIGN
# A benchmark run by hand (never by the test suite); it measures and never fails on a number.
# It builds build-lockstat (Release, KEEL_BUILD_BENCH=ON, KEEL_BENCH_LOCK_STATS=ON: every
# rt->mu acquisition goes through a counting wrapper, src/runtime/internal.h) and runs
# bench_infer's fixed-count modes (--callgrind MODE, without valgrind: the same calls, nothing
# dumped) once per mode. At exit the library prints its totals (keel lockstat: ...); this
# script divides them by the calls bench_infer made (warm-up + short + measured), so the model
# load's few acquisitions are spread over the calls too (under 0.1 % at the default count).
# Hold times are wall-clock and include one clock read (printed as clock_read_ns): on a busy
# machine a holder that is preempted makes the maximum large; the mean and the histogram are
# what to read. Contention depends on how many threads run: async on 2 instances has two
# inference threads on the one lock.
#
# Usage: bench/lockstat.sh   Environment: ITERATIONS (200000), BATCH (1), DEPTH (8).
# Needs: the reference model (bench/train-reference.sh; made here if missing).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=build-lockstat
repo=build-bench/bench-models
iters=${ITERATIONS:-200000}
batch=${BATCH:-1}
depth=${DEPTH:-8}

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKEEL_BUILD_BENCH=ON \
    -DKEEL_BENCH_LOCK_STATS=ON >/dev/null
ninja -C "$build" bench_infer >/dev/null
[[ -f "$repo/ref_i1/1/model.json" ]] || OUT="$repo" sh bench/train-reference.sh "$repo" >/dev/null

printf '| mode | calls | acquisitions/call | contended/acquisition | mean hold ns (of it: clock read) | max hold ns | holds <100 / <400 / <1.6k / <6.4k / more ns |\n'
printf '|---|---:|---:|---:|---:|---:|---|\n'
for spec in "sync 1" "async 1" "async 2"; do
    read -r mode inst <<<"$spec"
    log=$("$build/bench_infer" --model-repository "$repo" --callgrind "$mode" --batch "$batch" \
        --iterations "$iters" --instances "$inst" --depth "$depth" 2>&1)
    /usr/bin/python3 - "$mode" "$inst" "$depth" <<PY
import re, sys
mode, inst, depth = sys.argv[1], sys.argv[2], sys.argv[3]
log = """$log"""
run = re.search(r"short=(\d+) iterations=(\d+)", log)
ls = re.search(r"keel lockstat: rt->mu acquisitions (\d+) contended (\d+) held_ns_total (\d+) "
               r"held_ns_max (\d+) clock_read_ns (\d+) hist\([^)]*\) ([\d ]+)", log)
if not run or not ls:
    sys.exit("lockstat: unexpected output:\n" + log)
short, iters = int(run.group(1)), int(run.group(2))
warm = max(iters // 10, 100)
calls = warm + short + iters
acq, cont, held, mx = (int(ls.group(i)) for i in range(1, 5))
h = [int(x) for x in ls.group(6).split()]
label = "%s %s" % (mode, "w%s/i%s" % (inst, inst) + (" d%s" % depth if mode == "async" else ""))
print("| %s | %d | %.2f | %.4f | %.0f (%s) | %d | %s |" % (
    label, calls, acq / calls, cont / acq if acq else 0, held / acq if acq else 0, ls.group(5), mx,
    " / ".join(str(x) for x in h[:4] + [sum(h[4:])])))
PY
done
