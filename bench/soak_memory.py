#!/usr/bin/python3
"""soak_memory.py: RSS over reloads under load, and RSS after unloading everything.

The memory goal of issue 14, measured (docs/PERFORMANCE.md, "Memory over reloads"):
  1. start `keel serve` in explicit mode with no model loaded and read its RSS (before);
  2. load the model, then `keel soak --url --pid` makes --swaps reloads back to back under
     4 clients (batch 8, binary tensors), sampling RSS every 0.25 s into a CSV;
  3. unload every model, wait for the reaper, read RSS again (after).
Prints RSS at reload 1,000 and at the last reload (goal: within 512 KiB), and before/after
(goal: within 1 MiB). --env VAR=VALUE (repeatable) runs the server under an environment, e.g.
LD_PRELOAD=... or GLIBC_TUNABLES=..., to compare allocators without rebuilding.

Usage: bench/soak_memory.py --keel build/plain/keel --repo MODELS --model ref_i1 \\
           [--swaps 10000] [--env VAR=VALUE ...] [--csv out.csv]
(bench/train-reference.sh makes the reference repository.) A measurement, not a test: it
exits 0 whatever the numbers, 1 only when the server or the soak failed.
"""
import argparse
import csv
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time

MIB = 1048576.0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS for %d" % pid)


def status(pid):
    """VmRSS, RssAnon, RssFile and the thread count from /proc/PID/status."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
            elif k == "Threads":
                out[k] = int(v)
    return out


def heap(port):
    """keel's heap gauges from /metrics (in use, free-but-held), in bytes."""
    out = {}
    for line in request(port, "GET", "/metrics")[1].decode().splitlines():
        for name in ("keel_memory_heap_in_use_bytes", "keel_memory_heap_free_bytes"):
            if line.startswith(name + " ") or line.startswith(name + "{"):
                out[name] = float(line.split()[-1])
    return out


def describe(pid, port):
    st, hp = status(pid), heap(port)
    return ("VmRSS %.2f MiB, RssAnon %.2f, RssFile %.2f, heap in use %.2f, free-held %.2f, "
            "threads %d" % (st["VmRSS"] / MIB, st["RssAnon"] / MIB, st["RssFile"] / MIB,
                            hp.get("keel_memory_heap_in_use_bytes", 0) / MIB,
                            hp.get("keel_memory_heap_free_bytes", 0) / MIB, st["Threads"]))


def request(port, method, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request(method, path, body=b"" if method == "POST" else None)
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keel", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--swaps", type=int, default=10000)
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--csv", default=None)
    a = ap.parse_args()

    env = dict(os.environ)
    for kv in a.env:
        k, v = kv.split("=", 1)
        env[k] = v
    port = free_port()
    srv = subprocess.Popen([a.keel, "serve", "--model-repository", a.repo,
                            "--model-control-mode", "explicit", "--http-port", str(port),
                            "--grpc-port", "-1",
                            "--log-level", "warn"], env=env)
    csv_path = a.csv or tempfile.mktemp(suffix=".csv", prefix="soak-memory-")
    try:
        for _ in range(200):
            try:
                if request(port, "GET", "/v2/health/live")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        time.sleep(1.0)
        before = rss(srv.pid)
        before_detail = describe(srv.pid, port)
        st, body = request(port, "POST", "/v2/repository/models/%s/load" % a.model)
        if st != 200:
            print("load failed: %d %r" % (st, body[:300]))
            return 1
        t0 = time.monotonic()
        # The soak client runs with this script's environment, not the server's.
        r = subprocess.run([a.keel, "soak", "--url", "127.0.0.1:%d" % port, "--pid", str(srv.pid),
                            "--model", a.model, "--swaps", str(a.swaps), "--swap-interval", "0",
                            "--concurrency", "4", "-b", "8", "--input-tensor-format", "binary",
                            "--sample-interval", "0.25", "--csv", csv_path],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        secs = time.monotonic() - t0
        out = r.stdout.decode("utf-8", "replace")
        if r.returncode not in (0, 3):
            print(out)
            print("soak failed (exit %d)" % r.returncode)
            return 1
        st, body = request(port, "GET", "/v2/repository/index")
        request(port, "POST", "/v2/repository/models/%s/unload" % a.model)
        time.sleep(3.0)  # the reaper frees the generations and trims
        after = rss(srv.pid)
        after_detail = describe(srv.pid, port)
    finally:
        srv.terminate()
        srv.wait(30)

    rows = [row for row in csv.DictReader(open(csv_path)) if row["phase"] == "swap"]

    def at(n):
        for row in rows:
            if int(row["swaps"]) >= n:
                return int(row["rss_bytes"]), int(row["swaps"])
        return None, None

    r1k, s1k = at(1000)
    last = rows[-1]
    rl, sl = int(last["rss_bytes"]), int(last["swaps"])
    for line in out.splitlines():
        if line.startswith(("requests:", "swaps:", "verdict=")):
            print(line)
    print("env: %s" % (" ".join(a.env) or "(none)"))
    print("%d reloads in %.0f s" % (a.swaps, secs))
    if r1k is not None:
        print("RSS at reload %d: %.2f MiB; at reload %d: %.2f MiB (%+.0f KiB; goal within 512 KiB)"
              % (s1k, r1k / MIB, sl, rl / MIB, (rl - r1k) / 1024.0))
    print("RSS before the first load %.2f MiB, after unloading everything %.2f MiB (%+.0f KiB; "
          "goal within 1 MiB)" % (before / MIB, after / MIB, (after - before) / 1024.0))
    print("  before: %s" % before_detail)
    print("  after:  %s" % after_detail)
    print("csv: %s" % csv_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
