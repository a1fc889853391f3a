"""test_hotswap_http.py: hot swap over HTTP with no dropped and no stale answer.

Two models A and B are trained with the xgboost CLI (different sizes, so every row's answer
differs). In explicit mode, clients infer continuously (JSON and binary) on model "swap"
while a thread alternates its version folder between A and B 50 times (copy to a temporary
name, os.rename over model.json, POST /v2/repository/models/swap/load). Every request must
succeed and equal, exactly, the in-process answer of A or of B; a request sent after a load
returned and answered before the next load started must come from the model that load
published (no stale answers)."""

import os
import threading
import time

import kit
from kit import check

SWAPS = 50
CLIENTS = 4
S = {}


def setup():
    work = kit.tmpdir("keel-train-")
    S["A"] = kit.train_model(work, "model_a", rounds=4, depth=2)
    S["B"] = kit.train_model(work, "model_b", rounds=12, depth=4)
    S["rows_json"] = kit.complete_rows()[:8]
    S["rows_bin"] = kit.heart_rows()[:8]
    S["ref"] = {}
    for name in ("A", "B"):
        repo = kit.copy_repo()
        kit.add_model(repo, "swap", S[name], instances=2)
        S["ref"][name] = {"json": kit.keel_reference(repo, "swap", S["rows_json"]),
                          "bin": kit.keel_reference(repo, "swap", S["rows_bin"])}
    for kind in ("json", "bin"):
        a, b = S["ref"]["A"][kind], S["ref"]["B"][kind]
        check(all(kit.f32_bits(x) != kit.f32_bits(y) for x, y in zip(a, b)),
              "models A and B agree on some row; they cannot be told apart")
    S["repo"] = kit.copy_repo()
    kit.add_model(S["repo"], "swap", S["A"], instances=2)


def which(kind, vals):
    for name in ("A", "B"):
        if kit.same_f32(vals, S["ref"][name][kind]):
            return name
    return None


def test_hotswap_under_load():
    repo = S["repo"]
    target = os.path.join(repo, "swap", "1", "model.json")
    with kit.running(kit.Server(repo, ["--model-control-mode", "explicit"])) as srv:
        port = srv.port
        r = kit.post(port, "/v2/repository/models/swap/load", b"{}")
        check(r.status == 200, "initial load: %r" % r)
        loads = [(0.0, time.monotonic(), "A")]  # (start, end, model)
        stop = threading.Event()
        lock = threading.Lock()
        results = []  # (t_send, t_done, kind, model or error)
        jbody = kit.json_infer_body(S["rows_json"])
        bbody, bhdrs = kit.binary_infer_body(S["rows_bin"])

        def client(i):
            n = 0
            while not stop.is_set():
                n += 1
                kind = "json" if (i + n) % 2 else "bin"
                t0 = time.monotonic()
                try:
                    if kind == "json":
                        r = kit.post(port, kit.infer_path("swap"), jbody, timeout=30)
                    else:
                        r = kit.post(port, kit.infer_path("swap"), bbody, headers=bhdrs,
                                     timeout=30)
                    if r.status != 200:
                        out = "HTTP %d %s" % (r.status, kit.short(r.body, 200))
                    else:
                        doc, vals = kit.decode_infer(r)
                        out = which(kind, vals["probability"]) or (
                            "an answer of neither model: %r" % vals["probability"][:3])
                        if str(doc.get("model_version")) != "1":
                            out = "model_version %r" % doc.get("model_version")
                except Exception as e:
                    out = "%s: %s" % (type(e).__name__, e)
                with lock:
                    results.append((t0, time.monotonic(), kind, out))

        threads = [threading.Thread(target=client, args=(i,), daemon=True)
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        load_errors = []
        try:
            time.sleep(0.2)
            for i in range(1, SWAPS + 1):
                name = "B" if i % 2 else "A"
                kit.replace_file(S[name], target)
                t0 = time.monotonic()
                r = kit.post(port, "/v2/repository/models/swap/load", b"{}", timeout=60)
                t1 = time.monotonic()
                if r.status != 200:
                    load_errors.append("load %d (%s): %r" % (i, name, r))
                loads.append((t0, t1, name))
                time.sleep(0.03)
            time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        check(not load_errors, "loads failed: %s" % load_errors[:3])
        failed = [x for x in results if x[3] not in ("A", "B")]
        check(not failed, "%d of %d requests failed during the swaps, e.g. %r"
              % (len(failed), len(results), failed[:3]))
        seen = {m: sum(1 for x in results if x[3] == m) for m in ("A", "B")}
        kit.log("  %d requests over %d swaps: %r" % (len(results), SWAPS, seen))
        check(seen["A"] > 0 and seen["B"] > 0, "answers never changed: %r" % seen)
        stale = []
        for t0, t1, kind, model in results:
            for k, (ls, le, lm) in enumerate(loads):
                nxt = loads[k + 1][0] if k + 1 < len(loads) else float("inf")
                if le <= t0 and t1 <= nxt and model != lm:
                    stale.append("request at +%.3fs answered by %s; load %d of %s had "
                                 "returned %.3fs before it was sent"
                                 % (t0 - loads[0][1], model, k, lm, t0 - le))
        check(not stale, "%d stale answers: %s" % (len(stale), stale[:3]))
        kit.wait_idle(port)
        r = kit.post(port, "/v2/repository/index", b"{}")
        entries = [e for e in r.json() if e.get("name") == "swap"]
        check(len(entries) == 1 and entries[0].get("state") == "READY",
              "index after the swaps: %r" % entries)


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_hotswap_under_load], setup=setup)
