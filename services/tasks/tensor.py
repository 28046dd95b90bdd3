"""Plain tensor models: any ONNX graph, served as it is over the Open Inference Protocol (REST and
gRPC), like Triton's onnxruntime backend. Inputs, outputs, datatypes and dynamic axes come from the
graph (read at import); there is no native route. What the contract bounds (the batch, fixed axes)
is checked by the shared tensor path; values are the graph's business."""

from __future__ import annotations

from services.tasks.base import TaskHandler


class TensorModel(TaskHandler):
    name = "tensor"


TASK = TensorModel
