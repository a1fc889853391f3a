"""test_grpc.py: the gRPC endpoint of `keel serve` (--grpc-port) driven by Python's grpcio.

Stubs are generated at test time with grpc_tools.protoc (Debian python3-grpc-tools) from
keel's own src/server/proto/*.proto into a temp dir. One server serves HTTP and gRPC on free
ports; every gRPC answer is compared with the HTTP answer to the same question: metadata,
readiness, configuration, statistics and index documents field by field, inference results
bit for bit (typed contents and raw_input_contents), and error messages word for word with
the status mapped as Triton maps it. A slow model (one context, a blocker request holding
it) puts calls in the queue for the deadline and cancel tests, which check through the
model's statistics that the expired or cancelled requests never reached the backend.
Malformed protobuf, unknown methods, oversize messages, a busy port and SIGTERM with calls
open are covered too."""

import json
import os
import random
import signal
import struct
import subprocess
import threading
import time

import grpckit
import kit
from kit import check

S = {}
BLOCKER_COPIES = 128  # 32768 rows: long enough on an idle machine too


def load_stubs():
    global grpc, pb, pbg, hp, hpg
    st = grpckit.load()
    grpc, pb, pbg, hp, hpg = st.grpc, st.pb, st.pbg, st.hp, st.hpg


def channel(port):
    return grpc.insecure_channel("127.0.0.1:%d" % port)


def stub():
    return pbg.GRPCInferenceServiceStub(S["ch"])


def rpc_error(fn, *a, **kw):
    """Calls fn; returns the grpc.RpcError it raised (fails if it succeeded)."""
    try:
        r = fn(*a, **kw)
    except grpc.RpcError as e:
        return e
    raise kit.TestFailure("expected an error, got %r" % (r,))


def http_error(path, body=None, headers=None):
    r = kit.post(S["port"], path, body, headers=headers) if body is not None else kit.get(
        S["port"], path)
    check(r.status >= 400, "expected an HTTP error for %s, got %r" % (path, r))
    return r.status, r.json()["error"]


CODE_OF_HTTP = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 503: "UNAVAILABLE",
                500: "INTERNAL"}


def check_same_error(e, http_status, http_msg, what):
    check(e.code().name == CODE_OF_HTTP[http_status],
          "%s: gRPC status %s, HTTP said %d" % (what, e.code().name, http_status))
    check(e.details() == http_msg, "%s: gRPC message %r, HTTP message %r"
          % (what, e.details(), http_msg))


def rows_request(rows, **kw):
    return grpckit.rows_request(pb, rows, **kw)


raw_f32 = grpckit.raw_f32


def slow_rows_request(n):
    return rows_request(S["one"] * n, model="slow")


# ------------------------------------------------------------------------------ setup


def setup():
    load_stubs()
    repo = kit.copy_repo()
    work = kit.tmpdir("keel-train-")
    slow = kit.train_slow_model(work)
    kit.add_model(repo, "slow", slow, instances=1, max_queue_size=64,
                  max_batch_size=256 * BLOCKER_COPIES)
    # heart_b8: heart with batches of 8 that wait (up to 2 s) to fill, so that batching in
    # test_batches_on_the_cq_thread does not depend on the client outpacing the server.
    cfg = kit.add_model(repo, "heart_b8", os.path.join(repo, "heart", "1", "model.json"),
                        max_batch_size=8)
    cfg["dynamic_batching"].update(preferred_batch_size=[8], max_queue_delay_microseconds=2000000)
    kit.write_config(repo, "heart_b8", cfg)
    S["repo"] = repo
    S["rows"] = kit.heart_rows()[:64]
    S["one"] = kit.complete_rows()[:1]
    S["ref"] = kit.keel_reference(repo, "heart", S["rows"])
    # A wide fast bound: under ASan heart's batches can take hundreds of microseconds, and
    # test_batches_on_the_cq_thread checks where batches run, not the bound.
    S["server"] = kit.Server(repo, grpc=True, args=["--inline-max-us", "5000"]).start()
    S["port"] = S["server"].port
    S["gport"] = S["server"].grpc_port
    S["ch"] = channel(S["gport"])
    grpc.channel_ready_future(S["ch"]).result(timeout=10)
    S["fds"] = S["server"].fd_count()


