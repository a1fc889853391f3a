"""test_perf.py: `keel perf` against the real `keel serve`.

Counts, not timings: with no warm-up every request keel perf sends is measured, so the
requests it reports as successful must equal exactly what the server's statistics counted
(and, at batch 4, four inferences per request). A missing model gives only failures, all
counted under their HTTP status and named with the server's message. The CSV has its
columns and one row per level, percentiles are ordered, and an open-loop run sends the
number of requests its schedule says. Usage mistakes exit 2.

Over gRPC (--protocol grpc, unary and --grpc-stream) the same count check holds against the
server's statistics, failures are counted by gRPC status name (or stream_error), and a port
that is not a reachable gRPC server is one clear error."""

import csv
import os
import re
import subprocess

import kit
from kit import check

S = {}
COLUMNS = ["mode", "level", "window_s", "requests", "ok", "failed", "throughput_rps",
           "infer_per_s", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us",
           "unsent", "connections", "gen_cpu_us_per_req", "errors"]


def setup():
    S["server"] = kit.Server(kit.example_repo(), grpc=True).start()
    S["port"] = S["server"].port
    S["dir"] = kit.tmpdir("keel-perf-")
    S["fds"] = S["server"].fd_count()


def teardown():
    kit.wait_idle(S["port"])
    S["server"].wait_fds(S["fds"])
    S["server"].stop()


def perf(*args, expect_rc=0, port=None):
    """Runs keel perf against the test server; returns (stdout, stderr, csv rows)."""
    path = os.path.join(S["dir"], "out.csv")
    if os.path.exists(path):
        os.unlink(path)
    cmd = [kit.KEEL, "perf", "-u", "127.0.0.1:%d" % (port or S["port"]), "--no-progress",
           "-f", path] + list(args)
    kit.vlog("running:", " ".join(cmd))
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    out, err = p.stdout.decode(), p.stderr.decode()
    check(p.returncode == expect_rc, "keel perf %s exited %d, expected %d\nstdout:\n%s\nstderr:\n%s"
          % (" ".join(args), p.returncode, expect_rc, out, err))
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            check(header == COLUMNS, "CSV header %r, expected %r" % (header, COLUMNS))
            rows = [dict(zip(header, r)) for r in reader]
    return out, err, rows


