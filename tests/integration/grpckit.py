"""grpckit.py: gRPC helpers for the integration tests (Debian python3-grpcio and
python3-grpc-tools): Python stubs generated at test time from keel's own
src/server/proto/*.proto into a temp dir, and request builders for the heart model."""

import os
import struct
import subprocess
import sys

import kit
from kit import check


class Stubs:
    pass


def load():
    """Generates and imports the stubs; returns an object with grpc, pb (inference messages),
    pbg (service stubs), hp and hpg (health)."""
    out = kit.tmpdir("keel-grpc-stubs-")
    proto = os.path.join(kit.SOURCE, "src", "server", "proto")
    p = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I" + proto,
                        "--python_out=" + out, "--grpc_python_out=" + out,
                        "keel_inference.proto", "keel_health.proto"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    check(p.returncode == 0, "grpc_tools.protoc failed: %s" % p.stdout.decode())
    sys.path.insert(0, out)
    import grpc
    import keel_health_pb2
    import keel_health_pb2_grpc
    import keel_inference_pb2
    import keel_inference_pb2_grpc
    s = Stubs()
    s.grpc, s.pb, s.pbg = grpc, keel_inference_pb2, keel_inference_pb2_grpc
    s.hp, s.hpg = keel_health_pb2, keel_health_pb2_grpc
    return s


def rows_request(pb, rows, model="heart", raw=True, req_id=None, outputs=None, version=""):
    """A ModelInferRequest of heart-shaped FP32 rows (13 features), raw or typed."""
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    if req_id is not None:
        req.id = req_id
    t = req.inputs.add()
    t.name = "features"
    t.datatype = "FP32"
    t.shape.extend([len(rows), 13])
    vals = kit.flat(rows)
    if raw:
        req.raw_input_contents.append(struct.pack("<%df" % len(vals), *vals))
    else:
        t.contents.fp32_contents.extend(vals)
    for o in outputs or []:
        req.outputs.add().name = o
    return req


def raw_f32(resp, i=0):
    b = resp.raw_output_contents[i]
    return list(struct.unpack("<%df" % (len(b) // 4), b))
