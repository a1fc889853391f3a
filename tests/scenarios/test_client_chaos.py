"""test_client_chaos.py: scenario "clients that misbehave while their requests are batched"
(issue 12).

Batching changes when a connection's request is in flight: it is gathered during the loop's
turn (and the turn's extra passes run libmicrohttpd on it), handed to an inference thread
when the batch waits for a delay, or waits for a preprocessing worker. Clients that leave at
any of those moments must cost nothing but their own request. For each of three models
(heart: dynamic batching, delay 0, batches run on the HTTP thread; heart_delay: a 2 ms
batching delay, batches run on an inference thread; digits_image_b: images decoded by the
preprocessing workers, then batched) CHAOS clients loop for SECS seconds over: the headers
and part of the body, then close; several requests pipelined then close; a whole request then close at
once; then shut down writing (and maybe read a little); then read a few bytes of the answer
and close; then wait up to 2 ms and close; each closing with a reset half the time. Beside
them GOOD clients send the same request and must get 200 and exactly the answer the model
gave alone. Afterwards: the server is alive and logged no "BUG", leases, requests and queued
are 0 and it holds no more fds than before (within 10 s; --http-timeout-secs is 30).

test_body_cut_short: clients that send their headers and half of a Content-Length body and
then close (FIN, or a reset) are closed by the server at once, not at --http-timeout-secs
(libmicrohttpd 0.9.75 in epoll mode misses a FIN that comes with the last bytes it reads;
server.c's client_left peeks for it). Headers cut short are not covered: libmicrohttpd calls
no handler before they are complete, so those wait for the timeout (docs/OPERATIONS.md).
How it was checked to fail: on the tree before the ORPHANED connection state (905e0f2) the
server aborts ("BUG: connection completed while its request is in flight") in the first
phase; without client_left the connections cut short stay open (CLOSE-WAIT) and the fd
checks fail.
"""

import base64
import json
import os
import random
import shutil
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import kit  # noqa: E402
from kit import check  # noqa: E402

S = {}
SECS = 4
CHAOS = 6
GOOD = 2


def setup():
    repo = kit.copy_repo()
    cfg = kit.read_config(repo, "heart")
    cfg["name"] = "heart_delay"
    cfg["dynamic_batching"] = {"max_queue_delay_microseconds": 2000}
    shutil.copytree(os.path.join(repo, "heart"), os.path.join(repo, "heart_delay"))
    kit.write_config(repo, "heart_delay", cfg)
    cfg = kit.read_config(repo, "digits_image")
    cfg["name"] = "digits_image_b"
    cfg["dynamic_batching"] = {}
    shutil.copytree(os.path.join(repo, "digits_image"), os.path.join(repo, "digits_image_b"))
    kit.write_config(repo, "digits_image_b", cfg)
    S["server"] = kit.Server(repo, args=["--max-connections", "256"]).start()
    S["port"] = S["server"].port
    S["fds"] = S["server"].fd_count()


def teardown():
    S["server"].stop()


def request_of(model):
    """(body, headers) of one request to model."""
    if model == "digits_image_b":
        img = open(os.path.join(kit.SOURCE, "examples", "images", "2_120.jpg"), "rb").read()
        body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                       "data": [base64.b64encode(img).decode()]}]}).encode()
        return body, {"Content-Type": "application/json"}
    return kit.binary_infer_body(kit.heart_rows()[:1])


def chaos(model):
    port = S["port"]
    body, hdrs = request_of(model)
    head = "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n" % (
        kit.infer_path(model), len(body))
    head += "".join("%s: %s\r\n" % kv for kv in hdrs.items())
    raw = (head + "\r\n").encode() + body
    hlen = len(raw) - len(body)
    r = kit.post(port, kit.infer_path(model), body, headers=hdrs, timeout=60)
    check(r.status == 200, "%s alone: %r" % (model, r))
    want = r.body
    stop = time.monotonic() + SECS
    errors = []
    done = {"chaos": 0, "good": 0}
    lock = threading.Lock()

    def misbehave(k):
        rnd = random.Random(k)
        n = 0
        while time.monotonic() < stop:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                if rnd.random() < 0.5:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                what = rnd.randrange(6)
                if what == 0:
                    s.sendall(raw[:rnd.randint(hlen + 1, len(raw) - 1)])
                elif what == 1:
                    s.sendall(raw * rnd.randint(2, 4))
                elif what == 2:
                    s.sendall(raw)
                elif what == 3:
                    s.sendall(raw)
                    s.shutdown(socket.SHUT_WR)
                    if rnd.random() < 0.5:
                        s.recv(rnd.randint(1, 100))
                elif what == 4:
                    s.sendall(raw)
                    s.recv(rnd.randint(1, 50))
                else:
                    s.sendall(raw)
                    time.sleep(rnd.random() * 0.002)
                s.close()
                n += 1
            except OSError:
                pass  # the server may close first (a reset, a half request): not a failure
        with lock:
            done["chaos"] += n

    def behave(k):
        n = 0
        try:
            while time.monotonic() < stop:
                r = kit.post(port, kit.infer_path(model), body, headers=hdrs, timeout=60)
                check(r.status == 200, "a good client got %r" % r)
                check(r.body == want, "a good client got another answer: %r" % kit.short(r.body))
                n += 1
        except Exception as e:  # reported below
            errors.append("good client %d: %r" % (k, e))
        with lock:
            done["good"] += n

    ts = [threading.Thread(target=misbehave, args=(k,)) for k in range(CHAOS)]
    ts += [threading.Thread(target=behave, args=(k,)) for k in range(GOOD)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    kit.log("  %s: %d misbehaving requests, %d good answers" % (model, done["chaos"],
                                                                done["good"]))
    check(not errors, "; ".join(errors[:3]))
    check(done["chaos"] > 50 and done["good"] > 5, "too little traffic: %r" % done)
    kit.wait_idle(port, names=("keel_live_leases", "keel_live_requests", "keel_live_queued"))
    S["server"].wait_fds(S["fds"])
    with open(S["server"].stderr_path, "rb") as f:
        log = f.read()
    check(b"BUG" not in log, "the server logged a BUG")


def test_batched_on_the_http_thread():
    chaos("heart")


def test_batched_after_a_delay():
    chaos("heart_delay")


def test_batched_after_preprocessing():
    chaos("digits_image_b")


def test_body_cut_short():
    port = S["port"]
    body, hdrs = request_of("heart")
    head = "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n" % (
        kit.infer_path("heart"), len(body))
    head += "".join("%s: %s\r\n" % kv for kv in hdrs.items())
    raw = (head + "\r\n").encode() + body[:len(body) // 2]
    kit.wait_idle(port)
    base = S["server"].fd_count()
    # Closed right after the send, so that the FIN travels with the bytes (the case
    # libmicrohttpd misses), and half of them held open until all were sent (a FIN of its
    # own).
    held = []
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 4 >= 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(raw)
        if i % 2:
            held.append(s)
        else:
            s.close()
    time.sleep(0.2)
    for s in held:
        s.close()
    S["server"].wait_fds(base, timeout=3)
    r = kit.post(port, kit.infer_path("heart"), body, headers=hdrs)
    check(r.status == 200, "the next request: %r" % r)


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_batched_on_the_http_thread, test_batched_after_a_delay,
             test_batched_after_preprocessing, test_body_cut_short], setup=setup,
            teardown=teardown)
