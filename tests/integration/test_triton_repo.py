"""test_triton_repo.py: Triton model repositories as they are (config.pbtxt) served by the real
`keel serve`.

The repository is built at test time: Triton-style folders with config.pbtxt files in the
shapes Triton's documentation shows (FIL with model_type xgboost_json, output_class false and
true with a threshold, predict_proba; ONNX Runtime by platform with no input/output section,
and by backend with one), each beside the same model configured with config.json. Every
answer over HTTP must be bit-identical to its config.json twin (and the FIL class and
probability outputs must be exactly what the raw probabilities imply). The model metadata and
config endpoints (what the Triton HTTP client's get_model_metadata/get_model_config call) must
show what keel runs. Then, in explicit mode, each file of a malformed config.pbtxt corpus is
loaded over the running model: the load fails with a message naming the file, line and
column, and the old version keeps answering exactly as before. A folder with both files, a
typo in config.json and an unsupported section fail with the messages the issue asks for.
"""

import json
import os
import random
import shutil

import kit
from kit import check

S = {}

FIL = """backend: "fil"
max_batch_size: 256
input [
 {
    name: "input__0"
    data_type: TYPE_FP32
    dims: [ 13 ]
  }
]
output [
 {
    name: "output__0"
    data_type: TYPE_FP32
    dims: [ %(dims)d ]
  }
]
instance_group [{ kind: KIND_AUTO }]
parameters [
  {
    key: "model_type"
    value: { string_value: "xgboost_json" }
  },
  {
    key: "output_class"
    value: { string_value: "%(cls)s" }
  }%(extra)s
]

dynamic_batching {}
"""


def fil_pbtxt(cls="false", dims=1, extra=""):
    return FIL % {"cls": cls, "dims": dims, "extra": extra}


def param(key, value):
    return ',\n  {\n    key: "%s"\n    value: { string_value: "%s" }\n  }' % (key, value)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def heart_json_twin(name, params):
    """The FIL model as config.json with keel's own names (backend xgboost)."""
    cfg = {"name": name, "backend": "xgboost", "max_batch_size": 256,
           "input": [{"name": "input__0", "data_type": "TYPE_FP32", "dims": [13]}],
           "output": [{"name": "output__0", "data_type": "TYPE_FP32",
                       "dims": [2 if params.get("predict_proba") == "true" else 1]}],
           "default_model_filename": "xgboost.json",
           "parameters": {k: {"string_value": v} for k, v in params.items()}}
    return json.dumps(cfg, indent=2)


