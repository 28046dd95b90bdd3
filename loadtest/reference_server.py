"""The reference for the serving benchmark: what a user would write instead of adopting the suite.

A FastAPI + uvicorn app doing the identical classify work on the same model file: decode the
upload, preprocess it from the contract stored in the model (the suite's own functions, so the work
is the same), run ONNX Runtime, answer the top-k as JSON. Started by ``loadtest/bench_serving.py``:

    REFERENCE_MODEL=/path/to/model.onnx uvicorn loadtest.reference_server:app --workers 1 --no-access-log

It uses the same ONNX Runtime settings as the suite's sessions (cores / workers threads, no spinning)
so that the comparison measures the serving stack, not the session options."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, Form, UploadFile

from services.imaging import decode_image, to_model_input
from services.runtime import read_contract

MODEL = Path(os.environ.get("REFERENCE_MODEL", "model.onnx"))
contract = read_contract(MODEL)
options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("REFERENCE_THREADS", "1"))
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
app = FastAPI()


@app.post("/classify")
async def classify(image: UploadFile = File(...), top_k: int = Form(5)) -> dict:
    picture = decode_image(await image.read(), "image", contract.limits["max_pixels"])
    probs = session.run(None, {"image": to_model_input(picture, contract.image)})[0][0]
    order = np.argsort(-probs, kind="stable")[:top_k]
    return {"model": contract.name,
            "predictions": [{"label": contract.labels[i], "class_id": int(i), "probability": float(probs[i])} for i in order]}
