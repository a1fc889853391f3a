"""test_restricted_api.py: --http-restricted-api (Triton's restricted API groups) over HTTP.

One server restricts every group keel has endpoints for, each with its own header and value
(one of them read from a file with KEY=@FILE). For every endpoint of every group: no header,
a wrong value, a value that is a prefix or an extension of the right one, another group's key,
the header twice (right twice, right and wrong) all get 403 with Triton's message naming the
header; the right value (header name in any case) gets the endpoint's normal answer. A
restricted POST is refused before its body is sent. A second server restricts only
model-repository: the other groups stay open. Start-up: unknown groups, a group named twice
(in one option or two), malformed rules, bad keys and values, unreadable or empty value files
all exit 2 with a message that never shows the value. Error messages of clients outside
model-repository never show the repository's paths; the repository index still does.
"""

import http.client as httpclient
import json
import os
import subprocess
import time

import kit
from kit import check

S = {}

# group -> (header, value); the value of model-repository comes from a file.
KEYS = {
    "health": ("X-Health-Key", "h-7f3a"),
    "metadata": ("X-Meta-Key", "m-19bc"),
    "inference": ("Infer-Token", "i-ab12:cd34=ef"),
    "model-config": ("X-Config-Key", "c-0000"),
    "model-repository": ("Admin-Key", "admin secret value"),
    "statistics": ("X-Stats-Key", "s-5511"),
    "metrics": ("X-Metrics-Key", "p-9090"),
}
GROUPS = list(KEYS)


def endpoints():
    """group -> [(method, path, body, expected status with the right key)]."""
    body = kit.json_infer_body([S["row"]])
    return {
        "health": [("GET", "/v2/health/live", None, 200), ("GET", "/v2/health/ready", None, 200),
                   ("GET", "/v2/models/heart/ready", None, 200)],
        "metadata": [("GET", "/v2", None, 200), ("GET", "/v2/models/heart", None, 200),
                     ("GET", "/v2/models/heart/versions/1", None, 200)],
        "inference": [("POST", "/v2/models/heart/infer", body, 200)],
        "model-config": [("GET", "/v2/models/heart/config", None, 200)],
        "model-repository": [("POST", "/v2/repository/index", b"", 200),
                             ("POST", "/v2/repository/models/heart/load", b"", 200)],
        "statistics": [("GET", "/v2/models/stats", None, 200),
                       ("GET", "/v2/models/heart/stats", None, 200)],
        "metrics": [("GET", "/metrics", None, 200)],
    }


def request(port, method, path, body=None, headers=()):
    """headers: a list of (name, value) pairs, repeated names allowed."""
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
            conn.putheader("Content-Type", "application/json")
        conn.endheaders(body)
        r = conn.getresponse()
        return kit.Response(r.status, r.reason, r.getheaders(), r.read())
    finally:
        conn.close()


def expect_forbidden(r, header, what):
    check(r.status == 403, "%s: expected 403, got %r" % (what, r))
    msg = r.error_message()
    want = "This API is restricted, expecting header '%s'" % header
    check(msg == want, "%s: message %r, expected Triton's %r" % (what, msg, want))


def keel_serve(args, timeout=60):
    repo = S.get("repo") or kit.example_repo()
    env = dict(os.environ)
    return subprocess.run([kit.KEEL, "serve", "--model-repository", repo, "--http-port", "0"]
                          + args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                          env=env)


def setup():
    S["repo"] = kit.copy_repo()
    S["row"] = kit.complete_rows()[0]
    S["ref"] = kit.keel_reference(S["repo"], "heart", [S["row"]])
    d = kit.tmpdir("keel-keys-")
    S["keyfile"] = os.path.join(d, "admin.key")
    with open(S["keyfile"], "w") as f:
        f.write(KEYS["model-repository"][1] + "\n")  # the newline is not part of the value
    os.chmod(S["keyfile"], 0o600)
    args = ["--model-control-mode", "explicit", "--load-model", "heart"]
    for g, (k, v) in KEYS.items():
        val = "@" + S["keyfile"] if g == "model-repository" else v
        args += ["--http-restricted-api", "%s:%s=%s" % (g, k, val)]
    # Triton's groups keel has no endpoints for are accepted (Triton command lines work).
    args += ["--http-restricted-api", "shared-memory,trace,logging:X-Other=o-1"]
    S["server"] = kit.Server(S["repo"], args).start()
    S["port"] = S["server"].port


