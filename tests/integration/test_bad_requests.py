"""test_bad_requests.py: a corpus of malformed and hostile requests against `keel serve`.

Every case expects a specific 4xx status (a small set where the HTTP specs allow a choice)
and, for requests that reach keel's handlers, a JSON error {"error": "..."} containing a word
that names the problem (the field, e.g. "shape", or the input's name). After every case a
good request must still succeed with the exact in-process answer. Cases at the HTTP level
(malformed request line or headers, sent over raw sockets) only need the right status. The
size cases include a 10 GB Content-Length that must be refused at once with 413 without the
body being sent, lying Content-Lengths, and slow clients that must not block other clients.
At the end the server must still be alive and exit 0 on SIGTERM without sanitizer reports.
"""

import copy
import json
import socket
import threading
import time

import kit
from kit import check

MAX_REQUEST_BYTES = 4 * 1024 * 1024
S = {}
INFER = "/v2/models/heart/infer"

# Words that say "this is not valid JSON".
JSON_WORDS = ["json", "parse", "syntax", "invalid", "unexpected", "premature", "malformed",
              "lexical", "token", "end of", "eof"]
SIZE_WORDS = ["large", "size", "limit", "bytes", "exceed", "too long", "too big"]


def setup():
    S["repo"] = kit.example_repo()
    S["row"] = kit.complete_rows()[0]
    S["ref"] = kit.keel_reference(S["repo"], "heart", [S["row"]])
    # A short idle timeout: libmicrohttpd 0.9.75's epoll mode (keel's HTTP loops) can miss a
    # FIN that arrives together with the last data (a client that sends and half-closes at
    # once), so such a connection is closed at --http-timeout-secs rather than at once
    # (docs/OPERATIONS.md, "Limits"); 3 s keeps the half-close cases inside their 10 s.
    S["server"] = kit.Server(S["repo"], ["--max-request-bytes", str(MAX_REQUEST_BYTES),
                                         "--http-timeout-secs", "3"]).start()
    S["port"] = S["server"].port
    assert_good()
    S["fds"] = S["server"].fd_count()


def teardown():
    check(S["server"].alive(), "server died")
    assert_good()
    kit.wait_idle(S["port"])
    S["server"].wait_fds(S["fds"])  # no connection or buffer fd left behind
    S["server"].stop()


def port():
    return S["port"]


def assert_good(timeout=30):
    r = kit.post(port(), INFER, kit.json_infer_body([S["row"]]), timeout=timeout)
    check(r.status == 200, "a good request after the bad one failed: %r" % r)
    _, vals = kit.decode_infer(r)
    kit.assert_f32_equal(vals["probability"], S["ref"], "good request")


def good_doc():
    return json.loads(kit.json_infer_body([S["row"]]))


def mutated(fn):
    """A JSON body: the good request changed by fn(doc) (fn may return a new doc)."""
    def make():
        d = good_doc()
        r = fn(d)
        return json.dumps(d if r is None else r).encode()
    return make


def inp(d):
    return d["inputs"][0]


def setk(obj, key, value):
    obj[key] = value


def delk(obj, key):
    del obj[key]


def expect_error(r, statuses, words, what):
    check(r is not None, "%s: the server closed the connection without answering" % what)
    check(r.status in statuses, "%s: expected %s, got %r" % (what, "/".join(map(str, statuses)), r))
    msg = r.error_message()
    kit.vlog("    -> %d %s" % (r.status, msg))
    if words:
        low = msg.lower()
        check(any(w.lower() in low for w in words),
              "%s: error message %r names none of %r" % (what, msg, words))
    return msg


# ------------------------------------------------------------------------------ case builders

CASES = []


def case(name):
    def deco(fn):
        def t():
            fn()
            check(S["server"].alive(), "the server died")
            assert_good()
        t.__name__ = "test_" + name
        CASES.append(t)
        return fn
    return deco


def body_case(name, body, statuses=(400,), words=None, path=INFER, headers=None):
    """POST path with body (bytes, or a callable making bytes)."""
    def fn():
        b = body() if callable(body) else body
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        r = kit.post(port(), path, b, headers=h)
        expect_error(r, statuses, words, "POST %s body %r" % (path, kit.short(b, 160)))
    case(name)(fn)


