"""test_endpoints.py: every endpoint of `keel serve` against the Open Inference Protocol
schemas and for the right values: server and model metadata (inputs and outputs as in
config.json), health and readiness, model configuration, statistics (counters grow by exactly
what was sent), repository index, load/unload in explicit mode (readiness flips), --load-model '*', poll mode
(an added and a removed model), /metrics, and inference in JSON and Triton's binary extension
(FP32 in and out, every combination), whose answers must equal the in-process path
(`keel infer`) exactly, which itself must agree with the xgboost command-line tool."""

import json
import math
import os
import shutil
import subprocess
import time

import kit
from kit import check

S = {}  # server, port, references


def setup():
    S["repo"] = kit.example_repo()
    S["cfg"] = kit.read_config(S["repo"], "heart")
    S["complete"] = kit.complete_rows()
    S["all"] = kit.heart_rows()
    S["ref_complete"] = kit.keel_reference(S["repo"], "heart", S["complete"])
    S["ref_all"] = kit.keel_reference(S["repo"], "heart", S["all"])
    S["server"] = kit.Server(S["repo"]).start()
    S["port"] = S["server"].port


def teardown():
    kit.wait_idle(S["port"])
    S["server"].stop()


def port():
    return S["port"]


# ------------------------------------------------------------------------------ references


def test_reference_agrees_with_xgboost_cli():
    model_file = os.path.join(S["repo"], "heart", "1", "model.json")
    xgb = kit.xgboost_reference(model_file, S["all"])
    for i, (a, b) in enumerate(zip(S["ref_all"], xgb)):
        check(abs(a - b) <= 1e-6, "row %d: keel infer %r, xgboost %r" % (i, a, b))
    # The sample file's rows are heart_scale's first rows.
    for i, (_, feats) in enumerate(kit.sample_rows(kit.SOURCE)):
        check(all(kit.f32_bits(x) == kit.f32_bits(y) for x, y in zip(feats, S["all"][i])),
              "heart_sample.txt row %d differs from heart_scale row %d" % (i, i))


# ------------------------------------------------------------------------------ metadata, health


def test_server_metadata():
    r = kit.get(port(), "/v2")
    check(r.status == 200, "GET /v2: %r" % r)
    doc = r.json()
    kit.SCHEMAS.validate("metadata_server_response", doc)
    check(doc["name"] != "" and doc["version"] != "", "empty name or version: %r" % doc)
    want = {"binary_tensor_data", "model_repository", "statistics", "model_configuration"}
    missing = want - set(doc["extensions"])
    check(not missing, "GET /v2 extensions %r lack Triton's names for implemented extensions %r"
          % (doc["extensions"], sorted(missing)))


def test_health():
    for path in ("/v2/health/live", "/v2/health/ready"):
        r = kit.get(port(), path)
        check(r.status == 200, "GET %s: %r" % (path, r))


def expected_tensors(kind):
    cfg = S["cfg"]
    out = []
    for t in cfg[kind]:
        shape = list(t["dims"])
        if cfg.get("max_batch_size", 0) > 0:
            shape = [-1] + shape
        out.append({"name": t["name"], "datatype": t["data_type"].replace("TYPE_", ""),
                    "shape": shape})
    return out


def test_model_metadata():
    for path in ("/v2/models/heart", "/v2/models/heart/versions/1"):
        r = kit.get(port(), path)
        check(r.status == 200, "GET %s: %r" % (path, r))
        doc = r.json()
        kit.SCHEMAS.validate("metadata_model_response", doc)
        check(doc["name"] == "heart", "%s: name %r" % (path, doc["name"]))
        check("1" in doc.get("versions", []),
              "%s: versions %r lack \"1\"" % (path, doc.get("versions")))
        for kind, key in (("input", "inputs"), ("output", "outputs")):
            got = [{k: t.get(k) for k in ("name", "datatype", "shape")} for t in doc.get(key, [])]
            check(got == expected_tensors(kind), "%s: %s %r, config.json says %r"
                  % (path, key, got, expected_tensors(kind)))


def test_model_ready():
    # The last path is longer than the router's stack buffer (256 bytes): routed the same.
    for path in ("/v2/models/heart/ready", "/v2/models/heart/versions/1/ready",
                 "/v2/models/heart/versions/%s1/ready" % ("0" * 300)):
        r = kit.get(port(), path)
        check(r.status == 200, "GET %s: %r" % (kit.short(path, 80), r))
    for path in ("/v2/nosuch", "/v2/models/heart/versions/1/%snosuch" % ("x" * 300)):
        r = kit.get(port(), path)
        check(r.status == 404 and "unknown endpoint" in r.error_message(),
              "GET %s: expected 404 unknown endpoint, got %r" % (kit.short(path, 80), r))