def teardown():
    check(S["server"].alive(), "server died")
    S["server"].stop()


def test_every_group_refuses_without_its_key():
    port = S["port"]
    eps = endpoints()
    for g in GROUPS:
        header, value = KEYS[g]
        other = KEYS[GROUPS[(GROUPS.index(g) + 1) % len(GROUPS)]]
        for method, path, body, _ in eps[g]:
            what = "%s %s (%s)" % (method, path, g)
            cases = [
                ("missing", []),
                ("wrong value", [(header, value[:-2] + "zz")]),
                ("value with a suffix", [(header, value + "x")]),
                ("prefix of the value", [(header, value[:-1])]),
                ("empty value", [(header, "")]),
                ("another group's key", [other]),
                ("the right value twice", [(header, value), (header, value)]),
                ("right then wrong", [(header, value), (header, "nope")]),
                ("wrong then right", [(header, "nope"), (header, value)]),
            ]
            for name, hdrs in cases:
                expect_forbidden(request(port, method, path, body, hdrs), header,
                                 "%s, %s" % (what, name))


def test_every_group_allows_its_key():
    port = S["port"]
    eps = endpoints()
    for g in GROUPS:
        header, value = KEYS[g]
        for method, path, body, want in eps[g]:
            for name in (header, header.lower(), header.upper()):
                r = request(port, method, path, body, [(name, value)])
                check(r.status == want, "%s %s with %s: expected %d, got %r"
                      % (method, path, name, want, r))
    # The answer itself is the normal one.
    h, v = KEYS["inference"]
    r = request(port, "POST", "/v2/models/heart/infer", kit.json_infer_body([S["row"]]), [(h, v)])
    _, vals = kit.decode_infer(r)
    kit.assert_f32_equal(vals["probability"], S["ref"], "infer with the key")


def test_unknown_paths_stay_404():
    r = request(S["port"], "GET", "/v2/nosuch")
    check(r.status == 404, "unknown path without any key: %r" % r)


def test_refused_before_the_body():
    """A restricted POST announcing 10 MB is answered 403 from its headers alone."""
    s = kit.connect(S["port"])
    try:
        s.sendall(b"POST /v2/models/heart/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{")
        r = kit.read_response(s, timeout=10)
        check(r is not None, "no answer to a restricted POST without its key")
        expect_forbidden(r, KEYS["inference"][0], "restricted POST, body not sent")
        check(kit.wait_closed(s, 5), "the connection stayed open after a 403 before the body")
    finally:
        s.close()


def test_only_listed_groups_are_restricted():
    repo = S["repo"]
    srv = kit.Server(repo, ["--http-restricted-api", "model-repository:Admin-Key=k1"]).start()
    try:
        port = srv.port
        for path in ("/v2/health/ready", "/v2", "/v2/models/heart", "/v2/models/heart/config",
                     "/v2/models/stats", "/metrics"):
            r = request(port, "GET", path)
            check(r.status == 200, "unrestricted %s: %r" % (path, r))
        r = request(port, "POST", "/v2/models/heart/infer", kit.json_infer_body([S["row"]]))
        check(r.status == 200, "unrestricted infer: %r" % r)
        expect_forbidden(request(port, "POST", "/v2/repository/index", b""), "Admin-Key",
                         "index without its key")
        r = request(port, "POST", "/v2/repository/index", b"", [("admin-key", "k1")])
        check(r.status == 200, "index with its key: %r" % r)
    finally:
        srv.stop()


SECRET = "Zq8-do-not-print-me"


