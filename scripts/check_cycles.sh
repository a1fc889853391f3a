#!/usr/bin/env bash
# check_cycles.sh: no call cycle and no include cycle between the files of a module.
#
# Usage: scripts/check_cycles.sh BUILD_DIR MODULE...   (e.g. build/plain src/server src/workers)
# Calls: for every object file of a module it reads the symbols the file defines
# (nm --defined-only) and the ones it needs (nm -u), draws an edge a -> b when a needs a symbol
# b defines, prints the edges, and fails if the graph has a cycle (which it names). Calls
# through function pointers (a callback handed down) are not edges, which is the one way up
# the house style allows.
# Includes: every #include "..." of a .c/.h file of the module that names a file of the same
# module is an edge; the graph must be acyclic too (include guards would hide a cycle).
set -euo pipefail

build=$1
shift
status=0
for module in "$@"; do
    mapfile -t objs < <(find "$build" -path "*/${module}/*.o" -not -path '*/fuzz*' | sort)
    if ((${#objs[@]} == 0)); then
        echo "check_cycles: no object files for $module under $build" >&2
        exit 2
    fi
    tmp=$(mktemp -d)
    for o in "${objs[@]}"; do
        f=$(basename "$o" .o)
        nm --defined-only -g "$o" | awk 'NF >= 3 {print $3}' >"$tmp/$f.def"
        nm -u "$o" | awk '{print $NF}' >"$tmp/$f.und"
    done
    : >"$tmp/edges"
    for o in "${objs[@]}"; do
        a=$(basename "$o" .o)
        for d in "$tmp"/*.def; do
            b=$(basename "$d" .def)
            [[ $a == "$b" ]] && continue
            if grep -qxFf "$d" "$tmp/$a.und" 2>/dev/null; then
                echo "$a $b" >>"$tmp/edges"
            fi
        done
    done
    echo "== $module: file -> file calls"
    sed 's/ / -> /; s/^/   /' "$tmp/edges"
    # tsort reports a cycle on stderr ("input contains a loop").
    if ! out=$(tsort "$tmp/edges" 2>&1 >/dev/null) || [[ -n $out ]]; then
        echo "check_cycles: $module has a file-level call cycle:" >&2
        echo "$out" >&2
        status=1
    else
        echo "   no call cycle"
    fi
    # Includes, from the sources: "x.h" or "<module>/x.h" naming a file of this module.
    mod=$(basename "$module")
    : >"$tmp/inc"
    for f in "$module"/*.c "$module"/*.h; do
        [[ -e $f ]] || continue
        a=$(basename "$f")
        sed -n 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"\([^"]*\)".*/\1/p' "$f" |
            while read -r inc; do
                b=${inc#"$mod"/}
                if [[ $b != */* && -e $module/$b && $b != "$a" ]]; then
                    echo "$a $b" >>"$tmp/inc"
                fi
            done
    done
    if ! out=$(tsort "$tmp/inc" 2>&1 >/dev/null) || [[ -n $out ]]; then
        echo "check_cycles: $module has an include cycle:" >&2
        echo "$out" >&2
        status=1
    else
        echo "   no include cycle ($(wc -l <"$tmp/inc") includes between its files)"
    fi
    rm -rf "$tmp"
done
exit $status