def test_unknown_model_and_version_404():
    cases = [
        ("/v2/models/nosuch", "nosuch"),
        ("/v2/models/nosuch/ready", "nosuch"),
        ("/v2/models/nosuch/config", "nosuch"),
        ("/v2/models/nosuch/stats", "nosuch"),
        ("/v2/models/heart/versions/7", "7"),
        ("/v2/models/heart/versions/7/ready", "7"),
        ("/v2/models/heart/versions/7/config", "7"),
        ("/v2/models/heart/versions/7/stats", "7"),
        # Names up to 63 bytes are kept in the connection's state, longer ones allocated:
        # both named whole in the answer.
        ("/v2/models/%s/ready" % ("n" * 63), "'%s'" % ("n" * 63)),
        ("/v2/models/%s/ready" % ("n" * 64), "'%s'" % ("n" * 64)),
    ]
    for path, word in cases:
        r = kit.get(port(), path)
        check(r.status == 404, "GET %s: expected 404, got %r" % (path, r))
        msg = r.error_message()
        check(word in msg, "GET %s: error %r does not name %r" % (path, msg, word))
    body = kit.json_infer_body(S["complete"][:1])
    for path, word in (("/v2/models/nosuch/infer", "nosuch"),
                       ("/v2/models/heart/versions/7/infer", "7")):
        r = kit.post(port(), path, body)
        check(r.status == 404, "POST %s: expected 404, got %r" % (path, r))
        msg = r.error_message()
        check(word in msg, "POST %s: error %r does not name %r" % (path, msg, word))


def test_model_config():
    for path in ("/v2/models/heart/config", "/v2/models/heart/versions/1/config"):
        r = kit.get(port(), path)
        check(r.status == 200, "GET %s: %r" % (path, r))
        doc = r.json()
        kit.SCHEMAS.validate("model_config_response", doc)
        cfg = S["cfg"]
        check(doc.get("name") == "heart", "%s: name %r" % (path, doc.get("name")))
        check(doc.get("backend") == cfg["backend"], "%s: backend %r" % (path, doc.get("backend")))
        check(doc.get("max_batch_size") == cfg["max_batch_size"],
              "%s: max_batch_size %r" % (path, doc.get("max_batch_size")))
        for kind in ("input", "output"):
            got = [{k: t.get(k) for k in ("name", "data_type", "dims")} for t in doc.get(kind, [])]
            want = [{k: t.get(k) for k in ("name", "data_type", "dims")} for t in cfg[kind]]
            check(got == want, "%s: %s %r, config.json says %r" % (path, kind, got, want))
        ig = doc.get("instance_group")
        check(isinstance(ig, list) and ig and ig[0].get("count") == 2,
              "%s: instance_group %r (config.json: count 2)" % (path, ig))


# ------------------------------------------------------------------------------ statistics


def test_stats_format():
    for path in ("/v2/models/heart/stats", "/v2/models/heart/versions/1/stats", "/v2/models/stats"):
        r = kit.get(port(), path)
        check(r.status == 200, "GET %s: %r" % (path, r))
        doc = r.json()
        kit.SCHEMAS.validate("model_statistics_response", doc)
        mine = [e for e in doc["model_stats"] if e.get("name") == "heart"]
        check(len(mine) == 1 and str(mine[0].get("version")) == "1",
              "GET %s: expected one entry for heart version 1: %r" % (path, kit.short(r.body)))
        kit.stat_counts(mine)
        e = mine[0]
        for k in ("success", "fail", "queue", "compute_infer"):
            v = e["inference_stats"].get(k)
            check(isinstance(v, dict) and isinstance(v.get("count"), int)
                  and isinstance(v.get("ns"), int), "GET %s: inference_stats.%s is %r"
                  % (path, k, v))


