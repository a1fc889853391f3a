#!/usr/bin/env bash
# test.sh: the whole test command (what CI runs through .ci/run).
#
# Stages (the default runs format, fresh, release, asan and tsan, in that order):
#   format  clang-format --dry-run --Werror over every .c/.h under src/ include/ tests/, and
#           no alloca anywhere (VLAs are refused by -Wvla -Werror in the plain stage)
#   plain   gcc Debug build with -Werror (build/plain), scripts/check-layers.py (every include
#           follows an arrow of ARCHITECTURE.md; no file-level call or include cycle inside a
#           module), every test
#   release gcc Release build with -Werror and the tests (build/release-tests): proves that
#           Release, where fault injection is compiled out, builds with BUILD_TESTING on; runs
#           the quick unit tests (label unit, but memory) only
#   fresh   git clone of the committed HEAD into an otherwise empty temporary folder, then the
#           plain stage there: proves the tests need no file outside the repository
#           (uncommitted changes are not in the clone: it says so when the tree is dirty)
#   asan    clang AddressSanitizer + UndefinedBehaviorSanitizer (build/asan), every test;
#           LeakSanitizer runs with ASan on Linux, so any leak fails the test; then the
#           libFuzzer drivers for KEEL_FUZZ_SECS (30) each from fuzz/corpus/ (scripts/fuzz.sh):
#           a crash fails the stage and leaves its input in fuzz/corpus/<driver>/
#   tsan    clang ThreadSanitizer (build/tsan), the tests labelled "concurrency"
# KEEL_TEST_STAGES picks stages, e.g. KEEL_TEST_STAGES="format plain". A failing stage does not
# stop the later ones; the script prints one summary line per stage and exits 1 if any failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

