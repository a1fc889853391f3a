"""test_observability.py: latency histograms, the access log, trace context and Triton's trace
extension, checked against what the clients sent and received.

- Histograms: after a known mix of requests (successes, failures that reach the model, and
  requests refused before it), each latency histogram of model="heart" counts exactly the
  requests that reached the model (= the statistics' success + fail), its buckets are
  cumulative and end in +Inf = _count, it has buckets at 20 us and 10 s, the compute
  histogram counts the backend runs, and keel_responses_total counts every status code sent.
  Scrapes under load pass promtool.
- Access log (logfmt and JSON): exactly one line per request, 2xx/4xx/503 alike, whose
  status, request id, model, version, bytes out and trace id match the response.
- A log writer blocked on a pipe nobody reads: requests keep being answered, lines are
  dropped and counted in /metrics, the drop is logged, and the server still stops cleanly.
- SIGHUP reopens the log (logrotate's rename + HUP).
- traceparent: a valid one is echoed with the caller's trace id and keel's own span id;
  malformed ones are ignored (200, no echo, no trace id in the log).
- /v2/trace/setting round trip (global and per model, bad values refused) and the trace file:
  one header and one timestamps entry per traced request, steps in Triton's order, ns
  non-decreasing.
- gRPC feeds all of it the same way (test_grpc_feeds_observability): unary ModelInfer calls
  and ModelStreamInfer messages, successes and failures, are counted in the protocol="grpc"
  histograms (count = the statistics' success + fail), in keel_responses_total{protocol=
  "grpc",code=<status name>}, have one access log line each (protocol=grpc, status = the gRPC
  code), one trace each with GRPC_* steps in order, and a traceparent sent as call metadata
  is echoed in the initial metadata and logged.
"""

import json
import os
import re
import signal
import stat
import threading
import time

import kit
from kit import check

S = {}
HEART_ROWS = 2


def setup():
    S["rows"] = kit.complete_rows()[:HEART_ROWS]


def infer_ok(port, req_id=None, headers=None):
    return kit.post(port, kit.infer_path(), kit.json_infer_body(S["rows"], req_id=req_id),
                    headers=headers or {})


