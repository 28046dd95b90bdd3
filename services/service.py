"""BentoML services: the public API (``Suite``) and the adaptive-batching model host
(``BatchedModels``) it depends on. Service methods are thin: validate -> preprocess from the
contract -> session -> postprocess. Protocol front-ends (native HTTP here, Open Inference Protocol
later) share the loaded sessions and the batching through ``Suite``'s helpers."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Annotated, Any, Optional

import anyio
import bentoml
import numpy as np
from pydantic import Field
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.errors import RequestError
from services.imaging import decode_image, encode_png, grid, to_model_input
from services.oip.rest import app as oip_rest_app, root_app as oip_rest_root
from services.runtime import FAMILIES, ModelHub, OnnxModel
from services.textgen import SamplingParams, TextGenerator

log = logging.getLogger("services")
BATCHED = ("classify", "segment")  # fixed-size inputs that stack into one tensor
MAX_LATENCY_MS = int(os.environ.get("SUITE_MAX_LATENCY_MS", "10000"))
MAX_BATCH = int(os.environ.get("SUITE_MAX_BATCH", "64"))


def error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status)


def png_response(pixels: np.ndarray) -> Response:
    return Response(encode_png(pixels), media_type="image/png")


async def in_thread(fn, *args):
    """ONNX Runtime releases the GIL: run sessions off the event loop so requests overlap."""
    return await anyio.to_thread.run_sync(fn, *args)


def keep_dependency_session(proxy: Any) -> None:
    """BentoML 1.4.39's dependency client replaces its aiohttp session every 100 requests by
    closing the old one while other requests are still in flight on it; those fail with
    ServerDisconnectedError (measured: 3-6 % of classify requests at 8 concurrent clients).
    One session for the worker's life avoids that; the connection pool itself stays bounded."""
    manager = getattr(getattr(proxy, "_async", None), "_session_manager", None)
    if manager is None:  # a BentoML without the refresh: nothing to do
        log.warning("BentoML dependency client has no session manager; session refresh not disabled")
        return
    manager.max_requests = 2 ** 62
    manager.max_age = float("inf")


@bentoml.service(name="batched-models", workers=1, traffic={"timeout": 60, "max_concurrency": 256})
class BatchedModels:
    """Hosts the models whose requests stack along the batch axis; BentoML's adaptive batching
    merges concurrent requests (native and Open Inference Protocol alike) into one session run."""

    def __init__(self) -> None:
        self.hub = ModelHub(BATCHED)
        self.sessions = self.hub.latest()

    async def _run(self, name: str, batch: np.ndarray) -> np.ndarray:
        model = self.sessions[name]
        (input_spec,), (output_spec,) = model.contract.inputs, model.contract.outputs
        outputs = await in_thread(model.run, {input_spec.name: batch.astype(input_spec.dtype, copy=False)})
        return outputs[output_spec.name]

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    async def classify(self, image: np.ndarray) -> np.ndarray:
        return await self._run("classify", image)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    async def segment(self, image: np.ndarray) -> np.ndarray:
        return await self._run("segment", image)


@bentoml.asgi_app(oip_rest_app, path="/v2")  # Open Inference Protocol v2, REST
@bentoml.asgi_app(oip_rest_root, path="/")  # GET /v2 (server metadata) exactly
@bentoml.service(name="model-suite", workers=1, traffic={"timeout": 120, "max_concurrency": 256},
                 http={"port": 3000})