def method_case(name, method, path, statuses=(405,)):
    def fn():
        body = b"{}" if method in ("POST", "PUT") else None
        r = kit.http(port(), method, path, body=body)
        expect_error(r, statuses, None, "%s %s" % (method, path))
    case(name)(fn)


def raw_case(name, data, statuses=(400,), allow_close=False, json_error=False, words=None,
             half_close=False):
    """Raw bytes; expects a response with one of statuses (or, if allow_close, the server
    closing the connection without one)."""
    def fn():
        b = data() if callable(data) else data
        r = kit.raw(port(), b, timeout=10, half_close=half_close)
        what = "raw %r" % kit.short(b, 120)
        if r is None:
            check(allow_close, "%s: connection closed without a response (expected %s)"
                  % (what, statuses))
            return
        check(r.status in statuses, "%s: expected %s, got %r" % (what, statuses, r))
        kit.vlog("    -> %d %s" % (r.status, kit.short(r.body, 150)))
        if json_error:
            expect_error(r, statuses, words, what)
    case(name)(fn)


def bin_case(name, make, statuses=(400,), words=None):
    """make() -> (json header bytes, binary bytes, Inference-Header-Content-Length value or
    None to omit the header)."""
    def fn():
        head, binary, hl = make()
        h = {"Content-Type": "application/octet-stream"}
        if hl is not None:
            h["Inference-Header-Content-Length"] = str(hl)
        r = kit.post(port(), INFER, head + binary, headers=h)
        expect_error(r, statuses, words, "binary request header %r (+%d bytes, IHCL %r)"
                     % (kit.short(head, 160), len(binary), hl))
    case(name)(fn)


def bin_parts(size=None, nbytes=None, extra_input_fields=None):
    """A binary request for the good row: returns (header json, binary bytes)."""
    import struct
    data = struct.pack("<13f", *S["row"])
    d = {"inputs": [{"name": "features", "shape": [1, 13], "datatype": "FP32",
                     "parameters": {"binary_data_size": len(data) if size is None else size}}]}
    if extra_input_fields:
        d["inputs"][0].update(extra_input_fields)
    binary = data if nbytes is None else (data * 2)[:nbytes]
    return json.dumps(d).encode(), binary


# ------------------------------------------------------------------------------ JSON syntax

body_case("empty_body", b"", words=JSON_WORDS + ["empty", "body"])
body_case("truncated_json", lambda: kit.json_infer_body([S["row"]])[:60], words=JSON_WORDS)
body_case("trailing_garbage", lambda: kit.json_infer_body([S["row"]]) + b" xyz",
          words=JSON_WORDS + ["trailing", "garbage"])
body_case("top_level_array", b"[]", words=JSON_WORDS + ["object"])
body_case("top_level_null", b"null", words=JSON_WORDS + ["object"])
body_case("top_level_string", b'"features"', words=JSON_WORDS + ["object"])
body_case("plain_text", b"hello world", words=JSON_WORDS)
body_case("single_quotes", b"{'inputs': []}", words=JSON_WORDS)
body_case("non_utf8_input_name",
          lambda: kit.json_infer_body([S["row"]]).replace(b'"features"', b'"feat\xff\xfeures"'),
          words=JSON_WORDS + ["utf", "encoding"])
body_case("non_utf8_id",
          lambda: kit.json_infer_body([S["row"]], req_id="IDX").replace(b"IDX", b"\xc3\x28"),
          words=JSON_WORDS + ["utf", "encoding"])
body_case("raw_nul_byte", lambda: kit.json_infer_body([S["row"]]).replace(b'"features"',
                                                                          b'"feat\x00ures"'),
          words=JSON_WORDS + ["nul", "control"])
body_case("deeply_nested_arrays", b"[" * 100000 + b"]" * 100000,
          words=JSON_WORDS + ["depth", "nest", "deep", "object"])
body_case("deeply_nested_objects", b'{"a":' * 50000 + b"1" + b"}" * 50000,
          words=JSON_WORDS + ["depth", "nest", "deep", "inputs"])
