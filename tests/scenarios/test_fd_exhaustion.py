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
Not covered: EMFILE at a preprocessing worker's spawn (the fork server's own fd limit).
"""

import os
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


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_emfile_at_accept, test_emfile_at_model_load], setup=setup, teardown=teardown)
