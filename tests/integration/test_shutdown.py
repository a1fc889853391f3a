"""test_shutdown.py: SIGTERM drains without losing a request.

8 client threads send infer requests continuously (a new connection each) while the server
gets SIGTERM. Then: /v2/health/ready answers 503 right away and never 200 again; requests
are still served during the grace period; every request that got a response got 200, or 503
"shutting down" only after readiness turned off and the grace period passed; the only
transport error allowed is "connection refused", and only once the server has stopped
accepting (no reset or dropped connection: none lost); the server exits 0 without sanitizer
reports. Done with the fast heart model, and with a slow model where a long request admitted
during the grace period is still running when it ends (it must be drained with 200)."""

import errno
import http.client
import threading
import time

import kit
from kit import check

GRACE = 1.0
CLIENTS = 8
BLOCKER_COPIES = 128  # 128 x 256 rows of the slow model: about a second of backend time
S = {}


def setup():
    S["repo"] = kit.example_repo()
    S["rows"] = kit.complete_rows()[:4]
    S["ref"] = kit.keel_reference(S["repo"], "heart", S["rows"])
    # A repository with a slow model too (one context; a 256-row request takes ~10+ ms), so
    # that requests are queued when the drain starts.
    repo = kit.copy_repo()
    kit.add_model(repo, "slow", kit.train_slow_model(kit.tmpdir("keel-train-")), instances=1,
                  max_queue_size=64, max_batch_size=256 * BLOCKER_COPIES)
    # One request per backend run (no dynamic_batching): the long request must wait behind
    # the other clients' slow requests, not be merged with them.
    kit.edit_config(repo, "slow", lambda c: c.pop("dynamic_batching", None))
    S["slow_repo"] = repo
    S["slow_rows"] = kit.heart_rows()[:256]
    S["slow_ref"] = kit.keel_reference(repo, "slow", S["slow_rows"])


def is_refused(e):
    return isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED


def is_reset(e):
    """A TCP reset (not an orderly close without an answer, which http.client reports as
    RemoteDisconnected, itself a ConnectionResetError)."""
    return (isinstance(e, (ConnectionResetError, BrokenPipeError))
            and not isinstance(e, http.client.RemoteDisconnected))


