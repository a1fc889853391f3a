"""test_exit_timeout.py: scenario "forced exit when --exit-timeout-secs expires with stuck
requests" (issue 14).

The slow model (2000 deep trees) gets one execution context. A blocker request of BLOCKER
rows runs for well over a second; behind it QUEUED one-row requests wait for the context.
Then SIGTERM, with --shutdown-grace-secs 0 and --exit-timeout-secs 1. Checked:
  - the log says "exit timeout: cancelling requests in flight" with in_flight equal to the
    requests then in flight (the blocker and the queued ones), and "drained" with cancelled
    equal to the number of requests cancelled;
  - every queued request gets 503 after the exit timeout (not before: they are drained first)
    and before the server exits (cancelled, not run: the model's only context is busy);
  - the blocker, already running, is answered too at the exit timeout (issue 14's point 2:
    a cancel detaches a running request), 503 "cancelled at the exit timeout", while its
    backend call goes on;
  - the server exits 0, with no sanitizer report, once the blocker's call returns (the
    runtime's stop waits for it: well after the exit timeout), and no request is lost (every
    client got a response).
Second test, a model call that never returns (fault point backend_hang: the run blocks for
good; fault-injection builds, i.e. every build the tests run in), --exit-timeout-secs 1,
--stuck-exit-secs STUCK_EXIT:
  - on an inference thread (--infer-on-io-thread off): the request is answered 503 at the
    exit timeout, and the process exits with status 3 STUCK_EXIT seconds after the exit
    timeout, logging "stuck exit" with contexts_stuck=1 in_flight=0 (the teardown would
    otherwise wait forever for the call: keel_runtime_destroy cannot free a model a backend
    thread is inside);
  - on the I/O thread (--infer-on-io-thread on): the call wedges that HTTP thread, so its
    connection's answer can never be written (the client sees the connection close at the
    exit) and the drain cannot end (in_flight=1, contexts_stuck=-1: no snapshot); the exit is
    bounded the same way.
How it was checked to fail (second test): with the guard not started in keel_server_run,
the server never exits (the test's wait times out).
How it was checked to fail: with the exit-timeout cancel in src/server/server.c turned into a
wait (s->cancel_all never set), nothing is cancelled: the blocker gets 200 and the queued
requests run after it. With detach_locked in src/runtime/sched.c returning false (a running
request is not answered at a cancel), the blocker is answered only when its call returns.
"""

import os
import re
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import kit  # noqa: E402
from kit import check  # noqa: E402

S = {}
QUEUED = 6
BLOCKER_COPIES = 512  # heart_scale's first 256 rows, 512 times: 131072 rows, seconds of work
EXIT_TIMEOUT = 1
STUCK_EXIT = 2


def setup():
    repo = kit.copy_repo()
    work = kit.tmpdir("keel-train-")
    slow = kit.train_slow_model(work)
    kit.add_model(repo, "slow", slow, instances=1, max_queue_size=QUEUED + 8,
                  max_batch_size=256 * BLOCKER_COPIES)
    S["repo"] = repo
    S["rows"] = kit.heart_rows()[:256]
    S["one"] = kit.complete_rows()[:1]


def post_in_thread(port, body, hdrs, out, key):
    return kit.post_in_thread(port, kit.infer_path("slow"), body, hdrs, out, key)


def log_field(text, msg, field):
    m = re.search(r'msg=(?:"%s"|%s )[^\n]*\b%s=(\d+)' % (re.escape(msg), re.escape(msg), field),
                  text)
    return int(m.group(1)) if m else None


def test_stuck_requests_at_the_exit_timeout():
    # --stuck-exit-secs: the blocker's call returns, only late (seconds; more under TSan).
    srv = kit.Server(S["repo"], args=["--shutdown-grace-secs", "0", "--exit-timeout-secs",
                                      str(EXIT_TIMEOUT), "--stuck-exit-secs", "600",
                                      "--log-level", "info"]).start()
    port = srv.port
    try:
        out = {}
        body, hdrs = kit.binary_infer_body(S["rows"] * BLOCKER_COPIES,
                                           params={"binary_data_output": True})
        blocker = post_in_thread(port, body, hdrs, out, "blocker")
        deadline = time.monotonic() + 60
        while sum(kit.metric_values(kit.scrape(port), "keel_live_contexts_in_use")) < 1:
            check(blocker.is_alive() and time.monotonic() < deadline, "the blocker never ran")
            time.sleep(0.002)
        one, one_hdrs = kit.binary_infer_body(S["one"])
        queued = [post_in_thread(port, one, one_hdrs, out, "q%d" % i) for i in range(QUEUED)]
        deadline = time.monotonic() + 60
        while sum(kit.metric_values(kit.scrape(port), "keel_live_queued")) < QUEUED:
            check(time.monotonic() < deadline, "the queued requests were never all queued")
            time.sleep(0.005)
        t_term = time.monotonic()
        srv.signal(signal.SIGTERM)
        for t in queued:
            t.join(120)
        blocker.join(600)
        rc = srv.wait(600)
        t_exit = time.monotonic()
        check(rc is not None, "the server did not exit after the blocker returned")
        srv.check_exit(0)
    except BaseException:
        srv.kill()
        raise
    text = srv.stderr_text()
    check(not isinstance(out["blocker"], Exception), "blocker: %r" % out["blocker"])
    t_block = out["blocker_t"]
    kit.log("  blocker answered %.2fs, server exited %.2fs after SIGTERM (exit timeout %ds)"
            % (t_block - t_term, t_exit - t_term, EXIT_TIMEOUT))
    check(t_exit - t_term > EXIT_TIMEOUT + 0.3, "test setup: the server exited %.2fs after "
          "SIGTERM: the blocker's call did not outlast the exit timeout" % (t_exit - t_term))
    check(out["blocker"].status == 503 and b"cancelled at the exit timeout" in out["blocker"].body,
          "the running blocker got %r" % out["blocker"])
    check(EXIT_TIMEOUT - 0.05 <= t_block - t_term < EXIT_TIMEOUT + 1.5,
          "the running blocker was answered %.2fs after SIGTERM, not at the exit timeout"
          % (t_block - t_term))
    for i in range(QUEUED):
        r, t = out["q%d" % i], out["q%d_t" % i]
        check(not isinstance(r, Exception), "queued request %d: %r (lost)" % (i, r))
        check(r.status == 503, "queued request %d got %r, not 503" % (i, r))
        check(t - t_term >= EXIT_TIMEOUT - 0.05, "queued request %d answered %.2fs after SIGTERM, "
              "before the exit timeout" % (i, t - t_term))
        check(t < t_exit, "queued request %d answered after the server exited" % i)
    in_flight = log_field(text, "exit timeout: cancelling requests in flight", "in_flight")
    check(in_flight == QUEUED + 1, "exit-timeout log line: in_flight=%r, expected %d; log:\n%s"
          % (in_flight, QUEUED + 1, kit.short(text, 3000)))
    cancelled = log_field(text, "drained", "cancelled")
    check(cancelled == QUEUED + 1,
          "drained log line: cancelled=%r, expected %d" % (cancelled, QUEUED + 1))
    kit.log("  log: in_flight=%d cancelled=%d" % (in_flight, cancelled))