body_case("deeply_nested_data",
          mutated(lambda d: setk(inp(d), "data", json.loads("[" * 500 + "0.5" + "]" * 500))),
          words=["data", "depth", "nest", "deep", "shape"] + JSON_WORDS)
body_case("deeply_nested_data_20000",
          lambda: kit.json_infer_body([S["row"]]).replace(
              b'"data": [', b'"data": ' + b"[" * 20000).replace(b"]}]", b"]" * 20000 + b"}]"),
          words=["data", "depth", "nest", "deep", "shape"] + JSON_WORDS)

# ------------------------------------------------------------------------------ structure

body_case("inputs_missing", b"{}", words=["inputs"])
body_case("inputs_not_array", b'{"inputs": 5}', words=["inputs"])
body_case("inputs_empty", b'{"inputs": []}', words=["inputs", "features", "input"])
body_case("input_not_object", b'{"inputs": [5]}', words=["inputs"])
body_case("input_missing_name", mutated(lambda d: delk(inp(d), "name")), words=["name"])
body_case("input_name_not_string", mutated(lambda d: setk(inp(d), "name", 7)), words=["name"])
body_case("unknown_input_name", mutated(lambda d: setk(inp(d), "name", "nosuch")),
          words=["nosuch"])
body_case("extra_unknown_input",
          mutated(lambda d: d["inputs"].append(dict(inp(d), name="extra"))), words=["extra"])
body_case("duplicate_input", mutated(lambda d: d["inputs"].append(copy.deepcopy(inp(d)))),
          words=["duplicate", "twice", "more than once", "features"])
body_case("shape_missing", mutated(lambda d: delk(inp(d), "shape")), words=["shape"])
body_case("shape_not_array", mutated(lambda d: setk(inp(d), "shape", "1,13")), words=["shape"])
body_case("shape_negative", mutated(lambda d: setk(inp(d), "shape", [-1, 13])), words=["shape"])
body_case("shape_negative_big", mutated(lambda d: setk(inp(d), "shape", [-3, -13])),
          words=["shape"])
body_case("shape_fraction", mutated(lambda d: setk(inp(d), "shape", [1.5, 13])), words=["shape"])
body_case("shape_string_element", mutated(lambda d: setk(inp(d), "shape", ["1", 13])),
          words=["shape"])
body_case("shape_product_overflows", mutated(lambda d: setk(inp(d), "shape", [2**62, 2**62, 13])),
          words=["shape", "overflow"])
body_case("shape_element_above_int64",
          lambda: kit.json_infer_body([S["row"]]).replace(b'"shape": [1, 13]',
                                                          b'"shape": [18446744073709551616, 13]'),
          words=["shape"])
body_case("shape_huge_literal",
          lambda: kit.json_infer_body([S["row"]]).replace(b'"shape": [1, 13]',
                                                          b'"shape": [1e400, 13]'),
          words=["shape"] + JSON_WORDS)
body_case("shape_huge_no_overflow", mutated(lambda d: setk(inp(d), "shape", [2**40, 13])),
          statuses=(400, 413), words=["shape", "data"] + SIZE_WORDS)
body_case("shape_data_too_few", mutated(lambda d: setk(inp(d), "data", inp(d)["data"][:12])),
          words=["shape", "data", "element"])
body_case("shape_data_too_many", mutated(lambda d: setk(inp(d), "data", inp(d)["data"] + [0.5])),
          words=["shape", "data", "element"])
body_case("shape_wrong_for_model",
          mutated(lambda d: inp(d).update(shape=[1, 12], data=inp(d)["data"][:12])),
          words=["shape", "dims", "features"])
body_case("shape_without_batch_dim", mutated(lambda d: setk(inp(d), "shape", [13])),
          words=["shape", "dims", "features", "batch"])
body_case("shape_rank_3", mutated(lambda d: setk(inp(d), "shape", [1, 1, 13])),
          words=["shape", "dims", "features"])
body_case("shape_zero_features", mutated(lambda d: inp(d).update(shape=[1, 0], data=[])),
          words=["shape", "dims", "features"])
