"""test_disconnect.py: a client that hangs up while its request is queued costs no backend call.

A slow model (2000 deep trees) gets one execution context and max_batch_size 8192. A
"blocker" request of 8192 rows (hundreds of milliseconds of backend time) occupies that
context; while it runs, other clients send a one-row request on a raw socket and hang up
10 ms later, so their requests are surely waiting in the queue behind the blocker. The test
checks that the blocker was still running when the last client hung up (else it cannot tell
queued from running, and says so). Afterwards the model's execution_count and success count
must have grown by exactly the number of 200 answers clients received: the abandoned
requests never ran. Done with a reset (SO_LINGER 0) and with an orderly close (FIN), and with
several queued requests behind the blocker. The same setup checks Triton's "timeout" request
parameter: a request whose deadline passes in the queue gets an error naming the timeout and
never reaches the backend, while a generous timeout changes nothing."""

import socket
import struct
import threading
import time

import kit
from kit import check

S = {}
ABANDONED = 3
HANGUP_DELAY = 0.01
BLOCKER_COPIES = 32  # the blocker is heart_scale's first 256 rows, 32 times: 8192 rows


def setup():
    repo = kit.copy_repo()
    work = kit.tmpdir("keel-train-")
    slow = kit.train_slow_model(work)
    kit.add_model(repo, "slow", slow, instances=1, max_queue_size=64,
                  max_batch_size=256 * BLOCKER_COPIES)
    S["rows"] = kit.heart_rows()[:256]
    S["ref"] = kit.keel_reference(repo, "slow", S["rows"])
    S["one"] = kit.complete_rows()[:1]
    S["one_ref"] = kit.keel_reference(repo, "slow", S["one"])
    S["server"] = kit.Server(repo).start()
    S["port"] = S["server"].port
    body, hdrs = kit.binary_infer_body(S["rows"])
    kit.decode_infer(kit.post(S["port"], kit.infer_path("slow"), body, headers=hdrs))
    S["fds"] = S["server"].fd_count()


def teardown():
    kit.wait_idle(S["port"])
    S["server"].wait_fds(S["fds"])  # hung-up connections all closed
    S["server"].stop()


def settled_counts(timeout=10):
    """Statistics once they stop changing (two equal reads 0.3 s apart)."""
    deadline = time.monotonic() + timeout
    last = kit.stat_counts(kit.model_stats(S["port"], "slow"))
    while True:
        time.sleep(0.3)
        cur = kit.stat_counts(kit.model_stats(S["port"], "slow"))
        if cur == last or time.monotonic() > deadline:
            return cur
        last = cur


def one_row_request(params=None):
    body = kit.json_infer_body(S["one"], params=params)
    head = ("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n" % (kit.infer_path("slow"), len(body))).encode()
    return head + body


def while_blocked(action, sent_within=None):
    """Runs action() while a blocker request occupies the slow model's only context.
    action returns the number of 200 answers it received. The blocker must still be running
    when action returns or, for actions that wait for answers queued behind the blocker,
    sent_within seconds after action started (it sends everything within that time).
    Returns (blocker seconds, answered 200s including the blocker's, statistics before,
    statistics after settling)."""
    port = S["port"]
    kit.wait_idle(port)
    before = settled_counts()
    body, hdrs = kit.binary_infer_body(S["rows"] * BLOCKER_COPIES,
                                       params={"binary_data_output": True})
    result = {}

    def blocker():
        t0 = time.monotonic()
        try:
            r = kit.post(port, kit.infer_path("slow"), body, headers=hdrs, timeout=120)
            result["resp"] = r
        except Exception as e:
            result["error"] = e
        result["t0"], result["t1"] = t0, time.monotonic()

    t = threading.Thread(target=blocker, daemon=True)
    t.start()
    # Wait until the blocker is admitted (keel_live_leases counts admitted requests): the
    # queue was empty, so it runs first and everything sent from now on queues behind it.
    deadline = time.monotonic() + 30
    while sum(kit.metric_values(kit.scrape(port), "keel_live_leases")) < 1:
        check(t.is_alive() and time.monotonic() < deadline,
              "the blocker request was never seen admitted (%r)" % result)
        time.sleep(0.002)
    t_action = time.monotonic()
    extra = action()
    t_action_end = time.monotonic() if sent_within is None else t_action + sent_within
    t.join(120)
    check(not t.is_alive(), "the blocker request did not finish within 120s")
    check("error" not in result, "blocker request failed: %r" % result.get("error"))
    _, vals = kit.decode_infer(result["resp"])
    kit.assert_f32_equal(vals["probability"], S["ref"] * BLOCKER_COPIES, "blocker")
    check(result["t1"] > t_action_end, "test setup: the blocker (%.3fs) finished before the "
          "hang-ups were done, so they may not have been queued" % (result["t1"] - result["t0"]))
    kit.wait_idle(port)
    return result["t1"] - result["t0"], 1 + extra, before, settled_counts()


