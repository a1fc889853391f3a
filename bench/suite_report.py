"""suite_report.py: the markdown tables of bench/suite.sh's results.

Reads build-bench/bench-results/suite/results.tsv (tab-separated: section, round, key,
values...; lines starting with '#' open a run and carry its machine lines). For each section
it uses the newest run that has rows of that section, and prints medians with their spread
(min..max) over the rounds; a ratio is the median of the per-round ratios. Standard library
only.

Usage: python3 bench/suite_report.py RESULTS.tsv
"""

import os
import statistics
import sys


def med(xs):
    return "%s (%s..%s)" % (fmt(statistics.median(xs)), fmt(min(xs)), fmt(max(xs)))


def fmt(x):
    if abs(x) >= 100:
        return "%.0f" % x
    if abs(x) >= 10:
        return "%.1f" % x
    return "%.3f" % x


def load(path):
    runs = []  # [(header lines, [rows])]
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("# suite.sh"):
                runs.append(([line], []))
            elif line.startswith("#"):
                if runs:
                    runs[-1][0].append(line)
            elif line.strip():
                if not runs:
                    runs.append((["# (no header)"], []))
                runs[-1][1].append(line.split("\t"))
    latest = {}
    for header, rows in runs:
        secs = {}
        for r in rows:
            secs.setdefault(r[0], []).append(r)
        for s, rs in secs.items():
            latest[s] = (header, rs)
    return latest


def by_key(rows):
    d = {}
    for r in rows:
        d.setdefault(r[2], []).append([float(x) for x in r[3:]])
    return d


def header(h):
    for line in h:
        print("    " + line.lstrip("# "))
    print()


def gen(h, rows):
    print("### Load generator capacity (static reply vs inference)\n")
    header(h)
    d = by_key(rows)
    print("| what | req/s | p50 ms | p99 ms | failed | server CPU us/req | generator CPU us/req |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    names = {"perf_live": "keel perf, GET /v2/health/live",
             "wrk_live": "wrk, GET /v2/health/live",
             "perf_infer_b1": "keel perf, infer ref_i1 batch 1 (JSON)"}
    for k in ("perf_live", "wrk_live", "perf_infer_b1"):
        if k in d:
            v = d[k]
            print("| %s | %s | %s | %s | %d | %s | %s |"
                  % (names[k], med([x[0] for x in v]), fmt(statistics.median(x[1] for x in v)),
                     fmt(statistics.median(x[2] for x in v)), sum(int(x[3]) for x in v),
                     med([x[4] for x in v]) if all(len(x) > 5 for x in v) else "-",
                     med([x[5] for x in v]) if all(len(x) > 5 for x in v) else "-"))
    if "perf_live" in d and "perf_infer_b1" in d:
        ratios = [a[0] / b[0] for a, b in zip(d["perf_live"], d["perf_infer_b1"])]
        print("\nkeel perf drives the static endpoint at %s times the rate keel serves "
              "inference (median of per-round ratios)." % med(ratios))
    print()


