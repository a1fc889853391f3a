"""fastapi_peer.py: the Python server keel is compared against (bench/suite.sh).

DESIGN
The same model file keel serves, loaded with the xgboost Python package (Debian
python3-xgboost, the same libxgboost keel links) and predicted with nthread=1 through
Booster.inplace_predict, behind FastAPI on uvicorn (one process, one event loop), speaking
the same KServe V2 JSON as keel: POST /v2/models/{name}/infer with
{"inputs": [{"name", "shape", "datatype": "FP32", "data"}]} answered with
{"model_name", "outputs": [{"name": "probability", "shape": [n, 1], "datatype": "FP32",
"data"}]}, plus GET /v2/health/live. Two handlers, chosen by --mode:
  raw       the tuned one: reads the body bytes, json.loads, numpy, predict, and writes the
            JSON answer with json.dumps into a plain Response (no validation layer);
  pydantic  the idiomatic one: request and response declared as pydantic models, FastAPI
            validates the body and serialises the response.
uvicorn runs with uvloop and httptools (Debian python3-uvloop, python3-httptools: what
`uvicorn[standard]` installs, the usual tuned setup) when they are importable, and says so on
stderr. Run only under /usr/bin/python3 (Debian's modules). A benchmark peer, not a server.

Usage: /usr/bin/python3 bench/fastapi_peer.py --model-file M --name N --port P [--mode raw]
"""

import argparse
import json
import sys
from typing import List, Optional

import numpy as np
import uvicorn
import xgboost
from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel


def build_app(model_file, name, mode):
    booster = xgboost.Booster(model_file=model_file)
    booster.set_param({"nthread": 1})
    nfeat = booster.num_features()
    app = FastAPI()

    @app.get("/v2/health/live")
    def live():
        return Response(content=b"", status_code=200)

    def predict(data, shape):
        if len(shape) != 2 or shape[1] != nfeat or len(data) != shape[0] * shape[1]:
            raise HTTPException(status_code=400, detail="shape %s does not match [-1, %d]"
                                % (shape, nfeat))
        x = np.asarray(data, dtype=np.float32).reshape(shape)
        return booster.inplace_predict(x).astype(np.float32)

    if mode == "raw":
        @app.post("/v2/models/{model}/infer")
        async def infer_raw(model: str, request: Request):
            if model != name:
                return Response(content=json.dumps({"error": "unknown model '%s'" % model}),
                                status_code=404, media_type="application/json")
            doc = json.loads(await request.body())
            t = doc["inputs"][0]
            y = predict(t["data"], t["shape"])
            out = {"model_name": name, "outputs": [{"name": "probability",
                                                    "shape": [len(y), 1], "datatype": "FP32",
                                                    "data": y.tolist()}]}
            return Response(content=json.dumps(out), media_type="application/json")
    else:
        class InTensor(BaseModel):
            name: str
            shape: List[int]
            datatype: str
            data: List[float]

        class InferRequest(BaseModel):
            id: Optional[str] = None
            inputs: List[InTensor]

        class OutTensor(BaseModel):
            name: str
            shape: List[int]
            datatype: str
            data: List[float]

        class InferResponse(BaseModel):
            model_name: str
            id: Optional[str] = None
            outputs: List[OutTensor]

        @app.post("/v2/models/{model}/infer", response_model=InferResponse)
        def infer_pydantic(model: str, req: InferRequest):
            if model != name:
                raise HTTPException(status_code=404, detail="unknown model '%s'" % model)
            t = req.inputs[0]
            y = predict(t.data, t.shape)
            return InferResponse(model_name=name, id=req.id,
                                 outputs=[OutTensor(name="probability", shape=[len(y), 1],
                                                    datatype="FP32", data=y.tolist())])
    return app


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-file", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("raw", "pydantic"), default="raw")
    a = p.parse_args()
    app = build_app(a.model_file, a.name, a.mode)
    loop = http = "auto"
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        import httptools  # noqa: F401
        http = "httptools"
    except ImportError:
        http = "h11"
    print("fastapi_peer: %s handler on 127.0.0.1:%d, loop %s, http %s"
          % (a.mode, a.port, loop, http), file=sys.stderr, flush=True)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False,
                loop=loop, http=http)


if __name__ == "__main__":
    main()
