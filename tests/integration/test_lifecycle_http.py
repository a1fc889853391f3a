"""test_lifecycle_http.py: the model lifecycle as an operator sees it through `keel serve`.

Poll mode: a broken new version (truncated model file) dropped into the repository fails its
load after the settle interval; the old version keeps answering every request; the failure
is visible in the repository index (state, reason, attempts, next retry) and in /metrics
(keel_model_load_error, keel_model_load_failures, next retry time); replacing the file with a
good one makes the new version serve, and the per-generation memory series follow the serving
generation (the old generation's series disappear). /metrics stays promtool-clean.

Explicit mode with --model-memory-limit 1k: every load is refused with 503 naming the limit.
"""

import os
import threading
import time

import kit
from kit import check

S = {}


def setup():
    work = kit.tmpdir("keel-train-")
    S["B"] = kit.train_model(work, "model_b", rounds=12, depth=4)
    S["rows"] = kit.complete_rows()[:4]


def index_row(port, model, version):
    r = kit.post(port, "/v2/repository/index", b"{}")
    check(r.status == 200, "index: %r" % r)
    doc = r.json()
    kit.SCHEMAS.validate("repository_index_response", doc)
    for e in doc:
        if e.get("name") == model and e.get("version") == str(version):
            return e
    return None


def wait_until(what, fn, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    raise kit.TestFailure("timed out waiting for %s" % what)


def memory_series(text, model):
    samples, _ = kit.parse_metrics(text)
    return {(l["version"], l["generation"], l["kind"]): v for n, l, v in samples
            if n == "keel_generation_memory_bytes" and l.get("model") == model}


def test_poll_failed_version_then_fixed():
    repo = kit.copy_repo()
    args = ["--model-control-mode", "poll", "--repository-poll-secs", "1",
            "--repository-settle-ms", "300", "--load-retry-max-secs", "2"]
    with kit.running(kit.Server(repo, args)) as srv:
        port = srv.port
        body = kit.json_infer_body(S["rows"])
        stop = threading.Event()
        errors = []
        answers = [0]

        def client():  # one request; kit.Worker repeats it and keeps what it raises
            r = kit.post(port, kit.infer_path("heart"), body)
            if r.status != 200:
                errors.append(r)
            else:
                answers[0] += 1

        text = kit.scrape(port)
        mem1 = memory_series(text, "heart")
        check(("1", str(index_row(port, "heart", 1)["keel"]["generation"]), "rss") in mem1,
              "no memory series for heart version 1: %r" % mem1)
        row = index_row(port, "heart", 1)
        for k in ("load_attempts", "load_failures", "last_attempt_unix_ms", "next_retry_unix_ms",
                  "pinned", "evicted", "memory"):
            check(k in row["keel"], "index row lacks keel.%s: %r" % (k, row))
        check(row["keel"]["memory"]["charged_bytes"] > 0, "charged 0: %r" % row)

        threads = kit.start_workers(client, stop, 2)
        try:
            # A truncated version 2: the newest version, so keel tries it and must keep 1.
            good = open(S["B"], "rb").read()
            os.makedirs(os.path.join(repo, "heart", "2"))
            with open(os.path.join(repo, "heart", "2", "model.json"), "wb") as f:
                f.write(good[: len(good) // 2])
            row = wait_until("the failed load of version 2",
                             lambda: (lambda r: r if r and r["keel"]["load_failures"] >= 2
                                      else None)(index_row(port, "heart", 1)))
            check(row["state"] == "READY", "version 1 not READY after a failed load: %r" % row)
            check("heart/2/model.json" in row["reason"], "reason does not name the file: %r"
                  % row)
            check(row["keel"]["next_retry_unix_ms"] > row["keel"]["last_attempt_unix_ms"] > 0,
                  "no retry scheduled: %r" % row)
            text = kit.scrape(port)
            kit.promtool_check(text, "the scrape after a failed load")
            samples, _ = kit.parse_metrics(text)
            err = [(l, v) for n, l, v in samples
                   if n == "keel_model_load_error" and l.get("model") == "heart"]
            check(err == [({"model": "heart", "reason": "load"}, 1.0)],
                  "keel_model_load_error: %r" % err)
            fails = [v for n, l, v in samples
                     if n == "keel_model_load_failures" and l.get("model") == "heart"]
            check(fails and fails[0] >= 2, "keel_model_load_failures: %r" % fails)

            # The complete file: version 2 serves, its memory series replace version 1's.
            kit.replace_file(S["B"], os.path.join(repo, "heart", "2", "model.json"))
            wait_until("version 2 to serve",
                       lambda: kit.get(port, "/v2/models/heart/versions/2/ready").status == 200)
        finally:
            stop.set()
        kit.join_workers(threads)
        check(not errors, "%d requests failed, first: %r" % (len(errors), errors[:1]))
        check(answers[0] > 0, "no answers")
        row = index_row(port, "heart", 2)
        check(row["keel"]["load_failures"] == 0 and row["reason"] == "",
              "after the fix: %r" % row)
        gen2 = str(row["keel"]["generation"])
        mem = memory_series(kit.scrape(port), "heart")
        # pss is absent where smaps_rollup is not read (sanitizer builds); the rest always.
        want = {("2", gen2, k) for k in ("rss", "estimate", "charged")}
        check(want <= set(mem) <= want | {("2", gen2, "pss")},
              "memory series after the swap (version 1's must be gone): %r" % sorted(mem))
        check(mem[("2", gen2, "estimate")] == os.path.getsize(S["B"]),
              "estimate is not the model file's size: %r" % mem)
        kit.wait_idle(port)


def test_memory_limit_refuses_loads():
    repo = kit.copy_repo()
    args = ["--model-control-mode", "explicit", "--model-memory-limit", "1k"]
    with kit.running(kit.Server(repo, args)) as srv:
        port = srv.port
        r = kit.post(port, "/v2/repository/models/heart/load", b"{}")
        check(r.status == 503, "load under a 1 KiB limit: %r" % r)
        check("model memory limit" in r.error_message(), "message: %r" % r.error_message())
        text = kit.scrape(port)
        check(kit.metric_values(text, "keel_model_memory_limit_bytes") == [1024.0],
              "limit metric: %r" % kit.metric_values(text, "keel_model_memory_limit_bytes"))
        # The server is fine: health answers, and the index shows why.
        check(kit.get(port, "/v2/health/live").status == 200, "not live")
        row = [e for e in kit.post(port, "/v2/repository/index", b"{}").json()
               if e.get("name") == "heart"][0]
        check("model memory limit" in row["reason"], "index reason: %r" % row)


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_poll_failed_version_then_fixed, test_memory_limit_refuses_loads], setup=setup)
