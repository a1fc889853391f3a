"""test_soak.py: `keel soak` on the example model, healthy and with a deliberate leak.

Healthy: a short soak (SWAPS reloads of "heart" under 4 concurrent clients, plus unload/load
of a second model; the first half of the swap phase is warm-up, as RSS climbs for the first
couple of seconds) ends with 0 failed requests and swaps, a flat verdict for every series,
the server's clean exit, a CSV with every series as a column and a sample per interval, and
a well-formed SVG with one labelled polyline per series.

Leaking: the same run with KEEL_FAULT=leak_per_swap (a test-only hook in fault-injection
builds: every published model load leaks 64 KiB and a memfd) must end with exit status 3
and a verdict that names fds, memfds and rss_bytes as growing, and nothing else: threads,
children and the live-object gauges stay flat. The leaked blocks stay reachable from a
static list, so LeakSanitizer (ASan stage) has nothing to report; what is tested is the
soak verdict.

Under a sanitizer the RSS series measures the sanitizer's allocator (ASan's quarantine of
freed blocks alone grows RSS by tens of MiB, and with the quarantine off its caches and stack
depot still grow), so there the RSS tolerance is raised to 256 MiB and the RSS verdict is
left to the plain build; every count series is judged the same in every build."""

import csv
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import kit
from kit import check

S = {}
SWAPS = 150
SERIES = ["rss_bytes", "threads", "fds", "memfds", "children", "live_requests", "live_leases",
          "live_queued", "live_generations", "live_contexts", "live_contexts_in_use",
          "http_inflight"]


def sanitized():
    """True if the keel binary is built with AddressSanitizer or ThreadSanitizer."""
    with open(kit.KEEL, "rb") as f:
        data = f.read()
    return b"__asan_init" in data or b"__tsan_init" in data


def setup():
    S["sanitized"] = sanitized()
    repo = kit.copy_repo()
    # A second model to unload and load back with every swap.
    shutil.copytree(os.path.join(repo, "heart"), os.path.join(repo, "heart2"))
    kit.edit_config(repo, "heart2", lambda c: c.update(name="heart2"))
    S["repo"] = repo
    S["dir"] = kit.tmpdir("keel-soak-")


def soak(tag, env_extra=None):
    csv_path = os.path.join(S["dir"], tag + ".csv")
    svg_path = os.path.join(S["dir"], tag + ".svg")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    cmd = [kit.KEEL, "soak", "--model-repository", S["repo"], "-m", "heart",
           "--load-unload", "heart2", "--swaps", str(SWAPS), "--swap-interval", "0.03",
           "--sample-interval", "0.1", "--warmup-fraction", "0.5", "--concurrency", "4",
           "--csv", csv_path,
           "--svg", svg_path, "--no-progress"]
    if S["sanitized"]:
        cmd += ["--rss-tolerance", "256m"]
    kit.vlog("running:", " ".join(cmd))
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                       timeout=540)
    out, err = p.stdout.decode(), p.stderr.decode("utf-8", "replace")
    kit.vlog(out)
    for pat in kit.SANITIZER_PATTERNS:
        found = pat in err if isinstance(pat, str) else pat.search(err)
        check(not found, "sanitizer report in keel soak's stderr:\n" + err[-4000:])
    m = re.search(r"^verdict=(\w+)(?: series=(\S+))?(?: not_idle=(\S+))? "
                  r"failed_requests=(\d+) failed_swaps=(\d+)$", out, re.M)
    check(m is not None, "no verdict line (status %d)\nstdout:\n%s\nstderr:\n%s"
          % (p.returncode, out, err[-3000:]))
    res = {"rc": p.returncode, "out": out, "err": err, "verdict": m.group(1),
           "grows": set(m.group(2).split(",")) if m.group(2) else set(),
           "not_idle": set(m.group(3).split(",")) if m.group(3) else set(),
           "failed_requests": int(m.group(4)), "failed_swaps": int(m.group(5)),
           "csv": csv_path, "svg": svg_path}
    return res


