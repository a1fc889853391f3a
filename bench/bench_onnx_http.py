#!/usr/bin/python3
"""bench_onnx_http.py: latency per inference and memory per context of an onnx model served
by `keel serve`, measured from a client.

  bench_onnx_http.py KEEL MODEL.onnx INSTANCES ITERS

Starts `keel serve` on a temp repository holding MODEL.onnx as model "m" (inputs and outputs
from the file, max_batch_size 8, instance_count INSTANCES), and prints one line:
  rss_loaded_kb rss_touched_kb p50_us p99_us
rss_* is the server's VmRSS after the load and after INSTANCES client threads sent 50
requests each at once (every context has run). Latency: ITERS sequential requests of batch 1
over one keep-alive connection, binary tensor extension for input and output, timed in this
client (Python's http.client adds its own cost: compare with the in-process numbers of
bench_onnx, not with a C client). Standard library only.
"""

import http.client
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time


def graph_input(model):
    """(name, dims) of the first graph input, parsed as in tests/integration/test_onnx_http."""
    def varint(b, i):
        v = s = 0
        while True:
            c = b[i]
            i += 1
            v |= (c & 0x7F) << s
            if not c & 0x80:
                return v, i
            s += 7

    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            num, wt = key >> 3, key & 7
            if wt == 0:
                v, i = varint(buf, i)
            elif wt == 2:
                n, i = varint(buf, i)
                v = buf[i:i + n]
                i += n
            elif wt == 5:
                v, i = None, i + 4
            else:
                v, i = None, i + 8
            yield num, v

    with open(model, "rb") as f:
        b = f.read()
    graph = next(v for n, v in fields(b) if n == 7)
    inits = {next((v.decode() for n, v in fields(t) if n == 8), "")
             for n, t in fields(graph) if n == 5}
    for n, vi in fields(graph):
        if n != 11:
            continue
        name = next(v.decode() for k, v in fields(vi) if k == 1)
        if name in inits:
            continue
        tt = next(v for k, v in fields(next(v for k, v in fields(vi) if k == 2)) if k == 1)
        shape = next(v for k, v in fields(tt) if k == 2)
        dims = []
        for k, d in fields(shape):
            dv = [v for kk, v in fields(d) if kk == 1]
            dims.append(dv[0] if dv else 1)
        return name, dims
    raise SystemExit("no graph input")


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def main():
    keel, model, instances, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    d = tempfile.mkdtemp(prefix="keel-bench-onnx-http-")
    repo = os.path.join(d, "models")
    os.makedirs(os.path.join(repo, "m", "1"))
    shutil.copyfile(model, os.path.join(repo, "m", "1", "model.onnx"))
    with open(os.path.join(repo, "m", "config.json"), "w") as f:
        json.dump({"name": "m", "backend": "onnx", "max_batch_size": 8,
                   "instance_group": [{"count": instances, "kind": "KIND_CPU"}]}, f)
    name, dims = graph_input(model)
    dims[0] = 1
    n = 1
    for x in dims:
        n *= x
    data = struct.pack("<%df" % n, *[(i * 2654435761 % 1000) / 1000.0 for i in range(n)])
    head = json.dumps({"parameters": {"binary_data_output": True},
                       "inputs": [{"name": name, "shape": dims, "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(data)}}]}).encode()
    body = head + data
    hdrs = {"Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream"}
    p = subprocess.Popen([keel, "serve", "--model-repository", repo, "--http-port", "0", "--grpc-port", "-1",
                          "--log-level", "warn"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    try:
        line = p.stdout.readline().decode()
        port = int(re.search(r"port=(\d+)", line).group(1))
        rss1 = rss_kb(p.pid)

        def client(k):
            c = http.client.HTTPConnection("127.0.0.1", port)
            for _ in range(k):
                c.request("POST", "/v2/models/m/infer", body, hdrs)
                r = c.getresponse()
                r.read()
                assert r.status == 200, r.status
            c.close()

        ts = [threading.Thread(target=client, args=(50,)) for _ in range(instances)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        rss2 = rss_kb(p.pid)
        c = http.client.HTTPConnection("127.0.0.1", port)
        lat = []
        for i in range(iters + iters // 10):
            t0 = time.perf_counter()
            c.request("POST", "/v2/models/m/infer", body, hdrs)
            r = c.getresponse()
            r.read()
            if r.status != 200:
                raise SystemExit("HTTP %d" % r.status)
            if i >= iters // 10:
                lat.append((time.perf_counter() - t0) * 1e6)
        c.close()
        lat.sort()
        print("%d %d %.1f %.1f" % (rss1, rss2, lat[len(lat) // 2], lat[len(lat) * 99 // 100]))
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(60)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