def test_stats_count_exactly():
    before = kit.stat_counts(kit.model_stats(port(), "heart"))
    rows = S["complete"]
    sent = 0
    nrows = 0
    for n in (1, 1, 1, 5, 17):
        r = kit.post(port(), kit.infer_path(), kit.json_infer_body(rows[:n]))
        kit.decode_infer(r)
        sent += 1
        nrows += n
    for n in (3, 64):
        body, hdrs = kit.binary_infer_body(rows[:n])
        kit.decode_infer(kit.post(port(), kit.infer_path(), body, headers=hdrs))
        sent += 1
        nrows += n
    mid = kit.stat_counts(kit.model_stats(port(), "heart"))
    # Requests that reach the model and fail there: a shape that does not match config.json.
    bad = json.dumps({"inputs": [{"name": "features", "shape": [1, 12], "datatype": "FP32",
                                  "data": [0.5] * 12}]})
    for _ in range(2):
        r = kit.post(port(), kit.infer_path(), bad)
        check(r.status == 400, "shape [1,12]: expected 400, got %r" % r)
    after = kit.stat_counts(kit.model_stats(port(), "heart"))
    v1 = kit.stat_counts(kit.model_stats(port(), "heart", 1))
    check(v1 == after, "/versions/1/stats %r differs from /stats %r" % (v1, after))
    d = {k: mid[k] - before[k] for k in before}
    want = {"success": sent, "fail": 0, "inference_count": nrows, "execution_count": sent}
    check(d == want, "statistics grew by %r for %d requests of %d rows (expected %r)"
          % (d, sent, nrows, want))
    d2 = {k: after[k] - mid[k] for k in before}
    check(d2["success"] == 0 and d2["inference_count"] == 0 and d2["execution_count"] == 0,
          "failing requests changed success/inference/execution counts: %r" % d2)
    check(d2["fail"] == 2, "2 requests failed on the model (shape [1,12]) but "
          "inference_stats.fail grew by %d" % d2["fail"])
    st = kit.model_stats(port(), "heart")[0]
    check(st.get("last_inference", 0) > 0, "last_inference %r" % st.get("last_inference"))
    check(st["inference_stats"]["success"]["ns"] > 0, "success.ns is 0")


# ------------------------------------------------------------------------------ repository


def index(p, body=b"{}"):
    r = kit.post(p, "/v2/repository/index", body)
    check(r.status == 200, "POST /v2/repository/index: %r" % r)
    doc = r.json()
    kit.SCHEMAS.validate("repository_index_response", doc)
    return doc


def test_repository_index():
    for body in (b"{}", b""):
        doc = index(port(), body)
        mine = [e for e in doc if e.get("name") == "heart"]
        check(len(mine) == 1, "index %r: expected one heart entry" % doc)
        e = mine[0]
        check(str(e.get("version")) == "1" and e.get("state") == "READY",
              "index entry %r: expected version \"1\" state READY" % e)


def test_load_refused_in_mode_none():
    r = kit.post(port(), "/v2/repository/models/heart/load", b"{}")
    check(400 <= r.status < 500 or r.status == 503,
          "load in model-control-mode none: expected a refusal, got %r" % r)
    r.error_message()
    r = kit.post(port(), "/v2/repository/models/heart/unload", b"{}")
    check(400 <= r.status < 500 or r.status == 503,
          "unload in model-control-mode none: expected a refusal, got %r" % r)
    r.error_message()
    check(kit.get(port(), "/v2/models/heart/ready").status == 200, "heart no longer ready")


# ------------------------------------------------------------------------------ inference


def infer_values(resp, n):
    doc, vals = kit.decode_infer(resp)
    check(doc["model_name"] == "heart", "model_name %r" % doc["model_name"])
    check(str(doc.get("model_version")) == "1", "model_version %r" % doc.get("model_version"))
    check(len(doc["outputs"]) == 1, "expected 1 output, got %r" % doc["outputs"])
    o = doc["outputs"][0]
    check(o["name"] == "probability" and o["datatype"] == "FP32" and o["shape"] == [n, 1],
          "output %r: expected probability FP32 [%d, 1]" % ({k: o.get(k) for k in
                                                             ("name", "datatype", "shape")}, n))
    return doc, o, vals["probability"]


def json_only(resp):
    check(resp.header("Inference-Header-Content-Length") is None,
          "JSON-only response has Inference-Header-Content-Length")
    ct = resp.header("Content-Type") or ""
    check("json" in ct, "JSON response Content-Type %r" % ct)