def wrk(h, rows):
    print("### keel perf vs wrk on the same endpoint\n")
    header(h)
    d = by_key(rows)
    w, p = d.get("wrk_b1", []), d.get("perf_b1", [])
    print("| round | wrk req/s | keel perf req/s | keel perf / wrk | wrk p99 ms | keel perf p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for i, (a, b) in enumerate(zip(w, p)):
        ratios.append(b[0] / a[0])
        print("| %d | %.0f | %.0f | %.3f | %.3f | %.3f |" % (i + 1, a[0], b[0], ratios[-1], a[2],
                                                           b[2]))
    if ratios:
        print("| median | %s | %s | **%s** | | |" % (med([x[0] for x in w]),
                                                   med([x[0] for x in p]), med(ratios)))
    print()


def ratio(h, rows):
    print("### Served/raw (keel serve over HTTP, V2 JSON, vs XGBoost C API on the same core)\n")
    header(h)
    last_raw = {}
    acc = {}
    for r in rows:
        key, vals = r[2], [float(x) for x in r[3:]]
        if key.startswith("raw_b"):
            last_raw[key[4:]] = vals
            continue
        _, mode, b = key.split("_")
        acc.setdefault((int(b[1:]), mode), []).append((last_raw[b], vals))
    print("| batch | --infer-on-http-thread | raw calls/s | keel req/s | served/raw | p50 ms | "
          "p99 ms | raw CPU us/call | keel CPU us/req | served/raw by CPU | failed |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (b, mode) in sorted(acc):
        v = acc[(b, mode)]
        cpu = [x for x in v if len(x[0]) > 1 and len(x[1]) > 4 and x[1][4] > 0]
        print("| %d | %s | %s | %s | **%s** | %s | %s | %s | %s | **%s** | %d |"
              % (b, mode, med([x[0][0] for x in v]), med([x[1][0] for x in v]),
                 med([x[1][0] / x[0][0] for x in v]), fmt(statistics.median(x[1][1] for x in v)),
                 med([x[1][2] for x in v]),
                 med([x[0][1] for x in cpu]) if cpu else "-",
                 med([x[1][4] for x in cpu]) if cpu else "-",
                 med([x[0][1] / x[1][4] for x in cpu]) if cpu else "-",
                 sum(int(x[1][3]) for x in v)))
    print()


def batching(h, rows):
    print("### Dynamic batching (issue 12): batch-1 requests, served/raw batch-1 calls/s\n")
    header(h)
    raw = {}
    raw64 = {}
    raw8 = {}
    live = {}  # (round, connections) -> GET /v2/health/live row
    post = {}  # (round, connections) -> wrk: the batch-1 body POSTed to /v2/health/live (405)
    wrkb0 = {}  # (round, connections) -> wrk: the same body to ref_b0
    floor = {}  # (round, connections) -> keel perf's ref_b0 requests to bench/mhd_floor.c
    necessary = {}  # (round, connections) -> the same requests to mhd_model
    served = {}  # (round, connections) -> keel perf's ref_b0 requests to keel
    by_conns = {"live_c": live, "post_c": post, "wrkb0_c": wrkb0, "floor_c": floor,
                "model_c": necessary}
    acc = {}
    for r in rows:
        key, vals = r[2], [float(x) for x in r[3:]]
        if key == "raw_b1":
            raw[r[1]] = vals
            continue
        if key == "raw_b64":
            raw64[r[1]] = vals
            continue
        if key == "raw_b8":
            raw8[r[1]] = vals
            continue
        prefix = key.rsplit("_", 1)[0] + "_c"
        if prefix in by_conns and key[len(prefix):].isdigit():
            by_conns[prefix][(r[1], key[len(prefix):])] = vals
            continue
        if key.startswith("ref_b0_c"):
            served[(r[1], key[len("ref_b0_c"):])] = vals
        tail = key.rsplit("_", 1)[1]
        conns = tail[1:] if tail.startswith("c") else None
        acc.setdefault(key, []).append((raw.get(r[1]), vals, live.get((r[1], conns))))
    if live:
        bound_table(raw, raw64, live, raw8)
    if post and raw8:
        exchange_bound_table(
            raw, raw8, raw64, post, wrkb0,
            "A tighter bound (same rounds, wrk): the exchange of the batch-1 body itself and a "
            "row at the largest batch the connections allow", "POST body, 405", "wrk ref_b0")
    if floor and raw8:
        exchange_bound_table(
            raw, raw8, raw64, floor, served,
            "The floor (same rounds, keel perf): the same requests to bench/mhd_floor.c "
            "(libmicrohttpd, keel's loop, none of keel's work) and a row at the largest batch "
            "the connections allow; keel's own work is the gap between ref_b0 and this bound",
            "floor", "keel ref_b0")
    if necessary:
        necessary_table(raw, necessary, served)
    names = {"ref_i1": "off (no dynamic_batching)", "ref_b0": "on, delay 0",
             "ref_b0bin": "on, delay 0, binary tensor extension",
             "ref_bd": "on, delay 100 us, preferred 32", "digits": "digits, off",
             "digits_b": "digits, on"}
    print("| model | connections | batch | keel req/s | served/raw b1 | served / live | "
          "avg executed batch | p50 ms | p99 ms | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in sorted(acc, key=lambda k: (k.startswith("digits"), k.split("_")[-1], k)):
        m, tail = key.rsplit("_", 1)
        v = acc[key]
        conns = tail[1:] if tail.startswith("c") else "8"
        batch = "64" if tail == "b64" else "1"
        ratio = (med([x[1][0] / x[0][0] for x in v if x[0]]) if batch == "1" else "-")
        vs_live = [x[1][0] / x[2][0] for x in v if x[2] and x[2][0] > 0]
        print("| %s | %s | %s | %s | **%s** | %s | %s | %s | %s | %d |"
              % (names.get(m, m), conns, batch, med([x[1][0] for x in v]), ratio,
                 med(vs_live) if vs_live else "-",
                 med([x[1][6] for x in v]), fmt(statistics.median(x[1][1] for x in v)),
                 med([x[1][2] for x in v]), sum(int(x[1][3]) for x in v)))
    print()


def batched_rows(conns, raw8, raw64):
    """The raw calls whose per-row cost a batch at this many connections can reach, and their
    batch size: batch 8 at 8 connections or fewer (when the run measured it), else 64."""
    return (raw8, 8) if int(conns) <= 8 and raw8 else (raw64, 64)


def bound_table(raw, raw64, live, raw8):
    """What bounds a batch-1 request's rate: its HTTP exchange (the same server's GET
    /v2/health/live at the same connections) plus a batched row's backend cost: a raw
    batch-64 call / 64, and at 8 connections (when the run measured it) a raw batch-8 call / 8,
    the largest batch 8 connections can form. Per round: bound = 1 / (1/live + 1/rows), over
    raw b1."""
    print("What bounds the batch-1 rows (same rounds): the HTTP exchange alone and a batched "
          "row's backend cost\n")
    print("| connections | raw b1 calls/s | GET /v2/health/live req/s | live / raw b1 | "
          "batched rows/s | bound req/s | bound / raw b1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for conns in sorted({c for _, c in live}, key=int):
        rows_of, per = batched_rows(conns, raw8, raw64)
        rs = [rd for rd, c in live if c == conns and rd in raw and rd in rows_of]
        if not rs:
            continue
        lv = [live[(rd, conns)][0] for rd in rs]
        rb = [raw[rd][0] for rd in rs]
        r64 = [rows_of[rd][0] * per for rd in rs]
        bound = [1 / (1 / a + 1 / b) for a, b in zip(lv, r64)]
        print("| %s | %s | %s | **%s** | %s (raw b%d) | %s | **%s** |"
              % (conns, med(rb), med(lv), med([a / b for a, b in zip(lv, rb)]), med(r64), per,
                 med(bound), med([a / b for a, b in zip(bound, rb)])))
    print()


def exchange_bound_table(raw, raw8, raw64, exch, served, title, exch_name, served_name):
    """A bound from an exchange measured without keel's infer work (wrk POSTing the batch-1
    body to /v2/health/live: read, dropped, 405; or keel perf's requests to mhd_floor) plus
    the backend cost of a row in the largest batch the connections allow (a raw batch-8 call
    / 8 at 8 connections, a raw batch-64 call / 64 at 64). Per round: bound = 1 / (1/exchange
    + 1/rows), over raw b1; "served / bound" is the same generator's ref_b0 rate over it:
    keel's own share."""
    print(title + "\n")
    print("| connections | raw b1 calls/s | %s req/s | rows/s (raw b8 at 8, b64 at 64)"
          " | bound / raw b1 | %s req/s | %s / raw b1 | %s / bound |"
          % (exch_name, served_name, served_name, served_name))
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for conns in sorted({c for _, c in exch}, key=int):
        rows_of, per = batched_rows(conns, raw8, raw64)
        rs = [rd for rd, c in exch
              if c == conns and rd in raw and rd in rows_of and (rd, conns) in served]
        if not rs:
            continue
        pv = [exch[(rd, conns)][0] for rd in rs]
        rb = [raw[rd][0] for rd in rs]
        rr = [rows_of[rd][0] * per for rd in rs]
        sv = [served[(rd, conns)][0] for rd in rs]
        bound = [1 / (1 / a + 1 / b) for a, b in zip(pv, rr)]
        print("| %s | %s | %s | %s | **%s** | %s | **%s** | %s |"
              % (conns, med(rb), med(pv), med(rr), med([a / b for a, b in zip(bound, rb)]),
                 med(sv), med([a / b for a, b in zip(sv, rb)]),
                 med([a / b for a, b in zip(sv, bound)])))
    print()


def necessary_table(raw, necessary, served):
    """mhd_model (bench/mhd_floor.c with keel's JSON codec and one XGBoost call per HTTP turn:
    the work no V2 server skips for these requests, none of keel's runtime) over raw b1, per
    round; and keel's ref_b0 over it: what keel's runtime costs beyond that work."""
    print("Only the necessary work (same rounds, keel perf): the same requests to mhd_model "
          "(libmicrohttpd and keel's loop, keel's JSON decode and encode, one XGBoost call per "
          "HTTP turn over its rows; none of keel's runtime)\n")
    print("| connections | raw b1 calls/s | mhd_model req/s | mhd_model / raw b1 | its avg batch "
          "| keel ref_b0 req/s | keel ref_b0 / raw b1 | keel ref_b0 / mhd_model |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for conns in sorted({c for _, c in necessary}, key=int):
        rs = [rd for rd, c in necessary if c == conns and rd in raw and (rd, conns) in served]
        if not rs:
            continue
        nv = [necessary[(rd, conns)][0] for rd in rs]
        rb = [raw[rd][0] for rd in rs]
        sv = [served[(rd, conns)][0] for rd in rs]
        print("| %s | %s | %s | **%s** | %s | %s | **%s** | %s |"
              % (conns, med(rb), med(nv), med([a / b for a, b in zip(nv, rb)]),
                 med([necessary[(rd, conns)][6] for rd in rs]), med(sv),
                 med([a / b for a, b in zip(sv, rb)]), med([a / b for a, b in zip(sv, nv)])))
    print()


def grpc(h, rows):
    print("### gRPC vs HTTP (one keel serve, both protocols, interleaved)\n")
    header(h)
    last_raw = {}
    acc = {}  # (batch, protocol) -> [(raw, http, vals)]
    http = {}
    for r in rows:
        key, vals = r[2], [float(x) for x in r[3:]]
        proto, b = key.split("_")
        if proto == "raw":
            last_raw[b] = vals
            continue
        if proto == "http":
            http[b] = vals
        acc.setdefault((int(b[1:]), proto), []).append((last_raw[b], http.get(b), vals))
    names = {"http": "HTTP (V2 JSON)", "grpc": "gRPC ModelInfer",
             "grpcstream": "gRPC ModelStreamInfer"}
    print("| batch | protocol | raw calls/s | keel req/s | / HTTP req/s | served/raw | p50 ms | "
          "p99 ms | keel CPU us/req | served/raw by CPU | generator CPU us/req | failed |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    order = {"http": 0, "grpc": 1, "grpcstream": 2}
    for (b, proto) in sorted(acc, key=lambda k: (k[0], order.get(k[1], 9))):
        v = acc[(b, proto)]
        cpu = [x for x in v if len(x[0]) > 1 and len(x[2]) > 4 and x[2][4] > 0]
        vs = [x[2][0] / x[1][0] for x in v if x[1] is not None and x[1][0] > 0]
        gen = [x[2][5] for x in v if len(x[2]) > 5]
        print("| %d | %s | %s | %s | **%s** | **%s** | %s | %s | %s | %s | %s | %d |"
              % (b, names.get(proto, proto), med([x[0][0] for x in v]), med([x[2][0] for x in v]),
                 med(vs) if vs else "-", med([x[2][0] / x[0][0] for x in v]),
                 fmt(statistics.median(x[2][1] for x in v)), med([x[2][2] for x in v]),
                 med([x[2][4] for x in cpu]) if cpu else "-",
                 med([x[0][1] / x[2][4] for x in cpu]) if cpu else "-",
                 med(gen) if gen else "-", sum(int(x[2][3]) for x in v)))
    print("\n\"/ HTTP\" is the median of per-round ratios to the HTTP row of the same batch "
          "and round. The generator's CPU is its load thread's only (gRPC's own I/O threads in "
          "keel perf are not counted): when the gRPC rows' generator cost approaches the "
          "server's, the generator, not keel, may bound them.\n")


def fastapi(h, rows):
    print("### keel vs the FastAPI peer (bench/fastapi_peer.py)\n")
    header(h)
    d = by_key(rows)
    print("| batch | server | req/s | p50 ms | p99 ms | keel / this (req/s) | CPU us/req | "
          "keel / this (CPU) | failed |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for b in (1, 64):
        k = d.get("keel_b%d" % b)
        if not k:
            continue
        for name, label in (("keel", "keel serve"), ("fastapi_raw", "FastAPI, raw-body handler"),
                            ("fastapi_pydantic", "FastAPI, pydantic models")):
            v = d.get("%s_b%d" % (name, b))
            if not v:
                continue
            pairs = [(a[0], x[0]) for a, x in zip(k, v) if x[0] > 0]
            rat = med([a / x for a, x in pairs]) if name != "keel" and pairs else ""
            cpus = [(a[4], x[4]) for a, x in zip(k, v) if len(x) > 4 and a[4] > 0 and x[4] > 0]
            crat = med([x / a for a, x in cpus]) if name != "keel" and cpus else ""
            print("| %d | %s | %s | %s | %s | %s | %s | %s | %d |"
                  % (b, label, med([x[0] for x in v]), fmt(statistics.median(x[1] for x in v)),
                     fmt(statistics.median(x[2] for x in v)), ("**%s**" % rat) if rat else "",
                     med([x[4] for x in v]) if cpus else "-", ("**%s**" % crat) if crat else "",
                     sum(int(x[3]) for x in v)))
    print()


def ir(h, rows):
    print("### Instructions per request (callgrind)\n")
    header(h)
    print("| batch | --infer-on-http-thread | requests counted | server Ir/request | raw Ir/call | "
          "served/raw Ir |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        what, mode, b = r[2].split("_")
        total, n, raw = float(r[3]), float(r[4]), float(r[5])
        if n <= 0:
            continue
        print("| %s | %s | %d | %.0f | %.0f | %.2f |"
              % ("GET /v2/health/live" if what == "live" else b[1:], mode, n, total / n, raw,
                 total / n / raw))
    print()


def nginx(h, rows):
    print("### The HTTP layer: keel GET /v2/health/live vs nginx `return 200` (wrk)\n")
    header(h)
    d = by_key(rows)
    k, n = d.get("keel_live", []), d.get("nginx_return200", [])
    print("| round | keel req/s | nginx req/s | keel / nginx | keel p99 ms | nginx p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(k, n)):
        print("| %d | %.0f | %.0f | %.3f | %.3f | %.3f |"
              % (i + 1, a[0], b[0], a[0] / b[0] if b[0] else 0, a[2], b[2]))
    pairs = [(a[0], b[0]) for a, b in zip(k, n) if b[0] > 0]
    if pairs:
        print("| median | %s | %s | **%s** | | |" % (med([a for a, _ in pairs]),
                                                     med([b for _, b in pairs]),
                                                     med([a / b for a, b in pairs])))
    print()


def issue_table(latest, outdir):
    """Issue 11's table: one row per goal, from the sections that measure it."""
    rows = []

    def ratio_of(mode, b):
        if "ratio" not in latest:
            return None
        last_raw, got = {}, []
        for r in latest["ratio"][1]:
            key, vals = r[2], [float(x) for x in r[3:]]
            if key.startswith("raw_b"):
                last_raw[key[4:]] = vals
            elif key == "keel_%s_b%d" % (mode, b) and ("b%d" % b) in last_raw:
                got.append((last_raw["b%d" % b], vals))
        return got or None

    for b, goal in ((1, ">= 0.50"), (64, ">= 0.85")):
        for mode in ("auto", "on", "off"):
            v = ratio_of(mode, b)
            if v:
                rows.append(("batch %d: served req/s / raw XGBoost calls/s (%s%s)"
                             % (b, mode, ", default" if mode == "auto" else ""),
                             med([x[1][0] / x[0][0] for x in v]), goal))
    if "grpc" in latest:
        d = by_key(latest["grpc"][1])
        for b in (1, 64):
            h, g = d.get("http_b%d" % b), d.get("grpc_b%d" % b)
            if h and g:
                pairs = [(x[0], y[0]) for x, y in zip(g, h) if y[0] > 0]
                goal = ">= 1.0 (issue 13)" if b == 1 else "(issue 13: reported)"
                rows.append(("batch %d: gRPC req/s / HTTP req/s (same server, same run)" % b,
                             med([x / y for x, y in pairs]), goal))
    if "fastapi" in latest:
        d = by_key(latest["fastapi"][1])
        for b, goal in ((1, ">= 20x"), (64, ">= 6x")):
            k, f = d.get("keel_b%d" % b), d.get("fastapi_raw_b%d" % b)
            if k and f:
                pairs = [(a[0], x[0]) for a, x in zip(k, f) if x[0] > 0]
                if pairs:
                    rows.append(("batch %d vs the tuned FastAPI peer (raw-body handler)" % b,
                                 med([a / x for a, x in pairs]) + "x", goal))
    v = ratio_of("auto", 1)
    if v:
        rows.append(("p99 at %s connections, batch 1, default (ms)" % "8",
                     med([x[1][2] for x in v]), "<= 0.5"))
    if "nginx" in latest:
        d = by_key(latest["nginx"][1])
        pairs = [(a[0], b[0]) for a, b in zip(d.get("keel_live", []),
                                               d.get("nginx_return200", [])) if b[0] > 0]
        if pairs:
            rows.append(("GET /v2/health/live req/s / nginx return 200 req/s",
                         med([a / b for a, b in pairs]), ">= 1.0"))
    dec = os.path.join(outdir, "decode.txt")
    if os.path.exists(dec):
        rows.append(("FP32 JSON decode (bench_decode; see its output below)", "see below",
                     "<= 5 ns/number"))
    if "ir" in latest:
        for r in latest["ir"][1]:
            if r[2] == "serve_auto_b1":
                total, n, raw = float(r[3]), float(r[4]), float(r[5])
                rows.append(("instructions per batch-1 request / per raw call (callgrind, auto)",
                             "%.2fx" % (total / n / raw), "<= 1.4x"))
    if not rows:
        return
    print("### Issue 11's table (median, spread min..max over the rounds)\n")
    print("| | measured | goal |")
    print("|---|---|---|")
    for name, val, goal in rows:
        print("| %s | %s | %s |" % (name, val, goal))
    print()


def main():
    latest = load(sys.argv[1])
    issue_table(latest, os.path.dirname(sys.argv[1]))
    for s, fn in (("gen", gen), ("wrk", wrk), ("nginx", nginx), ("ratio", ratio),
                  ("batching", batching), ("grpc", grpc), ("fastapi", fastapi),
                  ("ir", ir)):
        if s in latest:
            fn(*latest[s])
    for name, title in (("decode.txt", "FP32 JSON decode and encode (bench_decode output)"),
                        ("soak.txt", "Soak (keel soak output)"),
                        ("swapp99.txt", "p99 with a swap every 0.5 s (keel soak output)")):
        path = os.path.join(os.path.dirname(sys.argv[1]), name)
        if os.path.exists(path):
            print("### %s\n" % title)
            with open(path) as f:
                for line in f:
                    print("    " + line.rstrip())
            print()


if __name__ == "__main__":
    main()