def teardown():
    S["ch"].close()
    kit.wait_idle(S["port"])
    S["server"].wait_fds(S["fds"] + 2)  # gRPC keeps an epoll/eventfd pair per poller
    S["server"].stop()


# ------------------------------------------------------------------------------ metadata


def test_health_and_metadata_match_http():
    st = stub()
    check(st.ServerLive(pb.ServerLiveRequest()).live is True, "ServerLive")
    check(st.ServerReady(pb.ServerReadyRequest()).ready is True, "ServerReady")
    check(st.ModelReady(pb.ModelReadyRequest(name="heart")).ready is True, "ModelReady heart")
    check(st.ModelReady(pb.ModelReadyRequest(name="heart", version="1")).ready is True,
          "ModelReady heart v1")
    check(st.ModelReady(pb.ModelReadyRequest(name="heart", version="7")).ready is False,
          "ModelReady heart v7")
    check(st.ModelReady(pb.ModelReadyRequest(name="nope")).ready is False, "ModelReady nope")
    h = hpg.HealthStub(S["ch"]).Check(hp.HealthCheckRequest())
    check(h.status == hp.HealthCheckResponse.SERVING, "health: %r" % h)
    e = rpc_error(hpg.HealthStub(S["ch"]).Check, hp.HealthCheckRequest(service="other"))
    check(e.code() == grpc.StatusCode.NOT_FOUND, "health of an unknown service: %r" % e)

    m = st.ServerMetadata(pb.ServerMetadataRequest())
    want = kit.get(S["port"], "/v2").json()
    check(m.name == want["name"] and m.version == want["version"] and
          list(m.extensions) == want["extensions"], "ServerMetadata %r vs HTTP %r" % (m, want))

    for model in ("heart", "digits"):
        m = st.ModelMetadata(pb.ModelMetadataRequest(name=model))
        want = kit.get(S["port"], "/v2/models/" + model).json()
        got = {"name": m.name, "versions": list(m.versions), "platform": m.platform,
               "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                          for t in m.inputs],
               "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                           for t in m.outputs]}
        check(got == want, "ModelMetadata %s: %r vs HTTP %r" % (model, got, want))

    c = st.ModelConfig(pb.ModelConfigRequest(name="heart")).config
    want = kit.get(S["port"], "/v2/models/heart/config").json()
    check(c.name == want["name"] and c.backend == want["backend"] and
          c.max_batch_size == want["max_batch_size"], "ModelConfig %r vs %r" % (c, want))
    check([(i.name, pb.DataType.Name(i.data_type), list(i.dims)) for i in c.input] ==
          [(i["name"], i["data_type"], i["dims"]) for i in want["input"]], "config inputs")
    check([(i.count, pb.ModelInstanceGroup.Kind.Name(i.kind)) for i in c.instance_group] ==
          [(i["count"], i["kind"]) for i in want["instance_group"]], "config instances")

    idx = st.RepositoryIndex(pb.RepositoryIndexRequest())
    want = kit.post(S["port"], "/v2/repository/index", b"").json()
    check([(x.name, x.version, x.state, x.reason) for x in idx.models] ==
          [(x["name"], x.get("version", ""), x["state"], x["reason"]) for x in want],
          "RepositoryIndex %r vs %r" % (idx, want))

    for name, version in (("nope", ""), ("heart", "7")):
        path = "/v2/models/" + name + ("/versions/" + version if version else "")
        hs, hm = http_error(path)
        check_same_error(rpc_error(st.ModelMetadata, pb.ModelMetadataRequest(
            name=name, version=version)), hs, hm, "ModelMetadata %s %s" % (name, version))
        hs, hm = http_error(path + "/config")
        check_same_error(rpc_error(st.ModelConfig, pb.ModelConfigRequest(
            name=name, version=version)), hs, hm, "ModelConfig %s %s" % (name, version))
    hs, hm = http_error("/v2/models/heart/versions/x1")
    check_same_error(rpc_error(st.ModelMetadata, pb.ModelMetadataRequest(
        name="heart", version="x1")), hs, hm, "ModelMetadata bad version")


def test_statistics_match_http():
    st = stub()
    st.ModelInfer(rows_request(S["rows"][:3]))
    kit.wait_idle(S["port"])
    g = st.ModelStatistics(pb.ModelStatisticsRequest(name="heart")).model_stats
    want = kit.get(S["port"], "/v2/models/heart/stats").json()["model_stats"]
    check(len(g) == len(want) == 1, "one entry each: %r / %r" % (g, want))
    g, w = g[0], want[0]
    check((g.name, g.version, g.last_inference, g.inference_count, g.execution_count) ==
          (w["name"], w["version"], w["last_inference"], w["inference_count"],
           w["execution_count"]), "statistics %r vs %r" % (g, w))
    for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        gs = getattr(g.inference_stats, k)
        check((gs.count, gs.ns) == (w["inference_stats"][k]["count"],
                                    w["inference_stats"][k]["ns"]), "statistics %s" % k)
    check(g.inference_count >= 3, "the gRPC inference was counted: %r" % g)
    allst = st.ModelStatistics(pb.ModelStatisticsRequest()).model_stats
    check(sorted(x.name for x in allst) == sorted(
        x["name"] for x in kit.get(S["port"], "/v2/models/stats").json()["model_stats"]),
        "all statistics")
    hs, hm = http_error("/v2/models/nope/stats")
    check_same_error(rpc_error(st.ModelStatistics, pb.ModelStatisticsRequest(name="nope")),
                     hs, hm, "statistics of an unknown model")


# ------------------------------------------------------------------------------ inference


def test_infer_raw_and_typed_bit_identical_to_http():
    st = stub()
    body, hdrs = kit.binary_infer_body(S["rows"], req_id="r-7",
                                       params={"binary_data_output": True})
    doc, http_vals = kit.decode_infer(kit.post(S["port"], kit.infer_path(), body, headers=hdrs))
    for raw in (True, False):
        r = st.ModelInfer(rows_request(S["rows"], raw=raw, req_id="r-7"))
        check(r.model_name == doc["model_name"] and r.model_version == doc["model_version"]
              and r.id == doc["id"] == "r-7", "header fields %r vs %r" % (r, doc))
        check(len(r.outputs) == 1 and r.outputs[0].name == "probability" and
              r.outputs[0].datatype == "FP32" and list(r.outputs[0].shape) == [len(S["rows"]), 1],
              "outputs: %r" % r.outputs)
        got = raw_f32(r)
        kit.assert_f32_equal(got, http_vals["probability"], "raw=%s vs HTTP" % raw)
        kit.assert_f32_equal(got, S["ref"], "raw=%s vs keel infer" % raw)
    # Requested outputs, an explicit version.
    r = st.ModelInfer(rows_request(S["rows"][:2], outputs=["probability"], version="1"))
    check(r.model_version == "1" and [o.name for o in r.outputs] == ["probability"], "%r" % r)
    hs, hm = http_error(kit.infer_path(), kit.json_infer_body(
        S["one"], outputs=[{"name": "nope"}]), {"Content-Type": "application/json"})
    check_same_error(rpc_error(st.ModelInfer, rows_request(S["one"], outputs=["nope"])),
                     hs, hm, "unknown requested output")


def test_batches_on_the_cq_thread():
    """heart_b8 batches 8 rows and waits for them (max_queue_delay 2 s): 240 one-row
    ModelInfer calls in flight together each get their own row's answer (bit-identical to
    keel's reference), every request is counted once in keel_runs, they ran as batches
    (fewer executions than calls), and the batches ran on the completion-queue thread
    (KEEL_SUBMIT_GATHER + keel_runtime_run_gathered: the submit that fills a batch readies
    it without waking a worker) rather than all on inference threads. With heart's own
    config (no delay) a batch is whatever one read of the CQ brought, and a client slower
    than the server (CI once) sees every call run alone: correct, but not what this checks."""
    st = stub()
    n = 240
    # One batch of 8 first: a size class that has never run is "slow" and handed to an
    # inference thread, which then goes on with every batch that is full when it finishes
    # (a slow build's CQ thread, still reading the burst, never got one: TSan, once).
    warm = [st.ModelInfer.future(rows_request([S["rows"][i]], model="heart_b8"), timeout=60)
            for i in range(8)]
    for f in warm:
        f.result(timeout=60)
    # An inference thread that worked polls once more a second later (sched.c's worker
    # loop); after that it wakes only when signalled, and a gathered batch signals nobody.
    time.sleep(1.5)
    before = kit.model_stats(S["port"], "heart_b8")[0]
    futs = [st.ModelInfer.future(rows_request([S["rows"][i % len(S["rows"])]], model="heart_b8"),
                                 timeout=60)
            for i in range(n)]
    for i, f in enumerate(futs):
        kit.assert_f32_equal(raw_f32(f.result(timeout=60)), [S["ref"][i % len(S["rows"])]],
                             "call %d" % i)
    after = kit.model_stats(S["port"], "heart_b8")[0]
    runs = {k: int(after["keel_runs"][k]) - int(before["keel_runs"][k])
            for k in ("inline", "handed_off")}
    execs = int(after["execution_count"]) - int(before["execution_count"])
    kit.log("  %d calls: runs %r, %d executions" % (n, runs, execs))
    check(runs["inline"] + runs["handed_off"] == n, "runs %r for %d calls" % (runs, n))
    check(runs["inline"] > 0, "no batch ran on the CQ thread: %r" % runs)
    check(execs < n, "%d executions for %d calls: nothing batched" % (execs, n))


def typed_input(dt, n, values):
    req = pb.ModelInferRequest(model_name="heart")
    t = req.inputs.add()
    t.name = "features"
    t.datatype = dt
    t.shape.extend([1, n])
    field = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}.get(dt)
    if field is not None:
        getattr(t.contents, field).extend(values)
    return req