def wait_for(fn, what, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise kit.TestFailure("timed out waiting for %s" % what)
        time.sleep(0.05)


def hist(samples, family, model="heart"):
    """{(version, protocol): {"buckets": [(le, v)], "count": c, "sum": s}} of one family."""
    out = {}
    for name, lb, v in samples:
        if lb.get("model") != model or not name.startswith(family + "_"):
            continue
        key = (lb.get("version"), lb.get("protocol"))
        h = out.setdefault(key, {"buckets": [], "count": None, "sum": None})
        if name == family + "_bucket":
            le = float("inf") if lb["le"] == "+Inf" else float(lb["le"])
            h["buckets"].append((le, v))
        elif name == family + "_count":
            h["count"] = v
        elif name == family + "_sum":
            h["sum"] = v
    return out


def hist_count(text, family, model="heart"):
    samples, _ = kit.parse_metrics(text)
    return sum(h["count"] or 0 for h in hist(samples, family, model).values())


def codes(text):
    samples, _ = kit.parse_metrics(text)
    return {lb["code"]: v for n, lb, v in samples
            if n == "keel_responses_total" and lb.get("protocol") == "http"}


# ------------------------------------------------------------------------------ histograms


def test_histograms_count_every_request():
    srv = kit.Server(kit.example_repo(), ["--preprocess-workers", "0"])
    with kit.running(srv):
        port = srv.port
        infer_ok(port)  # the series exists from here on
        kit.wait_idle(port)
        st0 = kit.stat_counts(kit.model_stats(port, "heart"))
        text0 = kit.scrape(port)
        c0 = codes(text0)
        bad_shape = json.dumps({"inputs": [{"name": "features", "shape": [1, 12],
                                            "datatype": "FP32", "data": [0.5] * 12}]}).encode()
        sent = {"ok": 0, "model_fail": 0, "bad_json": 0, "unknown": 0}
        lock = threading.Lock()

        def client(i):
            for n in range(40):
                k = n % 8
                if k == 5:
                    r, kind, want = kit.post(port, kit.infer_path(), bad_shape), "model_fail", 400
                elif k == 6:
                    r, kind, want = kit.post(port, kit.infer_path(), b"{not json"), "bad_json", 400
                elif k == 7:
                    r, kind, want = (kit.post(port, kit.infer_path("nosuch"),
                                              kit.json_infer_body(S["rows"])), "unknown", 404)
                else:
                    r, kind, want = infer_ok(port), "ok", 200
                check(r.status == want, "%s: expected %d, got %r" % (kind, want, r))
                with lock:
                    sent[kind] += 1

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        texts = []
        while any(t.is_alive() for t in threads):
            texts.append(kit.scrape(port))
            time.sleep(0.05)
        for t in threads:
            t.join(60)
        check(texts, "no scrape was taken under load")
        for text in texts[:: max(1, len(texts) // 5)]:
            kit.promtool_check(text, "a scrape taken under load")
        kit.wait_idle(port)
        st1 = kit.stat_counts(kit.model_stats(port, "heart"))
        reached = (st1["success"] + st1["fail"]) - (st0["success"] + st0["fail"])
        check(reached == sent["ok"] + sent["model_fail"],
              "statistics grew by %d, clients sent %r" % (reached, sent))
        want_total = st1["success"] + st1["fail"]
        # The histograms are fed when MHD reports the response sent: poll briefly.
        family = "keel_request_duration_seconds"
        text = wait_for(lambda: (lambda t: t if hist_count(t, family) == want_total else None)(
            kit.scrape(port)), "%s_count == %d" % (family, want_total))
        kit.promtool_check(text, "the idle scrape")
        samples, types = kit.parse_metrics(text)
        for fam in ("keel_request_duration_seconds", "keel_request_queue_duration_seconds",
                    "keel_request_compute_duration_seconds",
                    "keel_request_preprocess_duration_seconds"):
            check(types.get(fam) == "histogram", "%s has TYPE %r" % (fam, types.get(fam)))
        for fam, want in (("keel_request_duration_seconds", want_total),
                          ("keel_request_queue_duration_seconds", want_total),
                          # per request that reached the backend: every success here (the
                          # failures fail validation first); batched ones share one call
                          ("keel_request_compute_duration_seconds", st1["success"])):
            hs = hist(samples, fam)
            check(hs, "no %s series for model=heart" % fam)
            got = 0
            for key, h in hs.items():
                check(key == ("1", "http"), "%s: unexpected labels %r" % (fam, key))
                les = [le for le, _ in h["buckets"]]
                vals = [v for _, v in h["buckets"]]
                check(les == sorted(les) and les[-1] == float("inf"),
                      "%s buckets are not ascending ending in +Inf: %r" % (fam, les))
                check(2e-05 in les and 10.0 in les,
                      "%s has no bucket at 20us and 10s: %r" % (fam, les))
                check(vals == sorted(vals), "%s buckets are not cumulative: %r" % (fam, vals))
                check(vals[-1] == h["count"], "%s +Inf bucket %g != _count %g"
                      % (fam, vals[-1], h["count"]))
                check(h["sum"] is not None and h["sum"] > 0, "%s_sum is %r" % (fam, h["sum"]))
                got += h["count"]
            check(got == want, "%s counts %d requests; statistics say %d (success %d + fail "
                  "%d, executions %d)" % (fam, got, want, st1["success"], st1["fail"],
                                           st1["execution_count"]))
        c1 = codes(text)
        for code, n in (("400", sent["model_fail"] + sent["bad_json"]), ("404", sent["unknown"])):
            d = c1.get(code, 0) - c0.get(code, 0)
            check(d == n, "keel_responses_total{code=%s} grew by %g, clients got %d" % (code, d, n))
        d200 = c1.get("200", 0) - c0.get("200", 0)
        check(d200 >= sent["ok"], "keel_responses_total{code=200} grew by %g < %d successes"
              % (d200, sent["ok"]))
        kit.log("  sent %r; histogram count %d = success + fail" % (sent, want_total))


# ------------------------------------------------------------------------------ access log

_LOGFMT_RE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line):
    out = {}
    for k, v in _LOGFMT_RE.findall(line):
        if v.startswith('"'):
            v = json.loads(v) if "\\x" not in v else v[1:-1]
        out[k] = v
    return out


def read_log(path, fmt):
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8").splitlines()
    out = []
    for line in lines:
        if fmt == "json":
            try:
                out.append(json.loads(line))
            except ValueError:
                raise kit.TestFailure("access log line is not JSON: %r" % line)
        else:
            out.append(parse_logfmt(line))
    return out


def access_log_case(fmt):
    d = kit.tmpdir("keel-alog-")
    path = os.path.join(d, "access.log")
    srv = kit.Server(kit.example_repo(), [
        "--model-control-mode", "explicit", "--load-model", "heart", "--preprocess-workers", "0",
        "--access-log", path, "--access-log-format", fmt])
    expected = []  # (status, request_id, model, version, bytes_out, trace_id, route)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with kit.running(srv):
        port = srv.port
        for i in range(6):
            hdrs = {"traceparent": tp} if i == 2 else {}
            r = infer_ok(port, req_id="req-%d" % i, headers=hdrs)
            check(r.status == 200, "infer: %r" % r)
            expected.append((200, "req-%d" % i, "heart", "1", len(r.body),
                             tp[3:35] if i == 2 else "", "infer"))
        r = kit.post(port, kit.infer_path(), b'{"id": "broken", "inputs": [')
        check(r.status == 400, "bad JSON: %r" % r)
        expected.append((400, None, "heart", None, len(r.body), "", "infer"))
        r = kit.post(port, kit.infer_path("nosuch"), kit.json_infer_body(S["rows"], req_id="x"))
        check(r.status == 404, "unknown model: %r" % r)
        expected.append((404, None, "nosuch", None, len(r.body), "", "infer"))
        r = kit.post(port, kit.infer_path("digits"), kit.json_infer_body(S["rows"], req_id="y"))
        check(r.status == 503, "model not loaded (explicit mode): %r" % r)
        expected.append((503, None, "digits", None, len(r.body), "", "infer"))
        r = kit.get(port, kit.infer_path())
        check(r.status == 405, "GET infer: %r" % r)
        expected.append((405, "", "heart", None, len(r.body), "", "infer"))
        r = kit.get(port, "/v2/health/live")
        check(r.status == 200, "live: %r" % r)
        expected.append((200, "", "", None, len(r.body), "", "live"))
        r = kit.get(port, "/v2/no/such/path")
        check(r.status == 404, "unknown path: %r" % r)
        expected.append((404, "", "", None, len(r.body), "", "unknown"))
        lines = wait_for(lambda: (lambda ls: ls if len(ls) >= len(expected) else None)(
            read_log(path, fmt)), "%d access log lines" % len(expected))
        time.sleep(0.3)
        lines = read_log(path, fmt)
        check(len(lines) == len(expected), "%d access log lines for %d requests:\n%s"
              % (len(lines), len(expected), "\n".join(map(str, lines))))
        # Lines are written when MHD reports each response sent, so requests on different
        # HTTP threads may log out of order: match each request to exactly one line.
        left = list(enumerate(lines))
        for want in expected:
            status, rid, model, version, nout, trace, route = want
            match = None
            for j, (i, line) in enumerate(left):
                got = {k: str(v) if v is not None else "" for k, v in line.items()}
                if (got.get("status") == str(status) and got.get("route") == route
                        and got.get("model") == model and got.get("bytes_out") == str(nout)
                        and (rid is None or got.get("request_id") == rid)
                        and (version is None or got.get("version") == version)
                        and got.get("trace_id") == trace):
                    match = j
                    break
            check(match is not None, "no access log line for the request %r; lines:\n%s"
                  % (want, "\n".join(map(str, lines))))
            i, line = left.pop(match)
            got = {k: str(v) if v is not None else "" for k, v in line.items()}
            for k in ("ts", "request_id", "model", "version", "generation", "protocol", "status",
                      "bytes_in", "bytes_out", "queue_us", "compute_us", "total_us", "peer",
                      "trace_id"):
                check(k in line, "line %d lacks %s: %r" % (i, k, line))
            check(got["protocol"] == "http", "line %d protocol %r" % (i, got["protocol"]))
            check(re.match(r"^127\.0\.0\.1:\d+$", got["peer"]) is not None,
                  "line %d peer %r" % (i, got["peer"]))
            if status == 200 and route == "infer":
                check(int(got["generation"]) > 0, "line %d generation %r" % (i, got["generation"]))
                check(int(got["bytes_in"]) > 0, "line %d bytes_in %r" % (i, got["bytes_in"]))
                check(int(got["total_us"]) >= int(got["queue_us"]) + int(got["compute_us"]),
                      "line %d: total_us < queue_us + compute_us: %r" % (i, line))
                check(int(got["compute_us"]) > 0, "line %d compute_us 0: %r" % (i, line))
        check(not left, "access log lines no request accounts for: %r" % left)


def test_access_log_logfmt_one_line_per_request():
    access_log_case("logfmt")


def test_access_log_json_one_line_per_request():
    access_log_case("json")


def test_access_log_blocked_writer_drops_and_counts():
    d = kit.tmpdir("keel-fifo-")
    fifo = os.path.join(d, "access.fifo")
    os.mkfifo(fifo)
    # A reader that never reads: the server's open succeeds, its writes fill the pipe.
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        srv = kit.Server(kit.example_repo(), [
            "--preprocess-workers", "0", "--access-log", fifo,
            "--access-log-buffer-bytes", "16k"])
        with kit.running(srv):
            port = srv.port
            n = 1500
            worst = 0.0
            t0 = time.monotonic()
            for _ in range(n):
                t = time.monotonic()
                r = kit.get(port, "/v2/health/live", timeout=10)
                worst = max(worst, time.monotonic() - t)
                check(r.status == 200, "live: %r" % r)
            elapsed = time.monotonic() - t0
            scrapes = 0

            def accounted():
                nonlocal scrapes
                text = kit.scrape(port)
                scrapes += 1
                lines = sum(kit.metric_values(text, "keel_access_log_lines_total"))
                dropped = sum(kit.metric_values(text, "keel_access_log_dropped_lines_total"))
                # Every request before this scrape (the earlier scrapes too) is accounted.
                return (lines, dropped) if lines + dropped == n + scrapes - 1 else None

            lines, dropped = wait_for(accounted, "lines + dropped == requests")
            check(dropped > 0, "no line was dropped although nobody reads the pipe "
                  "(%d queued)" % lines)
            check(lines > 0, "no line was queued")
            kit.log("  %d requests in %.1fs (slowest %.0f ms): %d lines queued, %d dropped"
                    % (n, elapsed, worst * 1000, lines, dropped))
            check(worst < 5.0, "a request took %.1fs while the log was blocked" % worst)
        # kit.running stopped it: exit 0 although the writer was stuck in the pipe.
        check("access log lines dropped" in srv.stderr_text(),
              "the drop was not said in the log:\n%s" % srv.stderr_tail(20))
    finally:
        os.close(rfd)


def test_sighup_reopens_the_access_log():
    d = kit.tmpdir("keel-hup-")
    path = os.path.join(d, "access.log")
    srv = kit.Server(kit.example_repo(), ["--preprocess-workers", "0", "--access-log", path])
    with kit.running(srv):
        port = srv.port
        for _ in range(3):
            check(kit.get(port, "/v2/health/live").status == 200, "live")
        wait_for(lambda: len(read_log(path, "logfmt")) == 3, "3 lines before the rotation")
        os.rename(path, path + ".1")
        srv.signal(signal.SIGHUP)
        wait_for(lambda: "access log reopened" in srv.stderr_text(), "the reopen")
        check(srv.alive(), "SIGHUP stopped the server")
        for _ in range(2):
            check(kit.get(port, "/v2/health/live").status == 200, "live after SIGHUP")
        wait_for(lambda: len(read_log(path, "logfmt")) == 2, "2 lines in the new file")
        old = read_log(path + ".1", "logfmt")
        check(len(old) == 3, "the rotated file has %d lines, want 3" % len(old))
        check(stat.S_ISREG(os.stat(path).st_mode), "the new log is not a regular file")


# ------------------------------------------------------------------------------ traceparent


def test_traceparent_valid_and_malformed():
    d = kit.tmpdir("keel-tp-")
    path = os.path.join(d, "access.log")
    srv = kit.Server(kit.example_repo(), ["--preprocess-workers", "0", "--access-log", path,
                                          "--access-log-format", "json"])
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    valid = [("00-%s-%s-01" % (trace, parent), trace, "01"),
             ("00-%s-%s-00" % (trace, parent), trace, "00"),
             # a later version: read by its 00 prefix, extra fields after '-'
             ("cc-%s-%s-01-what-the-future-holds" % (trace, parent), trace, "01")]
    malformed = ["", "garbage", "00-%s-%s-01" % (trace.upper(), parent),
                 "00-%s-%s-01" % ("0" * 32, parent), "00-%s-%s-01" % (trace, "0" * 16),
                 "ff-%s-%s-01" % (trace, parent), "00-%s-%s-01-extra" % (trace, parent),
                 "00-%s-%s-1" % (trace, parent), "00_%s_%s_01" % (trace, parent),
                 "00-%s-%s-0g" % (trace, parent), "00-%s-%s-01" % (trace[:-1], parent + "0"),
                 "x" * 5000]
    with kit.running(srv):
        port = srv.port
        spans = set()
        for hv, tid, flags in valid:
            r = infer_ok(srv.port, headers={"traceparent": hv})
            check(r.status == 200, "valid traceparent %r: %r" % (hv, r))
            echo = r.header("traceparent")
            check(echo is not None, "no traceparent echoed for %r" % hv)
            m = re.match(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$", echo)
            check(m is not None, "echoed traceparent %r is malformed" % echo)
            check(m.group(1) == tid, "echoed trace id %s, sent %s" % (m.group(1), tid))
            check(m.group(2) != parent and m.group(2) != "0" * 16,
                  "echoed span id %s is the caller's or zero" % m.group(2))
            check(m.group(3) == flags, "echoed flags %s, sent %s" % (m.group(3), flags))
            spans.add(m.group(2))
        check(len(spans) == len(valid), "span ids repeat: %r" % spans)
        for hv in malformed:
            r = infer_ok(port, headers={"traceparent": hv})
            check(r.status == 200, "malformed traceparent %r must be ignored: %r" % (hv[:80], r))
            check(r.header("traceparent") is None, "traceparent echoed for malformed %r"
                  % hv[:80])
        n = len(valid) + len(malformed)
        lines = wait_for(lambda: (lambda ls: ls if len(ls) >= n else None)(read_log(path, "json")),
                         "%d lines" % n)
        for i, line in enumerate(lines[:n]):
            want = trace if i < len(valid) else ""
            check(line["trace_id"] == want, "line %d trace_id %r, want %r"
                  % (i, line["trace_id"], want))


# ------------------------------------------------------------------------------ trace API

STEPS = ["HTTP_RECV_START", "HTTP_RECV_END", "REQUEST_START", "QUEUE_START", "COMPUTE_START",
         "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END", "REQUEST_END",
         "HTTP_SEND_START", "HTTP_SEND_END"]


def post_json(port, path, doc):
    return kit.post(port, path, json.dumps(doc).encode(),
                    headers={"Content-Type": "application/json"})


def check_trace_file(path, want):
    with open(path) as f:
        doc = json.load(f)
    check(isinstance(doc, list), "%s is not a JSON array" % path)
    heads = {e["id"]: e for e in doc if "model_name" in e}
    stamps = {e["id"]: e["timestamps"] for e in doc if "timestamps" in e}
    check(len(heads) == want and set(heads) == set(stamps),
          "%s: %d headers, %d timestamp entries, want %d of each" % (path, len(heads),
                                                                   len(stamps), want))
    for tid, ts in stamps.items():
        check(heads[tid]["model_name"] == "heart" and heads[tid]["model_version"] == 1,
              "trace %d header %r" % (tid, heads[tid]))
        names = [t["name"] for t in ts]
        check(names == STEPS, "trace %d steps %r, want %r" % (tid, names, STEPS))
        ns = [t["ns"] for t in ts]
        check(all(isinstance(x, int) and x > 0 for x in ns), "trace %d ns %r" % (tid, ns))
        check(ns == sorted(ns), "trace %d timestamps are not ordered: %r"
              % (tid, list(zip(names, ns))))
    return doc


def test_trace_settings_round_trip_and_trace_file():
    d = kit.tmpdir("keel-trace-")
    srv = kit.Server(kit.example_repo(), ["--preprocess-workers", "0", "--trace-dir", d])
    with kit.running(srv):
        port = srv.port
        r = kit.get(port, "/v2/trace/setting")
        check(r.status == 200, "GET trace setting: %r" % r)
        g = r.json()
        check(g.get("trace_level") == ["OFF"] and g.get("trace_rate") == "1000"
              and g.get("trace_count") == "-1" and g.get("log_frequency") == "0",
              "default settings %r" % g)
        check("trace" in kit.get(port, "/v2").json().get("extensions", []),
              "server metadata does not list the trace extension")
        for bad in ({"trace_level": ["TENSORS"]}, {"trace_level": "LOUD"},
                    {"trace_rate": "0"}, {"trace_rate": "x"}, {"trace_count": "-2"},
                    {"log_frequency": "-1"}, {"trace_file": "../escape.json"},
                    {"trace_file": "/tmp/abs.json"}, {"no_such_setting": "1"}):
            r = post_json(port, "/v2/trace/setting", bad)
            check(r.status == 400 and r.error_message(), "POST %r: want 400, got %r" % (bad, r))
        r = kit.post(port, "/v2/trace/setting", b"[1,2")
        check(r.status == 400, "bad JSON body: %r" % r)
        check(kit.get(port, "/v2/trace/setting").json() == g, "a refused POST changed settings")
        r = post_json(port, "/v2/trace/setting", {
            "trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "5",
            "log_frequency": "0", "trace_file": "all.json"})
        check(r.status == 200, "POST global: %r" % r)
        want = {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "5",
                "log_frequency": "0", "trace_file": "all.json"}
        got = kit.get(port, "/v2/trace/setting").json()
        for k, v in want.items():
            check(got.get(k) == v, "GET after POST: %s = %r, want %r" % (k, got.get(k), v))
        # A model override copies the global settings and changes what is posted.
        r = post_json(port, "/v2/models/digits/trace/setting", {"trace_rate": "7"})
        check(r.status == 200, "POST model: %r" % r)
        m = kit.get(port, "/v2/models/digits/trace/setting").json()
        check(m.get("trace_rate") == "7" and m.get("trace_file") == "all.json",
              "model override %r" % m)
        r = post_json(port, "/v2/models/digits/trace/setting", {"trace_rate": None})
        check(r.json().get("trace_rate") == "1", "null resets to global: %r" % r.json())
        r = post_json(port, "/v2/models/digits/trace/setting", {})
        check(r.status == 200, "remove override: %r" % r)
        r = kit.get(port, "/v2/models/nosuch/trace/setting")
        check(r.status == 404, "unknown model's trace setting: %r" % r)
        for i in range(8):
            check(infer_ok(port, req_id="t%d" % i).status == 200, "infer %d" % i)
        time.sleep(0.3)
        got = kit.get(port, "/v2/trace/setting").json()
        check(got.get("trace_count") == "0", "trace_count after 8 traced requests with count "
              "5: %r" % got.get("trace_count"))
        # log_frequency: every 2 traces to <file>.<k>
        r = post_json(port, "/v2/trace/setting", {"trace_count": "-1", "log_frequency": "2",
                                                  "trace_file": "batch.json"})
        check(r.status == 200, "POST log_frequency: %r" % r)
        for i in range(4):
            check(infer_ok(port).status == 200, "infer")
        wait_for(lambda: os.path.exists(os.path.join(d, "batch.json.1")), "batch.json.1")
    # The 5 traces of all.json are written at the latest when the server stops.
    check_trace_file(os.path.join(d, "all.json"), 5)
    check_trace_file(os.path.join(d, "batch.json.0"), 2)
    check_trace_file(os.path.join(d, "batch.json.1"), 2)
    check(not os.path.exists(os.path.join(d, "batch.json.2")), "an empty batch was written")


GRPC_STEPS = ["GRPC_WAITREAD_START", "GRPC_WAITREAD_END"] + STEPS[2:9] + [
    "GRPC_SEND_START", "GRPC_SEND_END"]


def test_grpc_feeds_observability():
    import grpckit
    st = grpckit.load()
    grpc, pb, pbg = st.grpc, st.pb, st.pbg
    d = kit.tmpdir("keel-grpc-obs-")
    path = os.path.join(d, "access.log")
    srv = kit.Server(kit.example_repo(), ["--preprocess-workers", "0", "--access-log", path,
                                          "--access-log-format", "logfmt", "--trace-dir", d],
                     grpc=True)
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    tp = "00-%s-00f067aa0ba902b7-01" % trace
    with kit.running(srv):
        port = srv.port
        r = post_json(port, "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"],
                                                  "trace_rate": "1", "trace_file": "g.json"})
        check(r.status == 200, "trace settings: %r" % r)
        st0 = kit.stat_counts(kit.model_stats(port, "heart"))
        samples0, _ = kit.parse_metrics(kit.scrape(port))

        def grpc_codes(samples):
            return {lb["code"]: v for n, lb, v in samples
                    if n == "keel_responses_total" and lb.get("protocol") == "grpc"}
        c0 = grpc_codes(samples0)
        ch = grpc.insecure_channel("127.0.0.1:%d" % srv.grpc_port)
        stub = pbg.GRPCInferenceServiceStub(ch)
        expected = []  # (route, status code, request id, model, trace id)
        # Unary: successes (one with a traceparent), a model failure, an unknown model, a
        # malformed message.
        for i in range(3):
            md = [("traceparent", tp)] if i == 1 else []
            resp, call = stub.ModelInfer.with_call(
                grpckit.rows_request(pb, S["rows"], req_id="g%d" % i), metadata=md)
            check(resp.id == "g%d" % i, "answer id %r" % resp.id)
            echo = dict(call.initial_metadata()).get("traceparent")
            if i == 1:
                m = re.match(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$", echo or "")
                check(m is not None and m.group(1) == trace and m.group(2) != "00f067aa0ba902b7",
                      "traceparent echoed in the initial metadata: %r" % echo)
            else:
                check(echo is None, "traceparent echoed without one sent: %r" % echo)
            expected.append(("infer", 0, "g%d" % i, "heart", trace if i == 1 else ""))
        bad = grpckit.rows_request(pb, S["rows"], req_id="bad")
        bad.inputs[0].shape[1] = 12
        bad.raw_input_contents[0] = bad.raw_input_contents[0][:12 * 4 * len(S["rows"])]
        try:
            stub.ModelInfer(bad)
            raise kit.TestFailure("a 12-feature request succeeded")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, "bad shape: %r" % e.code())
        expected.append(("infer", 3, "bad", "heart", ""))
        try:
            stub.ModelInfer(grpckit.rows_request(pb, S["rows"], model="nosuch", req_id="u"))
            raise kit.TestFailure("unknown model succeeded")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.NOT_FOUND, "unknown model: %r" % e.code())
        expected.append(("infer", 5, None, "nosuch", ""))
        raw = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            raw(b"\xff\xff\xff\xff")
            raise kit.TestFailure("malformed protobuf succeeded")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, "malformed: %r" % e.code())
        expected.append(("infer", 3, "", "", ""))
        # A stream: two good messages and one for an unknown model.
        msgs = [grpckit.rows_request(pb, S["rows"], req_id="s0"),
                grpckit.rows_request(pb, S["rows"], model="nosuch", req_id="s1"),
                grpckit.rows_request(pb, S["rows"], req_id="s2")]
        answers = list(stub.ModelStreamInfer(iter(msgs), metadata=[("traceparent", tp)]))
        check(len(answers) == 3 and sum(1 for a in answers if a.error_message) == 1,
              "stream answers %r" % answers)
        expected += [("stream_infer", 0, "s0", "heart", trace),
                     ("stream_infer", 5, None, "nosuch", trace),
                     ("stream_infer", 0, "s2", "heart", trace)]
        ch.close()
        kit.wait_idle(port)
        st1 = kit.stat_counts(kit.model_stats(port, "heart"))
        reached = (st1["success"] + st1["fail"]) - (st0["success"] + st0["fail"])
        check(reached == 6, "statistics grew by %d, 6 gRPC requests reached heart" % reached)
        samples, _ = kit.parse_metrics(kit.scrape(port))
        for fam in ("keel_request_duration_seconds", "keel_request_queue_duration_seconds"):
            hs = hist(samples, fam)
            check(("1", "grpc") in hs, "no %s series with protocol=grpc: %r" % (fam, list(hs)))
            check(hs[("1", "grpc")]["count"] == reached,
                  "%s{protocol=grpc} counts %r, %d gRPC requests reached heart"
                  % (fam, hs[("1", "grpc")]["count"], reached))
        c1 = grpc_codes(samples)
        for code, n in (("OK", 5), ("INVALID_ARGUMENT", 2), ("NOT_FOUND", 2)):
            got = c1.get(code, 0) - c0.get(code, 0)
            check(got == n, "keel_responses_total{protocol=grpc,code=%s} grew by %g, want %d"
                  % (code, got, n))
        def grpc_lines():
            return [ln for ln in read_log(path, "logfmt") if ln.get("protocol") == "grpc"]
        wait_for(lambda: len(grpc_lines()) >= len(expected), "%d lines" % len(expected))
        time.sleep(0.3)
        lines = grpc_lines()
        check(len(lines) == len(expected), "%d gRPC access log lines for %d requests:\n%s"
              % (len(lines), len(expected), "\n".join(map(str, lines))))
        left = [{k: str(v) for k, v in ln.items()} for ln in lines]
        for want in expected:
            route, code, rid, model, tid = want
            match = [i for i, got in enumerate(left)
                     if got.get("route") == route and got.get("status") == str(code)
                     and got.get("model") == model and got.get("trace_id") == tid
                     and (rid is None or got.get("request_id") == rid)]
            check(match, "no access log line for the request %r; lines:\n%s"
                  % (want, "\n".join(map(str, lines))))
            got = left.pop(match[0])
            check(re.match(r"^127\.0\.0\.1:\d+$", got.get("peer", "")) is not None
                  and got.get("method") == ("ModelInfer" if route == "infer"
                                            else "ModelStreamInfer"),
                  "access log line %r for the request %r" % (got, want))
            if code == 0:
                check(int(got["generation"]) > 0 and int(got["bytes_in"]) > 0
                      and int(got["bytes_out"]) > 0 and int(got["compute_us"]) > 0
                      and int(got["total_us"]) >= int(got["compute_us"]),
                      "line %r" % got)
    with open(os.path.join(d, "g.json")) as f:
        doc = json.load(f)
    heads = {e["id"]: e for e in doc if "model_name" in e}
    stamps = {e["id"]: e["timestamps"] for e in doc if "timestamps" in e}
    check(len(stamps) == reached and set(heads) == set(stamps),
          "%d traces, want one per gRPC request that reached heart (%d): %r"
          % (len(stamps), reached, doc))
    for tid, ts in stamps.items():
        names, ns = [t["name"] for t in ts], [t["ns"] for t in ts]
        if heads[tid]["request_id"] != "bad":
            check(names == GRPC_STEPS, "gRPC trace steps %r, want %r" % (names, GRPC_STEPS))
        check([n for n in GRPC_STEPS if n in names] == names and names[0] == GRPC_STEPS[0]
              and names[-1] == GRPC_STEPS[-1], "gRPC trace steps %r out of order" % names)
        check(ns == sorted(ns), "gRPC trace timestamps not ordered: %r" % list(zip(names, ns)))