def test_infer_json_rows_one_by_one():
    for i, (_, feats) in enumerate(kit.sample_rows(kit.SOURCE)):
        if any(math.isnan(x) for x in feats):
            continue  # JSON has no NaN; the binary tests cover missing values
        r = kit.post(port(), kit.infer_path(), kit.json_infer_body([feats]))
        json_only(r)
        _, _, vals = infer_values(r, 1)
        kit.assert_f32_equal(vals, [S["ref_all"][i]], "sample row %d" % i)
    for i, row in enumerate(S["complete"][:20]):
        r = kit.post(port(), kit.infer_path(), kit.json_infer_body([row]))
        _, _, vals = infer_values(r, 1)
        kit.assert_f32_equal(vals, [S["ref_complete"][i]], "complete row %d" % i)


def test_infer_json_batch_and_id():
    rows = S["complete"]
    r = kit.post(port(), kit.infer_path(), kit.json_infer_body(rows, req_id="req-42"))
    json_only(r)
    doc, _, vals = infer_values(r, len(rows))
    check(doc.get("id") == "req-42", "id not echoed: %r" % doc.get("id"))
    kit.assert_f32_equal(vals, S["ref_complete"], "JSON batch of %d" % len(rows))
    r = kit.post(port(), kit.infer_path(version=1), kit.json_infer_body(rows[:7]))
    _, _, vals = infer_values(r, 7)
    kit.assert_f32_equal(vals, S["ref_complete"][:7], "JSON via /versions/1/infer")
    r = kit.post(port(), kit.infer_path(), kit.json_infer_body(rows[:3]))
    doc, _, _ = infer_values(r, 3)
    check("id" not in doc or doc["id"] == "", "id %r in a response to a request without id"
          % doc.get("id"))


def test_infer_json_requested_output():
    rows = S["complete"][:9]
    for outs in ([{"name": "probability"}],
                 [{"name": "probability", "parameters": {"binary_data": False}}]):
        r = kit.post(port(), kit.infer_path(), kit.json_infer_body(rows, outputs=outs))
        json_only(r)
        _, o, vals = infer_values(r, len(rows))
        check("data" in o, "output has no data")
        kit.assert_f32_equal(vals, S["ref_complete"][:9], "JSON with outputs %r" % outs)


def batches(rows, ref, size=256):
    for i in range(0, len(rows), size):
        yield rows[i:i + size], ref[i:i + size]


def check_binary_output(r, o, n):
    hl = r.header("Inference-Header-Content-Length")
    check(hl is not None, "binary output but no Inference-Header-Content-Length header")
    check(o.get("parameters", {}).get("binary_data_size") == 4 * n,
          "binary_data_size %r, expected %d" % (o.get("parameters"), 4 * n))
    check(int(hl) + 4 * n == len(r.body), "Inference-Header-Content-Length %s + %d != body %d"
          % (hl, 4 * n, len(r.body)))


def test_infer_binary_in_json_out():
    # All 270 rows, with NaN (missing) values, which only the binary form can carry.
    for rows, ref in batches(S["all"], S["ref_all"]):
        body, hdrs = kit.binary_infer_body(rows)
        r = kit.post(port(), kit.infer_path(), body, headers=hdrs)
        json_only(r)
        _, o, vals = infer_values(r, len(rows))
        kit.assert_f32_equal(vals, ref, "binary in, JSON out, %d rows" % len(rows))


def test_infer_json_in_binary_out():
    rows, ref = S["complete"], S["ref_complete"]
    variants = [
        ({"binary_data_output": True}, None),
        (None, [{"name": "probability", "parameters": {"binary_data": True}}]),
        ({"binary_data_output": True}, [{"name": "probability"}]),
    ]
    for params, outs in variants:
        r = kit.post(port(), kit.infer_path(),
                     kit.json_infer_body(rows, params=params, outputs=outs, req_id="b1"))
        doc, o, vals = infer_values(r, len(rows))
        check_binary_output(r, o, len(rows))
        check(doc.get("id") == "b1", "id not echoed in a binary response")
        kit.assert_f32_equal(vals, ref, "JSON in, binary out (%r, %r)" % (params, outs))


def test_infer_binary_in_binary_out():
    variants = [
        ({"binary_data_output": True}, None),
        (None, [{"name": "probability", "parameters": {"binary_data": True}}]),
    ]
    for params, outs in variants:
        for rows, ref in batches(S["all"], S["ref_all"]):
            body, hdrs = kit.binary_infer_body(rows, params=params, outputs=outs)
            r = kit.post(port(), kit.infer_path(version=1), body, headers=hdrs)
            _, o, vals = infer_values(r, len(rows))
            check_binary_output(r, o, len(rows))
            kit.assert_f32_equal(vals, ref, "binary in and out, %d rows (%r, %r)"
                                 % (len(rows), params, outs))


