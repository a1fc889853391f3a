#!/usr/bin/python3
"""bench_scrape.py: the cost of a /metrics scrape with many loaded models, and whether scraping
slows inference.

DESIGN
1. Builds a repository of N copies of the example model "heart" (default 100) in a temp dir,
   starts `keel serve` on it (port 0) and sends one inference to every model, so that each
   has its latency-histogram series (4 histograms x 21 buckets) besides its counters.
2. Scrape cost: S sequential scrapes on one keep-alive connection; prints the body size, the
   number of samples and the latency (mean, p50, p99, max).
3. Interference: C client threads send inferences round-robin over the models for T seconds,
   first with no scraper, then with a scraper thread scraping back-to-back; prints the
   inference throughput and latency p50/p99 of both runs.
It measures and never fails on a number (a broken step exits non-zero). Numbers from a loaded
machine mean little: run it on an idle one and put the results in docs/PERFORMANCE.md.

Usage: bench/bench_scrape.py --keel build-bench/keel [--models 100] [--scrapes 200]
                             [--clients 4] [--seconds 5]
"""

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = [0.708333, 1, 1, -0.320755, -0.105023, -1, 1, -0.419847, -1, -0.225806, 1, -1, 1]


def make_repo(n):
    src = os.path.join(ROOT, "examples", "models", "heart")
    d = tempfile.mkdtemp(prefix="keel-bench-scrape-")
    for i in range(n):
        name = "m%03d" % i
        shutil.copytree(src, os.path.join(d, name))
        cfg_path = os.path.join(d, name, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["name"] = name
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
    return d


def start(keel, repo):
    p = subprocess.Popen([keel, "serve", "--model-repository", repo, "--http-port", "0",
                          "--preprocess-workers", "0", "--log-level", "warn"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = p.stdout.readline().decode()
    m = re.search(r"port=(\d+)", line)
    if not m:
        p.kill()
        sys.exit("keel serve did not start: %r" % line)
    return p, int(m.group(1))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def infer_body():
    return json.dumps({"inputs": [{"name": "features", "shape": [1, 13], "datatype": "FP32",
                                   "data": ROW}]}).encode()


def load(port, models, clients, seconds, scrape):
    stop = threading.Event()
    lat = []
    lock = threading.Lock()
    scrapes = [0]

    def client(k):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = infer_body()
        i = k
        mine = []
        while not stop.is_set():
            t = time.perf_counter()
            c.request("POST", "/v2/models/%s/infer" % models[i % len(models)], body)
            r = c.getresponse()
            r.read()
            if r.status != 200:
                sys.exit("infer answered %d" % r.status)
            mine.append(time.perf_counter() - t)
            i += clients
        with lock:
            lat.extend(mine)

    def scraper():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not stop.is_set():
            c.request("GET", "/metrics")
            c.getresponse().read()
            scrapes[0] += 1

    ts = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    if scrape:
        ts.append(threading.Thread(target=scraper))
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    return len(lat) / seconds, pct(lat, 0.5), pct(lat, 0.99), scrapes[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keel", required=True)
    ap.add_argument("--models", type=int, default=100)
    ap.add_argument("--scrapes", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()

    repo = make_repo(a.models)
    proc, port = start(a.keel, repo)
    try:
        models = ["m%03d" % i for i in range(a.models)]
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for m in models:
            c.request("POST", "/v2/models/%s/infer" % m, infer_body())
            r = c.getresponse()
            r.read()
            if r.status != 200:
                sys.exit("model %s answered %d" % (m, r.status))
        times, size, samples = [], 0, 0
        for _ in range(a.scrapes):
            t = time.perf_counter()
            c.request("GET", "/metrics")
            body = c.getresponse().read()
            times.append(time.perf_counter() - t)
            size = len(body)
            samples = sum(1 for ln in body.splitlines() if ln and not ln.startswith(b"#"))
        print("models %d: scrape %d bytes, %d samples" % (a.models, size, samples))
        print("scrape latency over %d scrapes: mean %.2f ms, p50 %.2f ms, p99 %.2f ms, max "
              "%.2f ms" % (a.scrapes, statistics.mean(times) * 1e3, pct(times, 0.5) * 1e3,
                           pct(times, 0.99) * 1e3, max(times) * 1e3))
        for scrape in (False, True):
            rps, p50, p99, n = load(port, models, a.clients, a.seconds, scrape)
            print("inference, %d clients, %s: %.0f req/s, p50 %.3f ms, p99 %.3f ms%s"
                  % (a.clients, "scraping back-to-back" if scrape else "no scrapes", rps,
                     p50 * 1e3, p99 * 1e3, " (%d scrapes)" % n if scrape else ""))
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