def test_tracing_needs_trace_dir():
    srv = kit.Server(kit.example_repo(), ["--preprocess-workers", "0"])
    with kit.running(srv):
        r = post_json(srv.port, "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]})
        check(r.status == 400 and "--trace-dir" in r.error_message(),
              "tracing without --trace-dir: %r" % r)


def test_slow_scrape_holds_up_no_inference():
    """GET /metrics is rendered on the scrape thread, not on an HTTP loop: with one loop and
    every render made 3 s slower (KEEL_FAULT_SCRAPE_DELAY_MS, a hook of fault-injection
    builds), inferences sent on other connections after the scrape are all answered before
    the scrape's answer comes, and the scrape then answers in full. (Rendered on the loop, as
    before, the inferences waited behind the render and came after it.)"""
    env = dict(os.environ, KEEL_FAULT_SCRAPE_DELAY_MS="3000")
    srv = kit.Server(kit.example_repo(), ["--preprocess-workers", "0", "--http-threads", "1"],
                     env=env)
    with kit.running(srv):
        r = infer_ok(srv.port)
        check(r.status == 200, "warm-up inference: %r" % r)
        out = {}

        def scrape():
            try:
                out["r"] = kit.get(srv.port, "/metrics", timeout=60)
            except Exception as e:  # reported below
                out["r"] = e
            out["t"] = time.monotonic()

        t = threading.Thread(target=scrape, daemon=True)
        t.start()
        time.sleep(0.3)  # the scrape is being rendered (or queued to be)
        answered = []
        for i in range(5):
            r = infer_ok(srv.port, req_id="during-scrape-%d" % i)
            check(r.status == 200, "inference during a scrape: %r" % r)
            answered.append(time.monotonic())
        t.join(60)
        check(not t.is_alive(), "the scrape never answered")
        r = out.get("r")
        check(isinstance(r, kit.Response) and r.status == 200,
              "the slow scrape: %r" % (r,))
        text = r.body.decode("utf-8")
        check("keel_inference_request_success_total{" in text,
              "the scrape's text lacks keel's families: %r" % text[:300])
        check(r.header("Content-Type", "").startswith("text/plain; version=0.0.4"),
              "scrape content type %r" % r.header("Content-Type"))
        check(max(answered) < out["t"],
              "an inference on the scrape's HTTP loop was answered %.3f s after the scrape: the "
              "render held up the loop" % (max(answered) - out["t"]))


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_histograms_count_every_request, test_access_log_logfmt_one_line_per_request,
             test_access_log_json_one_line_per_request,
             test_access_log_blocked_writer_drops_and_counts, test_sighup_reopens_the_access_log,
             test_traceparent_valid_and_malformed, test_trace_settings_round_trip_and_trace_file,
             test_tracing_needs_trace_dir, test_grpc_feeds_observability,
             test_slow_scrape_holds_up_no_inference], setup=setup)
