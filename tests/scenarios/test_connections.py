"""test_connections.py: scenario "slow-loris clients, --http-timeout-secs and
--max-connections" (issue 14).

keel serve runs with --max-connections 8 and --http-timeout-secs 1:
  1. 8 slow-loris clients each send the start of a request (the request line and one header)
     and then nothing. A ninth connection gets no answer while they hold every slot
     (libmicrohttpd stops accepting at the limit; it waits in the kernel's listen backlog).
     Each stalled connection is closed by the server after the timeout (not before 1 s, and
     within a few seconds); then the ninth is accepted and answered 200, and an ordinary
     request gets 200 with the right answer: the slots came back.
  2. A client that sent a complete request and its answer, then stays silent on the
     keep-alive connection, is closed after the timeout too.
  3. Afterwards the server holds no more fds than before and counters are idle.
What is not promised (docs/OPERATIONS.md): a client that keeps sending one byte at a time is
never idle, so --http-timeout-secs does not close it; --max-connections bounds what such
clients can hold, and a proxy (nginx's client_header_timeout) closes them.
How it was checked to fail: with MHD_OPTION_CONNECTION_TIMEOUT left out in
src/server/server.c, the stalled connections stay open and step 1 fails; with
MHD_OPTION_CONNECTION_LIMIT left out, the ninth connection is served at once.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import kit  # noqa: E402
from kit import check  # noqa: E402

S = {}
LIMIT = 8
TIMEOUT = 1


def setup():
    S["repo"] = kit.example_repo()
    S["rows"] = kit.complete_rows()[:2]
    S["ref"] = kit.keel_reference(S["repo"], "heart", S["rows"])
    S["server"] = kit.Server(S["repo"], args=["--max-connections", str(LIMIT),
                                              "--http-timeout-secs", str(TIMEOUT)]).start()
    S["port"] = S["server"].port
    infer_ok()
    time.sleep(TIMEOUT + 1.5)  # the connections of the start-up checks are gone
    S["fds"] = S["server"].fd_count()


def teardown():
    kit.wait_idle(S["port"])
    S["server"].wait_fds(S["fds"])
    S["server"].stop()


def infer_ok():
    body, hdrs = kit.binary_infer_body(S["rows"])
    r = kit.post(S["port"], kit.infer_path("heart"), body, headers=hdrs)
    _, vals = kit.decode_infer(r)
    kit.assert_f32_equal(vals["probability"], S["ref"], "heart")


def closed_within(sock, timeout):
    """Seconds until the server closed sock (EOF or reset), or None after timeout."""
    t0 = time.monotonic()
    if kit.wait_closed(sock, timeout):
        return time.monotonic() - t0
    return None


def test_slow_loris_and_the_connection_limit():
    port = S["port"]
    loris = []
    for _ in range(LIMIT):
        s = kit.connect(port, timeout=30)
        s.sendall(b"POST /v2/models/heart/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        loris.append(s)
    t_sent = time.monotonic()
    time.sleep(0.2)  # accepted by MHD
    extra = kit.connect(port, timeout=30)
    try:
        extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    early = None
    try:
        early = kit.read_response(extra, timeout=TIMEOUT * 0.5)
    except kit.TestFailure:
        pass  # no answer yet: it waits in the listen backlog
    check(early is None or early == "", "a connection beyond --max-connections %d was served "
          "while %d were open: %r" % (LIMIT, LIMIT, early))
    closed = [closed_within(s, 15) for s in loris]
    for s in loris:
        s.close()
    t_closed = time.monotonic() - t_sent
    kit.log("  %d stalled connections closed after %.2f s (timeout %d s)" % (LIMIT, t_closed,
                                                                            TIMEOUT))
    check(all(c is not None for c in closed), "%d of %d stalled connections still open 15 s "
          "after the last byte (--http-timeout-secs %d)" % (sum(c is None for c in closed),
                                                           LIMIT, TIMEOUT))
    check(t_closed >= TIMEOUT - 0.05, "stalled connections closed after %.2f s, before the %d s "
          "timeout" % (t_closed, TIMEOUT))
    # The waiting connection is accepted once slots are free, and answered.
    r = kit.read_response(extra, timeout=15)
    extra.close()
    check(r is not None and r.status == 200, "the connection that waited for a slot got %r" % r)
    infer_ok()


def test_silent_keep_alive_client_is_closed():
    port = S["port"]
    s = kit.connect(port, timeout=30)
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    r = kit.read_response(s, timeout=10)
    check(r is not None and r.status == 200, "live: %r" % r)
    t = closed_within(s, 15)
    s.close()
    check(t is not None, "an idle keep-alive connection was still open after 15 s")
    check(t >= TIMEOUT - 0.05, "idle connection closed after %.2f s, before the timeout" % t)
    infer_ok()


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_slow_loris_and_the_connection_limit, test_silent_keep_alive_client_is_closed],
            setup=setup, teardown=teardown)
