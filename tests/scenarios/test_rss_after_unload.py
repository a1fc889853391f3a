"""test_rss_after_unload.py: scenario "RSS back near its pre-load value after unloading every
model" (issue 14).

keel serve in explicit mode with nothing loaded; its anonymous resident memory (RssAnon: the
heap, stacks and allocator caches; file-backed pages are library code, clean and shared) is
read after start-up. Then the slow model (2000 deep trees: tens of MiB once loaded) is
loaded, answers requests, is reloaded RELOADS times under requests, and unloaded; once the
reaper has freed the last generation (keel_live_generations 0) and the threads that worked
have gone idle (their allocator caches go back after a second idle: IDLE_WAIT), RssAnon must
be within BOUND (1 MiB, the goal of issue 14) of its value before the first load, and the
live counters idle. Measured: +0.76 to +0.86 MiB (docs/PERFORMANCE.md, "RSS after unloading
everything"); one generation of this model is about 10.7 MiB, and the build arena's extent
metadata that was not given back before this goal was met is about 3 MiB. VmRSS is logged
too: it also counts the pages of libxgboost's, libgomp's and libcrypto's code that the first
load touched (about 2.5 MiB, file-backed and clean: not the heap, not asserted).
Under a sanitizer RSS measures the sanitizer's allocator (quarantine, shadow memory), and
keel is not linked with jemalloc there, so the bound is asserted only in the plain build (the
test says so in its output): LeakSanitizer checks for leaks, and the counters are checked in
every build.
How it was checked to fail: with xgb_model_free in src/backends/xgboost.c not freeing the
booster (a leaked model), RssAnon stays 123 MiB above its start and the bound fails; without
the build arena (keel__heap_build_begin a no-op) it is +3.6 MiB and fails; without the idle
flush of the HTTP, inference and control threads it was +1.00 to +1.12 MiB over four runs:
at or over the bound.
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
BOUND = 1 * MIB
IDLE_WAIT = 2.5  # s: threads give their allocator caches back after 1 s idle
SETTLE_SECS = 15


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
        time.sleep(IDLE_WAIT)  # and the thread that answered it gives its cache back
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
        # The reaper's trim after the last free, then the idle threads' caches: after
        # IDLE_WAIT on an idle machine; on a loaded one the threads may run late, so the
        # sample is repeated for up to SETTLE_SECS (memory that never comes back still fails).
        time.sleep(IDLE_WAIT)
        settle = time.monotonic() + SETTLE_SECS
        while True:
            after = status(srv.proc.pid, port)
            if after["RssAnon"] - before["RssAnon"] <= BOUND or time.monotonic() > settle:
                break
            time.sleep(0.5)
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