def check_csv(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [dict(zip(header, r)) for r in reader]
    check(header == ["t_s", "phase", "swaps"] + SERIES, "CSV header %r" % header)
    phases = [r["phase"] for r in rows]
    check(phases[0] == "baseline" and phases[-1] == "idle", "phases %r" % phases[:3])
    swap_rows = [r for r in rows if r["phase"] == "swap"]
    check(len(swap_rows) >= 8, "only %d samples in the swap phase" % len(swap_rows))
    ts = [float(r["t_s"]) for r in rows]
    check(ts == sorted(ts), "sample times not increasing")
    swaps = [int(r["swaps"]) for r in rows]
    check(swaps == sorted(swaps) and swaps[-1] == SWAPS, "swap counts %r" % swaps[-3:])
    for r in swap_rows:
        for s in SERIES:
            check(r[s] != "" and float(r[s]) >= 0, "sample lacks %s: %r" % (s, r))
        check(float(r["rss_bytes"]) > 1 << 20 and int(r["threads"]) >= 2 and int(r["fds"]) >= 3,
              "implausible sample %r" % r)
        check(int(r["live_generations"]) >= 1, "no live generation in %r" % r)
    return rows


def check_svg(path, grows):
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    check(root.tag == ns + "svg", "root element %r" % root.tag)
    lines = root.findall(ns + "polyline")
    check(len(lines) == len(SERIES), "%d polylines for %d series" % (len(lines), len(SERIES)))
    for pl in lines:
        pts = pl.get("points").split()
        check(len(pts) >= 8, "a polyline with %d points" % len(pts))
        for pt in pts:
            x, y = (float(v) for v in pt.split(","))
            check(0 <= x <= float(root.get("width")) and 0 <= y <= float(root.get("height")),
                  "point %s outside the picture" % pt)
    texts = " ".join(t.text or "" for t in root.iter(ns + "text"))
    for s in SERIES:
        want = "%s: %s" % (s, "GROWS" if s in grows else "flat")
        check(want in texts, "the plot does not say %r" % want)


def test_soak_flat():
    r = soak("flat")
    check(r["rc"] == 0, "keel soak exited %d\n%s\n%s" % (r["rc"], r["out"], r["err"][-3000:]))
    check(r["verdict"] == "flat" and not r["grows"] and not r["not_idle"],
          "verdict not flat:\n" + r["out"])
    check(r["failed_requests"] == 0 and r["failed_swaps"] == 0, r["out"])
    check(re.search(r"^swaps: %d ok, 0 failed" % SWAPS, r["out"], re.M), r["out"])
    check(re.search(r"^requests: [1-9]\d* ok, 0 failed", r["out"], re.M), r["out"])
    check("server exit status: 0" in r["out"], r["out"])
    check_csv(r["csv"])
    check_svg(r["svg"], set())


def test_soak_names_leaking_series():
    r = soak("leak", {"KEEL_FAULT": "leak_per_swap"})
    check(r["rc"] == 3, "keel soak exited %d, expected 3\n%s" % (r["rc"], r["out"]))
    check(r["verdict"] == "grows", "verdict %s:\n%s" % (r["verdict"], r["out"]))
    want = {"fds", "memfds"} if S["sanitized"] else {"fds", "memfds", "rss_bytes"}
    check(r["grows"] == want, "growing series %s, expected %s:\n%s"
          % (sorted(r["grows"]), sorted(want), r["out"]))
    check(r["not_idle"] <= {"fds", "memfds"} and {"fds", "memfds"} <= r["not_idle"],
          "not idle: %s" % sorted(r["not_idle"]))
    check(r["failed_requests"] == 0 and r["failed_swaps"] == 0, r["out"])
    rows = check_csv(r["csv"])
    # One memfd per published load: the startup loads, the priming reload, and every
    # swap's reload plus the reloads of heart2 (loaded back on every second swap).
    last = rows[-1]
    check(int(last["memfds"]) >= SWAPS, "only %s memfds after %d swaps" % (last["memfds"], SWAPS))
    check_svg(r["svg"], r["grows"])


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_soak_flat, test_soak_names_leaking_series], setup=setup)