def test_datatypes_reach_keel_like_http():
    """heart takes FP32 [-1, 13]: every other datatype is decoded (counts and ranges checked
    by the codec) and then refused by keel's own input check, whose message must be HTTP's
    for the same tensor, typed and raw."""
    st = stub()
    samples = {"BOOL": [True, False] * 6 + [True], "INT8": list(range(-6, 7)),
               "INT16": list(range(-300, 1000, 100)), "INT32": list(range(13)),
               "INT64": [2 ** 40 + i for i in range(13)], "UINT8": list(range(13)),
               "UINT16": [60000 + i for i in range(13)], "UINT32": [2 ** 31 + i for i in range(13)],
               "UINT64": [2 ** 63 + i for i in range(13)], "FP64": [0.5 * i for i in range(13)],
               "BYTES": [b"ab"] * 13}
    for dt, vals in samples.items():
        jvals = [v.decode() for v in vals] if dt == "BYTES" else vals
        body = json.dumps({"inputs": [{"name": "features", "shape": [1, 13], "datatype": dt,
                                       "data": jvals}]}).encode()
        hs, hm = http_error(kit.infer_path(), body, {"Content-Type": "application/json"})
        check_same_error(rpc_error(st.ModelInfer, typed_input(dt, 13, vals)), hs, hm,
                         "typed %s" % dt)
        # The same tensor in raw form.
        fmt = {"BOOL": "?", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B",
               "UINT16": "H", "UINT32": "I", "UINT64": "Q", "FP64": "d"}.get(dt)
        raw = (b"".join(struct.pack("<I", len(v)) + v for v in vals) if dt == "BYTES"
               else struct.pack("<%d%s" % (len(vals), fmt), *vals))
        req = pb.ModelInferRequest(model_name="heart")
        t = req.inputs.add()
        t.name, t.datatype = "features", dt
        t.shape.extend([1, 13])
        req.raw_input_contents.append(raw)
        check_same_error(rpc_error(st.ModelInfer, req), hs, hm, "raw %s" % dt)
    # FP16 has no typed field: raw only.
    e = rpc_error(st.ModelInfer, typed_input("FP32", 13, [0.0] * 13).__class__(
        model_name="heart", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="features", datatype="FP16", shape=[1, 13],
            contents=pb.InferTensorContents())]))
    check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "FP16" in e.details() and
          "raw_input_contents" in e.details(), "typed FP16: %r" % e)
    # Codec errors name the field.
    cases = [
        (typed_input("FP32", 13, [0.0] * 12), ["fp32_contents", "12", "13"]),
        (typed_input("INT8", 13, [200] * 13), ["int_contents", "200", "INT8", "range"]),
        (typed_input("UINT16", 13, [70000] * 13), ["uint_contents", "70000", "UINT16"]),
        (typed_input("FLOAT99", 13, []), ["datatype", "FLOAT99"]),
    ]
    neg = typed_input("FP32", 13, [0.0] * 13)
    neg.inputs[0].shape[0] = -3
    cases.append((neg, ["shape[0]", "-3"]))
    twice = rows_request(S["rows"][:1])
    twice.raw_input_contents.append(b"\0" * 52)
    cases.append((twice, ["raw_input_contents", "2", "1"]))
    short = rows_request(S["rows"][:1])
    short.raw_input_contents[0] = b"\0" * 51
    cases.append((short, ["raw_input_contents[0]", "51", "52"]))
    cases.append((pb.ModelInferRequest(model_name="heart"), ["inputs", "required"]))
    for req, words in cases:
        e = rpc_error(st.ModelInfer, req)
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and
              all(w in e.details() for w in words), "%r: %s %r" % (words, e.code(), e.details()))


