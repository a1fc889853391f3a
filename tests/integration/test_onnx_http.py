"""test_onnx_http.py: the onnx backend (OpenCV DNN) through the real `keel serve`.

Conformance: every case of Debian libonnx-testdata's pytorch-converted and pytorch-operator
suites listed in tests/data/onnx_allowlist.txt is served as a model of its own (config built
from the .pb files) and inferred over HTTP with the binary tensor extension; each output must
match the test data within |a-b| <= 1e-5 + 1e-3*|b|. PyTorch models (tests/data/onnx, made by
scripts/export-onnx-test-models.py) and the digits example are inferred with JSON bodies and
compared with PyTorch's outputs the same way; the MLP's config leaves its inputs and outputs to
the model file, and the model metadata and config endpoints must show them. Malformed model
files (the test data's model that crashes OpenCV's importer, truncations, random bytes) fail
their load with an error naming the file while the server stays up, the previous version
answers exactly as before, and the server's fds and child processes stay flat. Hot swap
between two MLPs under 4 clients: no failed request, every answer exactly A's or B's, and the
live counters end at one generation's worth. The .pb files are read by a small protobuf reader
here (standard library only), so neither onnx nor torch is needed."""

import json
import os
import random
import shutil
import struct
import threading
import time

import kit
from kit import check

TESTDATA = "/usr/share/libonnx-testdata/data"
S = {}


# ------------------------------------------------------------------------------ TensorProto


def _varint(b, i):
    v = shift = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        if not c & 0x80:
            return v, i
        shift += 7


def read_tensor(path):
    """A FLOAT TensorProto file -> (name, dims, list of float32)."""
    with open(path, "rb") as f:
        b = f.read()
    i, dims, dtype, name, raw, floats = 0, [], 0, "", None, None
    while i < len(b):
        key, i = _varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
            if num == 1:
                dims.append(v)
            elif num == 2:
                dtype = v
        elif wt == 2:
            n, i = _varint(b, i)
            chunk = b[i:i + n]
            i += n
            if num == 1:  # packed dims
                j = 0
                while j < len(chunk):
                    v, j = _varint(chunk, j)
                    dims.append(v)
            elif num == 8:
                name = chunk.decode()
            elif num == 9:
                raw = chunk
            elif num == 4:
                floats = chunk
        elif wt == 5:
            i += 4
        elif wt == 1:
            i += 8
        else:
            raise kit.TestFailure("%s: unsupported wire type %d" % (path, wt))
    check(dtype == 1, "%s: not a FLOAT tensor (type %d)" % (path, dtype))
    data = raw if raw is not None else (floats or b"")
    count = 1
    for d in dims:
        count *= d
    check(len(data) == 4 * count, "%s: %d bytes for dims %s" % (path, len(data), dims))
    return name, dims, list(struct.unpack("<%df" % count, data))


def close(a, b):
    if a != a or b != b:  # NaN
        return a != a and b != b
    return abs(a - b) <= 1e-5 + 1e-3 * abs(b)


def graph_names(model_path):
    """(inputs minus initializers, outputs) of an ONNX model: names only."""
    with open(model_path, "rb") as f:
        b = f.read()

    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = _varint(buf, i)
            num, wt = key >> 3, key & 7
            if wt == 0:
                v, i = _varint(buf, i)
                yield num, v
            elif wt == 2:
                n, i = _varint(buf, i)
                yield num, buf[i:i + n]
                i += n
            elif wt == 5:
                i += 4
            elif wt == 1:
                i += 8

    def name_of(buf, field):
        for num, v in fields(buf):
            if num == field and isinstance(v, bytes):
                return v.decode()
        return ""

    graph = next(v for num, v in fields(b) if num == 7)
    inits, ins, outs = set(), [], []
    for num, v in fields(graph):
        if num == 5:
            inits.add(name_of(v, 8))
        elif num == 11:
            ins.append(name_of(v, 1))
        elif num == 12:
            outs.append(name_of(v, 1))
    return [n for n in ins if n not in inits], outs


# ------------------------------------------------------------------------------ requests


def binary_body(inputs):
    """inputs: list of (name, dims, values) -> (body, headers) with the binary extension."""
    blobs = [struct.pack("<%df" % len(v), *v) for _, _, v in inputs]
    # Binary outputs too: some test data has NaN, which JSON cannot carry.
    doc = {"parameters": {"binary_data_output": True},
           "inputs": [{"name": n, "shape": d, "datatype": "FP32",
                       "parameters": {"binary_data_size": len(blob)}}
                      for (n, d, _), blob in zip(inputs, blobs)]}
    head = json.dumps(doc).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head)),
                                    "Content-Type": "application/octet-stream"}