class Suite:
    batched = bentoml.depends(BatchedModels)
    # Declared so that `bentoml build` packs the newest version of each model into the bento.
    classify_model = bentoml.models.BentoModel("classify")
    segment_model = bentoml.models.BentoModel("segment")
    generate_model = bentoml.models.BentoModel("generate")
    denoise_model = bentoml.models.BentoModel("denoise")
    sample_model = bentoml.models.BentoModel("sample")

    def __init__(self) -> None:
        keep_dependency_session(self.batched)
        self.hub = ModelHub(FAMILIES)
        # Batched models run in BatchedModels; this worker opens sessions only for the others.
        self.sessions: dict[str, OnnxModel] = {n: self.hub.get(n) for n in FAMILIES if n not in BATCHED}
        self.text = TextGenerator(self.sessions["generate"])
        self.oip = None  # Open Inference Protocol front-ends, set up by the startup hook

    # ---- Open Inference Protocol v2: gRPC server lifecycle (REST is the /v2 mount) ---------------

    @bentoml.on_startup
    async def start_oip(self) -> None:
        from services.oip.core import OipCore
        from services.oip.grpc_server import GrpcFrontend

        self.oip = OipCore(self)
        self._oip_grpc = GrpcFrontend(self.oip)
        await self._oip_grpc.start()  # port taken: logs an ERROR, /v2/health/ready answers 503

    async def __is_ready__(self) -> bool:
        """BentoML's /readyz follows the gRPC front-end too: a server without its gRPC port
        (e.g. taken by a leftover process) is not ready, so Kubernetes will not route to it."""
        return self.oip is not None and self.oip.grpc_up

    @bentoml.on_shutdown
    async def stop_oip(self) -> None:
        if getattr(self, "_oip_grpc", None) is not None:
            await self._oip_grpc.stop()

    # ---- shared by every protocol -------------------------------------------------------------

    def contract(self, name: str):
        return self.hub.describe(name).contract

    async def infer(self, name: str, version: str | None, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs a model on checked tensors. The newest version of a batched model goes through the
        adaptive batcher; every other model and version runs on this worker's sessions."""
        stored = self.hub.describe(name, version)
        stored.check(feeds)
        if name in BATCHED and stored.version == self.hub.versions(name)[0]:
            (input_spec,), (output_spec,) = stored.contract.inputs, stored.contract.outputs
            method = getattr(self.batched.to_async, name)
            return {output_spec.name: np.asarray(await method(feeds[input_spec.name]))}
        return await in_thread(self.hub.get(name, stored.version).run, feeds)

    async def read_upload(self, image: Path, name: str) -> Any:
        c = self.contract(name)
        data = await anyio.Path(image).read_bytes()
        return decode_image(data, "image", c.limits["max_pixels"], c.limits.get("min_side", 1))

    # ---- native HTTP API ----------------------------------------------------------------------

    @bentoml.api
    async def classify(self, image: Path, top_k: Annotated[int, Field(ge=1, le=100)] = 5) -> dict:
        """Classify a PNG/JPEG image (any size, grayscale or RGB)."""
        try:
            c = self.contract("classify")
            picture = await self.read_upload(image, "classify")
            probs = (await self.infer("classify", None, {"image": to_model_input(picture, c.image)}))["probabilities"][0]
        except RequestError as exc:
            return error_response(exc)
        order = np.argsort(-probs, kind="stable")[: min(top_k, probs.size)]
        return {"model": self.hub.describe("classify").tag,
                "predictions": [{"label": c.labels[i], "class_id": int(i), "probability": float(probs[i])} for i in order]}

    @bentoml.api
    async def segment(self, image: Path) -> bytes:
        """PNG label mask of the input's width and height; pixel value = class id."""
        try:
            c = self.contract("segment")
            picture = await self.read_upload(image, "segment")
            mask = (await self.infer("segment", None, {"image": to_model_input(picture, c.image)}))["mask"][0]
        except RequestError as exc:
            return error_response(exc)
        from PIL import Image

        full = Image.fromarray(mask.astype(np.uint8)).resize(picture.size, Image.Resampling.NEAREST)
        return png_response(np.asarray(full))

    @bentoml.api
    async def denoise(self, image: Path, sigma: Optional[Annotated[float, Field(ge=0, le=100)]] = None) -> bytes:
        """Denoised PNG of the same size; sigma is the noise level on the 0-255 scale, omitted = blind."""
        try:
            c = self.contract("denoise")
            picture = await self.read_upload(image, "denoise")
        except RequestError as exc:
            return error_response(exc)
        rgb = picture.mode not in ("L", "I", "I;16", "F", "1")
        pixels = np.asarray(picture.convert("RGB" if rgb else "L"), dtype=np.float32) / 255.0
        planes = pixels.transpose(2, 0, 1) if rgb else pixels[None]  # colour: channel by channel
        level = c.extra["blind_level"] if sigma is None else sigma / 255.0
        feeds = {"noisy": planes[:, None], "noise_level": np.full((planes.shape[0], 1), level, np.float32)}
        out = (await self.infer("denoise", None, feeds))["denoised"][:, 0]
        out = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
        return png_response(out.transpose(1, 2, 0) if rgb else out[0])

    @bentoml.api
    async def sample(self, n: int = 16, seed: Optional[int] = None, class_id: Optional[int] = None) -> bytes:
        """PNG grid of n GAN samples; the same seed gives the same images."""
        c = self.contract("sample")
        try:
            if not 1 <= n <= c.limits["max_n"]:
                raise RequestError("n", f"must be between 1 and {c.limits['max_n']}, got {n}")
            if class_id is not None and not 0 <= class_id < len(c.labels):
                raise RequestError("class_id", f"unknown class {class_id}; classes are 0..{len(c.labels) - 1}")
            if seed is not None and not 0 <= seed < 2 ** 63:
                raise RequestError("seed", "must be a non-negative 64-bit integer")
        except RequestError as exc:
            return error_response(exc)
        rng = np.random.default_rng(seed if seed is not None else secrets.randbits(63))
        latent_dim = c.input("latent").shape[1]
        latent = rng.standard_normal((n, latent_dim)).astype(np.float32)
        classes = (np.full(n, class_id) if class_id is not None else np.arange(n) % len(c.labels)).astype(np.int64)
        images = (await self.infer("sample", None, {"latent": latent, "class_id": classes}))["images"][:, 0]
        return png_response(grid((np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8), columns=min(n, 8)))

    def _sampling(self, max_new_tokens, temperature, top_k, top_p, seed, stop) -> SamplingParams:
        return SamplingParams(max_new_tokens, temperature, top_k, top_p,
                              seed if seed is not None else secrets.randbits(63), tuple(stop or ()))

    @bentoml.api
    async def generate(self, prompt: str = "", max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, seed: Optional[int] = None, stop: Optional[list[str]] = None) -> dict:
        """Complete the prompt; same seed, same text."""
        params = self._sampling(max_new_tokens, temperature, top_k, top_p, seed, stop)
        try:
            done = await in_thread(self.text.complete, prompt, params)
        except RequestError as exc:
            return error_response(exc)
        return {"text": done.text, "finish_reason": done.finish_reason,
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
                "seed": params.seed, "model": self.sessions["generate"].tag}

    @bentoml.api
    async def generate_stream(self, prompt: str = "", max_new_tokens: int = 64, temperature: float = 1.0,
                              top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                              stop: Optional[list[str]] = None) -> str:
        """Same as /generate, streamed as server-sent events: one `data: {"text": ...}` per piece, then a
        final event with finish_reason and usage, then `data: [DONE]`."""
        params = self._sampling(max_new_tokens, temperature, top_k, top_p, seed, stop)
        stream = self.text.stream(prompt, params)
        try:  # the first step runs the checks, so bad input is a plain 400 before any event
            first = await in_thread(next, stream)
        except RequestError as exc:
            return error_response(exc)

        async def events():
            chunk = first
            while True:
                payload = {"text": chunk.text}
                if chunk.finish_reason is not None:
                    payload.update(finish_reason=chunk.finish_reason, seed=params.seed,
                                   usage={"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens})
                yield f"data: {json.dumps(payload)}\n\n"
                if chunk.finish_reason is not None:
                    break
                chunk = await in_thread(next, stream)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @bentoml.api(route="/models")
    async def models(self) -> list:
        """Every served model: name, version, task, contract, training metrics, parity figure."""
        out = []
        for name in FAMILIES:
            model = self.hub.describe(name)
            meta = model.metadata
            out.append({"name": name, "version": model.version, "task": meta.get("task"),
                        "architecture": model.contract.architecture,
                        "contract": json.loads(model.contract.to_json()), "metrics": meta.get("metrics"),
                        "parity_max_abs_diff": meta.get("parity_max_abs_diff"),
                        "data_fingerprint": meta.get("data_fingerprint"), "created_at": meta.get("created_at"),
                        "git_revision": meta.get("git_revision"), "versions": self.hub.versions(name)})
        return out