def test_unknown_model_and_version_like_http():
    st = stub()
    body = kit.json_infer_body(S["one"])
    for model, version in (("nope", ""), ("heart", "9"), ("heart", "v1")):
        path = kit.infer_path(model, version or None)
        hs, hm = http_error(path, body, {"Content-Type": "application/json"})
        check_same_error(rpc_error(st.ModelInfer, rows_request(S["one"], model=model,
                                                                version=version)),
                         hs, hm, "model %s version %r" % (model, version))


def test_malformed_protobuf_and_unknown_method():
    """Random bytes as the message body: INVALID_ARGUMENT naming the message type, the
    server stays up and its fd count flat; unknown methods are UNIMPLEMENTED."""
    rng = random.Random(13)
    fds = S["server"].fd_count()
    for method in ("ModelInfer", "ModelMetadata", "ServerLive"):
        call = S["ch"].unary_unary("/inference.GRPCInferenceService/" + method,
                                   request_serializer=None, response_deserializer=None)
        bad = 0
        for i in range(40):
            junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
            try:
                call(junk, timeout=10)
            except grpc.RpcError as e:
                check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and
                      "protobuf" in e.details() and "inference." in e.details(),
                      "%s: %s %r" % (method, e.code(), e.details()))
                bad += 1
        check(bad > 0, "%s: no random message was refused" % method)
    for path in ("/inference.GRPCInferenceService/SystemSharedMemoryStatus",
                 "/inference.GRPCInferenceService/CudaSharedMemoryRegister", "/no.Such/Method"):
        call = S["ch"].unary_unary(path, request_serializer=None, response_deserializer=None)
        e = rpc_error(call, b"", timeout=10)
        check(e.code() == grpc.StatusCode.UNIMPLEMENTED and path in e.details(),
              "%s: %s %r" % (path, e.code(), e.details()))
    check(stub().ServerLive(pb.ServerLiveRequest()).live, "server alive")
    S["server"].wait_fds(fds)


