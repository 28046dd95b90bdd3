"""Image classification: an upload in, the top-k labels with their probabilities out."""

from __future__ import annotations

from typing import Any

import numpy as np

from common.scores import probabilities
from contract import ModelContract
from services.budget import model_cost
from services.repository import ModelHandle
from services.rollout import top1_agreement
from services.tasks.base import NativeRoute, TaskHandler, check_int, json_answer
from services.tasks.images import decode_cost, image_input, open_upload

TOP_K_CAP = 100
OOD_OUTPUTS = ("ood_score", "reconstruction_error")  # a model exported with the digit autoencoder


def _fields(contract: ModelContract | None) -> dict[str, dict]:
    return {"top_k": {"type": "integer", "minimum": 1, "maximum": TOP_K_CAP, "default": 5}}


PREDICTIONS = {
    "model": {"type": "string"},
    "predictions": {"type": "array", "items": {"type": "object", "properties": {
        "label": {"type": "string"}, "class_id": {"type": "integer"}, "probability": {"type": "number"}}}},
    "ood_score": {"type": "number", "minimum": 0, "maximum": 1, "description":
                  "how unlike the training digits the input is: where its reconstruction error falls among the "
                  "held-out digits' errors (about 0.5 for a digit, 1.0 above them all; models exported with the "
                  "digit autoencoder)"},
    "reconstruction_error": {"type": "number", "description": "the autoencoder's mean squared error on the "
                                                              "normalised input"}}


class ImageClassification(TaskHandler):
    name = "image-classification"
    default_model = "classify"
    routes = (NativeRoute("/classify", "classify", "image", "Classify an image (any size, grayscale or RGB)",
                          _fields, json_answer("top-k predictions", PREDICTIONS)),)

    measure, default_min_agreement = "top1_agreement", 0.95

    def compare(self, contract: ModelContract, primary: dict, candidate: dict) -> float | None:
        name = contract.outputs[0].name
        return top1_agreement(primary[name], candidate[name])

    async def classify(self, handle: ModelHandle, image: bytes, values: dict[str, Any]) -> dict:
        c = handle.contract
        top_k = check_int("top_k", values.get("top_k", 5), 1, TOP_K_CAP)
        opened = open_upload(image, c)
        cost = decode_cost(opened, c) + model_cost(c.limits, 1)
        async with self.budget.reserve(cost, f"a {opened.width}x{opened.height} image"):
            _, x = await image_input(opened, c)
            outputs = await handle.infer({c.inputs[0].name: x})
        scores = outputs[c.outputs[0].name][0]
        probs = probabilities(scores, c)  # a graph that ends in logits (most imported ones) gets a softmax
        order = np.argsort(-probs, kind="stable")[: min(top_k, probs.size)]
        body = {"model": handle.tag,
                "predictions": [{"label": c.labels[i] if i < len(c.labels) else str(i), "class_id": int(i),
                                 "probability": float(probs[i])} for i in order]}
        for name in OOD_OUTPUTS:
            if name in outputs:
                body[name] = float(outputs[name][0])
        return body


TASK = ImageClassification