def hung_call(inline):
    env = dict(os.environ, KEEL_FAULT="backend_hang")
    # The stuck exit ends the process with threads never joined, on purpose (a worker may be
    # inside the hung call); ThreadSanitizer would report the ones that had finished.
    tsan = env.get("TSAN_OPTIONS", "")
    env["TSAN_OPTIONS"] = (tsan + ":" if tsan else "") + "report_thread_leaks=0"
    srv = kit.Server(S["repo"], env=env,
                     args=["--shutdown-grace-secs", "0", "--exit-timeout-secs", str(EXIT_TIMEOUT),
                           "--stuck-exit-secs", str(STUCK_EXIT), "--log-level", "info",
                           "--infer-on-io-thread", "on" if inline else "off"]).start()
    port = srv.port
    try:
        out = {}
        one, one_hdrs = kit.binary_infer_body(S["one"])
        t = kit.post_in_thread(port, kit.infer_path("slow"), one, one_hdrs, out, "hung",
                               timeout=120)
        if inline:
            time.sleep(1.0)  # its HTTP thread is the one that hangs: no /metrics from it
        else:
            deadline = time.monotonic() + 60
            while sum(kit.metric_values(kit.scrape(port), "keel_live_contexts_in_use")) < 1:
                check(time.monotonic() < deadline, "the request never ran")
                time.sleep(0.01)
        check(t.is_alive(), "the hung request was answered before the shutdown: %r"
              % out.get("hung"))
        t_term = time.monotonic()
        srv.signal(signal.SIGTERM)
        rc = srv.wait(60)
        t_exit = time.monotonic()
        check(rc is not None, "the server did not exit within 60 s of SIGTERM with a hung call")
        srv.check_exit(3)
        t.join(30)
    except BaseException:
        srv.kill()
        raise
    text = srv.stderr_text()
    r = out.get("hung")
    kit.log("  %s: exit %d %.2fs after SIGTERM; the request got %r"
            % ("I/O thread" if inline else "inference thread", rc, t_exit - t_term, r))
    check(EXIT_TIMEOUT + STUCK_EXIT - 0.1 <= t_exit - t_term < EXIT_TIMEOUT + STUCK_EXIT + 5,
          "exited %.2fs after SIGTERM, not at exit timeout + stuck exit (%d s)"
          % (t_exit - t_term, EXIT_TIMEOUT + STUCK_EXIT))
    m = re.search(r'msg="stuck exit: model calls still running after the exit timeout; exiting '
                  r'without waiting for them or freeing the runtime" contexts_stuck=(-?\d+) '
                  r'in_flight=(\d+)', text)
    check(m is not None, "no stuck exit log line; log:\n%s" % kit.short(text, 3000))
    # On an inference thread the drain ends (the request is answered) with its context stuck;
    # on the I/O thread it cannot end (-1: no snapshot), the request still in flight.
    want = (-1, 1) if inline else (1, 0)
    check((int(m.group(1)), int(m.group(2))) == want, "stuck exit log line: contexts_stuck=%s "
          "in_flight=%s, expected %d and %d" % (m.group(1), m.group(2), want[0], want[1]))
    if not inline:
        check(not isinstance(r, Exception) and r.status == 503 and
              b"cancelled at the exit timeout" in r.body, "the hung request got %r" % (r,))
        check(out["hung_t"] - t_term < EXIT_TIMEOUT + 1.5, "the hung request was answered "
              "%.2fs after SIGTERM, not at the exit timeout" % (out["hung_t"] - t_term))
    else:
        check(isinstance(r, Exception), "a request whose I/O thread hangs got an answer: %r"
              % (r,))


def test_hung_call_on_an_inference_thread():
    hung_call(False)


def test_hung_call_on_the_io_thread():
    hung_call(True)


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_stuck_requests_at_the_exit_timeout, test_hung_call_on_an_inference_thread,
             test_hung_call_on_the_io_thread], setup=setup)