def setup():
    repo = os.path.join(kit.tmpdir("keel-triton-"), "models")
    ex = kit.example_repo()
    heart_model = os.path.join(ex, "heart", "1", "model.json")
    digits_model = os.path.join(ex, "digits", "1", "model.onnx")
    shutil.copytree(os.path.join(ex, "heart"), os.path.join(repo, "heart"))
    shutil.copytree(os.path.join(ex, "digits"), os.path.join(repo, "digits"))
    fil = {
        "fil_raw": (fil_pbtxt("false"), {"output_class": "false"}),
        "fil_class": (fil_pbtxt("true", 1, param("threshold", "0.3")),
                      {"output_class": "true", "threshold": "0.3"}),
        "fil_proba": (fil_pbtxt("true", 2, param("predict_proba", "true")),
                      {"output_class": "true", "predict_proba": "true"}),
    }
    for name, (pbtxt, params) in fil.items():
        write(os.path.join(repo, name, "config.pbtxt"), pbtxt)
        os.makedirs(os.path.join(repo, name, "1"))
        shutil.copyfile(heart_model, os.path.join(repo, name, "1", "xgboost.json"))
        twin = name + "_json"
        write(os.path.join(repo, twin, "config.json"), heart_json_twin(twin, params))
        os.makedirs(os.path.join(repo, twin, "1"))
        shutil.copyfile(heart_model, os.path.join(repo, twin, "1", "xgboost.json"))
    # A harmless Triton field keel ignores: served, with a warning in the log and the index.
    write(os.path.join(repo, "fil_warn", "config.pbtxt"),
          fil_pbtxt("false") + "optimization { input_pinned_memory { enable: true } }\n")
    os.makedirs(os.path.join(repo, "fil_warn", "1"))
    shutil.copyfile(heart_model, os.path.join(repo, "fil_warn", "1", "xgboost.json"))
    # A two-class softprob model (two values per row): FIL's class is the larger one's index.
    multi = kit.train_model(kit.tmpdir("keel-multi-"), "multi", rounds=5, depth=3,
                            extra="objective = multi:softprob\nnum_class = 2")
    for name, pbtxt in (("multi_class", fil_pbtxt("true", 1)),
                        ("multi_proba", fil_pbtxt("true", 2, param("predict_proba", "true")))):
        write(os.path.join(repo, name, "config.pbtxt"), pbtxt)
        os.makedirs(os.path.join(repo, name, "1"))
        shutil.copyfile(multi, os.path.join(repo, name, "1", "xgboost.json"))
    write(os.path.join(repo, "multi_raw", "config.json"),
          heart_json_twin("multi_raw", {"predict_proba": "false"}).replace(
              '"dims": [\n        1\n      ]\n    }\n  ],\n  "default',
              '"dims": [\n        2\n      ]\n    }\n  ],\n  "default'))
    os.makedirs(os.path.join(repo, "multi_raw", "1"))
    shutil.copyfile(multi, os.path.join(repo, "multi_raw", "1", "xgboost.json"))
    write(os.path.join(repo, "ort_bare", "config.pbtxt"),
          'platform: "onnxruntime_onnx"\nmax_batch_size: 64\n')
    write(os.path.join(repo, "ort_io", "config.pbtxt"),
          'name: "ort_io"\nbackend: "onnxruntime"\nmax_batch_size: 64\n'
          'input [ { name: "pixels" data_type: TYPE_FP32 dims: [ 64 ] } ]\n'
          'output [ { name: "probabilities", data_type: TYPE_FP32, dims: [ 10 ] } ]\n'
          'instance_group [ { count: 2 kind: KIND_CPU } ]\n')
    for name in ("ort_bare", "ort_io"):
        os.makedirs(os.path.join(repo, name, "1"))
        shutil.copyfile(digits_model, os.path.join(repo, name, "1", "model.onnx"))
    S["repo"] = repo
    S["rows"] = kit.filled_rows()[:40]
    rng = random.Random(19)
    S["pixels"] = [[float(rng.randint(0, 16)) for _ in range(64)] for _ in range(12)]


def infer(port, model, rows, input_name):
    r = kit.post(port, kit.infer_path(model), kit.json_infer_body(rows, input_name=input_name))
    _, values = kit.decode_infer(r)
    check(len(values) == 1, "%s: %d outputs" % (model, len(values)))
    return list(values.values())[0]


