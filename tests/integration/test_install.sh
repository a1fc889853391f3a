#!/usr/bin/env bash
# test_install.sh: `cmake --install` of a built tree gives another program what it needs to
# embed keel: a tiny C program (tests/install/embed.c) is compiled against the installed tree
# with nothing but `pkg-config --cflags --libs keel` (shared, and --static), serves the example
# model in process, and answers what `keel infer` answers for the same row. Also: libkeel.so
# has a versioned SONAME and exports exactly the functions include/keel/keel.h marks
# KEEL_EXTERN, and the installed keel runs.
# Usage: test_install.sh <build dir> <source dir>
set -euo pipefail

build=$(cd "$1" && pwd)
src=$(cd "$2" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() {
    echo "FAIL: $*" >&2
    exit 1
}
command -v pkg-config >/dev/null || fail "pkg-config is missing (scripts/install-deps.sh)"
command -v cc >/dev/null || fail "no C compiler"

prefix="$work/prefix"
cmake --install "$build" --prefix "$prefix" >"$work/install.log" 2>&1 ||
    { cat "$work/install.log" >&2; fail "cmake --install failed"; }
libdir=$(find "$prefix" -name keel.pc -printf '%h\n' | head -n 1)
[ -n "$libdir" ] || fail "no keel.pc installed"
libdir=$(dirname "$libdir")
for f in "$prefix/bin/keel" "$prefix/bin/keel-model-check" "$prefix/include/keel/keel.h" \
    "$libdir/libkeel.a" "$libdir/libkeel.so"; do
    [ -e "$f" ] || fail "$f was not installed"
done

# The SONAME is versioned and the exports are exactly the public API.
soname=$(objdump -p "$libdir/libkeel.so" | awk '$1 == "SONAME" { print $2 }')
[[ "$soname" =~ ^libkeel\.so\.[0-9]+$ ]] || fail "SONAME is '$soname', expected libkeel.so.N"
[ -e "$libdir/$soname" ] || fail "$soname is not installed"
nm -D --defined-only "$libdir/libkeel.so" | awk '$2 ~ /^[TDBRVW]$/ { print $3 }' |
    grep -v '^_' | sort >"$work/exported.txt"
# Every declaration marked KEEL_EXTERN (it may span lines: take the name before the '(').
grep -v '^#' "$prefix/include/keel/keel.h" | tr '\n' ' ' | grep -oE 'KEEL_EXTERN [^(;#]*\(' |
    sed -E 's/.*[ *]([a-z0-9_]+)\($/\1/' | sort -u >"$work/declared.txt"
[ -s "$work/declared.txt" ] || fail "no KEEL_EXTERN declarations found in keel.h"
if ! diff -u "$work/declared.txt" "$work/exported.txt" >"$work/symdiff.txt"; then
    cat "$work/symdiff.txt" >&2
    fail "libkeel.so exports other symbols than keel.h declares (- declared only, + exported only)"
fi

export PKG_CONFIG_PATH="$libdir/pkgconfig"
# One row of the bundled heart model, with its label first (as `keel infer --label-first`).
row=$(awk '!/^#/ && NF > 0 { print; exit }' "$src/examples/heart_sample.txt")
values=$(echo "$row" | cut -d' ' -f2-)
want=$(echo "$row" | "$build/keel" infer --model-repository "$src/examples/models" --model heart \
    --label-first - | cut -f2)
[ -n "$want" ] || fail "keel infer gave no answer for the row"

# The embedding program checks model files with the installed helper: neither beside it nor
# at the configured install path (the tree went to a private --prefix), so it is named.
export KEEL_MODEL_CHECK="$prefix/bin/keel-model-check"

# Shared: only what pkg-config says, plus an rpath to the private prefix.
# shellcheck disable=SC2046
cc -std=c11 -Wall -Werror -o "$work/embed" "$src/tests/install/embed.c" \
    $(pkg-config --cflags --libs keel) -Wl,-rpath,"$libdir" || fail "embed.c did not build against keel.pc"
# ldd's output is read whole first: with pipefail, `ldd | grep -q` fails at random when grep
# quits at its match and ldd dies of SIGPIPE.
libs=$(ldd "$work/embed")
grep -q "$libdir/$soname" <<<"$libs" || fail "embed is not linked against the installed $soname"
# shellcheck disable=SC2086
got=$("$work/embed" "$src/examples/models" heart features $values) || fail "embed (shared) failed"
[ "$got" = "$want" ] || fail "embed (shared) answered $got, keel infer $want"

# Static: pkg-config --static adds libkeel.a's own dependencies; -Bstatic picks libkeel.a
# over libkeel.so for keel alone.
libs=$(pkg-config --static --libs keel)
libs=${libs/-lkeel/-Wl,-Bstatic -lkeel -Wl,-Bdynamic}
# shellcheck disable=SC2046,SC2086
cc -std=c11 -Wall -Werror -o "$work/embed_static" "$src/tests/install/embed.c" \
    $(pkg-config --cflags keel) $libs || fail "embed.c did not build against libkeel.a (pkg-config --static)"
libs=$(ldd "$work/embed_static")
grep -q libkeel <<<"$libs" && fail "embed_static is linked against libkeel.so"
# shellcheck disable=SC2086
got=$("$work/embed_static" "$src/examples/models" heart features $values) || fail "embed (static) failed"
[ "$got" = "$want" ] || fail "embed (static) answered $got, keel infer $want"

"$prefix/bin/keel" --help >/dev/null 2>&1 || "$prefix/bin/keel" help >/dev/null 2>&1 ||
    fail "the installed keel does not run"
echo "test_install: installed tree OK ($soname, $(wc -l <"$work/exported.txt") exported functions, shared and static embed agree with keel infer: $want)"
