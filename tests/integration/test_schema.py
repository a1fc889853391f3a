"""test_schema.py: keel's schema of the protocol (tests/schema/open_inference_rest.json), which
the other integration tests validate responses against, accepts the answers of the real
`keel serve` and rejects documents that break the protocol: a schema that accepted anything
would make every validation in the suite pass vacuously.

Run: /usr/bin/python3 tests/integration/test_schema.py --keel <keel> --source <repo root>
"""

import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kit  # noqa: E402
from kit import check  # noqa: E402

S = {}


def setup():
    S["server"] = kit.Server(os.path.join(kit.SOURCE, "examples", "models")).start()
    S["port"] = S["server"].port


def teardown():
    S["server"].stop()


def rejects(name, doc, why):
    try:
        kit.SCHEMAS.validate(name, doc)
    except kit.TestFailure:
        return
    raise kit.TestFailure("schema %s accepted a document with %s: %s"
                          % (name, why, kit.short(json.dumps(doc), 300)))


def mutations(doc, cases):
    """cases: (why, function mutating a copy of doc in place)."""
    for why, f in cases:
        d = copy.deepcopy(doc)
        f(d)
        yield why, d


def test_server_metadata():
    doc = kit.get(S["port"], "/v2").json()
    kit.SCHEMAS.validate("metadata_server_response", doc)
    for why, d in mutations(doc, [
            ("no name", lambda d: d.pop("name")),
            ("no extensions", lambda d: d.pop("extensions")),
            ("a numeric version", lambda d: d.update(version=1)),
            ("extensions not strings", lambda d: d.update(extensions=[1]))]):
        rejects("metadata_server_response", d, why)


def test_model_metadata():
    doc = kit.get(S["port"], "/v2/models/heart").json()
    kit.SCHEMAS.validate("metadata_model_response", doc)
    for why, d in mutations(doc, [
            ("no platform", lambda d: d.pop("platform")),
            ("no inputs", lambda d: d.pop("inputs")),
            ("an unknown datatype", lambda d: d["inputs"][0].update(datatype="FLOAT")),
            ("a shape of strings", lambda d: d["outputs"][0].update(shape=["-1", "1"])),
            ("a dimension below -1", lambda d: d["outputs"][0].update(shape=[-2, 1])),
            ("versions as numbers", lambda d: d.update(versions=[1]))]):
        rejects("metadata_model_response", d, why)


def test_infer_response():
    rows = kit.complete_rows()[:2]
    json_doc = kit.post(S["port"], kit.infer_path(), kit.json_infer_body(rows)).json()
    kit.SCHEMAS.validate("inference_response", json_doc)
    body, hdrs = kit.binary_infer_body(
        rows, outputs=[{"name": "probability", "parameters": {"binary_data": True}}])
    r = kit.post(S["port"], kit.infer_path(), body, headers=hdrs)
    doc, _ = kit.decode_infer(r)  # validates: an output in the binary section has no "data"
    check("binary_data_size" in doc["outputs"][0].get("parameters", {}),
          "binary output requested, got %r" % doc)
    for why, d in mutations(json_doc, [
            ("no outputs", lambda d: d.pop("outputs")),
            ("no model_name", lambda d: d.pop("model_name")),
            ("an output without data or binary_data_size", lambda d: d["outputs"][0].pop("data")),
            ("a negative dimension", lambda d: d["outputs"][0].update(shape=[-1, 1])),
            ("data that is not an array", lambda d: d["outputs"][0].update(data="0.5")),
            ("an object in data", lambda d: d["outputs"][0].update(data=[{"v": 1}])),
            ("a datatype in lower case", lambda d: d["outputs"][0].update(datatype="fp32"))]):
        rejects("inference_response", d, why)


def test_error_body():
    r = kit.get(S["port"], "/v2/models/nosuch")
    check(r.status == 404, "unknown model: %r" % r)
    r.error_message()  # validates
    rejects("inference_error_response", {}, "no error")
    rejects("inference_error_response", {"error": 404}, "a numeric error")


def test_repository_index_and_stats():
    doc = kit.post(S["port"], "/v2/repository/index", b"{}").json()
    kit.SCHEMAS.validate("repository_index_response", doc)
    rejects("repository_index_response", {"models": doc}, "an object instead of a list")
    for why, d in mutations(doc, [("an unknown state", lambda d: d[0].update(state="GOOD")),
                                  ("no reason", lambda d: d[0].pop("reason"))]):
        rejects("repository_index_response", d, why)
    st = kit.get(S["port"], "/v2/models/stats").json()
    kit.SCHEMAS.validate("model_statistics_response", st)
    for why, d in mutations(st, [
            ("no inference_stats", lambda d: d["model_stats"][0].pop("inference_stats")),
            ("a count as a string",
             lambda d: d["model_stats"][0]["inference_stats"]["success"].update(count="0"))]):
        rejects("model_statistics_response", d, why)
    cfg = kit.get(S["port"], "/v2/models/heart/config").json()
    kit.SCHEMAS.validate("model_config_response", cfg)
    rejects("model_config_response", dict(cfg, input=[{"name": "features"}]), "an input without dims")


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_server_metadata, test_model_metadata, test_infer_response, test_error_body,
             test_repository_index_and_stats], setup=setup, teardown=teardown)