body_case("batch_above_max_batch_size",
          mutated(lambda d: inp(d).update(shape=[257, 13], data=inp(d)["data"] * 257)),
          words=["batch", "max_batch_size", "257", "shape"])
body_case("datatype_missing", mutated(lambda d: delk(inp(d), "datatype")), words=["datatype"])
body_case("datatype_unknown", mutated(lambda d: setk(inp(d), "datatype", "FLOAT99")),
          words=["datatype", "FLOAT99"])
body_case("datatype_not_string", mutated(lambda d: setk(inp(d), "datatype", 5)),
          words=["datatype"])
body_case("datatype_fp64_for_fp32", mutated(lambda d: setk(inp(d), "datatype", "FP64")),
          words=["datatype", "FP64", "FP32", "type"])
body_case("datatype_int32_for_fp32",
          mutated(lambda d: inp(d).update(datatype="INT32", data=[1] * 13)),
          words=["datatype", "INT32", "FP32", "type"])
body_case("bytes_where_fp32_expected",
          mutated(lambda d: inp(d).update(datatype="BYTES", data=["abc"] * 13)),
          words=["datatype", "BYTES", "FP32", "type"])
body_case("data_missing", mutated(lambda d: delk(inp(d), "data")), words=["data"])
body_case("data_not_array", mutated(lambda d: setk(inp(d), "data", {"x": 1})), words=["data"])
body_case("data_string_element",
          mutated(lambda d: inp(d)["data"].__setitem__(3, "0.5")), words=["data", "number"])
body_case("data_bool_element",
          mutated(lambda d: inp(d)["data"].__setitem__(3, True)), words=["data", "number"])
body_case("data_null_element",
          mutated(lambda d: inp(d)["data"].__setitem__(3, None)), words=["data", "number"])
body_case("data_ragged_rows",
          mutated(lambda d: inp(d).update(shape=[2, 13], data=[inp(d)["data"],
                                                               inp(d)["data"][:12]])),
          words=["data", "shape", "element"])
body_case("data_number_1e999",
          lambda: mutated(lambda d: inp(d)["data"].__setitem__(0, 12345.5))().replace(
              b"12345.5", b"1e999"),
          words=["data", "range", "finite", "number", "large", "overflow"])
body_case("data_400_digit_integer",
          mutated(lambda d: inp(d)["data"].__setitem__(0, int("9" * 400))),
          words=["data", "range", "finite", "number", "large", "overflow"])
body_case("outputs_not_array", mutated(lambda d: setk(d, "outputs", "probability")),
          words=["outputs"])
body_case("output_missing_name", mutated(lambda d: setk(d, "outputs", [{}])),
          words=["name", "outputs"])
body_case("unknown_output", mutated(lambda d: setk(d, "outputs", [{"name": "nosuch"}])),
          words=["nosuch"])
body_case("id_not_string", mutated(lambda d: setk(d, "id", 5)), words=["id"])
body_case("parameters_not_object", mutated(lambda d: setk(d, "parameters", 5)),
          words=["parameters"])
body_case("timeout_not_integer", mutated(lambda d: setk(d, "parameters", {"timeout": "soon"})),
          words=["timeout"])
body_case("timeout_negative", mutated(lambda d: setk(d, "parameters", {"timeout": -5})),
          words=["timeout"])
body_case("binary_data_output_not_bool",
          mutated(lambda d: setk(d, "parameters", {"binary_data_output": "yes"})),
          words=["binary_data_output"])

# ------------------------------------------------------------------------------ binary extension

BIN_WORDS = ["binary", "inference-header-content-length", "size", "bytes", "length"]


def _b(**kw):
    def make():
        head, binary = bin_parts(kw.get("size"), kw.get("nbytes"), kw.get("fields"))
        hl = kw.get("hl", len(head))
        if callable(hl):
            hl = hl(len(head))
        return head, binary, hl
    return make


