"""test_rolling_restart.py: two keel replicas behind nginx, restarted one after the other
under continuous load, lose no request (docs/DEPLOY.md shows this configuration).

nginx (Debian's nginx-light, foreground, temporary prefix) balances one upstream of two
`keel serve` replicas on fixed ports with keep-alive connections. Four client threads send
infer requests through nginx the whole time, each checking its answer against the in-process
reference. Replica A gets SIGTERM, exits 0, and is started again on the same port; once it is
ready, the same for B. Every request must get 200 with the right answer: keel's drain (ready
503 for the grace period, then 503 "shutting down" to new requests, then connections
refused) and nginx's `proxy_next_upstream error http_503 non_idempotent` move every request
to the other replica. Why retrying a POST is safe here: keel answers 503 only for requests it
refused before running them, and an inference has no side effect, so even a request retried
after a broken connection only costs a second computation."""

import signal
import threading
import time

import kit
from kit import check

CLIENTS = 4

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    upstream keel {{
        server 127.0.0.1:{a} max_fails=0;
        server 127.0.0.1:{b} max_fails=0;
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64m;
        location / {{
            proxy_pass http://keel;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error http_503 non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 2s;
            proxy_read_timeout 60s;
        }}
    }}
}}
"""

S = {}


class Replica(kit.Server):
    """keel serve on a fixed port (nginx's upstream names it)."""

    def __init__(self, repo, port):
        super().__init__(repo, args=["--shutdown-grace-secs", "1"])
        self.fixed_port = port

    @property
    def cmd(self):
        return [kit.KEEL, "serve", "--model-repository", self.repo, "--http-port",
                str(self.fixed_port), "--grpc-port", "-1"] + self.args


def start_replica(port):
    for _ in range(50):  # the port may still be held by the process that just left
        try:
            return Replica(S["repo"], port).start()
        except kit.TestFailure as e:
            if "before listening" not in str(e):
                raise
            time.sleep(0.2)
    raise kit.TestFailure("replica could not listen on port %d again" % port)


def wait_ready(port, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if kit.get(port, "/v2/health/ready", timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise kit.TestFailure("replica on port %d not ready in %ds" % (port, timeout))


def setup():
    S["repo"] = kit.example_repo()
    S["rows"] = kit.complete_rows()[:4]
    S["ref"] = kit.keel_reference(S["repo"], "heart", S["rows"])
    S["ports"] = [kit.free_port(below_ephemeral=True), kit.free_port(below_ephemeral=True)]
    S["replicas"] = [start_replica(p) for p in S["ports"]]
    S["nginx"] = kit.Nginx(NGINX_CONF, a=S["ports"][0], b=S["ports"][1]).start()
    S["lb"] = S["nginx"].port


def teardown():
    for r in S.get("replicas", []):
        if r is not None and r.alive():
            r.stop()
    if S.get("nginx") is not None:
        S["nginx"].stop()


def test_rolling_restart_loses_nothing():
    body = kit.json_infer_body(S["rows"])
    stop = threading.Event()
    results = {"ok": 0, "bad": []}
    lock = threading.Lock()

    def client():
        while not stop.is_set():
            try:
                r = kit.post(S["lb"], kit.infer_path("heart"), body,
                             headers={"Content-Type": "application/json"}, timeout=60)
                if r.status != 200:
                    raise kit.TestFailure("status %d: %s" % (r.status, kit.short(r.body)))
                _, outs = kit.decode_infer(r)
                kit.assert_f32_equal(outs["probability"], S["ref"], "answer through nginx")
                with lock:
                    results["ok"] += 1
            except Exception as e:  # every failure is reported by the main thread
                with lock:
                    results["bad"].append(repr(e))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        for i, port in enumerate(S["ports"]):
            before = results["ok"]
            old = S["replicas"][i]
            old.signal(signal.SIGTERM)
            old.wait(60)
            old.check_exit(0)
            S["replicas"][i] = None
            time.sleep(0.5)  # traffic runs on the other replica alone meanwhile
            S["replicas"][i] = start_replica(port)
            wait_ready(port)
            time.sleep(1.0)
            check(results["ok"] > before, "no request was answered while replica %d restarted" % i)
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    check(not any(t.is_alive() for t in threads), "a client thread did not finish")
    kit.log("  %d requests answered through nginx, %d failed" % (results["ok"], len(results["bad"])))
    check(results["ok"] > 50, "too few requests went through: %d" % results["ok"])
    if results["bad"]:
        nginx_log = S["nginx"].error_log()
        raise kit.TestFailure("%d requests failed during the rolling restart, first: %s\n"
                              "nginx's error log:\n%s" % (len(results["bad"]), results["bad"][:2],
                                                          nginx_log))
    # After the restart both replicas serve: each answers directly.
    for port in S["ports"]:
        check(kit.get(port, "/v2/health/ready").status == 200, "replica %d not ready" % port)


if __name__ == "__main__":
    kit.run([test_rolling_restart_loses_nothing], setup=setup, teardown=teardown)
