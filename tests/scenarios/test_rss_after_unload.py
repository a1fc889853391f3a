"""test_rss_after_unload.py: scenario "RSS back near its pre-load value after unloading every
model" (issue 14).

keel serve in explicit mode with nothing loaded; its anonymous resident memory (RssAnon: the
heap, stacks and allocator caches; file-backed pages are library code, clean and shared) is
read after start-up. Then the slow model (2000 deep trees: tens of MiB once loaded) is
loaded, answers requests, is reloaded RELOADS times under requests, and unloaded; once the
reaper has freed the last generation (keel_live_generations 0) RssAnon must be within
BOUND (6 MiB) of its value before the first load, and the live counters idle. One generation
of this model is about 10.7 MiB, so a single one not given back fails; the issue's goal of
1 MiB is NOT met yet (measured here: +3.4 to +4.0 MiB of heap, of which about 3 MiB is
jemalloc's free-held pages: docs/PERFORMANCE.md, "RSS after unloading everything"). VmRSS
is logged too: it also counts the pages of libxgboost's and libgomp's code that the first
load touched.
Under a sanitizer RSS measures the sanitizer's allocator (quarantine, shadow memory), so
there the bound is not asserted (the test says so in its output): LeakSanitizer checks for
leaks, and the counters are checked in every build.
How it was checked to fail: with xgb_model_free in src/backends/xgboost.c not freeing the
booster (a leaked model), RssAnon stays 123 MiB above its start and the bound fails.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import kit  # noqa: E402
from kit import check  # noqa: E402

S = {}
RELOADS = 10
MIB = 1048576.0
BOUND = 6 * MIB


def sanitized():
    with open(kit.KEEL, "rb") as f:
        data = f.read()
    return b"__asan_init" in data or b"__tsan_init" in data


def status(pid, port):
    out = {}
    text = kit.scrape(port)
    for name, key in (("keel_memory_heap_in_use_bytes", "heap in use"),
                      ("keel_memory_heap_free_bytes", "heap free-held")):
        vals = kit.metric_values(text, name)
        out[key] = int(vals[0]) if vals else 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def setup():
    repo = kit.copy_repo()
    work = kit.tmpdir("keel-train-")
    kit.add_model(repo, "slow", kit.train_slow_model(work), instances=2)
    S["repo"] = repo
    S["rows"] = kit.complete_rows()[:4]
    S["ref"] = kit.keel_reference(repo, "slow", S["rows"])
    S["sanitized"] = sanitized()


def infer_ok():
    body, hdrs = kit.binary_infer_body(S["rows"])
    r = kit.post(S["port"], kit.infer_path("slow"), body, headers=hdrs)
    _, vals = kit.decode_infer(r)
    kit.assert_f32_equal(vals["probability"], S["ref"], "slow")


def test_rss_back_after_unloading_everything():
    srv = kit.Server(S["repo"], args=["--model-control-mode", "explicit"])
    with kit.running(srv):
        S["port"] = port = srv.port
        time.sleep(1.0)  # start-up allocations settled
        kit.scrape(port)  # the first /metrics builds its buffers: before the baseline
        time.sleep(0.5)
        before = status(srv.proc.pid, port)
        for i in range(RELOADS + 1):
            r = kit.post(port, "/v2/repository/models/slow/load", b"")
            check(r.status == 200, "load %d: %r" % (i, r))
            for _ in range(5):
                infer_ok()
        r = kit.post(port, "/v2/repository/models/slow/unload", b"")
        check(r.status == 200, "unload: %r" % r)
        kit.wait_idle(port, names=("keel_live_leases", "keel_live_requests", "keel_live_queued",
                                   "keel_live_generations", "keel_live_contexts"), timeout=30)
        time.sleep(1.0)  # the reaper's trim after the last free
        after = status(srv.proc.pid, port)
    d = {k: after[k] - before[k] for k in before}
    kit.log("  before %s" % ", ".join("%s %.2f MiB" % (k, v / MIB) for k, v in before.items()))
    kit.log("  after  %s" % ", ".join("%s %.2f MiB" % (k, v / MIB) for k, v in after.items()))
    kit.log("  change %s" % ", ".join("%s %+.2f MiB" % (k, v / MIB) for k, v in d.items()))
    if S["sanitized"]:
        kit.log("  sanitizer build: the RSS bound is not asserted (the counters were)")
        return
    check(d["RssAnon"] <= BOUND, "RssAnon is %.2f MiB above its value before the first load "
          "after unloading everything (bound %.1f MiB)" % (d["RssAnon"] / MIB, BOUND / MIB))


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_rss_back_after_unloading_everything], setup=setup)