def json_body(name, dims, values):
    return json.dumps({"inputs": [{"name": name, "shape": dims, "datatype": "FP32",
                                   "data": [kit.f32(x) for x in values]}]},
                      allow_nan=False).encode()


def compare(what, doc, values, name, dims, want):
    outs = {o["name"]: o for o in doc.get("outputs", [])}
    check(name in outs, "%s: no output %s in %r" % (what, name, list(outs)))
    check(outs[name]["shape"] == dims, "%s: output %s shape %r, expected %r"
          % (what, name, outs[name]["shape"], dims))
    got = values[name]
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if not close(a, b)]
    check(len(got) == len(want) and not bad,
          "%s: output %s: %d of %d values out of tolerance, e.g. index %s: %r vs %r"
          % (what, name, len(bad), len(want), bad[:1], [got[i] for i in bad[:1]],
             [want[i] for i in bad[:1]]))


def tensor_config(name, dims):
    return {"name": name, "data_type": "TYPE_FP32", "dims": dims if dims else [1]}


def add_model(repo, name, model_file, config_extra, version=1, instances=1, max_batch=0):
    os.makedirs(os.path.join(repo, name, str(version)), exist_ok=True)
    cfg = {"name": name, "backend": "onnx", "max_batch_size": max_batch,
           "instance_group": [{"count": instances, "kind": "KIND_CPU"}]}
    cfg.update(config_extra)
    with open(os.path.join(repo, name, "config.json"), "w") as f:
        json.dump(cfg, f)
    shutil.copyfile(model_file, os.path.join(repo, name, str(version), "model.onnx"))


# ------------------------------------------------------------------------------ setup


PYTORCH = [  # (model, data dir, input, output, config "input"/"output" or {} = from the model)
    ("mlp", "mlp", "x", "y", {}),
    ("cnn", "cnn", "image", "probabilities",
     {"input": [tensor_config("image", [3, 32, 32])],
      "output": [tensor_config("probabilities", [10])]}),
    ("squeezenet", "squeezenet", "image", "scores",
     {"input": [tensor_config("image", [3, 64, 64])], "output": [tensor_config("scores", [10])]}),
    ("digits", "digits", "pixels", "probabilities", {}),
]


def setup():
    check(os.path.isdir(TESTDATA), "%s is missing: install Debian's libonnx-testdata "
          "(scripts/install-deps.sh)" % TESTDATA)
    data = os.path.join(kit.SOURCE, "tests", "data", "onnx")
    repo = os.path.join(kit.tmpdir("keel-onnx-"), "models")
    os.makedirs(repo)
    S["repo"], S["data"], S["cases"] = repo, data, []
    with open(os.path.join(kit.SOURCE, "tests", "data", "onnx_allowlist.txt")) as f:
        listed = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    check(len(listed) >= 90, "the allowlist has only %d cases" % len(listed))
    for case in listed:
        suite, test = case.split("/")
        d = os.path.join(TESTDATA, suite, test)
        ins, outs = graph_names(os.path.join(d, "model.onnx"))
        tin = [read_tensor(os.path.join(d, "test_data_set_0", "input_%d.pb" % i))
               for i in range(len(ins))]
        tout = [read_tensor(os.path.join(d, "test_data_set_0", "output_%d.pb" % i))
                for i in range(len(outs))]
        if any(not dims for _, dims, _ in tin + tout):
            continue  # a scalar: config.json dims cannot say [] (not servable over V2)
        name = ("conv_" if suite == "pytorch-converted" else "op_") + test[len("test_"):]
        add_model(repo, name, os.path.join(d, "model.onnx"),
                  {"input": [tensor_config(n, t[1]) for n, t in zip(ins, tin)],
                   "output": [tensor_config(n, t[1]) for n, t in zip(outs, tout)]})
        S["cases"].append((name, [(n, t[1], t[2]) for n, t in zip(ins, tin)],
                           [(n, t[1], t[2]) for n, t in zip(outs, tout)]))
    for model, ddir, _, _, io in PYTORCH:
        src = (os.path.join(kit.SOURCE, "examples", "models", "digits", "1", "model.onnx")
               if model == "digits" else os.path.join(data, ddir, "model.onnx"))
        add_model(repo, model, src, io, instances=2, max_batch=8 if model != "digits" else 16)
    kit.log("  %d conformance cases of %d listed are served" % (len(S["cases"]), len(listed)))


# ------------------------------------------------------------------------------ tests


def test_conformance_over_http():
    with kit.running(kit.Server(S["repo"])) as srv:
        for name, ins, outs in S["cases"]:
            body, hdrs = binary_body(ins)
            r = kit.post(srv.port, kit.infer_path(name), body, headers=hdrs)
            check(r.status == 200, "%s: %r" % (name, r))
            doc, values = kit.decode_infer(r)
            for oname, dims, want in outs:
                compare(name, doc, values, oname, dims, want)