def test_serves_like_config_json():
    with kit.running(kit.Server(S["repo"])) as srv:
        port = srv.port
        rows = S["rows"]
        prob = infer(port, "heart", rows, "features")
        raw = infer(port, "fil_raw", rows, "input__0")
        kit.assert_f32_equal(raw, prob, "fil_raw vs heart (config.json)")
        for name in ("fil_raw", "fil_class", "fil_proba"):
            got = infer(port, name, rows, "input__0")
            want = infer(port, name + "_json", rows, "input__0")
            kit.assert_f32_equal(got, want, "%s vs its config.json twin" % name)
        cls = infer(port, "fil_class", rows, "input__0")
        kit.assert_f32_equal(cls, [1.0 if p > kit.f32(0.3) else 0.0 for p in prob],
                             "fil_class: the class at threshold 0.3")
        check(0.0 in cls and 1.0 in cls, "fil_class: both classes expected in 40 rows")
        proba = infer(port, "fil_proba", rows, "input__0")
        want = []
        for p in prob:
            want += [kit.f32(1.0 - p), p]
        kit.assert_f32_equal(proba, want, "fil_proba: [1 - p, p]")
        pairs = infer(port, "multi_raw", rows, "input__0")
        check(len(pairs) == 2 * len(rows), "multi_raw: %d values" % len(pairs))
        kit.assert_f32_equal(infer(port, "multi_proba", rows, "input__0"), pairs,
                             "multi_proba: the two class probabilities as they are")
        argmax = [1.0 if pairs[2 * i + 1] > pairs[2 * i] else 0.0 for i in range(len(rows))]
        check(0.0 in argmax and 1.0 in argmax, "multi: both classes expected in 40 rows")
        kit.assert_f32_equal(infer(port, "multi_class", rows, "input__0"), argmax,
                             "multi_class: the index of the larger probability")
        pixels = S["pixels"]
        digits = infer(port, "digits", pixels, "pixels")
        for name in ("ort_bare", "ort_io"):
            kit.assert_f32_equal(infer(port, name, pixels, "pixels"), digits,
                                 "%s vs digits (config.json)" % name)

        # Model metadata and config, as the Triton client asks for them.
        md = kit.get(port, "/v2/models/fil_class").json()
        check(md["inputs"] == [{"name": "input__0", "datatype": "FP32", "shape": [-1, 13]}],
              "fil_class metadata inputs: %r" % md["inputs"])
        check(md["outputs"][0]["name"] == "output__0", "metadata outputs: %r" % md["outputs"])
        cfg = kit.get(port, "/v2/models/fil_class/config").json()
        check(cfg["backend"] == "xgboost", "config backend %r" % cfg.get("backend"))
        check(cfg["default_model_filename"] == "xgboost.json", "config %r" % cfg)
        check(cfg["parameters"]["threshold"] == {"string_value": "0.3"}, "config %r" % cfg)
        cfg = kit.get(port, "/v2/models/ort_bare/config").json()
        check(cfg["backend"] == "onnx", "ort_bare backend %r" % cfg.get("backend"))
        check([i["name"] for i in cfg["input"]] == ["pixels"] and
              [o["name"] for o in cfg["output"]] == ["probabilities"],
              "ort_bare config I/O from the model: %r" % cfg)
        md = kit.get(port, "/v2/models/ort_bare").json()
        check(md["outputs"][0]["shape"] == [-1, 10], "ort_bare metadata %r" % md)
        srv.stop()


def test_ignored_field_warns_in_index():
    with kit.running(kit.Server(S["repo"])) as srv:
        index = {m["name"]: m for m in kit.post(srv.port, "/v2/repository/index", b"").json()}
        warn = index["fil_warn"]
        check(warn["state"] == "READY", "fil_warn: %r" % warn)
        ws = warn["keel"].get("warnings", [])
        check(len(ws) == 1 and "optimization" in ws[0] and "config.pbtxt:" in ws[0],
              "the index does not show the ignored field: %r" % warn)
        check("warnings" not in index["fil_raw"]["keel"],
              "a config without ignored fields has warnings: %r" % index["fil_raw"])
        check("optimization" in srv.stderr_text(), "the ignored field is not in the log")


def test_convert_round_trip():
    """keel convert prints config.json; served from it, the model answers the same."""
    repo = S["repo"]
    p = kit.subprocess.run([kit.KEEL, "convert", "--model-repository", repo, "--model",
                            "fil_class"], stdout=kit.subprocess.PIPE,
                           stderr=kit.subprocess.PIPE, timeout=120)
    check(p.returncode == 0, "keel convert failed: %s" % p.stderr.decode())
    cfg = json.loads(p.stdout)
    check(cfg["backend"] == "xgboost" and cfg["name"] == "fil_class", "convert: %r" % cfg)
    copy = os.path.join(kit.tmpdir("keel-conv-"), "models")
    os.makedirs(copy)
    shutil.copytree(os.path.join(repo, "fil_class"), os.path.join(copy, "fil_class"))
    os.remove(os.path.join(copy, "fil_class", "config.pbtxt"))
    write(os.path.join(copy, "fil_class", "config.json"), p.stdout.decode())
    with kit.running(kit.Server(copy)) as srv:
        got = infer(srv.port, "fil_class", S["rows"], "input__0")
        srv.stop()
    with kit.running(kit.Server(repo)) as srv:
        want = infer(srv.port, "fil_class", S["rows"], "input__0")
        srv.stop()
    kit.assert_f32_equal(got, want, "converted config.json vs config.pbtxt")