def drain(repo, model, rows, ref, use_json, after_term=None):
    """SIGTERM under continuous load from CLIENTS threads; checks everything the module
    docstring lists. after_term(port), if given, runs in a thread right after SIGTERM.
    Returns the request log and the SIGTERM time."""
    srv = kit.Server(repo, ["--shutdown-grace-secs", str(int(GRACE)),
                            "--exit-timeout-secs", "20"])
    srv.start()
    port = srv.port
    stop = threading.Event()
    lock = threading.Lock()
    log = []  # (thread, t_send, t_done, status or None, Response or exception)
    json_body = kit.json_infer_body(rows) if use_json else None
    bin_body, bin_hdrs = kit.binary_infer_body(rows)
    path = kit.infer_path(model)

    def client(i):
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.monotonic()
            try:
                if use_json and (i + n) % 2:
                    r = kit.post(port, path, json_body, timeout=30)
                else:
                    r = kit.post(port, path, bin_body, headers=bin_hdrs, timeout=30)
                item = (i, t0, time.monotonic(), r.status, r)
            except Exception as e:
                item = (i, t0, time.monotonic(), None, e)
            with lock:
                log.append(item)
            if item[3] is None and is_refused(item[4]):
                time.sleep(0.01)

    ready_log = []  # (t_send, t_done, status or exception)

    def ready_poller():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = kit.get(port, "/v2/health/ready", timeout=10)
                ready_log.append((t0, time.monotonic(), r.status))
            except Exception as e:
                ready_log.append((t0, time.monotonic(), e))
                if is_refused(e):
                    return
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        with lock:
            ok_before = sum(1 for x in log if x[3] == 200)
        t_term = time.monotonic()
        srv.signal()
        if after_term is not None:
            extra = threading.Thread(target=after_term, args=(port, t_term), daemon=True)
            extra.start()
            threads.append(extra)
        # Readiness must turn off right after SIGTERM.
        first_ready = None
        deadline = t_term + 0.5
        while time.monotonic() < deadline:
            try:
                r = kit.get(port, "/v2/health/ready", timeout=5)
            except Exception as e:
                first_ready = e
                break
            if r.status == 503:
                first_ready = 503
                break
            time.sleep(0.01)
        poller = threading.Thread(target=ready_poller, daemon=True)
        poller.start()
        rc = srv.wait(40)
        t_exit = time.monotonic()
        time.sleep(0.3)  # let the clients see the closed port
        stop.set()
        for t in threads + [poller]:
            t.join(40)
    finally:
        stop.set()
        if srv.proc.poll() is None:
            srv.kill()

    check(rc is not None, "the server did not exit within 40s of SIGTERM")
    kit.log("  %d requests before SIGTERM ok, %d total; exit after %.2fs"
            % (ok_before, len(log), t_exit - t_term))
    check(ok_before > 0, "no request succeeded before SIGTERM")
    check(first_ready == 503, "/v2/health/ready did not answer 503 within 0.5s of SIGTERM "
          "(last: %r)" % first_ready)
    ready_problems = []
    for t0, t1, st in ready_log:
        check(st != 200, "/v2/health/ready answered 200 %.3fs after SIGTERM" % (t0 - t_term))
        if not isinstance(st, int) and not is_refused(st):
            ready_problems.append((t0, t1, st))

    # When the listener closes, the kernel resets the connections still in its backlog
    # (never accepted): the client sees a reset, not a refusal, at the moment the server stops
    # accepting, which the clients detect as the first refusal right after. Such a reset of
    # a request sent after the grace period, within 0.1 s of that moment, counts as refused
    # (a server cannot avoid it). Any other reset, any close without an answer
    # (RemoteDisconnected), any timeout is a lost request.
    refusals = [t1 for _, _, t1, st, obj in log if st is None and is_refused(obj)]
    t_close = min(refusals) if refusals else t_exit
    answered = [t1 for _, _, t1, st, _ in log if st is not None]
    t_last_answer = max(answered) if answered else t_term
    problems = []
    for t0, t1, st in ready_problems:  # same rule as below: only a backlog reset at close
        if not (is_reset(st) and t0 > t_term + GRACE - 0.1 and abs(t1 - t_close) <= 0.1):
            problems.append("/v2/health/ready poll failed with %r (sent %.3fs, failed %.3fs "
                            "after SIGTERM; listener closed ~%.3fs)"
                            % (st, t0 - t_term, t1 - t_term, t_close - t_term))
    grace_ok = 0
    backlog_resets = 0
    for i, t0, t1, st, obj in log:
        rel = "sent %.3fs, answered %.3fs after SIGTERM" % (t0 - t_term, t1 - t_term)
        if st == 200:
            try:
                _, vals = kit.decode_infer(obj)
                if not kit.same_f32(vals["probability"], ref):
                    problems.append("wrong answer (%s)" % rel)
            except Exception as e:
                problems.append("bad 200 response (%s): %s" % (rel, e))
            if t_term < t0 and t1 < t_term + GRACE - 0.2:
                grace_ok += 1
        elif st == 503:
            msg = ""
            try:
                msg = obj.error_message()
            except Exception as e:
                problems.append("503 without a JSON error (%s): %s" % (rel, e))
            if "shut" not in msg.lower():
                problems.append("503 %r does not say shutting down (%s)" % (msg, rel))
            if t1 < t_term + GRACE - 0.1:
                problems.append("503 before the grace period ended (%s)" % rel)
        elif st is None:
            if is_refused(obj):
                if t0 < t_term:
                    problems.append("connection refused before SIGTERM (%s)" % rel)
            elif (is_reset(obj) and t0 > t_term + GRACE - 0.1
                  and abs(t1 - t_close) <= 0.1):
                backlog_resets += 1
            else:
                problems.append("request lost: %s: %s (%s; listener closed ~%.3fs, last "
                                "answer %.3fs after SIGTERM)" % (type(obj).__name__, obj, rel,
                                                                 t_close - t_term,
                                                                 t_last_answer - t_term))
        else:
            problems.append("status %s: %r (%s)" % (st, obj, rel))
    kit.log("  %d x 200, %d x 503, %d refused, %d reset when the listener closed (~%.3fs); last "
            "answer %.3fs after SIGTERM" % (sum(1 for x in log if x[3] == 200),
                                            sum(1 for x in log if x[3] == 503),
                                            len(refusals), backlog_resets, t_close - t_term,
                                            t_last_answer - t_term))
    # Once refused, a client must never be accepted again (the listener is closed).
    refused_at = {}
    for i, t0, t1, st, obj in sorted(log, key=lambda x: x[1]):
        if st is None and is_refused(obj):
            refused_at.setdefault(i, t0)
        elif i in refused_at and st is not None:
            problems.append("client %d was refused at %.3fs, then answered %s at %.3fs"
                            % (i, refused_at[i] - t_term, st, t0 - t_term))
    if problems:
        raise kit.TestFailure("%d problem(s) among %d requests:\n  %s"
                              % (len(problems), len(log), "\n  ".join(problems[:20])))
    check(grace_ok > 0, "no request was served during the %.0fs grace period after SIGTERM"
          % GRACE)
    srv.check_exit(0)
    return log, t_term


