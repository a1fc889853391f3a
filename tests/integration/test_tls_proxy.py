"""test_tls_proxy.py: keel behind nginx terminating TLS, as docs/OPERATIONS.md shows it.

keel listens on 127.0.0.1 with model-repository restricted (its key read from a file);
Debian's nginx (nginx-light) runs in the foreground from a temporary prefix with a self-signed
certificate made by openssl at test time, terminating TLS on a free port and forwarding to keel
with proxy_ignore_client_abort off. Checked through TLS: an inference gives the in-process
answer; the repository index is 403 with Triton's message without the key and 200 with it;
and a client that hangs up while its request waits in keel's queue (behind a long "blocker"
request on the only context of a slow model) gets its request cancelled inside keel: nginx
closes its upstream connection, keel's hang-up watcher cancels the queued request
(keel_http_cancelled_requests_total{cause="client_gone"} grows by one) and it never reaches
the backend (the model's execution_count grows by the blocker only).
"""

import http.client as httpclient
import os
import socket
import ssl
import subprocess
import threading
import time

import kit
from kit import check

S = {}
ADMIN = ("Admin-Key", "tls-admin-0c1d")
BLOCKER_COPIES = 128  # 32768 rows: long enough on an idle machine too

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    upstream keel {{
        server 127.0.0.1:{keel_port};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {prefix}/cert.pem;
        ssl_certificate_key {prefix}/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 64m;

        location / {{
            proxy_pass http://keel;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ignore_client_abort off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def make_certificate(d):
    p = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", os.path.join(d, "key.pem"), "-out", os.path.join(d, "cert.pem"),
         "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    check(p.returncode == 0, "openssl req failed: %s" % p.stdout.decode()[-1000:])
    os.chmod(os.path.join(d, "key.pem"), 0o600)


def start_nginx(keel_port):
    prefix = kit.tmpdir("keel-nginx-")
    make_certificate(prefix)
    S["nginx"] = kit.Nginx(NGINX_CONF, prefix=prefix, keel_port=keel_port).start()
    S["prefix"] = prefix
    return S["nginx"].port


def tls_context():
    ctx = ssl.create_default_context(cafile=os.path.join(S["prefix"], "cert.pem"))
    ctx.check_hostname = True
    return ctx


def tls_request(method, path, body=None, headers=None, timeout=120):
    conn = httpclient.HTTPSConnection("127.0.0.1", S["tls_port"], timeout=timeout,
                                      context=tls_context())
    try:
        h = dict(headers or {})
        if body is not None:
            h.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return kit.Response(r.status, r.reason, r.getheaders(), r.read())
    finally:
        conn.close()


def setup():
    repo = kit.copy_repo()
    work = kit.tmpdir("keel-train-")
    slow = kit.train_slow_model(work)
    kit.add_model(repo, "slow", slow, instances=1, max_queue_size=64,
                  max_batch_size=256 * BLOCKER_COPIES)
    S["row"] = kit.complete_rows()[0]
    S["ref"] = kit.keel_reference(repo, "heart", [S["row"]])
    S["rows"] = kit.heart_rows()[:256]
    S["slow_ref"] = kit.keel_reference(repo, "slow", S["rows"])
    keyfile = os.path.join(kit.tmpdir("keel-key-"), "admin.key")
    with open(keyfile, "w") as f:
        f.write(ADMIN[1] + "\n")
    S["server"] = kit.Server(repo, ["--http-restricted-api",
                                    "model-repository:%s=@%s" % (ADMIN[0], keyfile)]).start()
    S["port"] = S["server"].port
    S["tls_port"] = start_nginx(S["port"])


def teardown():
    try:
        check(S["server"].alive(), "keel died")
        kit.wait_idle(S["port"])
        S["server"].stop()
    finally:
        if S.get("nginx") is not None:
            S["nginx"].stop()


def test_infer_through_tls():
    r = tls_request("POST", kit.infer_path("heart"), kit.json_infer_body([S["row"]]))
    check(r.status == 200, "infer through nginx: %r" % r)
    _, vals = kit.decode_infer(r)
    kit.assert_f32_equal(vals["probability"], S["ref"], "infer through TLS")
    body, hdrs = kit.binary_infer_body([S["row"]], params={"binary_data_output": True})
    r = tls_request("POST", kit.infer_path("heart"), body, headers=hdrs)
    check(r.status == 200, "binary infer through nginx: %r" % r)
    _, vals = kit.decode_infer(r)
    kit.assert_f32_equal(vals["probability"], S["ref"], "binary infer through TLS")


def test_plain_http_to_the_tls_port_is_refused():
    r = kit.http(S["tls_port"], "GET", "/v2/health/ready")
    check(r.status == 400, "plain HTTP to nginx's TLS port: %r" % r)


def test_repository_needs_the_key_through_tls():
    r = tls_request("POST", "/v2/repository/index", b"")
    check(r.status == 403, "index through nginx without the key: %r" % r)
    msg = r.error_message()
    check(msg == "This API is restricted, expecting header '%s'" % ADMIN[0],
          "index without the key: message %r" % msg)
    r = tls_request("POST", "/v2/repository/index", b"", headers={ADMIN[0]: "wrong"})
    check(r.status == 403, "index through nginx with a wrong key: %r" % r)
    r = tls_request("POST", "/v2/repository/index", b"", headers={ADMIN[0]: ADMIN[1]})
    check(r.status == 200, "index through nginx with the key: %r" % r)
    names = {m.get("name") for m in r.json()}
    check({"heart", "slow"} <= names, "index through nginx: %r" % names)


def client_gone():
    samples, _ = kit.parse_metrics(kit.scrape(S["port"]))
    vals = [v for n, labels, v in samples
            if n == "keel_http_cancelled_requests_total" and labels.get("cause") == "client_gone"]
    check(len(vals) == 1, "/metrics has no keel_http_cancelled_requests_total{cause=client_gone}")
    return vals[0]


def live_leases():
    return sum(kit.metric_values(kit.scrape(S["port"]), "keel_live_leases"))


def test_hangup_through_the_proxy_cancels_inside_keel():
    port = S["port"]
    kit.wait_idle(port)
    gone0 = client_gone()
    before = kit.stat_counts(kit.model_stats(port, "slow"))
    body, hdrs = kit.binary_infer_body(S["rows"] * BLOCKER_COPIES,
                                       params={"binary_data_output": True})
    result = {}

    def blocker():  # straight to keel, so that it certainly runs first
        try:
            result["resp"] = kit.post(port, kit.infer_path("slow"), body, headers=hdrs,
                                      timeout=300)
        except Exception as e:
            result["error"] = e
        result["t1"] = time.monotonic()

    t = threading.Thread(target=blocker, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while live_leases() < 1:
        check(t.is_alive() and time.monotonic() < deadline, "the blocker was never admitted")
        time.sleep(0.002)

    # Through TLS and nginx: a one-row request that queues behind the blocker.
    one = kit.json_infer_body(kit.complete_rows()[:1])
    raw = socket.create_connection(("127.0.0.1", S["tls_port"]), timeout=30)
    s = tls_context().wrap_socket(raw, server_hostname="127.0.0.1")
    s.sendall(("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               "Content-Length: %d\r\n\r\n" % (kit.infer_path("slow"), len(one))).encode() + one)
    deadline = time.monotonic() + 30
    while live_leases() < 2:
        check(time.monotonic() < deadline and t.is_alive(),
              "the proxied request never reached keel's queue (leases %r)" % live_leases())
        time.sleep(0.002)
    s.close()  # the client hangs up on nginx
    t_close = time.monotonic()
    deadline = time.monotonic() + 20
    while client_gone() < gone0 + 1:
        check(time.monotonic() < deadline,
              "keel did not cancel the request of the client that hung up on nginx "
              "(client_gone stayed %r)" % client_gone())
        time.sleep(0.01)
    t_cancel = time.monotonic()
    t.join(300)
    check(not t.is_alive(), "the blocker did not finish")
    check("error" not in result, "blocker failed: %r" % result.get("error"))
    _, vals = kit.decode_infer(result["resp"])
    kit.assert_f32_equal(vals["probability"], S["slow_ref"] * BLOCKER_COPIES, "blocker")
    check(result["t1"] > t_cancel, "test setup: the blocker finished %.3fs after the hang-up, "
          "before the cancel was seen, so the request may have run" % (result["t1"] - t_close))
    kit.wait_idle(port)
    after = kit.stat_counts(kit.model_stats(port, "slow"))
    check(after["execution_count"] - before["execution_count"] == 1 and
          after["success"] - before["success"] == 1,
          "the abandoned request reached the backend: before %r, after %r" % (before, after))
    check(client_gone() == gone0 + 1, "client_gone grew by %r, expected 1"
          % (client_gone() - gone0))


if __name__ == "__main__":
    kit.parse_args()
    kit.run([test_infer_through_tls, test_plain_http_to_the_tls_port_is_refused,
             test_repository_needs_the_key_through_tls,
             test_hangup_through_the_proxy_cancels_inside_keel],
            setup=setup, teardown=teardown)
