"""test_example_images.py: the bundled image example, as a user runs it (scripts/run-example.sh):
`keel serve` on examples/models classifies each sample image of examples/images (PNG and JPEG,
gray and colour, drawn at sizes that are not multiples of 8) with the "digits_image" model as
the digit its file name says, sent as base64 JSON and as Triton binary BYTES, one by one and
in one batch; the model's own tensor input still works and answers exactly as the "digits"
model it shares its file with.

Run: /usr/bin/python3 tests/integration/test_example_images.py --keel <keel> --source <root>
"""

import base64
import json
import os
import re
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kit  # noqa: E402
from kit import check  # noqa: E402

S = {}
NAME_RE = re.compile(r"^(\d)_(\d+)\.(png|jpg)$")


def setup():
    d = os.path.join(kit.SOURCE, "examples", "images")
    S["images"] = []
    for f in sorted(os.listdir(d)):
        m = NAME_RE.match(f)
        check(m is not None, "examples/images/%s: not named <digit>_<size>.<png|jpg>" % f)
        with open(os.path.join(d, f), "rb") as fh:
            S["images"].append((f, int(m.group(1)), fh.read()))
    check(len(S["images"]) >= 2 and {f[-3:] for f, _, _ in S["images"]} == {"png", "jpg"},
          "examples/images should hold PNG and JPEG samples: %r" % [f for f, _, _ in S["images"]])
    S["server"] = kit.Server(kit.example_repo()).start()
    S["port"] = S["server"].port


def teardown():
    kit.wait_idle(S["port"])
    S["server"].stop()


def json_body(images):
    return json.dumps({"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                                   "data": [base64.b64encode(b).decode() for b in images]}]}
                      ).encode()


def binary_body(images):
    data = b"".join(struct.pack("<I", len(b)) + b for b in images)
    head = json.dumps({"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(data)}}]}).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}


def probabilities(resp, n):
    doc, outs = kit.decode_infer(resp)
    check(doc["model_name"] == "digits_image", "model_name %r" % doc["model_name"])
    p = outs["probabilities"]
    check(len(p) == 10 * n, "%d probabilities for %d images" % (len(p), n))
    return [p[10 * i:10 * i + 10] for i in range(n)]


def argmax(row):
    return max(range(len(row)), key=lambda i: row[i])


def test_metadata_lists_the_image_input():
    doc = kit.get(S["port"], "/v2/models/digits_image").json()
    kit.SCHEMAS.validate("metadata_model_response", doc)
    ins = {t["name"]: t for t in doc["inputs"]}
    check(ins.get("image", {}).get("datatype") == "BYTES" and "pixels" in ins,
          "digits_image inputs %r: expected the BYTES input image and the model's pixels"
          % doc["inputs"])


def test_each_image_json_and_binary():
    path = kit.infer_path("digits_image")
    for f, digit, data in S["images"]:
        by_json = probabilities(kit.post(S["port"], path, json_body([data])), 1)[0]
        body, hdrs = binary_body([data])
        by_binary = probabilities(kit.post(S["port"], path, body, headers=hdrs), 1)[0]
        kit.assert_f32_equal(by_binary, by_json, "%s: binary BYTES vs JSON base64" % f)
        check(argmax(by_json) == digit and by_json[digit] > 0.5,
              "%s: predicted %d (p=%.3f), the image is a %d; probabilities %r"
              % (f, argmax(by_json), by_json[argmax(by_json)], digit, by_json))
        S.setdefault("one_by_one", []).append(by_json)


def test_one_batch_of_all_images():
    if "one_by_one" not in S:
        test_each_image_json_and_binary()
    rows = probabilities(kit.post(S["port"], kit.infer_path("digits_image"),
                                  json_body([d for _, _, d in S["images"]])), len(S["images"]))
    for (f, _, _), got, want in zip(S["images"], rows, S["one_by_one"]):
        kit.assert_f32_equal(got, want, "%s: in a batch vs alone" % f)


def test_tensor_input_matches_digits_model():
    with open(os.path.join(kit.SOURCE, "examples", "digits_sample.txt")) as f:
        rows = [[float(x) for x in line.split()[1:]] for line in f
                if line.strip() and not line.startswith("#")][:3]
    body = json.dumps({"inputs": [{"name": "pixels", "shape": [len(rows), 64],
                                   "datatype": "FP32", "data": [x for r in rows for x in r]}]})
    _, got = kit.decode_infer(kit.post(S["port"], kit.infer_path("digits_image"), body.encode()))
    _, want = kit.decode_infer(kit.post(S["port"], kit.infer_path("digits"), body.encode()))
    kit.assert_f32_equal(got["probabilities"], want["probabilities"],
                         "digits_image's tensor input vs the digits model")


def test_not_an_image_is_400():
    r = kit.post(S["port"], kit.infer_path("digits_image"), json_body([b"not an image"]))
    check(r.status == 400, "a text file as the image: expected 400, got %r" % r)
    check("image 0" in r.error_message(), "error does not name the image: %r" % r)


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_metadata_lists_the_image_input, test_each_image_json_and_binary,
             test_one_batch_of_all_images, test_tensor_input_matches_digits_model,
             test_not_an_image_is_400], setup=setup, teardown=teardown)