def test_sigterm_drains():
    drain(S["repo"], "heart", S["rows"], S["ref"], use_json=True)


def test_sigterm_drains_queued_requests():
    """A long request admitted during the grace period and still running (behind the other
    clients' slow requests) when the grace period ends must be answered 200: the drain waits
    for admitted requests instead of dropping or cancelling them."""
    body, hdrs = kit.binary_infer_body(S["slow_rows"] * BLOCKER_COPIES)
    res = {}

    def blocker(port, t_term):
        time.sleep(max(0.0, t_term + GRACE / 2 - time.monotonic()))
        res["t0"] = time.monotonic()
        try:
            res["r"] = kit.post(port, kit.infer_path("slow"), body, headers=hdrs, timeout=60)
        except Exception as e:
            res["r"] = e
        res["t1"] = time.monotonic()

    log, t_term = drain(S["slow_repo"], "slow", S["slow_rows"], S["slow_ref"], use_json=False,
                        after_term=blocker)
    r = res.get("r")
    check(isinstance(r, kit.Response), "the long request sent %.3fs after SIGTERM failed: %r"
          % (res.get("t0", 0) - t_term, r))
    check(r.status == 200, "the long request sent %.3fs after SIGTERM (in the grace period) "
          "got %r" % (res["t0"] - t_term, r))
    _, vals = kit.decode_infer(r)
    kit.assert_f32_equal(vals["probability"], S["slow_ref"] * BLOCKER_COPIES, "long request")
    kit.log("  long request: sent %.3fs, answered %.3fs after SIGTERM"
            % (res["t0"] - t_term, res["t1"] - t_term))
    check(res["t1"] > t_term + GRACE, "test setup: the long request finished (%.3fs after "
          "SIGTERM) before the grace period ended, so it did not test the drain"
          % (res["t1"] - t_term))


def test_sigterm_idle_exits_zero():
    srv = kit.Server(S["repo"], ["--shutdown-grace-secs", "0"]).start()
    r = kit.post(srv.port, kit.infer_path(), kit.json_infer_body(S["rows"]))
    check(r.status == 200, "infer %r" % r)
    t0 = time.monotonic()
    srv.stop(timeout=30)
    check(time.monotonic() - t0 < 10, "an idle server took %.1fs to exit" % (time.monotonic() - t0))


def test_usage_errors_exit_2():
    import subprocess
    cases = [
        ["serve"],
        ["serve", "--model-repository", S["repo"], "--http-port", "notaport"],
        ["serve", "--model-repository", S["repo"], "--http-port", "0", "--model-control-mode",
         "sometimes"],
        ["serve", "--model-repository", S["repo"], "--http-port", "0", "--no-such-option"],
        ["serve", "--model-repository", S["repo"], "--http-port", "0", "--max-request-bytes",
         "-5"],
    ]
    for args in cases:
        p = subprocess.run([kit.KEEL] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=60)
        check(p.returncode == 2, "keel %s: exit %d (expected 2, usage error); stderr %r"
              % (" ".join(args[1:]), p.returncode, p.stderr.decode()[-300:]))
        check(p.stdout == b"", "usage error printed to stdout: %r" % p.stdout)
    p = subprocess.run([kit.KEEL, "serve", "--help"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    check(p.returncode == 0 and b"--model-repository" in p.stdout,
          "keel serve --help: exit %d, stdout %r" % (p.returncode, p.stdout[:200]))


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_usage_errors_exit_2, test_sigterm_idle_exits_zero, test_sigterm_drains,
             test_sigterm_drains_queued_requests], setup=setup)
