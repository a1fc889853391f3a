"""test_fd_exhaustion.py: scenario "fd exhaustion" (issue 14): the server runs out of file
descriptors (RLIMIT_NOFILE set low on the server process with prlimit) and comes back.

  1. At accept: far more clients connect than the server has fds for. The server must stay up
     (no crash, no busy loop that starves the rest), and once the clients are gone an
     ordinary request gets 200 with the right answer and the fd count returns to its
     baseline.
  2. At model load: with every fd taken by idle connections, a load asked for over a
     connection opened before fails with a clear error that names the cause (EMFILE, "Too many
     open files") and the model stays unavailable; after the connections close, the same load
     succeeds and the model answers.
How it was checked to fail: with the load's error message replaced by a fixed "load failed"
in src/runtime/load.c (load_fail), step 2 fails on the message. Step 1 guards libmicrohttpd's
accept loop, not keel code: it was checked only against its precondition (with the fd limit
raised to 4096 the server never reaches the limit and the test says so).
  3. At a preprocessing worker's spawn, on each side (test_emfile_at_worker_spawn, its own
     server with an image model): both workers are killed while (a) keel or (b) the fork
     server may open no descriptor (RLIMIT_NOFILE lowered on the running process with
     prlimit(2), below every fd in use: deterministic, no race with accepts). (a) The
     fork server's reply carries the new worker's socket and pidfd, which the kernel cannot
     install in keel (MSG_CTRUNC); (b) the fork server's socketpair fails. An image request
     over a connection opened before gets an error naming "Too many open files" within its
     deadline; the fork server is the same process afterwards (it is not declared lost);
     once the limit is back the workers are respawned, the next image request is answered
     and fds, memfds, workers and zombies are back at their baseline.
How it was checked to fail (3): with keel__prep_recv returning -EMSGSIZE for a cut control
message again (the code before this test), (a) fails: keel declared the fork server lost
and killed it, so no worker ever came back ("no preprocessing worker can run: the fork
server is gone").
"""

import os
import resource
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import kit  # noqa: E402
from kit import check  # noqa: E402

S = {}
NOFILE = 96


class LimitedServer(kit.Server):
    @property
    def cmd(self):
        return ["prlimit", "--nofile=%d:%d" % (NOFILE, NOFILE), "--"] + super().cmd


def setup():
    repo = kit.copy_repo()
    S["repo"] = repo
    S["rows"] = kit.complete_rows()[:2]
    S["ref"] = kit.keel_reference(repo, "heart", S["rows"])
    S["server"] = LimitedServer(repo, args=["--model-control-mode", "explicit", "--load-model",
                                            "heart", "--max-connections", "1024",
                                            "--http-timeout-secs", "30",
                                            # One HTTP thread: with a pool (the default 2),
                                            # libmicrohttpd 0.9.75's worker that holds no
                                            # connection keeps polling the listen socket at
                                            # EMFILE and spins (0.4-1.0 s of CPU per second
                                            # measured here; docs/OPERATIONS.md, "Limits").
                                            # Known, not fixed: this checks the one-thread
                                            # server, which backs off.
                                            "--http-threads", "1"]).start()
    S["port"] = S["server"].port
    infer_ok()
    S["fds"] = S["server"].fd_count()
    kit.log("  server fds at rest: %d of %d" % (S["fds"], NOFILE))


def teardown():
    kit.wait_idle(S["port"])
    S["server"].wait_fds(S["fds"], timeout=40)
    S["server"].stop()


def infer_ok(model="heart", conn=None):
    body, hdrs = kit.binary_infer_body(S["rows"])
    r = kit.post(S["port"], kit.infer_path(model), body, headers=hdrs)
    _, vals = kit.decode_infer(r)
    kit.assert_f32_equal(vals["probability"], S["ref"], model)


