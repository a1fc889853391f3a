"""test_systemd.py: keel serve as a systemd Type=notify service, with this test as the manager.

The test creates the notification socket (AF_UNIX datagram, as systemd does), starts keel
serve with NOTIFY_SOCKET and WATCHDOG_USEC set, and reads what keel sends: a STATUS line
while it loads, READY=1 only once the models are loaded and the port answers (readiness is
200 when READY arrives), WATCHDOG=1 at about half the watchdog interval while it serves, and
after SIGTERM STOPPING=1 before it exits 0, with no watchdog ping after STOPPING. Without
NOTIFY_SOCKET nothing is sent (keel serve runs as before). Also: packaging/keel.service is a
Type=notify unit that `systemd-analyze verify` accepts."""

import os
import socket
import subprocess
import time

import kit
from kit import check

WATCHDOG_S = 0.6


def notify_socket():
    d = kit.tmpdir("keel-notify-")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    return sock, path


def read_messages(sock, until, stop=None):
    """(monotonic time, message) pairs until the deadline or stop(messages) is true."""
    out = []
    while time.monotonic() < until:
        try:
            data = sock.recv(4096)
        except socket.timeout:
            if stop is not None and stop(out):
                break
            continue
        out.append((time.monotonic(), data.decode("utf-8", "replace")))
        if stop is not None and stop(out):
            break
    return out


def has(msgs, state):
    return any(state in m.split("\n") for _, m in msgs)


def test_notify_protocol():
    sock, path = notify_socket()
    env = dict(os.environ)
    env["NOTIFY_SOCKET"] = path
    env["WATCHDOG_USEC"] = str(int(WATCHDOG_S * 1e6))
    srv = kit.Server(kit.example_repo(), env=env).start()
    try:
        # The listening line came first on stdout; READY=1 must have been sent by then or
        # right after it, and readiness must already be 200 when it is read.
        msgs = read_messages(sock, time.monotonic() + 30, lambda m: has(m, "READY=1"))
        check(has(msgs, "READY=1"), "no READY=1 within 30 s; got %r" % msgs)
        check(kit.get(srv.port, "/v2/health/ready").status == 200,
              "READY=1 was sent but /v2/health/ready is not 200")
        ready = [m for _, m in msgs if "READY=1" in m.split("\n")][0]
        check("STATUS=serving on" in ready, "READY=1 came without its STATUS line: %r" % ready)
        check(any(m.startswith("STATUS=loading") for _, m in msgs),
              "no STATUS=loading line before READY=1: %r" % msgs)
        check(not has(msgs[:-1], "READY=1"), "READY=1 sent twice")
        # Watchdog pings at about WATCHDOG/2 while serving.
        t0 = time.monotonic()
        pings = read_messages(sock, t0 + 6 * WATCHDOG_S)
        times = [t for t, m in pings if m == "WATCHDOG=1"]
        check(len(times) >= 6, "expected >= 6 WATCHDOG=1 in %.1fs (period %.2fs), got %d: %r"
              % (6 * WATCHDOG_S, WATCHDOG_S / 2, len(times), pings))
        gaps = [b - a for a, b in zip(times, times[1:])]
        check(max(gaps) < WATCHDOG_S, "a watchdog gap of %.2fs is longer than WatchdogSec %.2fs"
              % (max(gaps), WATCHDOG_S))
        srv.signal()
        rest = read_messages(sock, time.monotonic() + 60, lambda m: srv.proc.poll() is not None)
        stopping = [i for i, (_, m) in enumerate(rest) if "STOPPING=1" in m.split("\n")]
        check(len(stopping) == 1, "expected one STOPPING=1 after SIGTERM, got %r" % rest)
        check(all(m != "WATCHDOG=1" for _, m in rest[stopping[0] + 1:]),
              "WATCHDOG=1 after STOPPING=1: %r" % rest)
        check("STATUS=draining" in rest[stopping[0]][1], "STOPPING=1 without a STATUS line")
        srv.wait(60)
        srv.check_exit(0)
    finally:
        sock.close()
        if srv.alive():
            srv.kill()


def test_no_notify_socket_sends_nothing():
    sock, path = notify_socket()
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env["WATCHDOG_USEC"] = "200000"
    srv = kit.Server(kit.example_repo(), env=env).start()
    try:
        check(kit.get(srv.port, "/v2/health/ready").status == 200, "not ready")
        msgs = read_messages(sock, time.monotonic() + 0.5)
        check(msgs == [], "messages without NOTIFY_SOCKET: %r" % msgs)
        srv.stop()
    finally:
        sock.close()


def test_unit_file():
    unit = os.path.join(kit.SOURCE, "packaging", "keel.service")
    with open(unit) as f:
        text = f.read()
    for want in ("Type=notify", "WatchdogSec=", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ExecStart=", "ReadOnlyPaths=", "DynamicUser=yes"):
        check(want in text, "packaging/keel.service lacks %s" % want)
    tool = "/usr/bin/systemd-analyze"
    check(os.path.exists(tool), "%s is missing (Debian package systemd: scripts/install-deps.sh "
          "--test)" % tool)
    r = subprocess.run([tool, "verify", unit], capture_output=True, text=True)
    # verify complains that keel is not installed at the unit's path on a build machine; any
    # other complaint is a mistake in the unit.
    bad = [l for l in (r.stdout + r.stderr).splitlines()
           if l.strip() and "/usr/local/bin/keel" not in l]
    check(not bad, "systemd-analyze verify: %s" % "\n".join(bad))


if __name__ == "__main__":
    kit.run([test_notify_protocol, test_no_notify_socket_sends_nothing, test_unit_file])
