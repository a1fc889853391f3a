"""test_preprocess_http.py: images in, tensors out, through the real `keel serve`.

An image model (XGBoost on 4x4 grayscale images, 16 features, trained here with the xgboost
CLI) has a "preprocess" section: clients send encoded PNG/JPEG images as the BYTES input
"image" and a preprocessing worker decodes, converts to gray, halves 8x8 -> 4x4 and scales by
1/255. The same model file is served without preprocessing as "digits_raw".

- Metadata advertises the BYTES input.
- JSON (base64 strings) and binary-extension BYTES requests return exactly what the model
  returns for the reference tensor: PIL's (PNG) and djpeg's (JPEG) pixels, 2x2 block means
  (what bilinear halving with half-pixel centres computes), times float32(1/255); that tensor
  is fed to digits_raw through the server and in process (`keel infer`).
- Malformed images (truncated, random bytes, a decompression bomb, a 100k x 100k header):
  400 naming the problem; no worker is restarted.
- kill -9 of a worker while clients send images: the requests that were on it get a 500
  naming signal 9 within the deadline, everything else succeeds, a new worker runs within
  2 s, no zombie, the server's fds and memfds back to the baseline, /metrics counts the
  restart by cause and the tasks by outcome (and passes promtool).
- SIGSTOP of a worker (--preprocess-timeout-ms 1500): that request fails within its deadline
  and the worker is replaced.
- The fork server killed: /v2/health/ready and the image model's ready endpoint say 503.
"""

import base64
import json
import os
import random
import signal
import struct
import subprocess
import threading
import time
import zlib

import kit
from kit import check

S = {}
W = H = 8


def proc_children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        rest = st[st.rindex(")") + 2:].split()
        if int(rest[1]) == pid:
            out.append((int(d), rest[0]))
    return out


def forkserver_pid(server_pid):
    kids = [p for p, st in proc_children(server_pid)]
    check(len(kids) == 1, "the server should have exactly one child (the fork server): %r" % kids)
    return kids[0]


def workers(server_pid):
    fs = forkserver_pid(server_pid)
    return [p for p, st in proc_children(fs) if st != "Z"]


def zombies(server_pid):
    z = [p for p, st in proc_children(server_pid) if st == "Z"]
    for p, _ in proc_children(server_pid):
        z += [q for q, st in proc_children(p) if st == "Z"]
    return z


def memfds(pid):
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            n += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("/memfd:")
        except OSError:
            pass
    return n


def make_images(d):
    """Random 8x8 gray PNG and JPEG files (PIL); returns {name: bytes}."""
    from PIL import Image
    rnd = random.Random(7)
    out = {}
    for k in range(4):
        im = Image.new("L", (W, H))
        im.putdata([rnd.randrange(256) for _ in range(W * H)])
        for ext in ("png", "jpg"):
            p = os.path.join(d, "img%d.%s" % (k, ext))
            im.save(p, quality=90) if ext == "jpg" else im.save(p)
            with open(p, "rb") as f:
                out["img%d.%s" % (k, ext)] = f.read()
    return out


def reference_pixels(d, name, data):
    """8-bit gray pixels decoded by references keel did not write: PIL for PNG, djpeg for
    JPEG (libjpeg-turbo-progs)."""
    p = os.path.join(d, name)
    if name.endswith(".png"):
        from PIL import Image
        return list(Image.open(p).convert("L").getdata())
    r = subprocess.run(["djpeg", "-grayscale", "-pnm", p], stdout=subprocess.PIPE, check=True)
    head = r.stdout.split(b"\n", 3)
    check(head[0] == b"P5" and head[1] == b"8 8" and head[2] == b"255", "djpeg output %r"
          % r.stdout[:20])
    return list(head[3])