all_stages=(format plain release fresh asan tsan)
# By default the plain stage runs once, inside the fresh clone (the same build and tests, and
# the proof that nothing outside the repository is needed).
default_stages=(format fresh release asan tsan)
read -r -a stages <<<"${KEEL_TEST_STAGES:-${default_stages[*]}}"
if ((${#stages[@]} == 0)); then
    stages=("${default_stages[@]}")
fi
for s in "${stages[@]}"; do
    case "$s" in
    format | plain | release | fresh | asan | tsan) ;;
    *)
        echo "test.sh: unknown stage '$s' in KEEL_TEST_STAGES (known: ${all_stages[*]})" >&2
        exit 2
        ;;
    esac
done

banner() {
    echo
    echo "=================================================================="
    echo "== $*"
    echo "=================================================================="
}

# Runs ctest with its output visible and a copy kept in <build>/ctest.log for the summary.
# --no-tests=error: an empty test list (a broken glob, a wrong label) is a failure.
run_ctest() {
    local build=$1
    shift
    "${ctest_prefix[@]}" ctest --test-dir "$build" --output-on-failure --no-tests=error \
        -j2 "$@" 2>&1 | tee "$build/ctest.log"
}

configure_and_build() {
    local build=$1
    shift
    cmake -S . -B "$build" -G Ninja "$@"
    ninja -C "$build"
}

stage_format() {
    local files=()
    mapfile -t files < <(find src include tests -type f \( -name '*.c' -o -name '*.h' -o -name '*.cpp' \) \
        -not -path '*/build/*' -not -path '*/build-*/*' | sort)
    if ((${#files[@]} == 0)); then
        echo "no C sources found under src/ include/ tests/" >&2
        return 1
    fi
    clang-format --version
    echo "checking ${#files[@]} files"
    if ! clang-format --dry-run --Werror "${files[@]}"; then
        echo
        echo "misformatted; fix with: clang-format -i <file>" >&2
        return 1
    fi
    echo "format: all ${#files[@]} files clean"
    # No stack allocation sized at run time: VLAs are compile errors (-Wvla with -Werror in
    # the plain stage); alloca has no warning, so it is refused here. A size taken from a
    # request would let a client overflow the stack.
    local hits
    hits=$(grep -rnE '\b(__builtin_)?alloca[[:space:]]*\(' src include tests fuzz bench \
        --include='*.c' --include='*.h' --include='*.cpp' --include='*.hpp' || true)
    if [[ -n "$hits" ]]; then
        echo "$hits" >&2
        echo "alloca is not allowed (use malloc, or a fixed-size buffer)" >&2
        return 1
    fi
    echo "format: no alloca"
}

stage_plain() {
    configure_and_build build/plain -DCMAKE_BUILD_TYPE=Debug -DKEEL_WERROR=ON
    # No call cycle between the files of these modules (from the object files' symbols).
    /usr/bin/python3 scripts/check-layers.py --build build/plain
    run_ctest build/plain
}

stage_release() {
    configure_and_build build/release-tests -DCMAKE_BUILD_TYPE=Release -DKEEL_WERROR=ON \
        -DBUILD_TESTING=ON
    run_ctest build/release-tests -L unit -E "^memory$" # memory: 10,000 load cycles, minutes
}

stage_fresh() {
    local head tmp rc=0
    head=$(git -C "$root" rev-parse HEAD)
    if [[ -n "$(git -C "$root" status --porcelain)" ]]; then
        echo "note: the work tree has uncommitted or untracked files; the fresh clone tests HEAD $head only"
    fi
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/keel-fresh.XXXXXX")
    echo "cloning HEAD $head into $tmp/keel (nothing else in $tmp)"
    git clone --quiet --no-checkout "$root" "$tmp/keel"
    git -C "$tmp/keel" checkout --quiet --detach "$head"
    # The clone's own test.sh, plain stage only; its build and logs stay inside the clone.
    (cd "$tmp/keel" && KEEL_TEST_STAGES=plain bash scripts/test.sh) || rc=$?
    mkdir -p "$root/build/fresh"
    cp "$tmp/keel/build/plain/ctest.log" "$root/build/fresh/ctest.log" 2>/dev/null || true
    rm -rf "$tmp"
    return "$rc"
}

stage_asan() {
    local rc=0
    configure_and_build build/asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_COMPILER=clang \
        -DCMAKE_CXX_COMPILER=clang++ -DKEEL_SANITIZE=address,undefined -DKEEL_BUILD_FUZZ=ON
    run_ctest build/asan || rc=$?
    # The libFuzzer drivers, KEEL_FUZZ_SECS (30) each from fuzz/corpus/, whatever the tests
    # gave; a crash keeps its input there and fails the stage.
    KEEL_FUZZ_PREFIX="${ctest_prefix[*]}" bash scripts/fuzz.sh build/asan || rc=1
    return "$rc"
}

stage_tsan() {
    configure_and_build build/tsan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_COMPILER=clang \
        -DCMAKE_CXX_COMPILER=clang++ -DKEEL_SANITIZE=thread
    run_ctest build/tsan -L concurrency
}

# The sanitizer runtimes of LLVM 14 cannot map their shadow memory when the kernel randomises
# mmap with more than 28 bits (vm.mmap_rnd_bits = 32 on recent kernels); on such machines the
# tests run with address randomisation off, if the container allows it.
ctest_prefix=()
sanitizer_prefix=()
rnd_bits=$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 0)
if ((rnd_bits > 28)) && setarch "$(uname -m)" -R true 2>/dev/null; then
    sanitizer_prefix=(setarch "$(uname -m)" -R)
fi

banner "install dependencies"
bash scripts/install-deps.sh --test

declare -A result=()
declare -A detail=()
failed=0
for s in "${stages[@]}"; do
    banner "stage: $s"
    start=$SECONDS
    log="$root/build/$s/ctest.log"
    [[ "$s" == release ]] && log="$root/build/release-tests/ctest.log"
    rm -f "$log"
    case "$s" in
    asan | tsan)
        ctest_prefix=("${sanitizer_prefix[@]}")
        if ((${#ctest_prefix[@]} > 0)); then
            echo "note: vm.mmap_rnd_bits=$rnd_bits; running tests under ${ctest_prefix[*]}"
        fi
        ;;
    *) ctest_prefix=() ;;
    esac
    # errexit is ignored inside a function called from an if/||, so run the stage in a
    # subshell that turns it back on, and read its status afterwards.
    set +e
    (
        set -euo pipefail
        "stage_$s"
    )
    rc=$?
    set -e
    secs=$((SECONDS - start))
    tests=""
    if [[ "$s" != format && -f "$log" ]]; then
        tests=$(grep -E 'tests? passed, [0-9]+ tests? failed out of' "$log" | tail -n 1 || true)
    fi
    if ((rc == 0)); then
        result[$s]=PASS
    else
        result[$s]="FAIL (exit $rc)"
        failed=1
    fi
    detail[$s]="${secs}s${tests:+, $tests}"
done

banner "summary"
for s in "${stages[@]}"; do
    printf 'test.sh: %-6s %s [%s]\n' "$s" "${result[$s]}" "${detail[$s]}"
done
if ((failed)); then
    echo "test.sh: FAILED"
    exit 1
fi
echo "test.sh: all stages passed"
