"""test_metrics.py: /metrics under load is valid Prometheus text and counts exactly.

Client threads send a known mix of requests: successes (JSON and binary) and failures that
reach the model (a shape that does not match config.json, an unknown input name). Scrapes
taken while they run must pass `promtool check metrics` (format and lint). Afterwards the
per-model success and failure counters (any metric family with "success" or "fail" in its
name, or in a status/result/outcome label, for model="heart") must have grown by exactly
what the clients received, and keel_live_leases / keel_live_requests are back to 0."""

import json
import re
import threading
import time

import kit
from kit import check

S = {}
THREADS = 4
PER_THREAD = 50  # every 5th request fails
TIME_WORDS = ("seconds", "_ns", "duration", "latency", "bucket", "_sum", "time", "bytes",
              "load")


def setup():
    S["repo"] = kit.example_repo()
    S["rows"] = kit.complete_rows()[:3]
    S["ref"] = kit.keel_reference(S["repo"], "heart", S["rows"])
    S["server"] = kit.Server(S["repo"]).start()
    S["port"] = S["server"].port
    kit.decode_infer(kit.post(S["port"], kit.infer_path(), kit.json_infer_body(S["rows"])))
    S["fds"] = S["server"].fd_count()


def teardown():
    kit.wait_idle(S["port"])
    S["server"].wait_fds(S["fds"])
    S["server"].stop()


def classify(samples):
    """{(family key, kind)}: sums over model="heart" samples of success/failure counters."""
    out = {}
    for name, labels, value in samples:
        if labels.get("model") != "heart":
            continue
        low = name.lower()
        if any(w in low for w in TIME_WORDS):
            continue
        kind = None
        if "success" in low:
            kind = "success"
        elif "fail" in low:
            kind = "failure"
        key = name
        if kind is None:
            for lk in ("status", "result", "outcome"):
                lv = labels.get(lk, "").lower()
                if "success" in lv or lv == "ok":
                    kind, key = "success", "%s{%s=%s}" % (name, lk, lv)
                elif "fail" in lv or "error" in lv:
                    kind, key = "failure", "%s{%s=*fail*}" % (name, lk)
        if kind is not None:
            out[(key, kind)] = out.get((key, kind), 0.0) + value
    return out


def test_metrics_under_load_and_exact_counts():
    port = S["port"]
    kit.wait_idle(port)
    S["m0_text"] = kit.scrape(port)
    S["st0"] = kit.stat_counts(kit.model_stats(port, "heart"))
    m0 = classify(kit.parse_metrics(S["m0_text"])[0])
    jbody = kit.json_infer_body(S["rows"])
    bbody, bhdrs = kit.binary_infer_body(S["rows"])
    bad_shape = json.dumps({"inputs": [{"name": "features", "shape": [1, 12], "datatype": "FP32",
                                        "data": [0.25] * 12}]}).encode()
    bad_input = kit.json_infer_body(S["rows"], input_name="nosuch")
    counts = {"ok": 0, "fail": 0, "other": []}
    lock = threading.Lock()

    def client(i):
        for n in range(PER_THREAD):
            if n % 5 == 4:
                body, hdrs, want = (bad_shape if n % 10 == 4 else bad_input), {}, 400
            elif n % 2:
                body, hdrs, want = jbody, {}, 200
            else:
                body, hdrs, want = bbody, bhdrs, 200
            try:
                r = kit.post(port, kit.infer_path(), body, headers=hdrs)
                st = r.status
                if st == 200:
                    _, vals = kit.decode_infer(r)
                    if not kit.same_f32(vals["probability"], S["ref"]):
                        st = "wrong answer"
            except Exception as e:
                st = repr(e)
            with lock:
                if st == want == 200:
                    counts["ok"] += 1
                elif st == want == 400:
                    counts["fail"] += 1
                else:
                    counts["other"].append((want, st))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    texts = []  # scrapes taken while the clients run; checked by promtool afterwards
    under_load = 0
    while any(t.is_alive() for t in threads) or len(texts) < 3:
        busy = any(t.is_alive() for t in threads)
        texts.append(kit.scrape(port))
        under_load += busy
        time.sleep(0.02)
    for t in threads:
        t.join(60)
    check(under_load > 0, "no scrape was taken while the clients were running")
    step = max(1, len(texts) // 10)
    for text in texts[::step]:
        kit.promtool_check(text, "a scrape taken under load")
    check(not counts["other"], "unexpected answers (expected, got): %r" % counts["other"][:5])
    kit.wait_idle(port)
    text = kit.scrape(port)
    kit.promtool_check(text, "the idle scrape")
    samples, types = kit.parse_metrics(text)
    for name in ("keel_live_leases", "keel_live_requests"):
        check(types.get(name) == "gauge",
              "%s has TYPE %r, expected gauge" % (name, types.get(name)))
    m1 = classify(samples)
    kit.log("  %d scrapes (%d under load, %d checked by promtool); clients: %d ok, %d failed"
            % (len(texts), under_load, len(texts[::step]), counts["ok"], counts["fail"]))
    succ = {k: v - m0.get(k, 0.0) for k, v in m1.items() if k[1] == "success"}
    fail = {k: v - m0.get(k, 0.0) for k, v in m1.items() if k[1] == "failure"}
    names = sorted({n for n, _, _ in samples})
    check(succ, "no success counter for model=\"heart\" in /metrics; metric names: %s" % names)
    check(fail, "no failure counter for model=\"heart\" in /metrics; metric names: %s" % names)
    for (key, _), d in succ.items():
        check(d == counts["ok"], "%s grew by %g, clients received %d x 200"
              % (key, d, counts["ok"]))
    for (key, _), d in fail.items():
        check(d == counts["fail"], "%s grew by %g, clients received %d failures (400 from the "
              "model: bad shape, unknown input)" % (key, d, counts["fail"]))
    # Triton-like families, checked when present: rows computed and backend executions
    # (failed requests fail validation before the backend; heart batches, so executions are
    # what the statistics extension counts, and at most one per request).
    before = kit.parse_metrics(S["m0_text"])[0]
    st1 = kit.stat_counts(kit.model_stats(S["port"], "heart"))
    d_exec = st1["execution_count"] - S["st0"]["execution_count"]
    check(1 <= d_exec <= counts["ok"], "statistics: %d executions for %d requests"
          % (d_exec, counts["ok"]))
    for pattern, want, what in ((r"inference_count", counts["ok"] * len(S["rows"]), "rows"),
                                (r"exec(ution)?_count", d_exec, "executions")):
        names = {n for n, lb, _ in samples if lb.get("model") == "heart" and re.search(pattern, n)
                 and not any(w in n for w in TIME_WORDS)}
        for n in names:
            d = (sum(v for nn, lb, v in samples if nn == n and lb.get("model") == "heart")
                 - sum(v for nn, lb, v in before if nn == n and lb.get("model") == "heart"))
            check(d == want, "%s grew by %g, expected %d %s" % (n, d, want, what))


def test_metrics_families_have_help_and_type():
    text = kit.scrape(S["port"])
    samples, types = kit.parse_metrics(text)
    helps = set(re.findall(r"^# HELP (\S+)", text, re.M))
    for name, _, _ in samples:
        fam = re.sub(r"_(bucket|sum|count|total|created)$", "", name)
        check(name in types or fam in types, "%s has no # TYPE" % name)
        check(name in helps or fam in helps, "%s has no # HELP" % name)


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_metrics_under_load_and_exact_counts, test_metrics_families_have_help_and_type],
            setup=setup, teardown=teardown)