def check_row(row):
    check(int(row["requests"]) >= 0 and int(row["ok"]) >= 0, "bad counts: %r" % row)
    if int(row["ok"]) > 0:
        q = [float(row[k]) for k in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us")]
        check(q[0] > 0 and q == sorted(q), "percentiles not ordered: %r" % row)
        check(0 < float(row["mean_us"]) <= q[4], "mean outside (0, max]: %r" % row)
        check(float(row["gen_cpu_us_per_req"]) > 0, "no generator CPU time: %r" % row)


def heart_success():
    return kit.stat_counts(kit.model_stats(S["port"], "heart"))


def test_sweep_counts_match_server():
    before = heart_success()
    out, _, rows = perf("-m", "heart", "--concurrency-range", "1:3:2", "-d", "0.5",
                        "--warmup", "0")
    after = heart_success()
    check([r["level"] for r in rows] == ["1", "3"], "levels %r" % [r["level"] for r in rows])
    ok = 0
    for r in rows:
        check_row(r)
        check(r["mode"] == "concurrency" and int(r["failed"]) == 0 and r["errors"] == "",
              "row %r" % r)
        check(int(r["ok"]) > 0, "no successful request at level %s" % r["level"])
        check(int(r["connections"]) == int(r["level"]), "connections: %r" % r)
        ok += int(r["ok"])
    check(after["success"] - before["success"] == ok,
          "server counted %d successes, keel perf %d" % (after["success"] - before["success"], ok))
    check(after["fail"] == before["fail"], "server counted failures")
    check("concurrency" in out and "p99" in out, "no table in the output:\n" + out)


def test_binary_batch_counts_rows():
    before = heart_success()
    out, _, rows = perf("-m", "heart", "-b", "4", "--input-tensor-format", "binary",
                        "--concurrency-range", "2", "-d", "0.5", "--warmup", "0")
    after = heart_success()
    # The server's own count: rows per backend execution over the run (heart batches).
    m = re.search(r"server: (\d+) rows in (\d+) backend executions, average batch ([0-9.]+)", out)
    check(m is not None, "no server line in keel perf's output:\n" + out)
    d_exec = after["execution_count"] - before["execution_count"]
    check((int(m.group(1)), int(m.group(2))) ==
          (after["inference_count"] - before["inference_count"], d_exec) and
          abs(float(m.group(3)) - int(m.group(1)) / max(d_exec, 1)) < 0.01,
          "keel perf says %s; the statistics %d rows in %d executions"
          % (m.group(0), after["inference_count"] - before["inference_count"], d_exec))
    check(len(rows) == 1 and int(rows[0]["failed"]) == 0, "rows %r" % rows)
    check_row(rows[0])
    ok = int(rows[0]["ok"])
    check(after["success"] - before["success"] == ok, "request count differs")
    check(after["inference_count"] - before["inference_count"] == 4 * ok,
          "server inferred %d rows for %d requests of 4"
          % (after["inference_count"] - before["inference_count"], ok))
    rps, ips = float(rows[0]["throughput_rps"]), float(rows[0]["infer_per_s"])
    check(abs(ips - 4 * rps) < 1e-6 * max(ips, 1) + 0.2, "infer/s %s is not 4 x req/s %s"
          % (ips, rps))


def test_input_data_file():
    path = os.path.join(S["dir"], "rows.txt")
    with open(path, "w") as f:
        f.write("# heart rows\n")
        for r in kit.complete_rows()[:5]:
            f.write(" ".join(kit.fmt_f32(x) for x in r) + "\n")
    _, _, rows = perf("-m", "heart", "--input-data", path, "-d", "0.3", "--warmup", "0")
    check(len(rows) == 1 and int(rows[0]["ok"]) > 0 and int(rows[0]["failed"]) == 0,
          "rows %r" % rows)


def test_missing_model_errors_by_status():
    before = heart_success()
    out, _, rows = perf("-m", "nosuch", "--input", "features:FP32:1x13", "--concurrency-range",
                        "2", "-d", "0.3", "--warmup", "0", expect_rc=1)
    check(len(rows) == 1, "rows %r" % rows)
    r = rows[0]
    check(int(r["ok"]) == 0 and int(r["failed"]) > 0, "row %r" % r)
    check(r["errors"] == "404:%s" % r["failed"], "errors column %r for %s failures"
          % (r["errors"], r["failed"]))
    check("unknown model" in out and "404" in out, "failure not named:\n" + out)
    check(heart_success() == before, "heart was inferred on")
    # Without --input the metadata request already fails: one clear message, status 1.
    _, err, rows = perf("-m", "nosuch", "-d", "0.3", expect_rc=1)
    check("404" in err and rows == [], "stderr %r rows %r" % (err, rows))


def test_open_loop_follows_schedule():
    rate, secs = 200, 1.0
    _, _, rows = perf("-m", "heart", "--request-rate-range", str(rate), "-d", str(secs),
                      "--warmup", "0", "--max-connections", "16")
    check(len(rows) == 1 and rows[0]["mode"] == "rate", "rows %r" % rows)
    r = rows[0]
    check_row(r)
    sent = int(r["ok"]) + int(r["failed"]) + int(r["unsent"])
    check(0.8 * rate * secs <= sent <= 1.2 * rate * secs + 1,
          "%d requests for %g s at %d/s" % (sent, secs, rate))
    check(int(r["failed"]) == 0, "row %r" % r)


def test_static_endpoint():
    _, _, rows = perf("--endpoint", "/v2/health/live", "--concurrency-range", "2", "-d", "0.3",
                      "--warmup", "0")
    check(len(rows) == 1 and int(rows[0]["ok"]) > 0 and int(rows[0]["failed"]) == 0,
          "rows %r" % rows)


def grpc_counts(*extra):
    """A gRPC run at concurrency 1 and 3 with no warm-up: every request keel perf counts as
    successful is one the server's statistics counted, and 4 rows each at batch 4."""
    before = heart_success()
    out, _, rows = perf("--protocol", "grpc", "-m", "heart", "-b", "4", "--concurrency-range",
                        "1:3:2", "-d", "0.5", "--warmup", "0", *extra, port=S["server"].grpc_port)
    after = heart_success()
    check([r["level"] for r in rows] == ["1", "3"], "levels %r" % [r["level"] for r in rows])
    ok = 0
    for r in rows:
        check_row(r)
        check(int(r["failed"]) == 0 and r["errors"] == "" and int(r["ok"]) > 0, "row %r" % r)
        check(int(r["connections"]) == int(r["level"]), "calls in flight: %r" % r)
        ok += int(r["ok"])
    check(after["success"] - before["success"] == ok,
          "server counted %d successes, keel perf %d" % (after["success"] - before["success"], ok))
    check(after["inference_count"] - before["inference_count"] == 4 * ok,
          "server inferred %d rows for %d requests of 4"
          % (after["inference_count"] - before["inference_count"], ok))
    check(after["fail"] == before["fail"], "server counted failures")
    return out


def test_grpc_unary_counts_match_server():
    out = grpc_counts()
    check("gRPC ModelInfer" in out, "protocol not named:\n" + out)


def test_grpc_stream_counts_match_server():
    out = grpc_counts("--grpc-stream", "--grpc-channels", "2")
    check("gRPC ModelStreamInfer" in out, "protocol not named:\n" + out)


def test_grpc_errors_by_status_name():
    before = heart_success()
    for extra, kind in (([], "NOT_FOUND"), (["--grpc-stream"], "stream_error")):
        out, _, rows = perf("--protocol", "grpc", "-m", "nosuch", "--input", "features:FP32:1x13",
                            "--concurrency-range", "2", "-d", "0.3", "--warmup", "0", *extra,
                            expect_rc=1, port=S["server"].grpc_port)
        check(len(rows) == 1 and int(rows[0]["ok"]) == 0 and int(rows[0]["failed"]) > 0,
              "rows %r" % rows)
        check(rows[0]["errors"] == "%s:%s" % (kind, rows[0]["failed"]), "errors column %r"
              % rows[0]["errors"])
        check("unknown model 'nosuch'" in out, "failure not named:\n" + out)
    check(heart_success() == before, "heart was inferred on")
    # Without --input the metadata call fails: one clear message, status 1.
    _, err, rows = perf("--protocol", "grpc", "-m", "nosuch", "-d", "0.3", expect_rc=1,
                        port=S["server"].grpc_port)
    check("NOT_FOUND" in err and "unknown model" in err and rows == [], "stderr %r" % err)


def test_grpc_timeout_enforced_by_perf():
    """keel perf's gRPC channel has no deadline filter: its loop must end a call that gets no
    answer within --timeout. A grpcio server that answers ModelMetadata but never ModelInfer,
    with its own deadline checking off, so that nothing but keel perf ends the calls."""
    import threading
    from concurrent import futures

    import grpckit
    st = grpckit.load()
    release = threading.Event()

    class Svc(st.pbg.GRPCInferenceServiceServicer):
        def ModelMetadata(self, request, context):
            r = st.pb.ModelMetadataResponse(name=request.name)
            t = r.inputs.add()
            t.name, t.datatype = "features", "FP32"
            t.shape.extend([-1, 13])
            return r

        def ModelInfer(self, request, context):
            release.wait(60)
            context.abort(st.grpc.StatusCode.INTERNAL, "released")

        def ModelStreamInfer(self, request_iterator, context):
            next(request_iterator)
            release.wait(60)
            context.abort(st.grpc.StatusCode.INTERNAL, "released")

    srv = st.grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.enable_deadline_checking", 0)])
    st.pbg.add_GRPCInferenceServiceServicer_to_server(Svc(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        for extra in ([], ["--grpc-stream"]):
            out, _, rows = perf("--protocol", "grpc", "-m", "heart", "--concurrency-range", "2",
                                "-d", "0.3", "--warmup", "0", "--timeout", "0.5", *extra,
                                expect_rc=1, port=port)
            check(len(rows) == 1 and int(rows[0]["ok"]) == 0 and int(rows[0]["failed"]) >= 2,
                  "%r: rows %r" % (extra, rows))
            check(rows[0]["errors"] == "DEADLINE_EXCEEDED:%s" % rows[0]["failed"],
                  "%r: errors column %r" % (extra, rows[0]["errors"]))
            check("no answer within --timeout" in out, "%r: failure not named:\n%s"
                  % (extra, out))
    finally:
        release.set()
        srv.stop(0)


def test_grpc_unreachable_is_one_clear_error():
    # The HTTP port (not gRPC) and a port nobody listens on; with --input too (no metadata
    # needed, but the target is still checked first).
    for port in (S["port"], kit.free_port()):
        for extra in ([], ["--input", "features:FP32:1x13"]):
            _, err, rows = perf("--protocol", "grpc", "-m", "heart", "-d", "0.3", *extra,
                                expect_rc=1, port=port)
            check("cannot reach a gRPC server at 127.0.0.1:%d" % port in err and rows == [],
                  "port %d %r: stderr %r rows %r" % (port, extra, err, rows))


def test_usage_errors():
    for args in (["--concurrency-range", "0"], ["--input-tensor-format", "xml"], ["--bogus"],
                 ["-b", "0"], [], ["--protocol", "udp"], ["--grpc-stream"],
                 ["--protocol", "grpc", "--input-tensor-format", "binary"],
                 ["--protocol", "grpc", "--endpoint", "/v2"], ["--grpc-channels", "0"]):
        a = list(args)
        if "--bogus" not in a and a != []:
            a = ["-m", "heart"] + a
        p = subprocess.run([kit.KEEL, "perf"] + a, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
        check(p.returncode == 2 and b"keel perf:" in p.stderr,
              "keel perf %s: status %d, stderr %r" % (a, p.returncode, p.stderr))


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_sweep_counts_match_server, test_binary_batch_counts_rows, test_input_data_file,
             test_missing_model_errors_by_status, test_open_loop_follows_schedule,
             test_static_endpoint, test_grpc_unary_counts_match_server,
             test_grpc_stream_counts_match_server, test_grpc_errors_by_status_name,
             test_grpc_timeout_enforced_by_perf,
             test_grpc_unreachable_is_one_clear_error, test_usage_errors],
            setup=setup, teardown=teardown)
