#!/usr/bin/python3
"""check-file-cycles.py: fails when the files of one source folder call or include each other in
a loop.

Usage: check-file-cycles.py BUILDDIR SRCDIR [--allow FROM:TO ...]
e.g.   check-file-cycles.py build/plain src/runtime --allow budget.c:lifecycle.c

Calls come from the object files CMake built in BUILDDIR (for SRCDIR/NAME.c, the one file
.../SRCDIR/NAME.c.o under BUILDDIR, whichever target built it): an edge a.c -> b.c for every
symbol that a.c.o needs (nm -u) and b.c.o defines (nm --defined-only). Includes come from
the sources in SRCDIR: a.c -> b.c when a.c (or a header it includes from SRCDIR) includes b.h.
An --allow FROM:TO edge (file names without a folder, e.g. budget.c:lifecycle.c) is dropped
before the check: the documented way up (a wake-up). Prints the graph, and every cycle found;
exits 1 if there is one.
"""
import os
import re
import subprocess
import sys


def nm(path, *flags):
    out = subprocess.run(["nm", *flags, path], check=True, capture_output=True, text=True).stdout
    syms = set()
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 3 and parts[1] in ("t", "b", "d", "r"):
            continue  # file-local
        syms.add(parts[-1])
    return syms


def find_objects(builddir, srcdir, names):
    suffix = os.path.normpath(srcdir).strip("/")
    found = {}
    for root, _dirs, files in os.walk(builddir):
        if not root.endswith(suffix):
            continue
        for f in files:
            n = f[:-2] if f.endswith(".c.o") else None
            if n in names:
                if n in found:
                    sys.exit(f"check-file-cycles: {n}: built twice ({found[n]}, {root}/{f})")
                found[n] = os.path.join(root, f)
    for n in names:
        if n not in found:
            sys.exit(f"check-file-cycles: no {suffix}/{n}.o under {builddir} (build first)")
    return found


def call_graph(builddir, srcdir, names):
    objs = find_objects(builddir, srcdir, names)
    defined, needed = {}, {}
    for n in names:
        obj = objs[n]
        defined[n] = nm(obj, "--defined-only")
        needed[n] = nm(obj, "-u")
    graph = {n: set() for n in names}
    for a in names:
        for b in names:
            if a != b and needed[a] & defined[b]:
                graph[a].add(b)
    return graph


INC = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def include_graph(srcdir, names):
    folder = os.path.basename(os.path.normpath(srcdir))

    def local_includes(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        res = []
        for inc in INC.findall(text):
            base = os.path.basename(inc)
            if (inc == base or inc.startswith(folder + "/")) and os.path.exists(
                os.path.join(srcdir, base)
            ):
                res.append(base)
        return res

    graph = {n: set() for n in names}
    for n in names:
        seen, todo = set(), local_includes(os.path.join(srcdir, n))
        while todo:
            h = todo.pop()
            if h in seen:
                continue
            seen.add(h)
            todo.extend(local_includes(os.path.join(srcdir, h)))
        for h in seen:
            c = h[:-2] + ".c"
            if c != n and c in graph:
                graph[n].add(c)
    return graph


def cycles(graph):
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def main():
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    builddir, srcdir, allow = args[0], args[1], set()
    rest = args[2:]
    while rest:
        if rest[0] != "--allow" or len(rest) < 2 or ":" not in rest[1]:
            sys.exit(__doc__)
        allow.add(tuple(rest[1].split(":", 1)))
        rest = rest[2:]
    names = sorted(f for f in os.listdir(srcdir) if f.endswith(".c"))
    bad = False
    for kind, graph in (("calls", call_graph(builddir, srcdir, names)), ("includes", include_graph(srcdir, names))):
        for a, b in allow:
            graph.get(a, set()).discard(b)
        print(f"{srcdir} {kind}:")
        for n in names:
            print(f"  {n} -> {', '.join(sorted(graph[n])) or '(none)'}")
        for c in cycles(graph):
            print(f"  CYCLE ({kind}): {' -> '.join(c)}")
            bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
