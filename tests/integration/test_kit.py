"""test_kit.py: the test kit's own checks fail when they should.

The integration tests lean on three helpers of kit.py whose failure modes once went unseen:
- kit.promtool_check must fail the test when promtool rejects a scrape (its verdict used to be
  returned and was dropped by a caller);
- kit.join_workers must fail the test from the main thread when a client thread raised (a
  failed check inside a thread died with the thread) or when one is still running (a request
  that never came back);
- a scrape keel really serves passes promtool (so the first check is not simply always false).
No server is needed except for the last one."""

import threading
import time

import kit
from kit import check


def raises_failure(fn):
    """The TestFailure message fn() raised, or None if it returned."""
    try:
        fn()
    except kit.TestFailure as e:
        return str(e)
    return None


def test_promtool_rejection_fails():
    bad = "# TYPE x counter\nx_total{a=\"1\"} 1\nx_total{a=\"1\"} 2\n"  # a duplicate series
    msg = raises_failure(lambda: kit.promtool_check(bad, "a duplicated series"))
    check(msg is not None, "promtool_check accepted a scrape promtool rejects")
    check("a duplicated series" in msg, "the failure does not say which scrape: %r" % msg)


def test_promtool_accepts_keel_scrape():
    repo = kit.example_repo()
    with kit.running(kit.Server(repo)) as srv:
        kit.promtool_check(kit.scrape(srv.port), "keel's idle scrape")


def test_thread_failure_reaches_main_thread():
    stop = threading.Event()
    calls = [0]

    def client():
        calls[0] += 1
        check(calls[0] < 3, "a wrong answer in call %d" % calls[0])

    ws = kit.start_workers(client, stop, 1)
    time.sleep(0.2)
    stop.set()
    msg = raises_failure(lambda: kit.join_workers(ws, timeout=5))
    check(msg is not None and "a wrong answer in call 3" in msg,
          "a check that failed in a client thread was lost: %r" % msg)


def test_stuck_thread_fails():
    stop = threading.Event()
    release = threading.Event()

    def client():
        release.wait(10)  # a request that never comes back

    ws = kit.start_workers(client, stop, 2)
    stop.set()
    msg = raises_failure(lambda: kit.join_workers(ws, timeout=0.3))
    release.set()
    check(msg is not None and "2 of 2 client threads still running" in msg,
          "a client thread that never returned went unreported: %r" % msg)
    kit.join_workers(ws, timeout=10)


def test_clean_threads_pass():
    stop = threading.Event()
    n = [0]
    lock = threading.Lock()

    def client():
        with lock:
            n[0] += 1
        time.sleep(0.001)

    ws = kit.start_workers(client, stop, 3)
    time.sleep(0.1)
    stop.set()
    kit.join_workers(ws)
    check(n[0] > 3, "the workers did not run: %d calls" % n[0])


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_promtool_rejection_fails, test_promtool_accepts_keel_scrape,
             test_thread_failure_reaches_main_thread, test_stuck_thread_fails,
             test_clean_threads_pass])