bin_case("ihcl_exceeds_body", _b(hl=lambda n: n + 100), words=BIN_WORDS + ["header"])
bin_case("ihcl_not_a_number", _b(hl="abc"), words=BIN_WORDS + ["header"])
bin_case("ihcl_negative", _b(hl="-1"), words=BIN_WORDS + ["header"])
bin_case("ihcl_zero", _b(hl=0), words=BIN_WORDS + JSON_WORDS + ["header", "empty"])
bin_case("ihcl_cuts_json", _b(hl=lambda n: n - 5), words=BIN_WORDS + JSON_WORDS)
bin_case("binary_truncated", _b(nbytes=30), words=BIN_WORDS + ["binary_data_size"])
bin_case("binary_size_mismatch_shape", _b(size=48, nbytes=48),
         words=["binary_data_size", "shape", "size", "bytes"])
bin_case("binary_extra_bytes", _b(nbytes=60), words=BIN_WORDS + ["extra", "unused", "left"])
bin_case("binary_size_not_integer", _b(size="52"), words=["binary_data_size"])
bin_case("binary_size_negative", _b(size=-4), words=["binary_data_size"])
bin_case("binary_size_huge", _b(size=2**63), words=["binary_data_size", "size"])
bin_case("binary_size_without_ihcl", _b(hl=None), words=BIN_WORDS + JSON_WORDS + ["data", "utf"])
bin_case("binary_size_and_data", _b(fields={"data": [0.5] * 13}), words=["data", "binary"])

# ------------------------------------------------------------------------------ paths, methods

body_case("unknown_model", lambda: kit.json_infer_body([S["row"]]), statuses=(404,),
          words=["nosuch"], path="/v2/models/nosuch/infer")
body_case("unknown_version", lambda: kit.json_infer_body([S["row"]]), statuses=(404,),
          words=["9"], path="/v2/models/heart/versions/9/infer")
body_case("version_not_a_number", lambda: kit.json_infer_body([S["row"]]), statuses=(400, 404),
          words=["abc", "version"], path="/v2/models/heart/versions/abc/infer")
body_case("version_negative", lambda: kit.json_infer_body([S["row"]]), statuses=(400, 404),
          words=["-1", "version"], path="/v2/models/heart/versions/-1/infer")
body_case("version_overflowing", lambda: kit.json_infer_body([S["row"]]), statuses=(400, 404),
          words=["99999999999999999999999", "version"],
          path="/v2/models/heart/versions/99999999999999999999999/infer")
method_case("unknown_path", "GET", "/v2/nothing/here", statuses=(404,))
method_case("get_infer", "GET", INFER)
method_case("put_infer", "PUT", INFER)
method_case("delete_server_metadata", "DELETE", "/v2")
method_case("post_health_live", "POST", "/v2/health/live")
method_case("post_model_metadata", "POST", "/v2/models/heart")
method_case("get_repository_index", "GET", "/v2/repository/index")
method_case("get_load", "GET", "/v2/repository/models/heart/load")
method_case("post_metrics", "POST", "/metrics")

# ------------------------------------------------------------------------------ traversal, NUL, %2F

NAME_WORDS = ["model name", "starts with '.'", "control"]
SLASH_WORDS = ["encoded '/'", "%2f"]
NUL_WORDS = ["nul"]


def path_case(name, method, path, words, statuses=(400,)):
    """A request whose URL path is the problem (sent as is: http.client does not normalise)."""
    def fn():
        body = kit.json_infer_body([S["row"]]) if method == "POST" else None
        h = {"Content-Type": "application/json"} if body is not None else None
        r = kit.http(port(), method, path, body=body, headers=h)
        expect_error(r, statuses, words, "%s %s" % (method, path))
    case(name)(fn)


path_case("traversal_dotdot_infer", "POST", "/v2/models/../infer", NAME_WORDS)
path_case("traversal_dot_ready", "GET", "/v2/models/./ready", NAME_WORDS)
path_case("traversal_hidden_config", "GET", "/v2/models/.git/config", NAME_WORDS)
path_case("traversal_encoded_dots", "GET", "/v2/models/%2e%2E/ready", NAME_WORDS)
path_case("traversal_encoded_backslashes", "GET", "/v2/models/..%5C..%5Cetc/ready", NAME_WORDS)
path_case("traversal_repository_load", "POST", "/v2/repository/models/../load", NAME_WORDS)
path_case("traversal_repository_encoded_slash", "POST",
          "/v2/repository/models/..%2F..%2Fetc%2Fpasswd/load", SLASH_WORDS)