def flood(n):
    """n connections, each sending nothing; returns the sockets (some only in the backlog)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(10)
        s.connect(("127.0.0.1", S["port"]))
        socks.append(s)
    return socks


def wait_server_fds(at_least, timeout=20):
    deadline = time.monotonic() + timeout
    while S["server"].fd_count() < at_least:
        check(time.monotonic() < deadline, "the server holds %d fds, expected at least %d"
              % (S["server"].fd_count(), at_least))
        time.sleep(0.05)


def close_all(socks):
    for s in socks:
        s.close()


def test_emfile_at_accept():
    socks = flood(NOFILE * 2)
    try:
        wait_server_fds(NOFILE - 2)
        time.sleep(1.0)  # the server is at the limit, with clients still waiting
        check(S["server"].alive(), "the server died at the fd limit:\n" + S["server"].stderr_tail())
        cpu0 = cpu_seconds()
        time.sleep(1.0)
        busy = cpu_seconds() - cpu0
        kit.log("  at the fd limit: %d fds, %.2f s of CPU in 1 s" % (S["server"].fd_count(), busy))
        check(busy < 0.5, "the server spins at the fd limit (%.2f s of CPU in 1 s)" % busy)
    finally:
        close_all(socks)
    S["server"].wait_fds(S["fds"], timeout=40)
    infer_ok()
    kit.wait_idle(S["port"])


def cpu_seconds():
    with open("/proc/%d/stat" % S["server"].proc.pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_emfile_at_model_load():
    port = S["port"]
    ctl = kit.connect(port, timeout=60)
    ctl.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    r = kit.read_response(ctl, timeout=10)
    check(r is not None and r.status == 200, "live: %r" % r)
    socks = flood(NOFILE * 2)
    try:
        wait_server_fds(NOFILE)
        req = ("POST /v2/repository/models/heart/unload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               "Content-Length: 0\r\n\r\n").encode()
        ctl.sendall(req)
        r = kit.read_response(ctl, timeout=60, method="POST")
        check(r is not None and r.status == 200, "unload at the fd limit: %r" % r)
        req = ("POST /v2/repository/models/heart/load HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               "Content-Length: 0\r\n\r\n").encode()
        ctl.sendall(req)
        r = kit.read_response(ctl, timeout=60, method="POST")
        kit.log("  load at the fd limit: %r" % r)
        check(r is not None and r.status >= 400, "load at the fd limit: %r" % r)
        check(b"Too many open files" in r.body, "the load error does not name the cause: %r" % r)
    finally:
        close_all(socks)
        ctl.close()
    S["server"].wait_fds(S["fds"], timeout=40)
    r = kit.post(port, "/v2/repository/models/heart/load", b"")
    check(r.status == 200, "load after the fds came back: %r" % r)
    infer_ok()


def image_request(sock, pp, images):
    body = pp.json_images(images)
    req = ("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           "Content-Length: %d\r\n\r\n" % (kit.infer_path("digits"), len(body))).encode()
    sock.sendall(req + body)
    return kit.read_response(sock, timeout=30, method="POST")


def wait_for(what, cond, timeout=20):
    deadline = time.monotonic() + timeout
    while not cond():
        check(time.monotonic() < deadline, "timed out waiting for " + what)
        time.sleep(0.05)


def test_emfile_at_worker_spawn():
    import test_preprocess_http as pp  # its image model, images and /proc helpers

    d = kit.tmpdir("keel-fdpp-")
    repo = os.path.join(d, "models")
    os.makedirs(repo)
    pp.add(repo, "digits", pp.train(d), True)
    images = pp.make_images(d)
    img = [images[sorted(images)[0]]]
    srv = kit.Server(repo, ["--preprocess-timeout-ms", "2000", "--http-threads", "1"]).start()
    try:
        pid = srv.proc.pid
        ok = pp.probs(kit.post(srv.port, kit.infer_path("digits"), pp.json_images(img)))
        fs = pp.forkserver_pid(pid)
        wait_for("2 workers", lambda: len(pp.workers(pid)) == 2)
        fds, memfds = srv.fd_count(), pp.memfds(pid)
        for side, target in (("keel", pid), ("fork server", fs)):
            ctl = kit.connect(srv.port, timeout=60)
            ctl.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            r = kit.read_response(ctl, timeout=10)
            check(r is not None and r.status == 200, "live: %r" % r)
            limit = resource.prlimit(target, resource.RLIMIT_NOFILE)
            resource.prlimit(target, resource.RLIMIT_NOFILE, (3, limit[1]))  # no new fd at all
            try:
                for w in pp.workers(pid):
                    os.kill(w, signal.SIGKILL)
                wait_for("the killed workers gone", lambda: len(pp.workers(pid)) == 0)
                t0 = time.monotonic()
                r = image_request(ctl, pp, img)
                took = time.monotonic() - t0
                kit.log("  %s at its fd limit: %d in %.2f s: %r" % (side, r.status if r else 0,
                                                                   took, r.body if r else r))
                check(r is not None and r.status >= 500, "%s at the fd limit: %r" % (side, r))
                check(b"Too many open files" in r.body,
                      "%s at the fd limit: the error does not name the cause: %r" % (side, r))
                check(took < 10, "%s at the fd limit: the request took %.1f s" % (side, took))
            finally:
                resource.prlimit(target, resource.RLIMIT_NOFILE, limit)
                ctl.close()
            check(srv.alive(), "the server died:\n" + srv.stderr_tail())
            check(pp.forkserver_pid(pid) == fs, "the fork server was replaced or lost")
            wait_for("2 workers respawned", lambda: len(pp.workers(pid)) == 2)
            r = kit.post(srv.port, kit.infer_path("digits"), pp.json_images(img))
            check(pp.probs(r) == ok, "the image request after the limit was lifted: %r" % r)
            kit.wait_idle(srv.port)
            srv.wait_fds(fds, timeout=20)
            wait_for("memfds back to %d" % memfds, lambda: pp.memfds(pid) <= memfds)
            check(pp.zombies(pid) == [], "zombies: %r" % pp.zombies(pid))
        check("fork server lost" not in srv.stderr_text(),
              "keel declared the fork server lost:\n" + srv.stderr_tail())
    finally:
        srv.stop()


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_emfile_at_accept, test_emfile_at_model_load, test_emfile_at_worker_spawn],
            setup=setup, teardown=teardown)
