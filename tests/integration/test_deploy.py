"""test_deploy.py: the Grafana dashboard and the Prometheus rules that ship in deploy/.

- deploy/prometheus/keel-rules.yml passes `promtool check rules`, and its alerts include the
  ones docs/OPERATIONS.md promises.
- deploy/grafana/keel-dashboard.json is valid JSON with panels and targets; every panel
  expression is valid PromQL (checked by promtool, as recording rules with Grafana's
  variables filled in).
- Every metric the dashboard or the rules read exists in a real scrape of `keel serve`
  (a model that has served a request, the access log on, preprocessing workers running).
"""

import json
import os
import re
import shutil
import subprocess

import kit
from kit import check

METRIC_RE = re.compile(r"(?<![\w:$])((?:keel|process)_[a-zA-Z0-9_]+)(?![\w:(])")
ALERTS = {"KeelModelNotReady", "KeelModelLoadFailuresRising",
          "KeelMemoryGrowingWhileLiveObjectsFlat", "KeelContextsStuck",
          "KeelPreprocessWorkerRestarts", "KeelOverload503"}


def promtool():
    p = shutil.which("promtool") or "/usr/bin/promtool"
    check(os.access(p, os.X_OK), "promtool is not installed (Debian package prometheus)")
    return p


def rules_path():
    return os.path.join(kit.SOURCE, "deploy", "prometheus", "keel-rules.yml")


def dashboard():
    with open(os.path.join(kit.SOURCE, "deploy", "grafana", "keel-dashboard.json")) as f:
        return json.load(f)


def dashboard_exprs(d):
    out = []
    for p in d.get("panels", []):
        for t in p.get("targets", []):
            out.append(t["expr"])
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if isinstance(q, str) and q.startswith("label_values("):
            m = re.match(r"label_values\((.*),\s*\w+\)$", q)
            check(m is not None, "template query %r is not label_values(expr, label)" % q)
            out.append(m.group(1))
    return out


def rule_exprs():
    import yaml
    with open(rules_path()) as f:
        doc = yaml.safe_load(f)
    return doc, [r["expr"] for g in doc["groups"] for r in g["rules"]]


def test_rules_pass_promtool():
    r = subprocess.run([promtool(), "check", "rules", rules_path()], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    check(r.returncode == 0, "promtool check rules fails:\n%s" % r.stdout.decode())
    doc, _ = rule_exprs()
    alerts = {r.get("alert") for g in doc["groups"] for r in g["rules"]}
    check(ALERTS <= alerts, "alerts missing from keel-rules.yml: %s" % sorted(ALERTS - alerts))


def test_dashboard_is_valid_and_its_queries_parse():
    d = dashboard()
    check(d.get("title") and d.get("uid"), "dashboard without title or uid")
    panels = [p for p in d.get("panels", []) if p.get("type") != "row"]
    check(len(panels) >= 10, "only %d panels" % len(panels))
    for p in panels:
        check(p.get("targets"), "panel %r has no query" % p.get("title"))
        refs = [t.get("refId") for t in p["targets"]]
        check(len(set(refs)) == len(refs), "panel %r repeats a refId" % p.get("title"))
        check("gridPos" in p, "panel %r has no gridPos" % p.get("title"))
    # PromQL syntax through promtool: each expression as a recording rule, with Grafana's
    # variables replaced by what they expand to.
    rules = []
    for i, e in enumerate(dashboard_exprs(d)):
        e = e.replace("$__rate_interval", "5m").replace("$model", ".*").replace(
            "$instance", ".*")
        rules.append({"record": "dashboard:expr_%d" % i, "expr": e})
    path = os.path.join(kit.tmpdir("keel-dash-"), "dash-rules.yml")
    with open(path, "w") as f:
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)  # JSON is YAML
    r = subprocess.run([promtool(), "check", "rules", path], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    check(r.returncode == 0, "a dashboard query is not valid PromQL:\n%s" % r.stdout.decode())


def test_every_metric_used_exists_in_a_real_scrape():
    d = kit.tmpdir("keel-deploy-")
    srv = kit.Server(kit.example_repo(), ["--access-log", os.path.join(d, "access.log")])
    used = {}
    for e in dashboard_exprs(dashboard()):
        for m in METRIC_RE.findall(e):
            used.setdefault(m, "dashboard")
    for e in rule_exprs()[1]:
        for m in METRIC_RE.findall(e):
            used.setdefault(m, "rules")
    check(len(used) >= 20, "suspiciously few metrics found in the queries: %r" % sorted(used))
    with kit.running(srv):
        r = kit.post(srv.port, kit.infer_path(), kit.json_infer_body(kit.complete_rows()[:1]))
        check(r.status == 200, "infer: %r" % r)
        kit.wait_idle(srv.port)
        names = set()
        for _ in range(50):
            samples, _ = kit.parse_metrics(kit.scrape(srv.port))
            names = {n for n, _, _ in samples}
            if "keel_request_duration_seconds_bucket" in names:
                break
        missing = sorted("%s (%s)" % (m, w) for m, w in used.items() if m not in names)
        check(not missing, "metrics used in deploy/ but absent from a scrape: %s" % missing)
        kit.log("  %d metrics used by the dashboard and rules, all in the scrape" % len(used))


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_rules_pass_promtool, test_dashboard_is_valid_and_its_queries_parse,
             test_every_metric_used_exists_in_a_real_scrape])
