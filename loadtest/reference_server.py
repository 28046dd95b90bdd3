"""The reference for the serving benchmark: what a user would write instead of adopting the suite.

A FastAPI + uvicorn app doing the identical classify work on the same model file: decode the
upload, preprocess it from the contract stored in the model (the suite's own functions, so the work
is the same), run ONNX Runtime, answer the top-k as JSON. Started by ``loadtest/bench_serving.py``:

    REFERENCE_MODEL=/path/to/model.onnx python -m loadtest.reference_server --port 8000 --workers 2

Each worker is its own uvicorn process with its own listening socket on the port (SO_REUSEPORT),
so the kernel spreads connections over the workers evenly. ``uvicorn --workers 2`` shares one
socket instead, and whichever worker wakes first accepts most of a burst of connections: wrk's 32
keep-alive connections split 28/4 or worse in some runs, which left one worker idle for the whole
run (issue 24 measured 2,089 -> 2,224 req/s from one worker to two that way; per-worker CPU time
here showed splits from 50/50 to 33/67 between runs of the same server).

It uses the same ONNX Runtime settings as the suite's sessions (cores / workers threads, no spinning)
so that the comparison measures the serving stack, not the session options."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, Form, HTTPException, UploadFile

from common.imaging import decode_image, to_model_input
from common.runtime import read_contract
from common.scores import probabilities  # the suite's own functions throughout, so both do the same work


def make_app(model: Path, threads: int, ready_dir: str | None, workers: int) -> FastAPI:
    """The app for one worker: the model's session made here, when the server starts, not at import."""
    contract = read_contract(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    input_name = contract.inputs[0].name
    app = FastAPI()

    @app.post("/classify")
    async def classify(image: UploadFile = File(...), top_k: int = Form(5)) -> dict:
        picture = decode_image(await image.read(), "image", contract.limits["max_pixels"])
        scores = session.run(None, {input_name: to_model_input(picture, contract.image)})[0][0]
        probs = probabilities(scores, contract)  # an imported classifier's graph may end in logits
        order = np.argsort(-probs, kind="stable")[:top_k]
        return {"model": contract.name,
                "predictions": [{"label": contract.labels[i], "class_id": int(i), "probability": float(probs[i])}
                                for i in order]}

    @app.get("/ready")
    def ready() -> dict:
        """200 once every worker listens (the benchmark's wait: with SO_REUSEPORT a worker still
        loading has no socket yet, so the first connections would all go to the others)."""
        listening = len(os.listdir(ready_dir)) if ready_dir else 1
        if listening < workers:
            raise HTTPException(503, f"{listening} workers listening")
        return {"workers": listening}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="the serving benchmark's FastAPI reference")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn processes, each with its own SO_REUSEPORT socket")
    args = parser.parse_args()
    if args.workers > 1:  # one process per worker; this one only waits for them (and dies with them)
        env = {**os.environ, "REFERENCE_WORKERS": str(args.workers)}
        children = [subprocess.Popen([sys.executable, "-m", "loadtest.reference_server", "--host", args.host,
                                      "--port", str(args.port), "--workers", "1"], env=env) for _ in range(args.workers)]
        sys.exit(max(child.wait() for child in children))
    import uvicorn

    ready_dir = os.environ.get("REFERENCE_READY_DIR")  # each worker leaves a file there once it listens
    app = make_app(Path(os.environ.get("REFERENCE_MODEL", "model.onnx")), int(os.environ.get("REFERENCE_THREADS", "1")),
                   ready_dir, int(os.environ.get("REFERENCE_WORKERS", "1")))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    if ready_dir:
        Path(ready_dir, str(os.getpid())).touch()
    uvicorn.Server(uvicorn.Config(app, access_log=False, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
