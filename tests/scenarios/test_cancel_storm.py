"""test_cancel_storm.py: scenario "a cancel storm" (issue 14): half of many admitted clients
hang up, nothing else is disturbed.

The slow model (2000 deep trees) gets one execution context, max_queue_size 128 and
max_batch_size 8192. A blocker request of 8192 rows occupies the context for hundreds of
milliseconds; behind it CLIENTS clients each send a one-row request on a raw socket. All of
them must be admitted (keel_live_leases = CLIENTS + 1 while the blocker still runs). Then every
other client hangs up (a reset for half of those, an orderly close for the rest). Checked:
keel_http_cancelled_requests_total{cause="client_gone"} grows by exactly the number that hung
up (the admission of each is proven by its cancellation being counted: a request that was
never admitted is not a client-gone cancel); every client that stayed gets 200 with the exact
answer; the model's success count grows by exactly the answered requests and its inference_count
by exactly their rows (the abandoned ones never ran; executions may be fewer than requests
once queued requests are batched); afterwards leases, requests and queued are 0 and the server
holds no more fds than before.
How it was checked to fail: with the client-gone cancel of a queued request disabled in
src/server/server.c (the abandoned requests run and are answered into closed sockets),
client_gone grows by 0 and success by all 41 requests.
"""

import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import kit  # noqa: E402
from kit import check  # noqa: E402

S = {}
CLIENTS = 40
BLOCKER_COPIES = 32  # heart_scale's first 256 rows, 32 times: 8192 rows


def setup():
    repo = kit.copy_repo()
    work = kit.tmpdir("keel-train-")
    slow = kit.train_slow_model(work)
    kit.add_model(repo, "slow", slow, instances=1, max_queue_size=CLIENTS + 8,
                  max_batch_size=256 * BLOCKER_COPIES)
    S["rows"] = kit.heart_rows()[:256]
    S["ref"] = kit.keel_reference(repo, "slow", S["rows"])
    S["one"] = kit.complete_rows()[:1]
    S["one_ref"] = kit.keel_reference(repo, "slow", S["one"])
    S["server"] = kit.Server(repo, args=["--max-connections", str(CLIENTS + 32)]).start()
    S["port"] = S["server"].port
    body, hdrs = kit.binary_infer_body(S["rows"])
    kit.decode_infer(kit.post(S["port"], kit.infer_path("slow"), body, headers=hdrs))
    S["fds"] = S["server"].fd_count()


def teardown():
    kit.wait_idle(S["port"], names=("keel_live_leases", "keel_live_requests", "keel_live_queued"))
    S["server"].wait_fds(S["fds"])
    S["server"].stop()


def client_gone():
    samples, _ = kit.parse_metrics(kit.scrape(S["port"]))
    vals = [v for n, labels, v in samples
            if n == "keel_http_cancelled_requests_total" and labels.get("cause") == "client_gone"]
    check(len(vals) == 1, "/metrics has no keel_http_cancelled_requests_total{cause=client_gone}")
    return vals[0]


def leases():
    return sum(kit.metric_values(kit.scrape(S["port"]), "keel_live_leases"))


def counts():
    return kit.stat_counts(kit.model_stats(S["port"], "slow"))


def one_row_request():
    body = kit.json_infer_body(S["one"])
    head = ("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n" % (kit.infer_path("slow"), len(body))).encode()
    return head + body


def test_half_of_the_admitted_hang_up():
    port = S["port"]
    kit.wait_idle(port)
    before, gone0 = counts(), client_gone()
    body, hdrs = kit.binary_infer_body(S["rows"] * BLOCKER_COPIES,
                                       params={"binary_data_output": True})
    result = {}

    def blocker():
        try:
            result["resp"] = kit.post(port, kit.infer_path("slow"), body, headers=hdrs,
                                      timeout=300)
        except Exception as e:  # reported below
            result["error"] = e
        result["t1"] = time.monotonic()

    t = threading.Thread(target=blocker, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while leases() < 1:
        check(t.is_alive() and time.monotonic() < deadline, "the blocker was never admitted")
        time.sleep(0.002)
    socks = []
    for _ in range(CLIENTS):
        s = kit.connect(port, timeout=300)
        s.sendall(one_row_request())
        socks.append(s)
    # Every client admitted while the blocker still runs.
    deadline = time.monotonic() + 60
    while leases() < CLIENTS + 1:
        check(time.monotonic() < deadline, "only %d of %d clients admitted"
              % (leases() - 1, CLIENTS))
        time.sleep(0.005)
    check(t.is_alive(), "test setup: the blocker finished before all clients were admitted")
    gone = 0
    for i, s in enumerate(socks):
        if i % 2 == 1:
            if i % 4 == 1:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            gone += 1
    t_hung = time.monotonic()
    stayed = [s for i, s in enumerate(socks) if i % 2 == 0]
    answers = []
    for s in stayed:
        r = kit.read_response(s, timeout=300, method="POST")
        s.close()
        answers.append(r)
    t.join(300)
    check(not t.is_alive() and "error" not in result, "blocker: %r" % result.get("error"))
    check(result["t1"] > t_hung, "test setup: the blocker finished before the hang-ups")
    _, vals = kit.decode_infer(result["resp"])
    kit.assert_f32_equal(vals["probability"], S["ref"] * BLOCKER_COPIES, "blocker")
    for i, r in enumerate(answers):
        check(r.status == 200, "client %d that stayed got %r" % (i, r))
        _, vals = kit.decode_infer(r)
        kit.assert_f32_equal(vals["probability"], S["one_ref"], "client %d" % i)
    kit.wait_idle(port, names=("keel_live_leases", "keel_live_requests", "keel_live_queued"))
    deadline = time.monotonic() + 10
    while client_gone() < gone0 + gone and time.monotonic() < deadline:
        time.sleep(0.05)
    after = counts()
    d_gone = client_gone() - gone0
    kit.log("  %d admitted, %d hung up: client_gone +%d, execution_count +%d, success +%d"
            % (CLIENTS, gone, d_gone, after["execution_count"] - before["execution_count"],
               after["success"] - before["success"]))
    check(d_gone == gone, "client_gone grew by %d, %d clients hung up" % (d_gone, gone))
    done = 1 + len(stayed)
    check(after["success"] - before["success"] == done,
          "success grew by %d, %d answered" % (after["success"] - before["success"], done))
    # Rows computed: the blocker's and one per client that stayed (with dynamic batching
    # executions may be fewer than requests, never more).
    d_rows = after["inference_count"] - before["inference_count"]
    want_rows = len(S["rows"]) * BLOCKER_COPIES + len(stayed)
    check(d_rows == want_rows, "inference_count grew by %d rows, the answered requests hold %d: "
          "rows of abandoned requests reached the backend" % (d_rows, want_rows))
    d_exec = after["execution_count"] - before["execution_count"]
    check(d_exec <= done, "execution_count grew by %d for %d answered requests" % (d_exec, done))


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_half_of_the_admitted_hang_up], setup=setup, teardown=teardown)
