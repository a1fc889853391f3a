"""test_restricted_grpc.py: --http-restricted-api protects the gRPC endpoint too, as Triton's
restricted groups do: a call to a restricted group's method without the key in its metadata
("keel-grpc-protocol-KEY" or Triton's "triton-grpc-protocol-KEY"), with a wrong value, or with
the key twice is answered UNAVAILABLE with Triton's message and never runs; with the key it is
served; methods of open groups need nothing. Checked for inference (ModelInfer), health
(ServerLive, grpc.health.v1 Check), metadata (ModelMetadata), model-repository
(RepositoryIndex) and statistics (ModelStatistics)."""

import grpckit
import kit
from kit import check

S = {}
KEYS = {"inference": ("Infer-Token", "i-42"), "health": ("X-Health", "h-1"),
        "model-repository": ("Admin-Key", "admin value")}


def setup():
    st = grpckit.load()
    S["grpc"], S["pb"], S["pbg"], S["hp"], S["hpg"] = st.grpc, st.pb, st.pbg, st.hp, st.hpg
    args = []
    for group, (key, value) in KEYS.items():
        args += ["--http-restricted-api", "%s:%s=%s" % (group, key, value)]
    S["server"] = kit.Server(kit.example_repo(), args=args, grpc=True).start()
    S["ch"] = S["grpc"].insecure_channel("127.0.0.1:%d" % S["server"].grpc_port)
    S["grpc"].channel_ready_future(S["ch"]).result(timeout=10)
    S["rows"] = kit.complete_rows()[:2]


def teardown():
    S["ch"].close()
    S["server"].stop()


def md(group, prefix="triton-grpc-protocol-", value=None, twice=False):
    key, right = KEYS[group]
    pair = (prefix + key.lower(), right if value is None else value)
    return [pair, pair] if twice else [pair]


def refused(fn, req, metadata, group):
    grpc = S["grpc"]
    try:
        fn(req, metadata=metadata, timeout=10)
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.UNAVAILABLE, "%s: expected UNAVAILABLE, got %s %s"
              % (group, e.code(), e.details()))
        want = "expecting header 'triton-grpc-protocol-%s'" % KEYS[group][0].lower()
        check(want in e.details().lower(), "%s: message %r lacks %r" % (group, e.details(), want))
        return
    raise kit.TestFailure("%s: the call without its key was served" % group)


def executions():
    r = kit.get(S["server"].port, "/v2/models/heart/stats",
                headers={KEYS["inference"][0]: KEYS["inference"][1]}).json()
    return sum(s["execution_count"] for s in r["model_stats"])


def test_inference_group():
    pb, stub = S["pb"], S["pbg"].GRPCInferenceServiceStub(S["ch"])
    req = grpckit.rows_request(pb, S["rows"])
    before = executions()
    for metadata in ([], md("inference", value="i-4"), md("inference", value="i-42x"),
                     md("inference", twice=True), md("health"),
                     md("inference", prefix="other-prefix-")):
        refused(stub.ModelInfer, req, metadata, "inference")
    check(executions() == before, "a refused ModelInfer reached the backend")
    for prefix in ("triton-grpc-protocol-", "keel-grpc-protocol-"):
        r = stub.ModelInfer(req, metadata=md("inference", prefix=prefix), timeout=10)
        check(len(grpckit.raw_f32(r)) == len(S["rows"]), "ModelInfer with the key: %r" % r)


def test_health_group():
    pb, stub = S["pb"], S["pbg"].GRPCInferenceServiceStub(S["ch"])
    refused(stub.ServerLive, pb.ServerLiveRequest(), [], "health")
    check(stub.ServerLive(pb.ServerLiveRequest(), metadata=md("health"), timeout=10).live,
          "ServerLive with the key")
    hstub = S["hpg"].HealthStub(S["ch"])
    refused(hstub.Check, S["hp"].HealthCheckRequest(), [], "health")
    hstub.Check(S["hp"].HealthCheckRequest(), metadata=md("health"), timeout=10)


def test_repository_group_and_open_groups():
    pb, stub = S["pb"], S["pbg"].GRPCInferenceServiceStub(S["ch"])
    refused(stub.RepositoryIndex, pb.RepositoryIndexRequest(), md("inference"),
            "model-repository")
    r = stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=md("model-repository"),
                             timeout=10)
    check({m.name for m in r.models} >= {"heart"}, "RepositoryIndex with the key: %r" % r)
    # metadata and statistics are not restricted here: no key needed.
    stub.ModelMetadata(pb.ModelMetadataRequest(name="heart"), timeout=10)
    stub.ModelStatistics(pb.ModelStatisticsRequest(name="heart"), timeout=10)


if __name__ == "__main__":
    kit.run([test_inference_group, test_health_group, test_repository_group_and_open_groups],
            setup=setup, teardown=teardown)