# ------------------------------------------------------------------------------ streaming


def test_stream_interleaved_requests_and_errors():
    """ModelStreamInfer: requests of two models and bad ones interleaved on one stream; each
    gets exactly one answer carrying its id, results equal to unary ModelInfer's, errors as
    error_message with HTTP's text (the stream goes on); the stream ends OK."""
    st = stub()
    digits_rows = [[(i * 7 + k) % 17 / 16.0 for k in range(64)] for i in range(3)]
    dreq = pb.ModelInferRequest(model_name="digits", id="d")
    t = dreq.inputs.add()
    t.name, t.datatype = "pixels", "FP32"
    t.shape.extend([3, 64])
    t.contents.fp32_contents.extend(sum(digits_rows, []))
    want_digits = raw_f32(st.ModelInfer(dreq))
    reqs, want = [], {}
    for i in range(12):
        if i % 4 == 3:
            r = rows_request(S["one"], model="nope", req_id="bad-%d" % i)
            want[r.id] = ("error", "unknown model 'nope'")
        elif i % 4 == 2:
            r = pb.ModelInferRequest()
            r.CopyFrom(dreq)
            r.id = "d-%d" % i
            want[r.id] = ("ok", want_digits)
        else:
            rows = S["rows"][i:i + 1 + i % 3]
            r = rows_request(rows, raw=i % 2 == 0, req_id="h-%d" % i)
            want[r.id] = ("ok", S["ref"][i:i + 1 + i % 3])
        reqs.append(r)
    got = {}
    for a in st.ModelStreamInfer(iter(reqs), timeout=60):
        if a.error_message:
            # Errors carry no id (Triton's message has none either): match by text.
            key = [k for k, v in want.items() if v[0] == "error" and k not in got][0]
            got[key] = ("error", a.error_message)
        else:
            got[a.infer_response.id] = ("ok", raw_f32(a.infer_response))
    check(sorted(got) == sorted(want), "answers %r for requests %r" % (sorted(got), sorted(want)))
    for k, (kind, v) in want.items():
        check(got[k][0] == kind, "%s: %r" % (k, got[k]))
        if kind == "ok":
            kit.assert_f32_equal(got[k][1], v, "stream answer " + k)
        else:
            check(got[k][1] == v, "%s: error %r, want %r" % (k, got[k][1], v))
    # An empty stream ends at once, OK.
    check(list(st.ModelStreamInfer(iter([]), timeout=30)) == [], "empty stream")


