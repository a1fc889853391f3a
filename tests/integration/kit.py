"""kit.py: shared helpers for the Python integration tests of `keel serve`.

Standard library only, plus Debian's python3-jsonschema (run the tests with /usr/bin/python3;
python3-yaml too when KEEL_OIP_SPEC is set). Every test file is run by ctest as

    /usr/bin/python3 tests/integration/test_X.py --keel <keel binary> --source <repo root>

and ends with the line "N passed, M failed"; it exits 0 only if nothing failed.

What is here:
  - arguments (--keel, --source, -k SUBSTRING to run only some tests, -v for verbose)
  - Server: starts `keel serve --http-port 0`, waits for the one stdout line
    "level=info msg=listening address=127.0.0.1 port=N", keeps stderr in a file, stops with
    SIGTERM and checks exit 0, nothing more on stdout and no sanitizer report on stderr
  - http(): one request over http.client; raw(): bytes over a raw socket, with a response
    reader that needs no well-behaved server
  - schema validation against keel's schema of the protocol, tests/schema/open_inference_rest.json
    (and against the protocol's OpenAPI file too when KEEL_OIP_SPEC names it)
  - the heart_scale rows, float32 helpers, infer request builders (JSON and Triton binary),
    response decoding, and references computed by `keel infer` and by the xgboost CLI
  - model training with the xgboost CLI (small models for hot swap, a slow one for queueing)
  - Prometheus text parsing, Triton-style statistics helpers
  - run(): a tiny test runner
"""

import argparse
import contextlib
import copy
import http.client as httpclient
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref

HEART_SCALE = "/usr/share/doc/liblinear-tools/examples/heart_scale"
LISTEN_RE = re.compile(r"^level=info msg=listening address=127\.0\.0\.1 port=(\d+)$")
GRPC_LISTEN_RE = re.compile(
    r"^level=info msg=listening protocol=grpc address=127\.0\.0\.1 port=(\d+)$")
SANITIZER_PATTERNS = [
    "LeakSanitizer",
    "ERROR: AddressSanitizer",
    "WARNING: ThreadSanitizer",
    "ERROR: ThreadSanitizer",
    re.compile(r"\.(c|h|cc|cpp):\d+:\d+: runtime error:"),  # UndefinedBehaviorSanitizer
]

ARGS = None
KEEL = None
SOURCE = None
VERBOSE = False
_servers = []  # every Server started, killed at exit if still running
_tmpdirs = []


# ------------------------------------------------------------------------------ basics