def test_infer_binary_every_alignment():
    # The binary section starts at the JSON header's length into the body; keel pads its
    # body buffer so that the section lands 16-aligned and reads the tensor in place.
    # Trailing spaces in the header shift it through every remainder; the answers must not
    # change (and under ASan nothing may be read after the body is gone).
    rows, ref = S["all"][:64], S["ref_all"][:64]
    for pad in range(4):
        body, hdrs = kit.binary_infer_body(rows)
        n = int(hdrs["Inference-Header-Content-Length"])
        body = body[:n] + b" " * pad + body[n:]
        hdrs["Inference-Header-Content-Length"] = str(n + pad)
        r = kit.post(port(), kit.infer_path(), body, headers=hdrs)
        json_only(r)
        _, o, vals = infer_values(r, len(rows))
        kit.assert_f32_equal(vals, ref, "binary in, header %d mod 4" % ((n + pad) % 4))


def test_metrics_endpoint():
    r = kit.get(port(), "/metrics")
    check(r.status == 200, "GET /metrics: %r" % r)
    ct = r.header("Content-Type") or ""
    check(ct.startswith("text/plain"), "/metrics Content-Type %r" % ct)
    text = r.body.decode()
    for name in ("keel_live_leases", "keel_live_requests"):
        check(kit.metric_values(text, name), "/metrics lacks %s" % name)


# ------------------------------------------------------------------------------ explicit mode


def test_explicit_load_unload():
    repo = kit.copy_repo()
    with kit.running(kit.Server(repo, ["--model-control-mode", "explicit"])) as srv:
        p = srv.port
        row = S["complete"][:4]
        ref = S["ref_complete"][:4]

        def load(model="heart"):
            return kit.post(p, "/v2/repository/models/%s/load" % model, b"{}")

        r = load()
        check(r.status == 200, "load heart: %r" % r)
        for path in ("/v2/models/heart/ready", "/v2/models/heart/versions/1/ready"):
            check(kit.get(p, path).status == 200, "%s not 200 after load" % path)
        _, _, vals = infer_values(kit.post(p, kit.infer_path(), kit.json_infer_body(row)), 4)
        kit.assert_f32_equal(vals, ref, "after explicit load")
        e = [x for x in index(p) if x.get("name") == "heart"]
        check(len(e) == 1 and e[0].get("state") == "READY", "index after load: %r" % e)

        r = kit.post(p, "/v2/repository/models/heart/unload", b"{}")
        check(r.status == 200, "unload heart: %r" % r)
        for path in ("/v2/models/heart/ready", "/v2/models/heart/versions/1/ready"):
            rr = kit.get(p, path)
            check(rr.status in (400, 404, 503), "%s after unload: expected not ready "
                  "(400/404/503), got %r" % (path, rr))
        r = kit.post(p, kit.infer_path(), kit.json_infer_body(row))
        check(r.status in (404, 503), "infer after unload: expected 503 (or 404), got %r" % r)
        msg = r.error_message()
        check("heart" in msg, "infer-after-unload error %r does not name the model" % msg)
        e = [x for x in index(p) if x.get("name") == "heart"]
        check(len(e) >= 1 and all(x.get("state") != "READY" for x in e),
              "index after unload should list heart as not READY: %r" % e)
        check(kit.get(p, "/v2/health/live").status == 200, "not live after unload")

        r = load("nosuch")
        check(r.status == 404, "load of a model not in the repository: expected 404, got %r" % r)
        check("nosuch" in r.error_message(), "load error does not name the model: %r" % r)

        r = load()
        check(r.status == 200, "reload heart: %r" % r)
        check(kit.get(p, "/v2/models/heart/ready").status == 200, "not ready after reload")
        _, _, vals = infer_values(kit.post(p, kit.infer_path(), kit.json_infer_body(row)), 4)
        kit.assert_f32_equal(vals, ref, "after reload")
        kit.wait_idle(p)


