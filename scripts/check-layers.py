#!/usr/bin/env python3
"""check-layers.py: the build's arrows, checked.

Two rules from docs/ARCHITECTURE.md, enforced on every CI run:

1. Between modules: a file of module A may include a header of module B only if
   ARCHITECTURE.md draws the arrow A -> B (in its "module arrows" block, which this script
   reads; an arrow may name the only headers it allows, e.g. `tests -> runtime[testhook.h]`).
   A header is resolved the way the compiler would: next to the including file first, then
   under src/, then under include/ (module "public"), then by name in a module folder.
2. Inside a module: the files form layers. No include cycle between the headers of a module,
   and, given a build directory, no call cycle between its files (X.c and X.h are one unit,
   and so is X.cpp): file A
   calls file B when A's object file has an undefined symbol that B's object file defines
   (`nm`). A call the block lists as an allowed upcall (`upcall runtime keel__life_wake`) is
   left out of the graph: it is a wake-up, the one way up STYLE.md allows.

Usage: scripts/check-layers.py [--build DIR]   (DIR: a configured and built CMake tree)
Exit 0 when every rule holds, 1 with one line per violation otherwise, 2 on usage errors.
"""
import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SOURCE_DIRS = ["src", "tests/unit", "bench", "fuzz"]
EXTS = (".c", ".h", ".cpp")
INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
GENERATED_RE = re.compile(r"\.pb(-c)?\.h$")


def fail_usage(msg):
    print(f"check-layers: {msg}", file=sys.stderr)
    sys.exit(2)