def test_pytorch_models_over_http():
    with kit.running(kit.Server(S["repo"])) as srv:
        for model, ddir, iname, oname, _ in PYTORCH:
            _, idims, x = read_tensor(os.path.join(S["data"], ddir, "test_data_set_0",
                                                   "input_0.pb"))
            _, odims, want = read_tensor(os.path.join(S["data"], ddir, "test_data_set_0",
                                                      "output_0.pb"))
            r = kit.post(srv.port, kit.infer_path(model), json_body(iname, idims, x))
            doc, values = kit.decode_infer(r)
            compare(model, doc, values, oname, odims, want)
        # The MLP's interface came from the model file: metadata and config show it.
        r = kit.get(srv.port, "/v2/models/mlp")
        check(r.status == 200, "metadata: %r" % r)
        meta = r.json()
        check(meta.get("inputs") == [{"name": "x", "datatype": "FP32", "shape": [-1, 20]}] and
              meta.get("outputs") == [{"name": "y", "datatype": "FP32", "shape": [-1, 5]}],
              "mlp metadata lacks the interface read from the model: %r" % meta)
        r = kit.get(srv.port, "/v2/models/mlp/config")
        check(r.status == 200, "config: %r" % r)
        cfg = r.json()
        check(cfg.get("input") == [{"name": "x", "data_type": "TYPE_FP32", "dims": [20]}],
              "mlp config: %r" % cfg)
        # The digits example classifies its sample images (9 of 10 right, as in PyTorch).
        rows = []
        with open(os.path.join(kit.SOURCE, "examples", "digits_sample.txt")) as f:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    v = [float(t) for t in line.split()]
                    rows.append((int(v[0]), v[1:]))
        r = kit.post(srv.port, kit.infer_path("digits"),
                     json_body("pixels", [len(rows), 64], [p for _, px in rows for p in px]))
        _, values = kit.decode_infer(r)
        p = values["probabilities"]
        right = sum(1 for i, (label, _) in enumerate(rows)
                    if max(range(10), key=lambda k: p[i * 10 + k]) == label)
        check(right >= 9, "digits: only %d of %d sample images classified right" % (right,
                                                                                     len(rows)))


def children_of(pid):
    n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            n += 1
    return n