path_case("encoded_slash_in_model", "POST", "/v2/models/he%2Fart/infer", SLASH_WORDS)
# Decoded, this would route to version 1 of "heart": refused, not reinterpreted.
path_case("encoded_slash_lowercase_reroutes", "GET", "/v2/models/heart%2fversions%2f1/ready",
          SLASH_WORDS)
path_case("encoded_nul_in_model", "GET", "/v2/models/heart%00/ready", NUL_WORDS)
path_case("encoded_nul_in_infer", "POST", "/v2/models/heart%00x/infer", NUL_WORDS)
path_case("encoded_nul_in_query", "GET", "/v2/health/ready?x=%00", NUL_WORDS)
path_case("control_char_in_model", "GET", "/v2/models/he%01art/ready", NAME_WORDS)
# A raw NUL: libmicrohttpd 0.9 hands over the URL cut at it; 1.0 closes the connection.
raw_case("nul_in_model_name_raw",
         b"GET /v2/models/heart\x00/../../etc/ready HTTP/1.1\r\nHost: x\r\n\r\n",
         statuses=(400,), allow_close=True, json_error=True, words=NUL_WORDS)
raw_case("nul_in_query_raw", b"GET /v2/health/ready?a=\x00b HTTP/1.1\r\nHost: x\r\n\r\n",
         statuses=(400,), allow_close=True, json_error=True, words=NUL_WORDS)
raw_case("nul_in_infer_path_raw",
         b"POST /v2/models/heart\x00x/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
         statuses=(400,), allow_close=True, json_error=True, words=NUL_WORDS)
raw_case("too_many_header_fields",
         b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" +
         b"".join(b"X-F%d: v\r\n" % i for i in range(150)) + b"\r\n",
         statuses=(431,), json_error=True, words=["header"])


# ------------------------------------------------------------------------------ sizes


def head_bytes(length, extra=b"", path=INFER):
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(length).encode() +
            b"\r\n" + extra + b"\r\n")


def ten_gb(expect_continue):
    def fn():
        s = kit.connect(port())
        try:
            t0 = time.monotonic()
            s.sendall(head_bytes(10 * 1024**3, b"Expect: 100-continue\r\n" if expect_continue
                                 else b""))
            r = kit.read_response(s, timeout=5)
            dt = time.monotonic() - t0
            what = "Content-Length 10 GB%s" % (" with Expect: 100-continue" if expect_continue
                                               else "")
            expect_error(r, (413,), SIZE_WORDS, what)
            check(dt < 2.0, "%s: 413 took %.2fs (expected at once)" % (what, dt))
            check(kit.wait_closed(s, 3), "%s: the connection stayed open after the 413 "
                  "(the server would wait for the 10 GB body)" % what)
        finally:
            s.close()
    return fn


case("content_length_10gb")(ten_gb(False))
case("content_length_10gb_expect_continue")(ten_gb(True))


@case("body_over_max_request_bytes")
def _over_max():
    body = b'{"inputs": [' + b" " * (MAX_REQUEST_BYTES + 1024) + b"]}"
    s = kit.connect(port(), timeout=20)
    err = []

    def send():
        try:
            s.sendall(head_bytes(len(body)) + body)
        except OSError as e:  # the server may stop reading once it has refused
            err.append(e)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        r = kit.read_response(s, timeout=20)
        expect_error(r, (413,), SIZE_WORDS, "a %d-byte body with --max-request-bytes %d"
                     % (len(body), MAX_REQUEST_BYTES))
    finally:
        s.close()
        t.join(20)


@case("content_length_more_than_sent_half_close")
def _lie_more_half():
    body = kit.json_infer_body([S["row"]])
    r = kit.raw(port(), head_bytes(len(body) + 500) + body, timeout=10, half_close=True)
    if r is not None:  # answering is optional: the client is gone; if it answers, it is a 400
        check(r.status == 400, "Content-Length above the bytes sent, then EOF: %r" % r)