def test_explicit_load_model_star():
    """--load-model '*' (Triton's spelling) loads every model of the repository at start in
    explicit mode; a directory without config.json is not a model; '*' with another
    --load-model is a usage error."""
    repo = kit.copy_repo()
    kit.add_model(repo, "heart2", os.path.join(repo, "heart", "1", "model.json"))
    os.makedirs(os.path.join(repo, "notes"))  # no config.json: not a model
    names = ["digits", "digits_image", "heart", "heart2"]
    with kit.running(kit.Server(repo, ["--model-control-mode", "explicit",
                                       "--load-model", "*"])) as srv:
        p = srv.port
        for m in names:
            check(kit.get(p, "/v2/models/%s/ready" % m).status == 200, "%s not ready" % m)
        ready = sorted(e["name"] for e in index(p) if e.get("state") == "READY")
        check(ready == names, "READY after --load-model '*': %r, expected %r" % (ready, names))
        r = kit.post(p, kit.infer_path("heart2"), kit.json_infer_body(S["complete"][:2]))
        doc, vals = kit.decode_infer(r)
        check(doc["model_name"] == "heart2", "model_name %r" % doc["model_name"])
        kit.assert_f32_equal(vals["probability"], S["ref_complete"][:2], "heart2 loaded by '*'")
        # Still explicit mode: models unload and load through the API.
        check(kit.post(p, "/v2/repository/models/heart2/unload", b"{}").status == 200,
              "unload heart2")
        wait_status(p, "/v2/models/heart2/ready", (400, 404, 503))
        kit.wait_idle(p)
    p = subprocess.run([kit.KEEL, "serve", "--model-repository", repo, "--model-control-mode",
                        "explicit", "--load-model", "*", "--load-model", "heart"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    check(p.returncode == 2 and b"--load-model '*'" in p.stderr,
          "'*' with another --load-model: exit %d, stderr %r (expected 2, a usage error)"
          % (p.returncode, p.stderr[-300:]))


def wait_status(p, path, want, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        r = kit.get(p, path)
        if r.status in want:
            return r
        check(time.monotonic() < deadline, "GET %s still %r after %ds (want %s)"
              % (path, r, timeout, want))
        time.sleep(0.2)


def test_poll_mode_picks_up_added_and_removed_models():
    repo = kit.copy_repo()
    args = ["--model-control-mode", "poll", "--repository-poll-secs", "1"]
    with kit.running(kit.Server(repo, args)) as srv:
        p = srv.port
        check(kit.get(p, "/v2/models/heart/ready").status == 200, "heart not ready in poll mode")
        r = kit.post(p, "/v2/repository/models/heart/unload", b"{}")
        check(400 <= r.status < 500 or r.status == 503,
              "unload in poll mode: expected a refusal, got %r" % r)
        # Add a model: a copy of heart named heart2 (complete before it becomes visible).
        tmp = os.path.join(os.path.dirname(repo), "heart2.tmp")
        shutil.copytree(os.path.join(repo, "heart"), tmp)
        kit.edit_config(os.path.dirname(repo), "heart2.tmp", lambda c: c.update(name="heart2"))
        os.rename(tmp, os.path.join(repo, "heart2"))
        wait_status(p, "/v2/models/heart2/ready", (200,))
        rows = S["complete"][:5]
        r = kit.post(p, kit.infer_path("heart2"), kit.json_infer_body(rows))
        doc, vals = kit.decode_infer(r)
        check(doc["model_name"] == "heart2", "model_name %r" % doc["model_name"])
        kit.assert_f32_equal(vals["probability"], S["ref_complete"][:5], "heart2 (poll mode)")
        # Remove it again.
        shutil.rmtree(os.path.join(repo, "heart2"))
        wait_status(p, "/v2/models/heart2/ready", (400, 404, 503))
        check(kit.get(p, "/v2/models/heart/ready").status == 200, "heart not ready any more")
        kit.wait_idle(p)


if __name__ == "__main__":
    kit.parse_args()
    kit.run([
        test_reference_agrees_with_xgboost_cli,
        test_server_metadata,
        test_health,
        test_model_metadata,
        test_model_ready,
        test_unknown_model_and_version_404,
        test_model_config,
        test_stats_format,
        test_stats_count_exactly,
        test_repository_index,
        test_load_refused_in_mode_none,
        test_infer_json_rows_one_by_one,
        test_infer_json_batch_and_id,
        test_infer_json_requested_output,
        test_infer_binary_in_json_out,
        test_infer_json_in_binary_out,
        test_infer_binary_in_binary_out, test_infer_binary_every_alignment,
        test_metrics_endpoint,
        test_explicit_load_unload,
        test_explicit_load_model_star,
        test_poll_mode_picks_up_added_and_removed_models,
    ], setup=setup, teardown=teardown)
