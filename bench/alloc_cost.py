#!/usr/bin/python3
"""alloc_cost.py: server-side instructions per request of `keel serve` under callgrind, for
allocator settings given as MALLOC_CONF values (docs/PERFORMANCE.md, "RSS after unloading
everything"). Instruction counts do not depend on the machine's load, unlike wall clock.

For each setting: keel serve runs under `valgrind --tool=callgrind`
(OMP_WAIT_POLICY=PASSIVE; --preprocess-workers 0: valgrind 3.19 has no pidfd_open), the
model is loaded, WARM requests warm it up, then the counters are
zeroed (callgrind_control -z), N requests are sent one after another on one keep-alive
connection (batch 8, binary tensors, the reference model) and the counters dumped
(callgrind_control -d window); that dump's total divided by N is the figure (every server
thread included).

Usage: bench/alloc_cost.py --keel build-bench/keel --repo MODELS --model ref_i1 \\
           [--n 2000] [--conf ""] [--conf "tcache_max:16384"] ...
(an empty --conf is the compiled-in setting; each value is appended to it by jemalloc, so
later options win.) A measurement, not a test.
"""
import argparse
import glob
import http.client
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def body(rows, cols):
    rnd = random.Random(7)
    data = struct.pack("<%df" % (rows * cols), *[rnd.random() for _ in range(rows * cols)])
    head = ('{"inputs":[{"name":"features","shape":[%d,%d],"datatype":"FP32",'
            '"parameters":{"binary_data_size":%d}}],"outputs":[{"name":"probability",'
            '"parameters":{"binary_data":true}}]}' % (rows, cols, len(data))).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}


def measure(a, conf, out):
    port = free_port()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    if conf:
        env["MALLOC_CONF"] = conf
    prefix = os.path.join(out, "cg.%d" % port)
    srv = subprocess.Popen(["valgrind", "--tool=callgrind",
                            "--callgrind-out-file=" + prefix + ".%p", a.keel, "serve",
                            "--model-repository", a.repo, "--model-control-mode", "explicit",
                            "--http-port", str(port), "--grpc-port", "-1", "--log-level", "warn",
                            # valgrind 3.19 lacks pidfd_open, which the worker pool needs
                            "--preprocess-workers", "0"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(3000):
            if srv.poll() is not None:
                raise RuntimeError("keel serve exited under valgrind (status %d)" % srv.returncode)
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                c.request("GET", "/v2/health/live")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        c.request("POST", "/v2/repository/models/%s/load" % a.model, body=b"")
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError("load failed: %d" % r.status)
        b, hdrs = body(8, 20)
        path = "/v2/models/%s/infer" % a.model

        def send(n):
            for _ in range(n):
                c.request("POST", path, body=b, headers=hdrs)
                resp = c.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError("infer: %d" % resp.status)

        send(a.warm)
        subprocess.run(["callgrind_control", "-z", str(srv.pid)], check=True,
                       stdout=subprocess.DEVNULL)
        send(a.n)
        subprocess.run(["callgrind_control", "-d", "window", str(srv.pid)], check=True,
                       stdout=subprocess.DEVNULL)
    finally:
        srv.terminate()
        srv.wait(600)
    total = None
    for f in glob.glob(prefix + ".*"):
        with open(f) as fh:
            text = fh.read()
        if "desc: Trigger: Client Request: window" not in text and "window" not in text:
            continue
        m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if m:
            total = int(m.group(1))
    if total is None:
        raise RuntimeError("no callgrind dump of the window under %s" % prefix)
    return total / a.n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keel", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--warm", type=int, default=200)
    ap.add_argument("--conf", action="append", default=None)
    a = ap.parse_args()
    out = tempfile.mkdtemp(prefix="alloc-cost-")
    for conf in a.conf or [""]:
        print("MALLOC_CONF=%-40s %10.0f instructions per request" % (repr(conf),
                                                                    measure(a, conf, out)),
              flush=True)
    print("callgrind files: %s" % out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