@case("content_length_more_than_sent_close")
def _lie_more_close():
    body = kit.json_infer_body([S["row"]])
    s = kit.connect(port())
    s.sendall(head_bytes(len(body) + 500) + body)
    time.sleep(0.05)
    s.close()
    time.sleep(0.05)


@case("content_length_less_than_sent")
def _lie_less():
    body = kit.json_infer_body([S["row"]])
    s = kit.connect(port())
    try:
        s.sendall(head_bytes(20) + body)
        r = kit.read_response(s, timeout=10)
        expect_error(r, (400,), JSON_WORDS, "Content-Length 20 with a %d-byte body" % len(body))
    finally:
        s.close()


raw_case("content_length_not_a_number",
         b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
         statuses=(400, 411, 413), allow_close=True)
raw_case("content_length_negative",
         b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}",
         statuses=(400, 411, 413), allow_close=True)


@case("content_length_conflicting_duplicates")
def _cl_dup():
    # RFC 9112 6.3: differing Content-Length values, or Content-Length with Transfer-Encoding,
    # are an unrecoverable framing error; the request must be refused as such (400,
    # connection closed), never parsed with either length (that is how requests get smuggled
    # past proxies).
    body = kit.json_infer_body([S["row"]])
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    for first, second in ((2, len(body)), (len(body), 2), (len(body), None)):
        if second is None:
            data = (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                    b"\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chunked)) + chunked
        else:
            data = (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                    b"\r\nContent-Length: %d\r\n\r\n" % (first, second)) + body
        s = kit.connect(port())
        try:
            s.sendall(data)
            r = kit.read_response(s, timeout=10)
            what = ("Content-Length %d and %d" % (first, second) if second is not None
                    else "Content-Length with Transfer-Encoding: chunked")
            check(r is not None, "%s: closed without an answer" % what)
            check(r.status == 400, "%s: expected 400, got %r" % (what, r))
            try:
                msg = json.loads(r.body)["error"]
            except Exception:
                msg = None  # libmicrohttpd's own page: fine, the framing was refused
            if msg is not None:
                check(any(w in msg.lower() for w in ("content-length", "framing")),
                      "%s: the body was parsed with one of the lengths (error %r) instead of "
                      "refusing the framing" % (what, msg))
            check(kit.wait_closed(s, 3), "%s: connection left open after a framing error" % what)
        finally:
            s.close()


raw_case("chunked_bad_chunk_size",
         b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
         b"\r\nzz\r\n{}\r\n0\r\n\r\n", statuses=(400, 411, 501), allow_close=True)
raw_case("post_without_content_length",
         b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n", statuses=(400, 411))

# ------------------------------------------------------------------------------ malformed HTTP

raw_case("garbage_request_line", b"GARBAGE\r\n\r\n", statuses=(400,), allow_close=True)
raw_case("binary_junk", bytes(range(256)) * 4 + b"\r\n\r\n", statuses=(400,), allow_close=True)
raw_case("request_line_without_version", b"GET /v2\r\n\r\n", statuses=(400, 505),
         allow_close=True)
raw_case("http_version_9_9", b"GET /v2 HTTP/9.9\r\nHost: x\r\n\r\n", statuses=(400, 505))
raw_case("header_without_colon", b"GET /v2 HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n",
         statuses=(400,), allow_close=True)
raw_case("header_name_with_space", b"GET /v2 HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
         statuses=(400,), allow_close=True)
# libmicrohttpd 0.9 cuts the URL at the NUL ("GET /v2" would answer 200): keel compares it
# with the request line and refuses; libmicrohttpd 1.0 closes the connection itself.
raw_case("nul_in_request_line", b"GET /v2\x00/x HTTP/1.1\r\nHost: x\r\n\r\n",
         statuses=(400,), allow_close=True, json_error=True, words=NUL_WORDS)
raw_case("huge_header_line",
         b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200000 + b"\r\n\r\n",
         statuses=(400, 413, 431), allow_close=True)
raw_case("ten_thousand_headers",
         b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(10000))
         + b"\r\n", statuses=(400, 413, 431), allow_close=True)
raw_case("huge_url", b"GET /v2/models/" + b"m" * 200000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
         statuses=(400, 404, 414, 431), allow_close=True)

# ------------------------------------------------------------------------------ connections


@case("keep_alive_survives_errors")
def _keep_alive():
    """One persistent connection: errors of every kind must leave it usable (or be closed
    cleanly with Connection: close, in which case the client reconnects)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port(), timeout=10)
    good = kit.json_infer_body([S["row"]])
    seq = [("POST", INFER, good, 200), ("POST", INFER, b"{", 400),
           ("POST", INFER, good, 200), ("GET", "/v2/models/nosuch", None, 404),
           ("GET", INFER, None, 405), ("POST", "/v2/models/heart/versions/9/infer", good, 404),
           ("GET", "/v2", None, 200), ("POST", INFER, good, 200)]
    try:
        for method, path, body, want in seq:
            conn.request(method, path, body=body)
            r = conn.getresponse()
            data = r.read()
            check(r.status == want, "keep-alive %s %s: expected %d, got %d %r"
                  % (method, path, want, r.status, kit.short(data)))
            if r.will_close:
                conn.close()
    finally:
        conn.close()


@case("pipelined_requests")
def _pipelined():
    """Two requests in one write: two answers, in order."""
    body = kit.json_infer_body([S["row"]])
    req = (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
           b"\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    s = kit.connect(port())
    try:
        s.sendall(req + b"GET /v2/models/nosuch HTTP/1.1\r\nHost: x\r\n\r\n")
        r1 = kit.read_response(s, timeout=10)
        check(r1 is not None and r1.status == 200, "first pipelined request: %r" % r1)
        r2 = kit.read_response(s, timeout=10)
        check(r2 is not None and r2.status == 404, "second pipelined request: %r" % r2)
    finally:
        s.close()


# ------------------------------------------------------------------------------ slow clients


def other_client_ok(what):
    t0 = time.monotonic()
    assert_good(timeout=10)
    dt = time.monotonic() - t0
    check(dt < 3.0, "%s: another client's request took %.2fs" % (what, dt))
    r = kit.get(port(), "/v2/health/ready", timeout=10)
    check(r.status == 200, "%s: ready %r" % (what, r))


@case("slow_body_does_not_block_others")
def _slow_body():
    body = kit.json_infer_body([S["row"]])
    s = kit.connect(port(), timeout=30)
    try:
        s.sendall(head_bytes(len(body)) + body[:25])
        time.sleep(0.3)
        other_client_ok("while a client stalls inside its body")
        time.sleep(1.0)
        other_client_ok("while a client stalls inside its body (later)")
        try:
            s.sendall(body[25:])
        except OSError:
            return  # the server may drop a client that stalls; that is fine
        r = kit.read_response(s, timeout=10)
        if r is not None and r.status != 200:
            check(r.status == 408, "the slow client finally got %r" % r)
    finally:
        s.close()


@case("slow_headers_do_not_block_others")
def _slow_headers():
    s = kit.connect(port(), timeout=30)
    try:
        s.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        time.sleep(0.3)
        other_client_ok("while a client stalls inside its headers")
    finally:
        s.close()


@case("many_stalled_clients_do_not_block_others")
def _many_slow():
    body = kit.json_infer_body([S["row"]])
    socks = []
    try:
        for i in range(32):
            s = kit.connect(port(), timeout=30)
            s.sendall(head_bytes(len(body)) + body[:10 + i])
            socks.append(s)
        time.sleep(0.3)
        other_client_ok("with 32 clients stalled inside their bodies")
    finally:
        for s in socks:
            s.close()


@case("reset_mid_body")
def _reset_mid_body():
    import struct
    body = kit.json_infer_body([S["row"]])
    s = kit.connect(port())
    s.sendall(head_bytes(len(body)) + body[:40])
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST
    time.sleep(0.05)


if __name__ == "__main__":
    kit.parse_args()
    n = len(CASES)
    assert n >= 50, n
    kit.run(CASES, setup=setup, teardown=teardown)
