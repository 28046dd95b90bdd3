"""A smoke check of a running suite on every protocol: the probes and /metrics, one call per API on native HTTP,
Open Inference Protocol REST and gRPC (the real tritonclient clients), and the OpenAI route (the
official openai client). What the tests run against the built bento, the container image and the
Kubernetes pod; run it by hand against any deployment:

    python -m loadtest.smoke --url http://127.0.0.1:3000 --grpc-port 9000 --probe-port 3001

Each answer is checked for content (the held-out digit's label, image sizes, generated tokens), not
only its status. OIP tensors are built from the contracts the server itself publishes at /models,
so the check needs no model files. Prints one line per check; exits 1 if any failed."""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import requests
from PIL import Image

from loadtest.payloads import digit_png, photo_png, scene_png

FAMILIES = ("classify", "segment", "denoise", "sample", "generate")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


def _png_size(content: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(content)).size


class Smoke:
    def __init__(self, url: str, grpc_port: int | None, probe_port: int | None = None, api_key: str = "",
                 grpc_host: str = "127.0.0.1", timeout: float = 120):
        self.url = url.rstrip("/")
        self.grpc_target = f"{grpc_host}:{grpc_port}" if grpc_port else None
        self.probe_url = f"{self.url.rsplit(':', 1)[0]}:{probe_port}" if probe_port else None
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.api_key = api_key
        self.timeout = timeout
        self.checks: list[Check] = []

    def check(self, name: str, probe: Callable[[], str]) -> None:
        started = time.monotonic()
        try:
            detail, ok = probe(), True
        except Exception as exc:  # noqa: BLE001 - a failed check is reported, the others still run
            detail, ok = f"{type(exc).__name__}: {str(exc)[:300]}", False
        self.checks.append(Check(name, ok, detail, time.monotonic() - started))

    def get(self, url: str, **kwargs) -> requests.Response:
        return requests.get(url, headers=self.headers, timeout=self.timeout, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        r = requests.post(self.url + path, headers=self.headers, timeout=self.timeout, **kwargs)
        assert r.status_code == 200, f"{r.status_code}: {r.text[:200]}"
        return r

    # ---- the checks --------------------------------------------------------------------------

    def run(self) -> list[Check]:
        self.probes()
        self.native()
        contracts = {}
        self.check("GET /models", lambda: self._contracts(contracts))
        feeds = self._oip_feeds(contracts) if contracts else {}
        self.oip_rest(feeds)
        if self.grpc_target:
            self.oip_grpc(feeds)
        self.openai()
        self.metrics()
        return self.checks

    @property
    def _probe_bases(self) -> list[tuple[str, str]]:
        """(label, base URL): the main port, and the probe port when there is one."""
        return [("", self.url)] + ([("probe port ", self.probe_url)] if self.probe_url else [])

    def probes(self) -> None:
        for label, base in self._probe_bases:
            for path in ("/livez", "/readyz"):
                self.check(f"{label}GET {path}", lambda b=base, p=path: self._status(self.get(b + p)))

    def metrics(self) -> None:
        """After the calls: /metrics (both ports) counts the native classify request made above."""
        for label, base in self._probe_bases:
            self.check(f"{label}GET /metrics", lambda b=base: self._metrics(self.get(b + "/metrics")))

    @staticmethod
    def _status(r: requests.Response) -> str:
        assert r.status_code == 200, f"{r.status_code}: {r.text[:200]}"
        return "200"

    @staticmethod
    def _metrics(r: requests.Response) -> str:
        counted = 'suite_requests_total{model="classify",protocol="native",status="200"}'
        assert r.status_code == 200 and counted in r.text, f"{r.status_code}, no {counted} in the page"
        return f"{len(r.text.splitlines())} lines"

    def native(self) -> None:
        def classify() -> str:
            png, label = digit_png()
            best = self.post("/classify", files={"image": ("digit.png", png, "image/png")}).json()["predictions"][0]
            assert best["class_id"] == label, f"predicted {best}, the digit is {label}"
            return f"digit {label} -> {best['label']} ({best['probability']:.2f})"

        def image_route(path: str, png: bytes, **data) -> Callable[[], str]:
            def call() -> str:
                r = self.post(path, files={"image": ("in.png", png, "image/png")}, data=data)
                assert r.headers["content-type"] == "image/png" and _png_size(r.content) == _png_size(png)
                return f"{_png_size(r.content)} PNG from {r.headers.get('x-model')}"
            return call

        def sample() -> str:
            r = self.post("/sample", json={"n": 2, "seed": 1})
            assert r.headers["content-type"] == "image/png"
            return f"{_png_size(r.content)} PNG from {r.headers.get('x-model')}"

        def generate() -> str:
            answer = self.post("/generate", json={"prompt": "The assert statement", "max_new_tokens": 8,
                                                  "seed": 1}).json()
            assert answer["usage"]["completion_tokens"] >= 1, answer
            return f"{answer['usage']['completion_tokens']} tokens: {answer['text'][:30]!r}"

        self.check("native POST /classify", classify)
        self.check("native POST /segment", image_route("/segment", scene_png()[0]))
        self.check("native POST /denoise", image_route("/denoise", photo_png(size=64)[0], sigma="25"))
        self.check("native POST /sample", sample)
        self.check("native POST /generate", generate)

    def _contracts(self, into: dict) -> str:
        from contract import ModelContract

        r = self.get(self.url + "/models")
        assert r.status_code == 200, f"{r.status_code}: {r.text[:200]}"
        for entry in r.json():
            into[entry["name"]] = ModelContract.from_json(json.dumps(entry["contract"]))
        missing = set(FAMILIES) - set(into)
        assert not missing, f"not served: {sorted(missing)}"
        return ", ".join(sorted(into))

    @staticmethod
    def _oip_feeds(contracts: dict) -> dict[str, tuple[dict[str, np.ndarray], dict, Callable]]:
        """Per model: input tensors, parameters, and a check of the result (-> detail)."""
        from common.imaging import decode_image, to_model_input

        png, label = digit_png()
        digit = to_model_input(decode_image(png, "image", 10**8), contracts["classify"].image)
        scene = to_model_input(decode_image(scene_png()[0], "image", 10**8), contracts["segment"].image)
        photo = np.asarray(Image.open(io.BytesIO(photo_png(size=64)[0])).convert("L"), np.float32) / 255.0
        latent_size = contracts["sample"].input("latent").shape[1]

        def classified(result) -> str:
            probabilities = result.as_numpy("probabilities")
            assert int(probabilities.argmax()) == label, f"argmax {probabilities.argmax()}, the digit is {label}"
            return f"digit {label}, p={probabilities.max():.2f}"

        def shaped(name: str, shape: tuple) -> Callable:
            def check(result) -> str:
                array = result.as_numpy(name)
                assert array.shape == shape, f"{name} {array.shape}, expected {shape}"
                return f"{name} {array.shape} {array.dtype}"
            return check

        def sampled(result) -> str:
            images = result.as_numpy("images")
            assert images.shape[0] == 2 and images.ndim == 4, f"images {images.shape}, expected 2 of them"
            return f"images {images.shape} {images.dtype}"

        def generated(result) -> str:
            text = result.as_numpy("text_output").ravel()[0]
            assert len(text) >= 1, "no text"
            return f"{text[:30]!r}"

        return {
            "classify": ({"image": digit}, {}, classified),
            "segment": ({"image": scene}, {}, shaped("mask", (1, scene.shape[2], scene.shape[3]))),
            "denoise": ({"noisy": photo[None, None], "noise_level": np.full((1, 1), 25 / 255, np.float32)}, {},
                        shaped("denoised", (1, 1) + photo.shape)),
            "sample": ({"latent": np.random.default_rng(0).standard_normal((2, latent_size)).astype(np.float32),
                        "class_id": np.array([3, 7], np.int64)}, {}, sampled),
            "generate": ({"text_input": np.array([b"The assert statement"], dtype=object)},
                         {"max_new_tokens": 8, "seed": 1}, generated),
        }

    def _infer(self, module, client, model: str, tensors: dict, parameters: dict, **kwargs):
        # (tritonclient adds its own headers to the dict it is given: each call gets a copy)
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, array in tensors.items():
            tensor = module.InferInput(name, list(array.shape), "BYTES" if array.dtype == object
                                       else np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return client.infer(model, inputs, parameters=parameters or None, **kwargs)

    def oip_rest(self, feeds: dict) -> None:
        import tritonclient.http as thttp

        client = thttp.InferenceServerClient(self.url.split("://", 1)[1], network_timeout=self.timeout)
        self.check("OIP REST server ready", lambda: str(client.is_server_ready(headers=dict(self.headers)) or _fail()))
        for model, (tensors, parameters, verify) in feeds.items():
            self.check(f"OIP REST infer {model}", lambda m=model, t=tensors, p=parameters, v=verify:
                       v(self._infer(thttp, client, m, t, p, headers=dict(self.headers))))
        client.close()

    def oip_grpc(self, feeds: dict) -> None:
        import tritonclient.grpc as tgrpc

        client = tgrpc.InferenceServerClient(self.grpc_target)
        metadata = {"authorization": f"Bearer {self.api_key}"} if self.api_key else None
        self.check("OIP gRPC server ready", lambda: str(client.is_server_ready(headers=metadata) or _fail()))
        for model, (tensors, parameters, verify) in feeds.items():
            self.check(f"OIP gRPC infer {model}", lambda m=model, t=tensors, p=parameters, v=verify:
                       v(self._infer(tgrpc, client, m, t, p, headers=metadata, client_timeout=self.timeout)))
        client.close()

    def openai(self) -> None:
        from openai import OpenAI

        client = OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", timeout=self.timeout, max_retries=0)

        def complete() -> str:
            answer = client.completions.create(model="generate", prompt="Exceptions are", max_tokens=8, seed=1)
            assert answer.usage.completion_tokens >= 1 and answer.choices[0].text, answer
            return f"{answer.usage.completion_tokens} tokens from {answer.model}"

        def stream() -> str:
            chunks = list(client.completions.create(model="generate", prompt="Exceptions are", max_tokens=8,
                                                    seed=1, stream=True))
            assert chunks and any(c.choices and c.choices[0].text for c in chunks), chunks[:3]
            return f"{len(chunks)} chunks"

        self.check("OpenAI completions", complete)
        self.check("OpenAI completions stream", stream)


def _fail():
    raise AssertionError("not ready")


def report(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<{width}} {c.seconds * 1000:7.0f} ms  {c.detail}"
                     for c in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--grpc-port", type=int, default=9000, help="0 = skip gRPC")
    parser.add_argument("--grpc-host", default="127.0.0.1")
    parser.add_argument("--probe-port", type=int, default=3001, help="0 = skip the probe port")
    parser.add_argument("--api-key", default="", help="the server's SUITE_API_KEY, if it has one")
    args = parser.parse_args(argv)
    checks = Smoke(args.url, args.grpc_port or None, args.probe_port or None, args.api_key, args.grpc_host).run()
    print(report(checks))
    failed = [c for c in checks if not c.ok]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