def read_arrows():
    """Parses the module arrows block of docs/ARCHITECTURE.md."""
    path = os.path.join(ROOT, "docs", "ARCHITECTURE.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"```text\n# module arrows[^\n]*\n(.*?)```", text, re.S)
    if not m:
        fail_usage(f"{path}: no '# module arrows' block")
    arrows = {}  # module -> {target module: set of allowed header basenames or None}
    upcalls = {}  # module -> set of symbols
    for n, line in enumerate(m.group(1).splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("upcall "):
            parts = line.split()
            if len(parts) != 3:
                fail_usage(f"arrows block line {n}: expected 'upcall MODULE SYMBOL'")
            upcalls.setdefault(parts[1], set()).add(parts[2])
            continue
        if "->" not in line:
            fail_usage(f"arrows block line {n}: expected 'module -> targets'")
        src, dst = (s.strip() for s in line.split("->", 1))
        targets = arrows.setdefault(src, {})
        for tok in dst.replace(",", " ").split():
            tm = re.fullmatch(r"([a-z_]+)(?:\[([^\]]+)\])?", tok)
            if not tm:
                fail_usage(f"arrows block line {n}: bad target '{tok}'")
            name, only = tm.group(1), tm.group(2)
            targets[name] = set(only.split("|")) if only else None
    return arrows, upcalls


def module_of(relpath):
    """The module a repository path belongs to, or None when it is not in any module."""
    parts = relpath.split("/")
    if parts[0] == "include":
        return "public"
    if parts[0] == "src" and len(parts) > 2:
        return parts[1]
    if relpath.startswith("tests/unit/"):
        return "tests"
    if parts[0] in ("bench", "fuzz"):
        return parts[0]
    return None


def all_files():
    out = []
    for d in SOURCE_DIRS + ["include"]:
        for base, _, names in os.walk(os.path.join(ROOT, d)):
            for name in names:
                if name.endswith(EXTS):
                    out.append(os.path.relpath(os.path.join(base, name), ROOT))
    return sorted(out)


def resolve(including, header, files_by_name):
    here = os.path.dirname(including)
    for cand in (os.path.join(here, header), os.path.join("src", header),
                 os.path.join("include", header)):
        cand = os.path.normpath(cand)
        if os.path.isfile(os.path.join(ROOT, cand)):
            return cand
    # A module folder on the include path (e.g. "server.h" from src/cli with src/server).
    matches = [p for p in files_by_name.get(os.path.basename(header), [])
               if p.endswith("/" + header) or os.path.basename(p) == header]
    if len(matches) == 1:
        return matches[0]
    return None


def unit(path):
    """X.c, X.cpp and X.h of one folder are one unit of the layering."""
    return os.path.splitext(path)[0]


def find_cycles(graph):
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, onstack, stack, out = {}, {}, set(), [], []
    counter = [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        onstack.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    onstack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in onstack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    onstack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def nm_symbols(obj):
    res = subprocess.run(["nm", "-P", obj], capture_output=True, text=True, check=True)
    defined, undefined = set(), set()
    for line in res.stdout.splitlines():
        f = line.split()
        if len(f) < 2:
            continue
        name, kind = f[0], f[1]
        if kind == "U":
            undefined.add(name)
        elif kind in "TDBRVWGS":
            defined.add(name)
    return defined, undefined


def objects_by_source(build):
    """Maps src/<module>/<file> to one object file compiled from it in the build tree."""
    out = {}
    for base, _, names in os.walk(build):
        for name in names:
            if not name.endswith(".o"):
                continue
            p = os.path.join(base, name)
            m = re.search(r"/(src/[a-z_]+/[A-Za-z0-9_]+\.(?:c|cpp))\.o$", p)
            if m and "fuzz" not in base:
                out.setdefault(m.group(1), p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", help="a built CMake tree: also check call cycles with nm")
    args = ap.parse_args()

    arrows, upcalls = read_arrows()
    files = all_files()
    files_by_name = {}
    for p in files:
        files_by_name.setdefault(os.path.basename(p), []).append(p)

    errors = []
    include_graph = {}  # module -> unit -> set(unit)
    for path in files:
        mod = module_of(path)
        if mod is None:
            continue
        with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
            text = f.read()
        for header in INCLUDE_RE.findall(text):
            if GENERATED_RE.search(header):
                continue  # made by protoc / protoc-c in the build tree
            target = resolve(path, header, files_by_name)
            if target is None:
                errors.append(f"{path}: includes \"{header}\", which is not in the tree")
                continue
            tmod = module_of(target)
            if tmod == mod:
                if path.endswith(".h"):
                    include_graph.setdefault(mod, {}).setdefault(path, set()).add(target)
                continue
            if tmod == "public":
                continue  # everyone may include the public header
            allowed = arrows.get(mod, {})
            if tmod not in allowed:
                errors.append(f"{path}: includes {target}, but ARCHITECTURE.md draws no "
                              f"arrow {mod} -> {tmod}")
            elif allowed[tmod] is not None and os.path.basename(target) not in allowed[tmod]:
                errors.append(f"{path}: includes {target}; the arrow {mod} -> {tmod} allows "
                              f"only {', '.join(sorted(allowed[tmod]))}")

    for mod, graph in sorted(include_graph.items()):
        for comp in find_cycles(graph):
            errors.append(f"include cycle in {mod}: " + " -> ".join(comp))

    if args.build:
        objs = objects_by_source(os.path.abspath(args.build))
        if not objs:
            fail_usage(f"{args.build}: no object files of src/ found (build it first)")
        by_module = {}
        for src, obj in objs.items():
            by_module.setdefault(module_of(src), {})[src] = obj
        for mod, srcs in sorted(by_module.items()):
            syms = {src: nm_symbols(obj) for src, obj in srcs.items()}
            owner = {}
            for src, (defined, _) in syms.items():
                for s in defined:
                    owner.setdefault(s, src)
            graph = {}
            skip = upcalls.get(mod, set())
            for src, (_, undefined) in syms.items():
                for s in undefined:
                    if s in skip:
                        continue
                    dst = owner.get(s)
                    if dst and dst != src:
                        graph.setdefault(unit(src), set()).add(unit(dst))
            for comp in find_cycles(graph):
                errors.append(f"call cycle in {mod}: " + " -> ".join(comp))

    for e in errors:
        print(e)
    if errors:
        print(f"check-layers: {len(errors)} violation(s)", file=sys.stderr)
        return 1
    print("check-layers: arrows and layers hold" + (" (includes and calls)" if args.build
                                                     else " (includes)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