def test_malformed_model_keeps_old_version():
    repo = os.path.join(kit.tmpdir("keel-onnx-bad-"), "models")
    mlp = os.path.join(S["data"], "mlp", "model.onnx")
    add_model(repo, "m", mlp, {}, instances=2, max_batch=8)
    target = os.path.join(repo, "m", "1", "model.onnx")
    good_cfg = open(os.path.join(repo, "m", "config.json")).read()
    _, dims, x = read_tensor(os.path.join(S["data"], "mlp", "test_data_set_0", "input_0.pb"))
    with open(mlp, "rb") as f:
        good = f.read()
    crash = os.path.join(TESTDATA, "node", "test_dropout_default_mask", "model.onnx")
    rnd = random.Random(5)
    bad = []
    with open(kit.KEEL, "rb") as f:
        binary = f.read()
    if b"AddressSanitizer" not in binary and b"ThreadSanitizer" not in binary:
        # OpenCV reads past its blobs on this model; the check's perturbed glibc heap makes
        # that fault. Sanitizer builds replace malloc, the read goes unnoticed and the file
        # loads (under TSan the server's own warm-up then crashed), so plain builds only.
        bad.append(("crashing model", open(crash, "rb").read(),
                    {"input": [tensor_config("x", [3, 4, 5])],
                     "output": [tensor_config("y", [3, 4, 5])]}))
    bad += [
        ("truncated", good[:len(good) // 2], None),
        ("truncated by one byte", good[:-1], None),
        ("random bytes", bytes(rnd.getrandbits(8) for _ in range(5000)), None),
    ]
    with kit.running(kit.Server(repo, ["--model-control-mode", "explicit"])) as srv:
        r = kit.post(srv.port, "/v2/repository/models/m/load", b"{}")
        check(r.status == 200, "load: %r" % r)
        r = kit.post(srv.port, kit.infer_path("m"), json_body("x", dims, x))
        _, ref = kit.decode_infer(r)
        fds = srv.fd_count()
        children = children_of(srv.proc.pid)  # the preprocessing fork server, if any
        for what, data, io in bad:
            if io is not None:
                add_model(repo, "m", mlp, io)
            tmp = target + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, target)
            r = kit.post(srv.port, "/v2/repository/models/m/load", b"{}", timeout=120)
            check(r.status != 200, "%s: the load succeeded" % what)
            msg = r.error_message()
            kit.vlog("  %s: HTTP %d %s" % (what, r.status, msg))
            check(target in msg, "%s: the error does not name %s: %r" % (what, target, msg))
            check(srv.alive(), "%s: the server died" % what)
            r = kit.post(srv.port, kit.infer_path("m"), json_body("x", dims, x))
            _, got = kit.decode_infer(r)
            kit.assert_f32_equal(got["y"], ref["y"], "%s: the old version's answer" % what)
            with open(os.path.join(repo, "m", "config.json"), "w") as f:
                f.write(good_cfg)
            check(children_of(srv.proc.pid) == children,
                  "%s: the server has model-check child processes left" % what)
            srv.wait_fds(fds)
        r = kit.get(srv.port, "/v2/health/live")
        check(r.status == 200, "live: %r" % r)
        kit.wait_idle(srv.port)
        text = kit.scrape(srv.port)
        check(kit.metric_values(text, "keel_live_generations") == [1.0] and
              kit.metric_values(text, "keel_live_contexts") == [2.0],
              "counters after the failed loads: generations %r contexts %r"
              % (kit.metric_values(text, "keel_live_generations"),
                 kit.metric_values(text, "keel_live_contexts")))


def test_hotswap_under_load():
    swaps, clients = 20, 4
    repo = os.path.join(kit.tmpdir("keel-onnx-swap-"), "models")
    a = os.path.join(S["data"], "mlp", "model.onnx")
    b = os.path.join(S["data"], "mlp_b", "model.onnx")
    add_model(repo, "swap", a, {}, instances=2, max_batch=8)
    target = os.path.join(repo, "swap", "1", "model.onnx")
    _, dims, x = read_tensor(os.path.join(S["data"], "mlp", "test_data_set_0", "input_0.pb"))
    body, hdrs = binary_body([("x", dims, x)])
    with kit.running(kit.Server(repo, ["--model-control-mode", "explicit"])) as srv:
        port = srv.port
        refs = {}
        for name, src in (("B", b), ("A", a)):
            kit.replace_file(src, target)
            r = kit.post(port, "/v2/repository/models/swap/load", b"{}", timeout=120)
            check(r.status == 200, "load %s: %r" % (name, r))
            _, v = kit.decode_infer(kit.post(port, kit.infer_path("swap"), body, headers=hdrs))
            refs[name] = v["y"]
        check(not kit.same_f32(refs["A"], refs["B"]), "A and B answer alike")
        stop = threading.Event()
        lock = threading.Lock()
        results = []

        def client():
            while not stop.is_set():
                try:
                    r = kit.post(port, kit.infer_path("swap"), body, headers=hdrs, timeout=60)
                    if r.status != 200:
                        out = "HTTP %d %s" % (r.status, kit.short(r.body, 200))
                    else:
                        _, v = kit.decode_infer(r)
                        out = next((n for n in ("A", "B") if kit.same_f32(v["y"], refs[n])),
                                   "an answer of neither model: %r" % v["y"][:3])
                except Exception as e:
                    out = "%s: %s" % (type(e).__name__, e)
                with lock:
                    results.append(out)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        errors = []
        try:
            time.sleep(0.2)
            for i in range(1, swaps + 1):
                kit.replace_file(b if i % 2 else a, target)
                r = kit.post(port, "/v2/repository/models/swap/load", b"{}", timeout=120)
                if r.status != 200:
                    errors.append("load %d: %r" % (i, r))
                time.sleep(0.03)
            time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        check(not errors, "loads failed: %s" % errors[:3])
        failed = [x for x in results if x not in ("A", "B")]
        check(not failed, "%d of %d requests failed or were wrong, e.g. %r"
              % (len(failed), len(results), failed[:3]))
        seen = {n: results.count(n) for n in ("A", "B")}
        kit.log("  %d requests over %d swaps: %r" % (len(results), swaps, seen))
        check(seen["A"] > 0 and seen["B"] > 0, "answers never changed: %r" % seen)
        kit.wait_idle(port)
        deadline = time.monotonic() + 10
        while True:  # the reaper frees retired generations off the request path
            text = kit.scrape(port)
            gens = kit.metric_values(text, "keel_live_generations")
            ctxs = kit.metric_values(text, "keel_live_contexts")
            if gens == [1.0] and ctxs == [2.0]:
                break
            check(time.monotonic() < deadline, "after the swaps: generations %r contexts %r "
                  "(expected one generation's worth: 1 and 2)" % (gens, ctxs))
            time.sleep(0.1)


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_conformance_over_http, test_pytorch_models_over_http,
             test_malformed_model_keeps_old_version, test_hotswap_under_load], setup=setup)