def test_startup_errors():
    kf = os.path.join(kit.tmpdir("keel-badkeys-"), "k")
    empty = kf + ".empty"
    with open(empty, "w") as f:
        f.write("\n")
    ctl = kf + ".ctl"
    with open(ctl, "wb") as f:
        f.write(b"ab\x01" + SECRET.encode())
    big = kf + ".big"
    with open(big, "w") as f:
        f.write("a" * 5000)
    bad = [
        (["bogus:k=" + SECRET], "unknown restricted api 'bogus'"),
        (["health,Bogus:k=" + SECRET], "unknown restricted api 'Bogus'"),
        (["health:k=" + SECRET, "health:k2=" + SECRET], "health"),
        (["health:k=" + SECRET, "inference,health:k2=v"], "multiple config groups"),
        (["health,health:k=" + SECRET], "named twice"),
        (["k=" + SECRET], "GROUPS:KEY=VALUE"),
        (["health:k"], "GROUPS:KEY=VALUE"),
        (["health:=" + SECRET], "GROUPS:KEY=VALUE"),
        (["health:k="], "GROUPS:KEY=VALUE"),
        ([":k=" + SECRET], "GROUPS:KEY=VALUE"),
        (["health,:k=" + SECRET], "empty API group"),
        (["health,,inference:k=" + SECRET], "empty API group"),
        (["health:bad key=" + SECRET], "not an HTTP token"),
        (["health:k(x)=" + SECRET], "not an HTTP token"),
        (["health:k= " + SECRET], "blank"),
        (["health:k=" + SECRET + "\x01"], "control"),
        (["health:k=@"], "path"),
        (["health:k=@/nonexistent/keel-key"], "/nonexistent/keel-key"),
        (["health:k=@" + empty], "empty"),
        (["health:k=@" + ctl], "control"),
        (["health:k=@" + big], "longer than"),
    ]
    for rules, words in bad:
        args = []
        for rule in rules:
            args += ["--http-restricted-api", rule]
        p = keel_serve(args)
        err = p.stderr.decode("utf-8", "replace")
        check(p.returncode == 2, "%r: exit %d, expected 2 (stderr %r)" % (rules, p.returncode,
                                                                          err))
        check("--http-restricted-api" in err and words in err,
              "%r: stderr %r does not name the problem (%r)" % (rules, err, words))
        check(SECRET not in err, "%r: the value was printed: %r" % (rules, err))
        check(p.stdout == b"", "%r: stdout %r" % (rules, p.stdout))


def test_error_messages_hide_repository_paths():
    # A repository reached through a symlink and a trailing slash, with a model whose file
    # is broken: load errors name the file.
    base = kit.tmpdir("keel-paths-")
    real = os.path.join(base, "real-models-dir")
    os.rename(kit.copy_repo(), real)
    bdir = os.path.join(real, "broken")
    os.makedirs(os.path.join(bdir, "1"))
    cfg = kit.read_config(real, "heart")
    cfg["name"] = "broken"
    kit.write_config(real, "broken", cfg)
    with open(os.path.join(bdir, "1", "model.json"), "w") as f:
        f.write("garbage\n")
    link = os.path.join(base, "link-to-models")
    os.symlink(real, link)
    given = link + "/"
    srv = kit.Server(given, ["--http-restricted-api", "statistics:X-K=v"]).start()
    try:
        port = srv.port
        needles = [base, "real-models-dir", "link-to-models", "model.json"]
        # (the infer answer names the state only: "model 'broken' is not ready (FAILED)")
        cases = [("GET", "/v2/health/ready", None, True), ("GET", "/v2/models/broken", None, True),
                 ("GET", "/v2/models/broken/ready", None, True),
                 ("GET", "/v2/models/broken/config", None, True),
                 ("POST", "/v2/models/broken/infer", kit.json_infer_body([S["row"]]), False)]
        for method, path, body, reason in cases:
            for _ in range(20):  # a load retry may be running: "is loading" for a moment
                r = request(port, method, path, body)
                if r.status != 503 or "is loading" not in r.error_message():
                    break
                time.sleep(0.05)
            check(r.status == 503, "%s %s: expected 503 (model failed to load), got %r"
                  % (method, path, r))
            msg = r.error_message()
            check("broken" in msg and (not reason or ("failed to load" in msg and
                                                      "XGBoost" in msg)),
                  "%s %s: the message %r lost the reason" % (method, path, msg))
            for n in needles:
                check(n not in msg, "%s %s: the message %r shows %r" % (method, path, msg, n))
        # model-repository clients see the whole reason, path included.
        r = request(port, "POST", "/v2/repository/index", b"")
        check(r.status == 200, "index: %r" % r)
        reasons = {m["name"]: m.get("reason", "") for m in r.json()}
        check("model.json" in reasons.get("broken", ""),
              "the repository index lost the path: %r" % reasons)
    finally:
        srv.stop()


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_every_group_refuses_without_its_key, test_every_group_allows_its_key,
             test_unknown_paths_stay_404, test_refused_before_the_body,
             test_only_listed_groups_are_restricted, test_startup_errors,
             test_error_messages_hide_repository_paths],
            setup=setup, teardown=teardown)