class TestFailure(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def log(*a):
    print(*a, flush=True)


def vlog(*a):
    if VERBOSE:
        print(*a, flush=True)


def parse_args(argv=None):
    global ARGS, KEEL, SOURCE, VERBOSE
    p = argparse.ArgumentParser()
    p.add_argument("--keel", required=True, help="path to the keel binary")
    p.add_argument("--source", required=True, help="repository root")
    p.add_argument("-k", dest="only", default=None, help="run only tests whose name contains this")
    p.add_argument("-v", dest="verbose", action="store_true")
    ARGS = p.parse_args(argv)
    KEEL = os.path.abspath(ARGS.keel)
    SOURCE = os.path.abspath(ARGS.source)
    VERBOSE = ARGS.verbose
    return ARGS


def tmpdir(prefix="keel-it-"):
    d = tempfile.mkdtemp(prefix=prefix)
    _tmpdirs.append(d)
    return d


def short(b, n=300):
    """A printable excerpt of bytes or str for messages."""
    if isinstance(b, (bytes, bytearray)):
        s = bytes(b[:n]).decode("utf-8", "backslashreplace")
    else:
        s = str(b)[:n]
    if len(b) > n:
        s += "...(%d bytes)" % len(b)
    return s


# ------------------------------------------------------------------------------ server


class Server:
    """One `keel serve` process."""

    def __init__(self, repo, args=(), env=None, start_timeout=120, grpc=False):
        self.repo = repo
        self.grpc = grpc  # serve gRPC on a free port (self.grpc_port); else --grpc-port -1
        self.grpc_port = None
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("OMP_NUM_THREADS", "1")
        supp = os.path.join(SOURCE, "tests", "lsan.supp")
        if "LSAN_OPTIONS" not in self.env and os.path.exists(supp):
            self.env["LSAN_OPTIONS"] = "suppressions=" + supp
        self.start_timeout = start_timeout
        self.proc = None
        self.port = None
        self.extra_stdout = []
        self.returncode = None
        self._stdout_thread = None
        d = tmpdir("keel-srv-")
        self.stderr_path = os.path.join(d, "stderr.log")

    @property
    def cmd(self):
        return ([KEEL, "serve", "--model-repository", self.repo, "--http-port", "0",
                 "--grpc-port", "0" if self.grpc else "-1"] + self.args)

    def start(self):
        check(os.access(KEEL, os.X_OK), "keel binary %s is missing or not executable" % KEEL)
        self._stderr_f = open(self.stderr_path, "wb")
        vlog("starting:", " ".join(self.cmd))
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr_f, env=self.env)
        _servers.append(self)
        deadline = time.monotonic() + self.start_timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while buf.count(b"\n") < (2 if self.grpc else 1):
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TestFailure("keel serve printed no listening line within %ds; stdout %r; "
                                  "stderr:\n%s" % (self.start_timeout, buf, self.stderr_tail()))
            r, _, _ = select.select([fd], [], [], min(left, 0.2))
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    rc = self.proc.wait()
                    raise TestFailure("keel serve exited (status %s) before listening; stdout %r; "
                                      "stderr:\n%s" % (rc, buf, self.stderr_tail()))
                buf += chunk
        line, _, rest = buf.partition(b"\n")
        m = LISTEN_RE.match(line.decode("utf-8", "replace"))
        if not m:
            self.kill()
            raise TestFailure("first stdout line is not the listening line: %r" % line)
        self.port = int(m.group(1))
        check(self.port > 0, "listening port is 0")
        if self.grpc:
            line, _, rest = rest.partition(b"\n")
            m = GRPC_LISTEN_RE.match(line.decode("utf-8", "replace"))
            if not m:
                self.kill()
                raise TestFailure("second stdout line is not the gRPC listening line: %r" % line)
            self.grpc_port = int(m.group(1))
            check(self.grpc_port > 0, "gRPC listening port is 0")
        if rest:
            self.extra_stdout.append(rest)
        self._stdout_thread = threading.Thread(target=self._drain_stdout, daemon=True)
        self._stdout_thread.start()
        vlog("listening on port", self.port)
        return self

    def _drain_stdout(self):
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return
            if not chunk:
                return
            self.extra_stdout.append(chunk)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stderr_text(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stderr_tail(self, n=40):
        return "\n".join(self.stderr_text().splitlines()[-n:])

    def sanitizer_reports(self):
        text = self.stderr_text()
        found = []
        for p in SANITIZER_PATTERNS:
            if isinstance(p, str):
                if p in text:
                    found.append(p)
            elif p.search(text):
                found.append(p.pattern)
        return found

    def fd_count(self):
        """Open file descriptors of the server process (Linux /proc)."""
        return len(os.listdir("/proc/%d/fd" % self.proc.pid))

    def wait_fds(self, baseline, timeout=10):
        """Waits until the server has no more open fds than baseline (connections the
        clients closed take a moment to be noticed); fails with the count otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.fd_count()
            if n <= baseline:
                return n
            if time.monotonic() > deadline:
                fds = {}
                for fd in os.listdir("/proc/%d/fd" % self.proc.pid):
                    try:
                        t = os.readlink("/proc/%d/fd/%s" % (self.proc.pid, fd))
                    except OSError:
                        continue
                    t = re.sub(r"\[\d+\]", "", t)
                    fds[t] = fds.get(t, 0) + 1
                raise TestFailure("the server has %d open fds %ds after the clients closed "
                                  "everything, %d before: %s" % (n, timeout, baseline, fds))
            time.sleep(0.1)

    def signal(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def stop(self, timeout=60, expect_rc=0):
        """SIGTERM, wait, then check exit status, stdout and sanitizer output."""
        check(self.proc is not None, "server was never started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.wait(timeout)
        if rc is None:
            self.kill()
            raise TestFailure("keel serve did not exit within %ds of SIGTERM; stderr tail:\n%s"
                              % (timeout, self.stderr_tail()))
        return self.check_exit(expect_rc)

    def check_exit(self, expect_rc=0):
        rc = self.proc.returncode
        if self._stdout_thread is not None:
            self._stdout_thread.join(5)
        self._stderr_f.close()
        problems = []
        if rc != expect_rc:
            problems.append("exit status %s, expected %s" % (rc, expect_rc))
        extra = b"".join(self.extra_stdout)
        if extra.strip():
            problems.append("stdout has more than the listening line: %r" % short(extra))
        san = self.sanitizer_reports()
        if san:
            problems.append("sanitizer report(s) in stderr: %s" % ", ".join(san))
        if problems:
            raise TestFailure("; ".join(problems) + "\nstderr tail:\n" + self.stderr_tail(60))
        return rc

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


@contextlib.contextmanager
def running(server):
    """Starts server; on a normal exit stops it with the full checks (exit 0, no sanitizer
    report); if the body raised, kills it and lets the exception through."""
    server.start()
    try:
        yield server
    except BaseException:
        log("server stderr tail:\n" + server.stderr_tail(30))
        server.kill()
        raise
    server.stop()


def _report_servers():
    """After a failure, the end of every server's stderr (a sanitizer report, an abort)."""
    for s in _servers:
        try:
            rc = s.proc.poll() if getattr(s, "proc", None) is not None else None
            log("--- server %s (%s), stderr tail:\n%s" % (
                " ".join(s.cmd[:1]), "running" if rc is None else "exited %r" % rc,
                s.stderr_tail(80)))
        except Exception as e:  # a report must not hide the failure it reports
            log("--- server stderr unavailable: %r" % e)


def _cleanup():
    for s in _servers:
        try:
            s.kill()
        except Exception:
            pass
    for d in _tmpdirs:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------ HTTP


class Response:
    def __init__(self, status, reason, headers, body, elapsed=0.0):
        self.status = status
        self.reason = reason
        self.headers = headers  # list of (name, value)
        self.body = body
        self.elapsed = elapsed

    def header(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def json(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except Exception as e:
            raise TestFailure("response body is not JSON (%s): status %s body %r"
                              % (e, self.status, short(self.body)))

    def error_message(self):
        """The "error" string of a JSON error body (fails the test if there is none)."""
        doc = self.json()
        check(isinstance(doc, dict) and isinstance(doc.get("error"), str),
              "error body is not {\"error\": \"...\"}: %r" % short(self.body))
        SCHEMAS.validate("inference_error_response", doc)
        return doc["error"]

    def __repr__(self):
        return "HTTP %s %s body %r" % (self.status, self.reason, short(self.body))


def http(port, method, path, body=None, headers=None, timeout=30):
    """One request on a fresh connection; returns a Response (raises OSError on I/O errors)."""
    t0 = time.monotonic()
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(body, str):
            body = body.encode("utf-8")
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return Response(r.status, r.reason, r.getheaders(), data, time.monotonic() - t0)
    finally:
        conn.close()


def get(port, path, **kw):
    return http(port, "GET", path, **kw)


def post(port, path, body=b"", **kw):
    return http(port, "POST", path, body=body, **kw)


def post_in_thread(port, path, body, headers, out, key, timeout=600):
    """POSTs from a daemon thread: out[key] gets the response, or the exception (the caller's
    checks report it), and out[key + "_t"] the monotonic time it came. Returns the thread."""
    def run():
        try:
            out[key] = post(port, path, body, headers=headers, timeout=timeout)
        except Exception as e:  # reported by the caller
            out[key] = e
        out[key + "_t"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def connect(port, timeout=10):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


_unread = weakref.WeakKeyDictionary()  # socket -> bytes received past the last response


def read_response(sock, timeout=10, method="GET"):
    """Reads one HTTP/1.x response from sock. Returns a Response, or None if the peer closed
    (or reset) the connection before sending anything. Raises TestFailure on timeout or if the
    connection closes in the middle of a response. Bytes received past the response are kept
    for the next call on the same socket (pipelining)."""
    deadline = time.monotonic() + timeout
    buf = _unread.pop(sock, b"")

    def more():
        nonlocal buf
        left = deadline - time.monotonic()
        if left <= 0:
            raise TestFailure("timed out after %.1fs waiting for a response (got %r)"
                              % (timeout, short(buf)))
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise TestFailure("timed out after %.1fs waiting for a response (got %r)"
                              % (timeout, short(buf)))
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        buf += chunk
        return bool(chunk)

    while b"\r\n\r\n" not in buf:
        if not more():
            if not buf:
                return None
            raise TestFailure("connection closed inside the response head: %r" % short(buf))
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("iso-8859-1").split("\r\n")
    m = re.match(r"^HTTP/1\.[01] (\d{3})(?: (.*))?$", lines[0])
    check(m is not None, "bad status line %r" % lines[0])
    status, reason = int(m.group(1)), m.group(2) or ""
    headers = []
    for ln in lines[1:]:
        k, sep, v = ln.partition(":")
        check(sep == ":", "bad response header line %r" % ln)
        headers.append((k.strip(), v.strip()))
    resp = Response(status, reason, headers, b"")
    buf = rest
    te = (resp.header("Transfer-Encoding") or "").lower()
    cl = resp.header("Content-Length")
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        if buf:
            _unread[sock] = buf
        return resp
    if "chunked" in te:
        body = b""
        while True:
            while b"\r\n" not in buf:
                if not more():
                    raise TestFailure("connection closed inside a chunked body")
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while b"\r\n" not in buf:
                    if not more():
                        break
                buf = buf.partition(b"\r\n")[2]
                break
            while len(buf) < size + 2:
                if not more():
                    raise TestFailure("connection closed inside a chunk")
            body += buf[:size]
            buf = buf[size + 2:]
        resp.body = body
    elif cl is not None:
        n = int(cl)
        while len(buf) < n:
            if not more():
                raise TestFailure("connection closed after %d of %d body bytes" % (len(buf), n))
        resp.body = buf[:n]
        buf = buf[n:]
    else:
        while more():
            pass
        resp.body = buf
        buf = b""
    if buf:
        _unread[sock] = buf
    return resp


def raw(port, data, timeout=10, half_close=False, method="GET"):
    """Sends bytes on a new connection and reads one response (None if the server closed the
    connection without answering)."""
    s = connect(port, timeout)
    try:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_response(s, timeout, method)
    finally:
        s.close()


def wait_closed(sock, timeout):
    """True if the peer closes sock (EOF or reset) within timeout; data received is ignored."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            return False
        except OSError:
            return True
    return False


# ------------------------------------------------------------------------------ schemas


class Schemas:
    """Validates response bodies against keel's own schema of the Open Inference Protocol,
    tests/schema/open_inference_rest.json (a definition per response kind). When the
    environment variable KEEL_OIP_SPEC names the protocol's published OpenAPI file
    (open_inference_rest.yaml), responses whose kind that file also defines are validated
    against it too; without the variable nothing else is needed."""

    def __init__(self, source):
        self.path = os.path.join(source, "tests", "schema", "open_inference_rest.json")
        self.definitions = None
        self.spec_path = os.environ.get("KEEL_OIP_SPEC") or None
        self.spec_components = None
        self.error = None
        self.jsonschema = None
        try:
            import jsonschema
            self.jsonschema = jsonschema
        except ImportError as e:
            self.error = ("python3-jsonschema is required (%s); run the tests with "
                          "/usr/bin/python3" % e)
            return
        try:
            with open(self.path) as f:
                self.definitions = json.load(f)["definitions"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.error = "cannot read keel's schema %s: %s" % (self.path, e)
            return
        if self.spec_path is not None:
            try:
                import yaml
                with open(self.spec_path) as f:
                    self.spec_components = yaml.safe_load(f)["components"]["schemas"]
            except Exception as e:
                self.error = ("KEEL_OIP_SPEC=%s: cannot read the OpenAPI schemas (%s)"
                              % (self.spec_path, e))

    def _check(self, validator_cls, schema, label, name, instance):
        errs = sorted(validator_cls(schema).iter_errors(instance),
                      key=lambda e: list(e.absolute_path))
        if errs:
            e = errs[0]
            raise TestFailure("response does not match %s %s: %s at %s; document %s"
                              % (label, name, e.message,
                                 "/".join(map(str, e.absolute_path)) or "(root)",
                                 short(json.dumps(instance), 400)))

    def validate(self, name, instance):
        check(self.definitions is not None, self.error or "schemas not loaded")
        check(name in self.definitions, "schema %s not in %s" % (name, self.path))
        schema = {"$ref": "#/definitions/" + name, "definitions": self.definitions}
        self._check(self.jsonschema.Draft7Validator, schema, "keel's schema", name, instance)
        if self.spec_components is not None and name in self.spec_components:
            comps = self.spec_components
            if name == "inference_response" and any(
                    isinstance(o, dict) and isinstance(o.get("parameters"), dict)
                    and "binary_data_size" in o["parameters"]
                    for o in instance.get("outputs") or []):
                # Outputs in the binary section have no "data", which the OpenAPI file's
                # response_output requires (it does not describe the binary extension).
                comps = copy.deepcopy(comps)
                comps["response_output"]["required"] = [
                    r for r in comps["response_output"].get("required", []) if r != "data"]
            schema = {"$ref": "#/components/schemas/" + name, "components": {"schemas": comps}}
            self._check(self.jsonschema.Draft4Validator, schema, "OpenAPI schema (%s)"
                        % self.spec_path, name, instance)

    def validate_infer(self, doc):
        self.validate("inference_response", doc)


SCHEMAS = None


# ------------------------------------------------------------------------------ data


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f32_bits(x):
    return struct.pack("<f", x)


def fmt_f32(x):
    """A decimal string that parses (strtof or strtod) to exactly the float32 x."""
    if math.isnan(x):
        return "nan"
    return repr(f32(x))


_rows_cache = None


def heart_rows():
    """The 270 heart_scale rows as tuples of 13 float32 values (nan = missing)."""
    global _rows_cache
    if _rows_cache is None:
        check(os.path.exists(HEART_SCALE), "%s missing (Debian liblinear-tools)" % HEART_SCALE)
        rows = []
        with open(HEART_SCALE) as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                v = [math.nan] * 13
                for p in parts[1:]:
                    i, _, x = p.partition(":")
                    v[int(i) - 1] = f32(float(x))
                rows.append(tuple(v))
        _rows_cache = rows
    return list(_rows_cache)


def complete_rows():
    """heart_scale rows with no missing value (JSON has no NaN)."""
    return [r for r in heart_rows() if not any(math.isnan(x) for x in r)]


def filled_rows():
    """All heart_scale rows with missing values replaced by 0 (usable in JSON)."""
    return [tuple(0.0 if math.isnan(x) else x for x in r) for r in heart_rows()]


def sample_rows(source):
    """examples/heart_sample.txt: (label, features) per row."""
    out = []
    with open(os.path.join(source, "examples", "heart_sample.txt")) as f:
        for line in f:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            nums = [float(x) for x in line.split()]
            out.append((nums[0], tuple(f32(x) for x in nums[1:])))
    return out


def flat(rows):
    return [x for r in rows for x in r]


# ------------------------------------------------------------------------------ infer requests


def infer_path(model="heart", version=None):
    if version is None:
        return "/v2/models/%s/infer" % model
    return "/v2/models/%s/versions/%s/infer" % (model, version)


def json_infer_body(rows, input_name="features", req_id=None, outputs=None, params=None,
                    datatype="FP32"):
    """A JSON infer request for rows (shape [len(rows), 13]). outputs: list of request_output
    dicts or None; params: request parameters or None."""
    doc = {}
    if req_id is not None:
        doc["id"] = req_id
    if params is not None:
        doc["parameters"] = params
    doc["inputs"] = [{"name": input_name, "shape": [len(rows), len(rows[0]) if rows else 13],
                      "datatype": datatype, "data": [f32(x) for x in flat(rows)]}]
    if outputs is not None:
        doc["outputs"] = outputs
    return json.dumps(doc, allow_nan=False).encode()


def binary_infer_body(rows, input_name="features", req_id=None, outputs=None, params=None):
    """A Triton binary-extension infer request: returns (body, headers)."""
    data = struct.pack("<%df" % (len(rows) * 13), *flat(rows))
    doc = {}
    if req_id is not None:
        doc["id"] = req_id
    if params is not None:
        doc["parameters"] = params
    doc["inputs"] = [{"name": input_name, "shape": [len(rows), 13], "datatype": "FP32",
                      "parameters": {"binary_data_size": len(data)}}]
    if outputs is not None:
        doc["outputs"] = outputs
    head = json.dumps(doc).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}


def decode_infer(resp, validate=True):
    """Decodes a 200 infer response: returns (json_doc, {output name: list of float32}).
    Checks the binary section layout and, if validate, the schema."""
    check(resp.status == 200, "infer failed: %r" % resp)
    hl = resp.header("Inference-Header-Content-Length")
    if hl is not None:
        check(re.fullmatch(r"\d+", hl) is not None, "bad Inference-Header-Content-Length %r" % hl)
        n = int(hl)
        check(n <= len(resp.body), "Inference-Header-Content-Length %d > body %d"
              % (n, len(resp.body)))
        head, binary = resp.body[:n], resp.body[n:]
    else:
        head, binary = resp.body, b""
    try:
        doc = json.loads(head.decode("utf-8"))
    except Exception as e:
        raise TestFailure("infer response JSON part does not parse (%s): %r" % (e, short(head)))
    if validate:
        SCHEMAS.validate_infer(doc)
    values = {}
    off = 0
    for o in doc.get("outputs", []):
        p = o.get("parameters") or {}
        if "binary_data_size" in p:
            size = p["binary_data_size"]
            check(hl is not None, "output %s has binary_data_size but the response has no "
                  "Inference-Header-Content-Length header" % o.get("name"))
            check("data" not in o, "binary output %s also has data" % o.get("name"))
            check(o.get("datatype") == "FP32", "output datatype %r" % o.get("datatype"))
            check(isinstance(size, int) and size % 4 == 0 and off + size <= len(binary),
                  "bad binary_data_size %r (binary section %d bytes, offset %d)"
                  % (size, len(binary), off))
            chunk = binary[off:off + size]
            off += size
            values[o["name"]] = list(struct.unpack("<%df" % (size // 4), chunk))
        else:
            data = o.get("data")
            check(isinstance(data, list) and all(isinstance(x, (int, float))
                                                 and not isinstance(x, bool) for x in data),
                  "output %s data is not a flat list of numbers: %s"
                  % (o.get("name"), short(json.dumps(data))))
            values[o["name"]] = [f32(float(x)) for x in data]
        n = 1
        for d in o.get("shape", []):
            n *= d
        check(len(values[o["name"]]) == n, "output %s has %d values for shape %s"
              % (o.get("name"), len(values[o["name"]]), o.get("shape")))
    check(off == len(binary), "binary section has %d bytes, outputs use %d" % (len(binary), off))
    return doc, values


def same_f32(got, want):
    if len(got) != len(want):
        return False
    return all(f32_bits(a) == f32_bits(b) for a, b in zip(got, want))


def assert_f32_equal(got, want, what):
    check(len(got) == len(want), "%s: %d values, expected %d" % (what, len(got), len(want)))
    for i, (a, b) in enumerate(zip(got, want)):
        if f32_bits(a) != f32_bits(b):
            raise TestFailure("%s: value %d is %r, expected exactly %r (in-process reference)"
                              % (what, i, a, b))


# ------------------------------------------------------------------------------ references


def keel_reference(repo, model, rows, version=None):
    """Probabilities (float32) from the in-process path: `keel infer --label-first`."""
    d = tmpdir("keel-ref-")
    path = os.path.join(d, "rows.txt")
    with open(path, "w") as f:
        for r in rows:
            f.write("0 " + " ".join(fmt_f32(x) for x in r) + "\n")
    cmd = [KEEL, "infer", "--model-repository", repo, "--model", model, "--label-first", path]
    if version is not None:
        cmd[6:6] = ["--version", str(version)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    check(p.returncode == 0, "keel infer failed (%d): %s" % (p.returncode, p.stderr.decode()))
    out = []
    for line in p.stdout.decode().splitlines():
        parts = line.split("\t")
        check(len(parts) == 2, "unexpected keel infer line %r" % line)
        out.append(f32(float(parts[1])))
    check(len(out) == len(rows), "keel infer printed %d rows for %d" % (len(out), len(rows)))
    shutil.rmtree(d, ignore_errors=True)
    return out


def xgboost_cli():
    p = shutil.which("xgboost") or "/usr/bin/xgboost"
    check(os.access(p, os.X_OK), "the xgboost command-line tool is not installed")
    return p


def xgboost_reference(model_file, rows):
    """Predictions of the xgboost command-line tool for rows (nan = absent)."""
    d = tmpdir("keel-xgb-")
    with open(os.path.join(d, "rows.libsvm"), "w") as f:
        for r in rows:
            f.write("0" + "".join(" %d:%s" % (i + 1, fmt_f32(x)) for i, x in enumerate(r)
                                  if not math.isnan(x)) + "\n")
    p = subprocess.run([xgboost_cli(), "/dev/null", "task=pred", "model_in=" + model_file,
                        "test:data=rows.libsvm?format=libsvm&indexing_mode=1",
                        "name_pred=pred.txt", "nthread=1"], cwd=d, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=300)
    check(p.returncode == 0, "xgboost prediction failed: %s" % p.stdout.decode())
    with open(os.path.join(d, "pred.txt")) as f:
        out = [float(x) for x in f.read().split()]
    shutil.rmtree(d, ignore_errors=True)
    check(len(out) == len(rows), "xgboost predicted %d rows for %d" % (len(out), len(rows)))
    return out


# ------------------------------------------------------------------------------ repositories


def example_repo():
    return os.path.join(SOURCE, "examples", "models")


def copy_repo(src=None):
    """Copies the example repository (or src) into a fresh temp dir; returns the copy's path."""
    d = tmpdir("keel-repo-")
    dst = os.path.join(d, "models")
    shutil.copytree(src or example_repo(), dst)
    return dst


def read_config(repo, model):
    with open(os.path.join(repo, model, "config.json")) as f:
        return json.load(f)


def write_config(repo, model, cfg):
    with open(os.path.join(repo, model, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def edit_config(repo, model, fn):
    cfg = read_config(repo, model)
    fn(cfg)
    write_config(repo, model, cfg)
    return cfg


def set_queue(cfg, max_queue_size=None, instances=None):
    if max_queue_size is not None:
        cfg.setdefault("dynamic_batching", {}).setdefault("default_queue_policy", {})[
            "max_queue_size"] = max_queue_size
    if instances is not None:
        cfg["instance_group"] = [{"count": instances, "kind": "KIND_CPU"}]


def train_model(workdir, name, rounds, depth, eta=0.3, extra=""):
    """Trains a binary:logistic model on heart_scale (labels +1/-1 -> 1/0) with the xgboost
    CLI, as tests/unit/testutil.c tu_train_heart does; returns the .json model path."""
    data = os.path.join(workdir, "heart01.txt")
    if not os.path.exists(data):
        with open(HEART_SCALE) as f, open(data, "w") as g:
            for line in f:
                line = re.sub(r"^\+1", "1", line)
                line = re.sub(r"^-1", "0", line)
                g.write(line)
    out = os.path.join(workdir, name + ".json")
    conf = os.path.join(workdir, "train-%s.conf" % name)
    with open(conf, "w") as f:
        f.write('booster = gbtree\nobjective = binary:logistic\nnthread = 1\n'
                'data = "heart01.txt?format=libsvm&indexing_mode=1"\nmodel_out = "%s"\n'
                'num_round = %d\nmax_depth = %d\neta = %s\n%s\n'
                % (os.path.basename(out), rounds, depth, eta, extra))
    p = subprocess.run([xgboost_cli(), conf], cwd=workdir, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=300)
    check(p.returncode == 0 and os.path.exists(out),
          "xgboost training failed: %s" % p.stdout.decode()[-2000:])
    return out


def train_slow_model(workdir):
    """A model whose 256-row prediction takes tens of milliseconds: 2000 deep trees that
    barely converge (eta 0.001, no regularisation), so every tree keeps ~all its splits."""
    return train_model(workdir, "slow", rounds=2000, depth=16, eta=0.001,
                       extra="min_child_weight = 0\nlambda = 0")


def add_model(repo, name, model_file, instances=1, max_queue_size=None, version=1,
              max_batch_size=None):
    """Adds model `name` to repo with heart's config and model_file as version `version`."""
    cfg = read_config(example_repo(), "heart")
    cfg["name"] = name
    if max_batch_size is not None:
        cfg["max_batch_size"] = max_batch_size
    set_queue(cfg, max_queue_size, instances)
    os.makedirs(os.path.join(repo, name, str(version)), exist_ok=True)
    write_config(repo, name, cfg)
    shutil.copyfile(model_file, os.path.join(repo, name, str(version), "model.json"))
    return cfg


def replace_file(src, dst):
    """Copies src over dst atomically (temp name in the same folder + os.rename)."""
    tmp = os.path.join(os.path.dirname(dst), ".tmp-%d-%s" % (os.getpid(), os.path.basename(dst)))
    shutil.copyfile(src, tmp)
    os.rename(tmp, dst)


# ------------------------------------------------------------------------------ stats, metrics


def model_stats(port, model, version=None):
    """The Triton statistics entry of model (and version): a dict with inference_count,
    execution_count and inference_stats.{success,fail,queue,...}.{count,ns}."""
    path = "/v2/models/%s%s/stats" % (model, "" if version is None else "/versions/%s" % version)
    r = get(port, path)
    check(r.status == 200, "GET %s: %r" % (path, r))
    doc = r.json()
    SCHEMAS.validate("model_statistics_response", doc)
    entries = [e for e in doc["model_stats"] if isinstance(e, dict) and e.get("name") == model
               and (version is None or str(e.get("version")) == str(version))]
    check(len(entries) >= 1, "GET %s: no entry for %s: %r" % (path, model, short(r.body)))
    return entries


def stat_counts(entries):
    """Sums the counters of statistics entries (one per version)."""
    tot = {"success": 0, "fail": 0, "inference_count": 0, "execution_count": 0}
    for e in entries:
        try:
            tot["success"] += int(e["inference_stats"]["success"]["count"])
            tot["fail"] += int(e["inference_stats"]["fail"]["count"])
            tot["inference_count"] += int(e["inference_count"])
            tot["execution_count"] += int(e["execution_count"])
        except (KeyError, TypeError, ValueError) as ex:
            raise TestFailure("statistics entry lacks %s (Triton format expected): %s"
                              % (ex, short(json.dumps(e), 600)))
    return tot


_SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$')
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse_metrics(text):
    """Prometheus text format -> (samples, types): samples is a list of
    (name, {label: value}, float), types maps family name -> type."""
    samples, types = [], {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3].strip()
            continue
        m = _SAMPLE_RE.match(line)
        check(m is not None, "unparsable metrics line %r" % line)
        labels = {}
        if m.group(3):
            for lm in _LABEL_RE.finditer(m.group(3)):
                labels[lm.group(1)] = lm.group(2)
        samples.append((m.group(1), labels, float(m.group(4))))
    return samples, types


def scrape(port):
    r = get(port, "/metrics")
    check(r.status == 200, "GET /metrics: %r" % r)
    return r.body.decode("utf-8")


def metric_values(text, name):
    """All sample values of metric name (any labels)."""
    samples, _ = parse_metrics(text)
    return [v for n, _, v in samples if n == name]


def wait_idle(port, names=("keel_live_leases", "keel_live_requests"), timeout=10):
    """Polls /metrics until every sample of each name is 0; fails with the last values."""
    deadline = time.monotonic() + timeout
    last = {}
    while True:
        text = scrape(port)
        last = {n: metric_values(text, n) for n in names}
        missing = [n for n in names if not last[n]]
        check(not missing, "/metrics has no %s" % ", ".join(missing))
        if all(all(v == 0 for v in vals) for vals in last.values()):
            return
        if time.monotonic() > deadline:
            raise TestFailure("not idle %ds after the load stopped: %s" % (timeout, last))
        time.sleep(0.1)


def free_port(below_ephemeral=False):
    """A free TCP port on 127.0.0.1. below_ephemeral: one under the kernel's ephemeral range,
    so that no server started with port 0 (tests run in parallel) can take it while its owner
    restarts."""
    if not below_ephemeral:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        return p
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    rng = __import__("random").Random()
    for _ in range(200):
        p = rng.randrange(max(1024, low - 12000), low - 1)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
        finally:
            s.close()
    raise TestFailure("no free port below %d" % low)


class Nginx:
    """Debian's nginx in the foreground from a temporary prefix (no master, one worker).
    conf is a str.format template; {prefix} and {port} (the listening port, chosen here) are
    filled in besides the caller's fields. prefix may be given (e.g. holding a certificate)."""

    def __init__(self, conf, prefix=None, **fields):
        self.conf, self.fields = conf, fields
        self.prefix = prefix or tmpdir("keel-nginx-")
        self.proc = self.log = None
        self.port = None

    def start(self):
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        check(os.access(nginx, os.X_OK), "nginx is not installed (scripts/install-deps.sh --test)")
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(self.prefix, sub), exist_ok=True)
        for _ in range(5):
            port = free_port()
            path = os.path.join(self.prefix, "nginx.conf")
            with open(path, "w") as f:
                f.write(self.conf.format(prefix=self.prefix, port=port, **self.fields))
            self.log = open(os.path.join(self.prefix, "stderr.log"), "wb")
            self.proc = subprocess.Popen([nginx, "-p", self.prefix, "-c", path, "-e", "stderr"],
                                         stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    self.port = port
                    return self
                except OSError:
                    time.sleep(0.05)
            self.stop()
        with open(os.path.join(self.prefix, "stderr.log"), "rb") as f:
            raise TestFailure("nginx did not start: %s" % f.read().decode()[-2000:])

    def error_log(self, n=3000):
        path = os.path.join(self.prefix, "error.log")
        if not os.path.exists(path):
            return ""
        with open(path, errors="replace") as f:
            return f.read()[-n:]

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


def promtool_check(text, what="the scrape"):
    """Runs `promtool check metrics` on text and fails the test (TestFailure naming what and
    promtool's complaint) when promtool rejects it or is missing; returns promtool's output.
    It raises rather than returning a verdict, so a caller cannot drop the result."""
    p = shutil.which("promtool") or "/usr/bin/promtool"
    check(os.access(p, os.X_OK), "promtool is not installed (Debian package prometheus)")
    r = subprocess.run([p, "check", "metrics"], input=text.encode(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    out = r.stdout.decode("utf-8", "replace")
    check(r.returncode == 0, "promtool check metrics rejects %s:\n%s\n--- scrape:\n%s"
          % (what, out, text[:3000]))
    return out


# ------------------------------------------------------------------------------ threads


class Worker(threading.Thread):
    """Runs fn() in a loop until stop is set (or fn returns False); exceptions are kept."""

    def __init__(self, fn, stop):
        super().__init__(daemon=True)
        self.fn = fn
        self.stop_ev = stop
        self.error = None

    def run(self):
        try:
            while not self.stop_ev.is_set():
                if self.fn() is False:
                    return
        except BaseException as e:  # noqa: B036 - reported by the test
            self.error = "%s: %s\n%s" % (type(e).__name__, e, traceback.format_exc())


def start_workers(fn, stop, n):
    """Starts n Workers running fn() until stop is set; join them with join_workers."""
    ws = [Worker(fn, stop) for _ in range(n)]
    for w in ws:
        w.start()
    return ws


def join_workers(workers, timeout=60):
    """Joins Workers from the main thread and fails the test there if one raised (a failed
    check inside a client thread would otherwise die with the thread, unreported) or is still
    running after timeout seconds (a lost request)."""
    deadline = time.monotonic() + timeout
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(1 for w in workers if w.is_alive())
    errors = [w.error for w in workers if w.error is not None]
    check(not stuck, "%d of %d client threads still running %ds after stop" % (stuck, len(workers),
                                                                             timeout))
    check(not errors, "%d of %d client threads failed; the first:\n%s" % (len(errors),
                                                                         len(workers), errors[0]
                                                                         if errors else ""))


# ------------------------------------------------------------------------------ runner


def run(tests, setup=None, teardown=None):
    """Runs setup(), each test, then teardown() (counted as a test when given). Prints
    "N passed, M failed" last and exits 0 only if nothing failed."""
    global SCHEMAS
    if ARGS is None:
        parse_args()
    passed = failed = 0
    SCHEMAS = Schemas(SOURCE)
    try:
        if SCHEMAS.error:
            log("FAIL setup: " + SCHEMAS.error)
            failed += 1
            return
        if ARGS.only:
            tests = [t for t in tests if ARGS.only in t.__name__]
        if setup is not None:
            t0 = time.monotonic()
            try:
                setup()
                log("ok   setup (%.1fs)" % (time.monotonic() - t0))
            except Exception:
                log("FAIL setup\n" + traceback.format_exc())
                failed += 1 + len(tests)
                log("(the %d tests were not run)" % len(tests))
                return
        for t in tests:
            t0 = time.monotonic()
            try:
                t()
                passed += 1
                log("ok   %s (%.1fs)" % (t.__name__, time.monotonic() - t0))
            except Exception:
                failed += 1
                log("FAIL %s (%.1fs)\n%s" % (t.__name__, time.monotonic() - t0,
                                             traceback.format_exc()))
        if teardown is not None:
            try:
                teardown()
                passed += 1
                log("ok   teardown")
            except Exception:
                failed += 1
                log("FAIL teardown\n" + traceback.format_exc())
    finally:
        if failed:
            _report_servers()
        _cleanup()
        print("%d passed, %d failed" % (passed, failed), flush=True)
        sys.exit(0 if failed == 0 else 1)