MALFORMED = [
    ('backend: "fil\n', ":1:14: String literals cannot cross line boundaries."),
    ('backend: "fil"\nmax_batch_size: "big"\n', ":2:17: Expected integer"),
    ('backend: "fil"\ninput [ { name: "x" data_type: TYPE_FLOAT } ]\n',
     ':2:43: Unknown enumeration value of "TYPE_FLOAT"'),
    ('backend: "fil"\ninput [ { name: "x"\n', ":3:1: Expected identifier, got: the end"),
    ('backend: "fil"\nbackend: "fil"\n', ':2:8: Non-repeated field "backend"'),
    ('backend: "fil"\nmax_batch_size: 123456789012345678901234\n', ":2:17: Integer out of range"),
    ('backend: "fil"\nname: "caf\xe9"\n', ":2:11: the file is not valid UTF-8"),
    ('backend: "fil"\nmax_batch_sizee: 8\n',
     ':2:1: max_batch_sizee: unknown field "max_batch_sizee"; did you mean "max_batch_size"?'),
    ('backend: "fil"\nsequence_batching { control_input [ { name: "START" } ] }\n',
     ":2:1: sequence_batching: keel does not support Triton's sequence_batching"),
]


def test_malformed_reload_keeps_serving():
    repo = S["repo"]
    path = os.path.join(repo, "fil_raw", "config.pbtxt")
    with open(path) as f:
        good = f.read()
    args = ["--model-control-mode", "explicit", "--load-model", "fil_raw"]
    with kit.running(kit.Server(repo, args)) as srv:
        port = srv.port
        before = infer(port, "fil_raw", S["rows"], "input__0")
        for text, want in MALFORMED:
            with open(path, "wb") as f:
                f.write(text.encode("latin-1"))
            r = kit.post(port, "/v2/repository/models/fil_raw/load", b"{}")
            check(r.status == 400, "load of %r: status %d, expected 400: %s"
                  % (text, r.status, kit.short(r.body)))
            msg = r.json()["error"]
            check(path + want in msg, "load of %r: error %r lacks %r" % (text, msg, path + want))
            kit.assert_f32_equal(infer(port, "fil_raw", S["rows"], "input__0"), before,
                                 "fil_raw after a failed reload")
        # Both files: an error naming both.
        with open(path, "w") as f:
            f.write(good)
        json_path = os.path.join(repo, "fil_raw", "config.json")
        write(json_path, heart_json_twin("fil_raw", {"output_class": "false"}))
        r = kit.post(port, "/v2/repository/models/fil_raw/load", b"{}")
        msg = r.json().get("error", "")
        check(r.status == 400 and json_path in msg and path in msg,
              "both files: status %d, error %r" % (r.status, msg))
        os.remove(json_path)
        r = kit.post(port, "/v2/repository/models/fil_raw/load", b"{}")
        check(r.status == 200, "reload of the good config.pbtxt: %d %s"
              % (r.status, kit.short(r.body)))
        kit.assert_f32_equal(infer(port, "fil_raw", S["rows"], "input__0"), before,
                             "fil_raw after a good reload")
        # config.json: a typo and a section keel does not implement.
        heart_cfg = os.path.join(repo, "heart", "config.json")
        cfg = kit.read_config(repo, "heart")
        for key, value, want in (
                ("max_batch_sizee", 8,
                 'max_batch_sizee: unknown field "max_batch_sizee"; did you mean '
                 '"max_batch_size"?'),
                ("sequence_batching", {},
                 "sequence_batching: keel does not support Triton's sequence_batching")):
            bad = dict(cfg)
            bad[key] = value
            write(heart_cfg, json.dumps(bad))
            r = kit.post(port, "/v2/repository/models/heart/load", b"{}")
            msg = r.json().get("error", "")
            check(r.status == 400 and (heart_cfg + ": " + want) in msg,
                  "config.json with %s: status %d, error %r" % (key, r.status, msg))
        kit.write_config(repo, "heart", cfg)
        srv.stop()


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_serves_like_config_json, test_ignored_field_warns_in_index,
             test_convert_round_trip,
             test_malformed_reload_keeps_serving], setup=setup)