def check_executions(what, blocked, done, before, after, skipped):
    d_exec = after["execution_count"] - before["execution_count"]
    d_succ = after["success"] - before["success"]
    kit.log("  %s: blocker ran %.3fs; %d answers, execution_count +%d, success +%d, fail +%d"
            % (what, blocked, done, d_exec, d_succ, after["fail"] - before["fail"]))
    check(d_succ == done, "success count grew by %d, clients received %d x 200 (%s request "
          "ran to completion)" % (d_succ, done, skipped))
    # Rows computed: the blocker's and one per other answered request (heart batches, so
    # executions may be fewer than requests, never more).
    d_rows = after["inference_count"] - before["inference_count"]
    want_rows = len(S["rows"]) * BLOCKER_COPIES + (done - 1)
    check(d_rows == want_rows, "inference_count grew by %d rows, the %d answered requests "
          "hold %d: %d rows of %s requests reached the backend"
          % (d_rows, done, want_rows, d_rows - want_rows, skipped))
    check(d_exec <= done, "execution_count grew by %d for %d answered requests" % (d_exec, done))


def hang_up(reset):
    s = kit.connect(S["port"])
    s.sendall(one_row_request())
    time.sleep(HANGUP_DELAY)
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def phase(reset):
    def action():
        for _ in range(ABANDONED):
            hang_up(reset)
            time.sleep(0.02)
        return 0

    blocked, done, before, after = while_blocked(action)
    check_executions("reset" if reset else "close", blocked, done, before, after,
                     "abandoned (client hung up while queued)")


def test_hangup_with_reset_while_queued():
    phase(reset=True)


def test_hangup_with_close_while_queued():
    phase(reset=False)


def test_hangup_between_queued_requests():
    """Queue: blocker, kept request, abandoned, kept request: only the abandoned one is
    skipped, the others are answered in full."""
    answers = []
    lock = threading.Lock()

    def kept():
        try:
            r = kit.post(S["port"], kit.infer_path("slow"), one_row_request().split(
                b"\r\n\r\n", 1)[1], headers={"Content-Type": "application/json"}, timeout=120)
            _, vals = kit.decode_infer(r)
            ok = kit.same_f32(vals["probability"], S["one_ref"])
        except Exception as e:
            ok = repr(e)
        with lock:
            answers.append(ok)

    def action():
        ts = []
        for i in range(2):
            ts.append(threading.Thread(target=kept, daemon=True))
            ts[-1].start()
            time.sleep(0.02)
            if i == 0:
                hang_up(reset=False)
                time.sleep(0.02)
        for t in ts:
            t.join(120)
        return sum(1 for a in answers if a is True)

    # The kept requests wait for the blocker, so action() returns after it; everything was
    # sent within ~0.1 s.
    blocked, done, before, after = while_blocked(action, sent_within=0.1)
    check(answers == [True, True], "the queued requests around the abandoned one: %r" % answers)
    check_executions("between", blocked, done, before, after, "abandoned")


def test_timeout_parameter_expires_in_queue():
    """Triton's "timeout" request parameter (microseconds): a request whose deadline passes
    while it is queued is answered with an error naming the timeout and never runs."""
    answers = []

    def action():
        s = kit.connect(S["port"])
        try:
            s.sendall(one_row_request({"timeout": 20000}))  # 20 ms, the blocker runs longer
            answers.append(kit.read_response(s, timeout=120))
        finally:
            s.close()
        return 0

    # The expired request is answered only when it is dequeued, after the blocker.
    blocked, done, before, after = while_blocked(action, sent_within=0.03)
    r = answers[0]
    check(r is not None and r.status in (408, 503, 504),
          "timeout 20 ms behind a %.3fs request: expected 503 (or 408/504), got %r"
          % (blocked, r))
    msg = r.error_message().lower()
    check(any(w in msg for w in ("timeout", "timed out", "deadline", "expired")),
          "the expired request's error %r does not say it timed out" % msg)
    check_executions("timeout", blocked, done, before, after, "expired")


def test_generous_timeout_changes_nothing():
    r = kit.post(S["port"], kit.infer_path("slow"), kit.json_infer_body(
        S["one"], params={"timeout": 30000000}))
    _, vals = kit.decode_infer(r)
    kit.assert_f32_equal(vals["probability"], S["one_ref"], "timeout 30 s")


def test_still_serving():
    body, hdrs = kit.binary_infer_body(S["rows"])
    r = kit.post(S["port"], kit.infer_path("slow"), body, headers=hdrs)
    _, vals = kit.decode_infer(r)
    kit.assert_f32_equal(vals["probability"], S["ref"], "slow after the hang-ups")


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_hangup_with_reset_while_queued, test_hangup_with_close_while_queued,
             test_hangup_between_queued_requests, test_timeout_parameter_expires_in_queue,
             test_generous_timeout_changes_nothing, test_still_serving],
            setup=setup, teardown=teardown)