def test_stream_cancel_while_queued():
    """A client that cancels its stream while its requests are queued: they never run."""
    def action():
        q = []
        ev = threading.Event()

        def gen():
            for _ in range(3):
                yield slow_rows_request(1)
            ev.wait(30)  # keep the stream open

        call = stub().ModelStreamInfer(gen(), timeout=60)
        time.sleep(0.3)
        call.cancel()
        ev.set()
        try:
            for a in call:
                q.append(a)
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.CANCELLED, "stream: %r" % e)
        check(q == [], "a cancelled stream got answers: %r" % q)
        return 0

    ran, before, after = while_blocked(action)
    check_not_run(ran, before, after, "queued on a cancelled stream")


# ------------------------------------------------------------------------------ queueing


def settled_counts(timeout=10):
    deadline = time.monotonic() + timeout
    last = kit.stat_counts(kit.model_stats(S["port"], "slow"))
    while True:
        time.sleep(0.3)
        cur = kit.stat_counts(kit.model_stats(S["port"], "slow"))
        if cur == last or time.monotonic() > deadline:
            return cur
        last = cur


def while_blocked(action):
    """Runs action() while a gRPC blocker request (32768 rows) occupies the slow model's only
    context; returns (answers action counted as run, stats before, stats after)."""
    port = S["port"]
    kit.wait_idle(port)
    before = settled_counts()
    result = {}
    fut = stub().ModelInfer.future(slow_rows_request(256 * BLOCKER_COPIES), timeout=120)
    deadline = time.monotonic() + 30
    while sum(kit.metric_values(kit.scrape(port), "keel_live_leases")) < 1:
        check(time.monotonic() < deadline, "the blocker was never admitted")
        time.sleep(0.002)
    ran = action()
    check(not fut.done(), "test setup: the blocker finished before the action was done")
    result["blocker"] = fut.result(timeout=120)
    kit.wait_idle(port)
    return ran, before, settled_counts()


def check_not_run(ran, before, after, what):
    d_exec = after["execution_count"] - before["execution_count"]
    d_succ = after["success"] - before["success"]
    check(d_succ == 1 + ran and d_exec == 1 + ran,
          "%s: execution_count +%d, success +%d, expected %d: a request that was %s reached "
          "the backend" % (what, d_exec, d_succ, 1 + ran, what))


def test_deadline_exceeded_while_queued():
    errors = []

    def action():
        futs = [stub().ModelInfer.future(slow_rows_request(1), timeout=0.2) for _ in range(3)]
        for f in futs:
            errors.append(rpc_error(f.result))
        return 0

    ran, before, after = while_blocked(action)
    for e in errors:
        check(e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, "deadline: %r" % e)
    check_not_run(ran, before, after, "expired in the queue")


def test_cancel_while_queued():
    cancelled_before = sum(kit.metric_values(kit.scrape(S["port"]),
                                             "keel_grpc_cancelled_requests_total"))

    def action():
        futs = [stub().ModelInfer.future(slow_rows_request(1), timeout=60) for _ in range(3)]
        time.sleep(0.2)
        for f in futs:
            check(f.cancel(), "a queued call could not be cancelled")
        return 0

    ran, before, after = while_blocked(action)
    check_not_run(ran, before, after, "cancelled by its client")
    n = sum(kit.metric_values(kit.scrape(S["port"]), "keel_grpc_cancelled_requests_total"))
    check(n - cancelled_before >= 3, "cancelled requests counted: %s -> %s"
          % (cancelled_before, n))