def reference_tensor(px):
    """Bilinear halving with half-pixel centres = 2x2 block means; then float32 scaling."""
    scale = kit.f32(1.0 / 255.0)
    out = []
    for by in range(H // 2):
        for bx in range(W // 2):
            s = sum(px[(2 * by + dy) * W + 2 * bx + dx] for dy in (0, 1) for dx in (0, 1))
            out.append(kit.f32(kit.f32(s / 4.0) * scale))
    return out


def train(d):
    rnd = random.Random(1)
    with open(os.path.join(d, "train.libsvm"), "w") as f:
        for _ in range(400):
            x = [rnd.random() for _ in range(16)]
            y = 1 if sum(x[:8]) > sum(x[8:]) else 0
            f.write("%d %s\n" % (y, " ".join("%d:%r" % (i + 1, v) for i, v in enumerate(x))))
    with open(os.path.join(d, "train.conf"), "w") as f:
        f.write('booster = gbtree\nobjective = binary:logistic\nnthread = 1\n'
                'data = "train.libsvm?format=libsvm&indexing_mode=1"\nmodel_out = "m.json"\n'
                'num_round = 20\nmax_depth = 4\n')
    p = subprocess.run([kit.xgboost_cli(), "train.conf"], cwd=d, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=300)
    check(p.returncode == 0, "xgboost training failed: %s" % p.stdout.decode()[-2000:])
    return os.path.join(d, "m.json")


def add(repo, name, model, preprocess):
    cfg = {"name": name, "backend": "xgboost", "max_batch_size": 8,
           "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [16]}],
           "output": [{"name": "probability", "data_type": "TYPE_FP32", "dims": [1]}],
           "instance_group": [{"count": 2, "kind": "KIND_CPU"}]}
    if preprocess:
        cfg["preprocess"] = {"input": "image", "output_input": "features", "format": "auto",
                             "color": "GRAY", "width": 4, "height": 4, "layout": "NCHW",
                             "scale": 1.0 / 255.0, "mean": [0.0], "std": [1.0],
                             "max_pixels": 1000000}
    os.makedirs(os.path.join(repo, name, "1"))
    with open(os.path.join(repo, name, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(model, "rb") as f, open(os.path.join(repo, name, "1", "model.json"), "wb") as g:
        g.write(f.read())


def json_images(images):
    return json.dumps({"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                                   "data": [base64.b64encode(b).decode() for b in images]}]}
                      ).encode()


def binary_images(images):
    data = b"".join(struct.pack("<I", len(b)) + b for b in images)
    head = json.dumps({"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(data)}}]}).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}


def probs(resp):
    _, outs = kit.decode_infer(resp)
    return outs["probability"]


def infer_images(port, images, binary=False, timeout=30):
    if binary:
        body, hdrs = binary_images(images)
        return kit.post(port, kit.infer_path("digits"), body, headers=hdrs, timeout=timeout)
    return kit.post(port, kit.infer_path("digits"), json_images(images), timeout=timeout)


def setup():
    d = kit.tmpdir("keel-pp-")
    S["dir"] = d
    model = train(d)
    repo = os.path.join(d, "models")
    os.makedirs(repo)
    add(repo, "digits", model, True)
    add(repo, "digits_raw", model, False)
    S["repo"] = repo
    S["images"] = make_images(d)
    S["names"] = sorted(S["images"])
    S["tensors"] = {n: reference_tensor(reference_pixels(d, n, S["images"][n]))
                    for n in S["names"]}
    S["ref"] = kit.keel_reference(repo, "digits_raw", [S["tensors"][n] for n in S["names"]])
    S["server"] = kit.Server(repo, ["--preprocess-timeout-ms", "1500",
                                         "--preprocess-max-bytes", "1m"]).start()
    S["port"] = S["server"].port
    check(probs(infer_images(S["port"], [S["images"][S["names"][0]]])) is not None, "warm-up")
    S["fds"] = S["server"].fd_count()


def teardown():
    kit.wait_idle(S["port"])
    S["server"].wait_fds(S["fds"])
    pid = S["server"].proc.pid
    family = [p for p, _ in proc_children(pid)]
    for p in list(family):
        family += [q for q, _ in proc_children(p)]
    S["server"].stop()
    left = [p for p in family if os.path.exists("/proc/%d" % p)]
    check(not left, "processes left after shutdown: %r" % left)


def test_metadata_shows_bytes_input():
    doc = kit.get(S["port"], "/v2/models/digits").json()
    ins = {i["name"]: i for i in doc["inputs"]}
    check(ins.get("image", {}).get("datatype") == "BYTES", "metadata inputs: %r" % doc["inputs"])


def test_images_equal_reference_tensor():
    port = S["port"]
    imgs = [S["images"][n] for n in S["names"]]
    raw = json.dumps({"inputs": [{"name": "features", "shape": [len(imgs), 16], "datatype": "FP32",
                                  "data": [x for n in S["names"] for x in S["tensors"][n]]}]})
    want_server = probs(kit.post(port, kit.infer_path("digits_raw"), raw.encode()))
    kit.assert_f32_equal(want_server, S["ref"], "digits_raw over HTTP vs keel infer")
    got_json = probs(infer_images(port, imgs))
    kit.assert_f32_equal(got_json, S["ref"], "JSON base64 images vs the reference tensor")
    got_bin = probs(infer_images(port, imgs, binary=True))
    kit.assert_f32_equal(got_bin, S["ref"], "binary BYTES images vs the reference tensor")
    # The decoded tensor may be sent to the image model directly, too.
    direct = probs(kit.post(port, kit.infer_path("digits"), raw.encode()))
    kit.assert_f32_equal(direct, S["ref"], "a decoded tensor sent to the image model")


def png_header(w, h):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def bomb():
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    w = h = 6000  # 36 M gray pixels in ~35 KB
    raw = zlib.compress(b"\0" * ((w + 1) * h), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def restarts(port):
    vals = kit.metric_values(kit.scrape(port), "keel_preprocess_worker_restarts_total")
    return sum(vals)


def test_malformed_images_are_400():
    port = S["port"]
    r0 = restarts(port)
    jpg = S["images"]["img0.jpg"]
    rnd = bytes(random.Random(3).randrange(256) for _ in range(3000))
    cases = [("truncated JPEG", jpg[: len(jpg) // 2], "JPEG"),
             ("random bytes", rnd, "not a JPEG or PNG"),
             ("JPEG signature then garbage", b"\xff\xd8\xff" + rnd, "JPEG"),
             ("100k x 100k header", png_header(100000, 100000), "100000x100000"),
             ("decompression bomb", bomb(), "6000x6000 = 36000000 pixels, more than the limit"),
             ("empty", b"", "empty image")]
    for what, data, words in cases:
        for binary in (False, True):
            resp = infer_images(port, [S["images"]["img1.png"], data], binary=binary)
            check(resp.status == 400, "%s: status %d, want 400: %r" % (what, resp.status, resp))
            msg = resp.error_message()
            check(words in msg and "image 1" in msg, "%s: message %r lacks %r" % (what, msg, words))
    check(restarts(port) == r0, "a malformed image restarted a worker")
    # Over --preprocess-max-bytes (1m): refused before any worker sees it.
    big = infer_images(port, [b"\xff\xd8\xff" + b"\0" * (1 << 20)], binary=True)
    check(big.status == 400 and "exceeds the limit of 1048576 bytes" in big.error_message(),
          "an over-limit request: %r" % big)


def load_clients(port, stop, results, n=3):
    imgs = [S["images"][k] for k in S["names"][:2]]
    ref = [S["ref"][S["names"].index(k)] for k in S["names"][:2]]
    lock = threading.Lock()

    def client():  # one request; kit.Worker repeats it and keeps what it raises
        t0 = time.monotonic()
        resp = infer_images(port, imgs)
        el = time.monotonic() - t0
        if resp.status == 200:
            kit.assert_f32_equal(probs(resp), ref, "an answer under load")
        with lock:
            if resp.status == 200:
                results["ok"] += 1
            else:
                results["err"].append((resp.status, resp.error_message(), el))
    return kit.start_workers(client, stop, n)


def test_kill9_worker_under_load():
    port, pid = S["port"], S["server"].proc.pid
    before = workers(pid)
    check(len(before) == 2, "2 workers expected, found %r" % before)
    r0 = restarts(port)
    stop = threading.Event()
    results = {"ok": 0, "err": []}
    ts = load_clients(port, stop, results)
    time.sleep(0.5)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    after = None
    while time.monotonic() - t_kill < 2.0:
        w = workers(pid)
        if len(w) == 2 and victim not in w:
            after = w
            break
        time.sleep(0.01)
    check(after is not None, "no replacement within 2 s of kill -9: %r" % workers(pid))
    time.sleep(0.5)
    stop.set()
    kit.join_workers(ts)  # a wrong answer or a transport error in a client fails here
    check(results["ok"] > 0, "no request succeeded under load")
    for status, msg, el in results["err"]:
        check(status == 500 and "signal 9" in msg, "unexpected failure %d %r" % (status, msg))
        check(el < 1.5 + 1.0, "a failed request took %.2fs" % el)
    check(len(results["err"]) <= 1, "more than the killed worker's request failed: %r"
          % results["err"])
    check(restarts(port) == r0 + 1, "restarts %s, want %s" % (restarts(port), r0 + 1))
    check(not zombies(pid), "zombies: %r" % zombies(pid))
    kit.wait_idle(port)
    S["server"].wait_fds(S["fds"])
    check(memfds(pid) == 0, "memfds left open: %d" % memfds(pid))
    text = kit.scrape(port)
    kit.promtool_check(text, "the scrape after kill -9 of a worker")
    m = {(n, tuple(sorted(l.items()))): v for n, l, v in kit.parse_metrics(text)[0]}
    check(m.get(("keel_preprocess_workers_alive", ())) == 2, "workers_alive metric")
    check(m.get(("keel_preprocess_memfds_open", ())) == 0, "memfds_open metric")
    check(m.get(("keel_preprocess_worker_restarts_total", (("cause", "signal"),)), 0) >= 1,
          "restarts by cause")
    check(m.get(("keel_preprocess_tasks_total", (("outcome", "ok"),)), 0) >= results["ok"],
          "tasks by outcome")


def test_sigstop_worker_deadline():
    port, pid = S["port"], S["server"].proc.pid
    before = workers(pid)
    for w in before:
        os.kill(w, signal.SIGSTOP)
    t0 = time.monotonic()
    resp = infer_images(port, [S["images"]["img0.png"]])
    el = time.monotonic() - t0
    check(resp.status == 503 and "deadline" in resp.error_message(), "SIGSTOPped worker: %r"
          % resp)
    check(el < 1.5 + 0.7, "the request waited %.2fs, its deadline is 1.5s" % el)
    for w in before:  # the one that was not used is woken up
        try:
            os.kill(w, signal.SIGCONT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        now = workers(pid)
        if len(now) == 2 and len(set(before) - set(now)) == 1:
            break
        time.sleep(0.02)
    check(len(now) == 2 and len(set(before) - set(now)) == 1,
          "one stopped worker should have been replaced: before %r, now %r" % (before, now))
    check(not zombies(pid), "zombies: %r" % zombies(pid))
    resp = infer_images(port, [S["images"]["img0.png"]])
    check(resp.status == 200, "after the replacement: %r" % resp)


def test_forkserver_death_makes_unready():
    # Last: the pool cannot recover from this by design (a new fork server would be forked
    # from a process that holds models and threads).
    port, pid = S["port"], S["server"].proc.pid
    check(kit.get(port, "/v2/health/ready").status == 200, "ready before")
    os.kill(forkserver_pid(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while kit.get(port, "/v2/health/ready").status != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    r = kit.get(port, "/v2/health/ready")
    check(r.status == 503 and "preprocessing" in r.error_message(), "ready after: %r" % r)
    check(kit.get(port, "/v2/models/digits/ready").status != 200, "image model still ready")
    check(kit.get(port, "/v2/models/digits_raw/ready").status == 200, "plain model not ready")
    check(not zombies(pid), "zombies: %r" % zombies(pid))
    resp = infer_images(port, [S["images"]["img0.png"]])
    check(resp.status >= 500, "an image request without workers: %r" % resp)


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_metadata_shows_bytes_input, test_images_equal_reference_tensor,
             test_malformed_images_are_400, test_kill9_worker_under_load,
             test_sigstop_worker_deadline, test_forkserver_death_makes_unready],
            setup=setup, teardown=teardown)
