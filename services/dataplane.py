"""The data plane: transport-neutral health, metadata and inference over the model repository and
the task handlers (KServe's ``dataplane.py``). Front-ends (native HTTP, Open Inference Protocol
REST and gRPC) only translate their wire format to these calls and back; nothing here knows HTTP."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Mapping

import numpy as np

from services.errors import ServingError, bad_request, unavailable
from services.repository import ModelHandle, ModelRepository
from services.tasks import (HANDLERS, Denoising, ImageClassification, ImageGeneration, Segmentation, TaskHandler,
                            TextGeneration)
from services.textgen import Chunk

SERVER_NAME = "model-suite"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "parameters"]
Tensors = dict[str, np.ndarray]


@dataclass
class InferResult:
    model: str
    version: str
    outputs: Tensors
    parameters: dict[str, Any]


@dataclass
class ImageResult:
    model: str  # name:version of the handle that ran
    png: bytes
    seed: int | None = None


@dataclass
class TextStream:
    model: str
    seed: int
    chunks: AsyncIterator[Chunk]


class DataPlane:
    def __init__(self, repository: ModelRepository, server_version: str = ""):
        self.repository = repository
        self.server_version = server_version
        self._readiness: dict[str, Callable[[], str | None]] = {}
        self._handlers: dict[str, TaskHandler] = {family: kind() for family, kind in HANDLERS.items()}

    # ---- health ----------------------------------------------------------------------------------

    def add_readiness_check(self, name: str, check: Callable[[], str | None]) -> None:
        """``check`` returns None when its part is ready, else why not (a front-end's listener)."""
        self._readiness[name] = check

    def not_ready_reason(self) -> str | None:
        if not self.repository.all_ready():
            return "models are loading"
        for name, check in self._readiness.items():
            reason = check()
            if reason is not None:
                return f"{name}: {reason}"
        return None

    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def require_ready(self) -> None:
        reason = self.not_ready_reason()
        if reason is not None:
            raise unavailable("server", f"not ready: {reason}", retry_after=1)

    # ---- metadata --------------------------------------------------------------------------------

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": self.server_version, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Loaded and warmed up. Any stored version can serve: one not loaded yet loads on first use."""
        return self.repository.is_ready(name, version)

    def model_metadata(self, name: str, version: str | None = None) -> dict:
        contract = self.repository.contract(name, version)
        extra_in, extra_out = self.handler(contract.family).extra_tensors(contract)
        tensors = lambda specs: [{"name": t.name, "datatype": t.oip_datatype, "shape": list(t.shape)} for t in specs]  # noqa: E731
        return {"name": name, "versions": self.repository.versions(name), "platform": PLATFORM,
                "inputs": tensors(contract.inputs) + extra_in, "outputs": tensors(contract.outputs) + extra_out}

    def models(self) -> list[dict]:
        """Every served model: newest version, contract, training metrics, parity figure, versions."""
        out = []
        for name in self.repository.names:
            stored = self.repository.stored(name)
            contract = self.repository.contract(name)
            meta = stored.metadata
            out.append({"name": name, "version": stored.version, "task": meta.get("task"),
                        "architecture": contract.architecture, "contract": json.loads(contract.to_json()),
                        "metrics": meta.get("metrics"), "parity_max_abs_diff": meta.get("parity_max_abs_diff"),
                        "data_fingerprint": meta.get("data_fingerprint"), "created_at": meta.get("created_at"),
                        "git_revision": meta.get("git_revision"), "versions": self.repository.versions(name),
                        "ready": self.repository.is_ready(name)})
        return out

    # ---- inference on tensors (Open Inference Protocol) --------------------------------------------

    async def infer(self, name: str, version: str | None, feeds: Tensors, parameters: Mapping[str, Any] | None = None,
                    requested: Iterable[str] | None = None) -> InferResult:
        handle = await self.repository.handle(name, version)
        handler = self.handler(handle.contract.family)
        result = await handler.infer_tensors(handle, feeds, parameters or {})
        outputs = result.outputs
        if requested is not None:
            requested = list(requested)
            unknown = [n for n in requested if n not in outputs]
            if unknown:
                raise bad_request(unknown[0], f"unknown output tensor; this request can return {list(outputs)}")
            outputs = {n: outputs[n] for n in requested}
        return InferResult(handle.name, handle.version, outputs, result.parameters)

    # ---- the tasks (native API) --------------------------------------------------------------------

    async def classify(self, image: bytes, top_k: int = 5, model: str | None = None) -> dict:
        handler, handle = await self._task(ImageClassification, model)
        return await handler.classify(handle, image, top_k)

    async def segment(self, image: bytes, model: str | None = None) -> ImageResult:
        handler, handle = await self._task(Segmentation, model)
        return ImageResult(handle.tag, await handler.segment(handle, image))

    async def denoise(self, image: bytes, sigma: float | None = None, model: str | None = None) -> ImageResult:
        handler, handle = await self._task(Denoising, model)
        return ImageResult(handle.tag, await handler.denoise(handle, image, sigma))

    async def sample(self, n: int = 16, seed: int | None = None, class_id: int | None = None,
                     model: str | None = None) -> ImageResult:
        handler, handle = await self._task(ImageGeneration, model)
        png, seed = await handler.sample(handle, n, seed, class_id)
        return ImageResult(handle.tag, png, seed)

    async def generate(self, prompt: str, sampling: Mapping[str, Any], model: str | None = None) -> dict:
        handler, handle = await self._task(TextGeneration, model)
        params = handler.sampling(handle, sampling)
        done = await handler.complete(handle, prompt, params)
        return {"text": done.text, "finish_reason": done.finish_reason,
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
                "seed": params.seed, "model": handle.tag}

    async def generate_stream(self, prompt: str, sampling: Mapping[str, Any], model: str | None = None) -> TextStream:
        """Checks the request and decodes the first piece before returning, so bad input is an
        error before any chunk goes out."""
        handler, handle = await self._task(TextGeneration, model)
        params = handler.sampling(handle, sampling)
        chunks = handler.stream(handle, prompt, params)
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(None, next, chunks)

        async def rest() -> AsyncIterator[Chunk]:
            chunk = first
            yield chunk
            while chunk.finish_reason is None:
                chunk = await loop.run_in_executor(None, next, chunks)
                yield chunk

        return TextStream(handle.tag, params.seed, rest())

    # ---- helpers ---------------------------------------------------------------------------------

    def handler(self, family: str) -> TaskHandler:
        try:
            return self._handlers[family]
        except KeyError:
            raise ServingError("model", f"no task handler for family {family!r}", 500) from None

    async def _task(self, kind: type[TaskHandler], model: str | None) -> tuple[Any, ModelHandle]:
        name = model or kind.task
        handle = await self.repository.handle(name)
        if handle.contract.family != kind.task:
            raise bad_request("model", f"model {name!r} is a {handle.contract.family} model, not {kind.task}")
        return self.handler(kind.task), handle