# ------------------------------------------------------------------------------ servers


def test_oversize_message():
    with kit.running(kit.Server(S["repo"], grpc=True,
                                args=["--max-request-bytes", "64k"])) as srv:
        ch = channel(srv.grpc_port)
        st = pbg.GRPCInferenceServiceStub(ch)
        big = rows_request(kit.heart_rows()[:1] * 2000)  # 104 kB of floats
        e = rpc_error(st.ModelInfer, big, timeout=30)
        check(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "65536" in e.details(),
              "oversize: %s %r" % (e.code(), e.details()))
        r = st.ModelInfer(rows_request(S["rows"][:2]), timeout=30)
        kit.assert_f32_equal(raw_f32(r), S["ref"][:2], "after an oversize message")
        ch.close()


def test_max_connections_answers_unavailable():
    """--max-connections 2 with two streams open: a third call is refused at once with
    UNAVAILABLE (as HTTP answers 503), on the streams' own connection as on a new one, never
    left to wait for its deadline; once the streams end, calls succeed again."""
    with kit.running(kit.Server(S["repo"], grpc=True,
                                args=["--max-connections", "2"])) as srv:
        ch = channel(srv.grpc_port)
        # A connection of its own (grpcio shares one per target unless told otherwise).
        ch2 = grpc.insecure_channel("127.0.0.1:%d" % srv.grpc_port,
                                    options=[("grpc.use_local_subchannel_pool", 1)])
        st, st2 = pbg.GRPCInferenceServiceStub(ch), pbg.GRPCInferenceServiceStub(ch2)
        hold = threading.Event()

        def gen():
            yield rows_request(S["rows"][:1])
            hold.wait(60)

        try:
            streams = [st.ModelStreamInfer(gen(), timeout=60) for _ in range(2)]
            for s in streams:
                a = next(s)
                check(a.error_message == "", "stream answer: %r" % a.error_message)
            for name, stub_ in (("same connection", st), ("new connection", st2)):
                t0 = time.monotonic()
                e = rpc_error(stub_.ModelInfer, rows_request(S["rows"][:1]), timeout=20)
                took = time.monotonic() - t0
                check(e.code() == grpc.StatusCode.UNAVAILABLE and
                      "too many calls in progress" in e.details(),
                      "%s: a third call got %s %r" % (name, e.code(), e.details()))
                check(took < 10, "%s: UNAVAILABLE took %.1f s" % (name, took))
        finally:
            hold.set()
        for s in streams:
            check(list(s) == [], "the streams end without further answers")
        r = st.ModelInfer(rows_request(S["rows"][:2]), timeout=30)
        kit.assert_f32_equal(raw_f32(r), S["ref"][:2], "after the streams ended")
        ch.close()
        ch2.close()


def test_repository_load_unload():
    """Explicit mode: RepositoryModelLoad / Unload through the same control thread as HTTP,
    with HTTP's messages for refusals; in mode none they are refused like HTTP's."""
    st = stub()
    hs, hm = http_error("/v2/repository/models/heart/load", b"")
    check_same_error(rpc_error(st.RepositoryModelLoad, pb.RepositoryModelLoadRequest(
        model_name="heart")), hs, hm, "load in mode none")
    with kit.running(kit.Server(S["repo"], grpc=True,
                                args=["--model-control-mode", "explicit"])) as srv:
        ch = channel(srv.grpc_port)
        st = pbg.GRPCInferenceServiceStub(ch)
        check(not st.ModelReady(pb.ModelReadyRequest(name="heart")).ready, "not loaded yet")
        st.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="heart"), timeout=60)
        check(st.ModelReady(pb.ModelReadyRequest(name="heart")).ready, "loaded")
        r = st.ModelInfer(rows_request(S["rows"][:2]), timeout=30)
        kit.assert_f32_equal(raw_f32(r), S["ref"][:2], "after a gRPC load")
        idx = st.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
        check([m.name for m in idx.models] == ["heart"], "ready index: %r" % idx)
        st.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="heart"), timeout=60)
        check(not st.ModelReady(pb.ModelReadyRequest(name="heart")).ready, "unloaded")
        r = kit.post(srv.port, "/v2/repository/models/nope/load", b"")
        e = rpc_error(st.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="nope"),
                      timeout=60)
        check(e.code().name == CODE_OF_HTTP[r.status] and e.details() == r.json()["error"],
              "load of an unknown model: %s %r vs HTTP %d %r" % (e.code(), e.details(),
                                                               r.status, r.json()))
        e = rpc_error(st.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(
            model_name="heart", parameters={"foo": pb.ModelRepositoryParameter(bool_param=True)}))
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "parameters.foo" in e.details(),
              "unsupported parameter: %r" % e)
        ch.close()


