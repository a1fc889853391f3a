"""test_hotswap_grpc.py: hot swap under gRPC load, with no failed call and no stale answer.

As test_hotswap_http.py, over gRPC: two models A and B (different answers on every row);
in explicit mode gRPC clients call ModelInfer continuously (raw and typed tensors) and one
client keeps a ModelStreamInfer stream busy, while the model's version folder alternates
between A and B 30 times, each swap loaded with RepositoryModelLoad. Every call must succeed
and equal exactly the in-process answer of A or of B; a call sent after a load returned and
answered before the next load started must come from the model that load published."""

import os
import threading
import time

import grpckit
import kit
from kit import check

SWAPS = 30
CLIENTS = 3
S = {}


def setup():
    S["g"] = grpckit.load()
    work = kit.tmpdir("keel-train-")
    S["A"] = kit.train_model(work, "model_a", rounds=4, depth=2)
    S["B"] = kit.train_model(work, "model_b", rounds=12, depth=4)
    S["rows"] = kit.heart_rows()[:8]
    S["ref"] = {}
    for name in ("A", "B"):
        repo = kit.copy_repo()
        kit.add_model(repo, "swap", S[name], instances=2)
        S["ref"][name] = kit.keel_reference(repo, "swap", S["rows"])
    check(all(kit.f32_bits(x) != kit.f32_bits(y) for x, y in zip(S["ref"]["A"], S["ref"]["B"])),
          "models A and B agree on some row; they cannot be told apart")
    S["repo"] = kit.copy_repo()
    kit.add_model(S["repo"], "swap", S["A"], instances=2)


def which(vals):
    for name in ("A", "B"):
        if kit.same_f32(vals, S["ref"][name]):
            return name
    return None


def test_hotswap_under_grpc_load():
    g = S["g"]
    pb = g.pb
    target = os.path.join(S["repo"], "swap", "1", "model.json")
    with kit.running(kit.Server(S["repo"], ["--model-control-mode", "explicit"],
                                grpc=True)) as srv:
        ch = g.grpc.insecure_channel("127.0.0.1:%d" % srv.grpc_port)
        st = g.pbg.GRPCInferenceServiceStub(ch)
        st.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="swap"), timeout=60)
        loads = [(0.0, time.monotonic(), "A")]  # (start, end, model)
        stop = threading.Event()
        lock = threading.Lock()
        results = []  # (t_send, t_done, model or error)

        def answer_of(resp):
            if resp.model_version != "1":
                return "model_version %r" % resp.model_version
            vals = grpckit.raw_f32(resp)
            return which(vals) or "an answer of neither model: %r" % vals[:3]

        def client(i):
            n = 0
            while not stop.is_set():
                n += 1
                t0 = time.monotonic()
                try:
                    r = st.ModelInfer(grpckit.rows_request(pb, S["rows"], model="swap",
                                                           raw=(i + n) % 2 == 0), timeout=30)
                    out = answer_of(r)
                except g.grpc.RpcError as e:
                    out = "%s %s" % (e.code(), e.details())
                with lock:
                    results.append((t0, time.monotonic(), out))

        sent = {}

        def stream_client():
            def gen():
                k = 0
                while not stop.is_set():
                    k += 1
                    req = grpckit.rows_request(pb, S["rows"], model="swap", req_id=str(k))
                    sent[str(k)] = time.monotonic()
                    yield req
                    time.sleep(0.005)

            try:
                for a in st.ModelStreamInfer(gen(), timeout=300):
                    t1 = time.monotonic()
                    out = a.error_message or answer_of(a.infer_response)
                    with lock:
                        results.append((sent.get(a.infer_response.id, t1), t1, out))
            except g.grpc.RpcError as e:
                with lock:
                    results.append((0, 0, "stream: %s %s" % (e.code(), e.details())))

        threads = [threading.Thread(target=client, args=(i,), daemon=True)
                   for i in range(CLIENTS)] + [threading.Thread(target=stream_client,
                                                                daemon=True)]
        for t in threads:
            t.start()
        load_errors = []
        try:
            time.sleep(0.2)
            for i in range(1, SWAPS + 1):
                name = "B" if i % 2 else "A"
                kit.replace_file(S[name], target)
                t0 = time.monotonic()
                try:
                    st.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="swap"),
                                           timeout=60)
                except g.grpc.RpcError as e:
                    load_errors.append("load %d (%s): %s %s" % (i, name, e.code(), e.details()))
                loads.append((t0, time.monotonic(), name))
                time.sleep(0.03)
            time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        ch.close()
        check(not load_errors, "loads failed: %s" % load_errors[:3])
        failed = [x for x in results if x[2] not in ("A", "B")]
        check(not failed, "%d of %d calls failed during the swaps, e.g. %r"
              % (len(failed), len(results), failed[:3]))
        seen = {m: sum(1 for x in results if x[2] == m) for m in ("A", "B")}
        kit.log("  %d calls over %d swaps: %r" % (len(results), SWAPS, seen))
        check(seen["A"] > 0 and seen["B"] > 0, "answers never changed: %r" % seen)
        stale = []
        for t0, t1, model in results:
            for k, (ls, le, lm) in enumerate(loads):
                nxt = loads[k + 1][0] if k + 1 < len(loads) else float("inf")
                if le <= t0 and t1 <= nxt and model != lm:
                    stale.append("call at +%.3fs answered by %s; load %d of %s had returned "
                                 "%.3fs before it was sent" % (t0 - loads[0][1], model, k, lm,
                                                               t0 - le))
        check(not stale, "%d stale answers: %s" % (len(stale), stale[:3]))


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_hotswap_under_grpc_load], setup=setup)