def test_busy_port_is_an_error():
    p = subprocess.run([kit.KEEL, "serve", "--model-repository", S["repo"], "--http-port", "0",
                        "--grpc-port", str(S["gport"])], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=120)
    check(p.returncode == 1, "a second server on the same gRPC port: exit %d" % p.returncode)
    check(p.stdout == b"", "nothing may be printed as listening: %r" % p.stdout)
    check(b"cannot listen for gRPC" in p.stderr, "stderr: %r" % p.stderr[-500:])


def test_sigterm_with_open_calls():
    """Unary calls and stream requests queued behind a blocker when SIGTERM arrives all get
    their answer (0 lost); the stream, still open, is then ended by the server, which exits
    0."""
    srv = kit.Server(S["repo"], grpc=True, args=["--shutdown-grace-secs", "0"]).start()
    try:
        ch = channel(srv.grpc_port)
        st = pbg.GRPCInferenceServiceStub(ch)
        blocker = st.ModelInfer.future(slow_rows_request(256 * BLOCKER_COPIES), timeout=120)
        deadline = time.monotonic() + 30
        while sum(kit.metric_values(kit.scrape(srv.port), "keel_live_leases")) < 1:
            check(time.monotonic() < deadline, "blocker never admitted")
            time.sleep(0.002)
        queued = [st.ModelInfer.future(slow_rows_request(1), timeout=120) for _ in range(4)]
        hold = threading.Event()

        def gen():
            for i in range(3):
                r = slow_rows_request(1)
                r.id = "s-%d" % i
                yield r
            hold.wait(60)  # the stream stays open across the shutdown

        stream = st.ModelStreamInfer(gen(), timeout=120)
        answers = []

        def read():
            try:
                for a in stream:
                    answers.append(a)
            except grpc.RpcError as e:
                answers.append(e)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        # SIGTERM only once all of them are admitted (1 + 4 + 3 leases): a stream request
        # that arrives after the drain began is refused, and under ThreadSanitizer a fixed
        # 0.3 s was once too short for the third.
        deadline = time.monotonic() + 60
        while sum(kit.metric_values(kit.scrape(srv.port), "keel_live_leases")) < 8:
            check(time.monotonic() < deadline, "the calls and stream requests were never all "
                  "admitted")
            time.sleep(0.01)
        srv.signal(signal.SIGTERM)
        check(len(blocker.result(timeout=120).raw_output_contents) == 1, "blocker answered")
        for f in queued:
            check(len(f.result(timeout=120).raw_output_contents) == 1, "queued call answered")
        reader.join(120)
        hold.set()
        got = sorted(a.infer_response.id for a in answers
                     if not isinstance(a, grpc.RpcError) and not a.error_message)
        check(got == ["s-0", "s-1", "s-2"], "stream answers across SIGTERM: %r" % answers)
        ch.close()
        rc = srv.wait(60)
        check(rc is not None, "keel serve did not exit after the drain")
        srv.check_exit(0)
    except BaseException:
        kit.log("server stderr tail:\n" + srv.stderr_tail(30))
        srv.kill()
        raise


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_health_and_metadata_match_http, test_statistics_match_http,
             test_infer_raw_and_typed_bit_identical_to_http, test_batches_on_the_cq_thread,
             test_datatypes_reach_keel_like_http,
             test_unknown_model_and_version_like_http, test_malformed_protobuf_and_unknown_method,
             test_stream_interleaved_requests_and_errors, test_stream_cancel_while_queued,
             test_deadline_exceeded_while_queued, test_cancel_while_queued, test_oversize_message,
             test_max_connections_answers_unavailable, test_repository_load_unload, test_busy_port_is_an_error,
             test_sigterm_with_open_calls],
            setup=setup, teardown=teardown)
