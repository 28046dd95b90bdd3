"""Classifier throughput and latency over every protocol, one after the other under the same load,
against a running server on 127.0.0.1 (`bentoml serve`):

    python -m loadtest.bench_protocols --url http://127.0.0.1:3000 --grpc-port 9000 --seconds 10 --concurrency 8

Each protocol gets ``--concurrency`` client threads sending one 28x28 digit per request for
``--seconds`` (after a short warm-up); prints requests/s and p50/p99 latency. Protocols: native
``/classify`` (multipart PNG), OIP REST JSON, OIP REST binary tensor extension, OIP gRPC."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from urllib.parse import urlparse

import numpy as np


TIMEOUT = 10.0  # seconds per request: a stuck request cannot stretch the run much


def digit() -> tuple[bytes, np.ndarray]:
    """One digit as PNG (native) and as a (1, 1, 28, 28) FP32 tensor of the same picture (OIP; the
    native API's mean/std normalisation is left out, it changes nothing for timing)."""
    import io

    from PIL import Image

    from loadtest.payloads import digit_png

    png, _ = digit_png(1700)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L").resize((28, 28), Image.Resampling.BILINEAR),
                        dtype=np.float32) / 255.0
    return png, pixels[None, None]


def make_callers(url: str, grpc_port: int, png: bytes, x: np.ndarray):
    """name -> factory of a per-thread callable doing one request (each thread owns its client)."""
    import requests
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    host = urlparse(url).netloc

    def native():
        session = requests.Session()

        def call():
            r = session.post(f"{url}/classify", files={"image": ("d.png", png, "image/png")}, timeout=TIMEOUT)
            r.raise_for_status()
        return call

    def rest(binary: bool):
        def factory():
            client = thttp.InferenceServerClient(host, network_timeout=TIMEOUT)
            i = thttp.InferInput("image", list(x.shape), "FP32")
            i.set_data_from_numpy(x, binary_data=binary)
            out = [thttp.InferRequestedOutput("probabilities", binary_data=binary)]

            def call():
                client.infer("classify", [i], outputs=out).as_numpy("probabilities")
            return call
        return factory

    def grpc():
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        i = tgrpc.InferInput("image", list(x.shape), "FP32")
        i.set_data_from_numpy(x)

        def call():
            client.infer("classify", [i], client_timeout=TIMEOUT).as_numpy("probabilities")
        return call

    return {"native HTTP /classify (PNG)": native, "OIP REST JSON": rest(False),
            "OIP REST binary": rest(True), "OIP gRPC": grpc}


def run(factory, seconds: float, concurrency: int, warmup: float = 1.0) -> dict:
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    first_error: list[str] = []
    start_at = time.monotonic() + warmup
    stop_at = start_at + seconds

    def worker(k: int):
        call = factory()
        while True:
            t0 = time.monotonic()
            if t0 >= stop_at:
                return
            try:
                call()
            except Exception as exc:  # counted, never fatal: the run stays bounded
                errors[k] += 1
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            t1 = time.monotonic()
            if t0 >= start_at:
                latencies[k].append(t1 - t0)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + warmup + 2 * TIMEOUT)
    all_ms = np.array([v for per in latencies for v in per]) * 1000
    return {"requests": all_ms.size, "errors": sum(errors), "rps": all_ms.size / seconds,
            "p50": float(np.percentile(all_ms, 50)) if all_ms.size else float("nan"),
            "p99": float(np.percentile(all_ms, 99)) if all_ms.size else float("nan"),
            "first_error": first_error[0] if first_error else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--grpc-port", type=int, default=9000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost"):
        parser.error("talks to 127.0.0.1 only")
    if not 0 < args.seconds <= 600 or not 0 < args.concurrency <= 256:
        parser.error("--seconds in (0, 600], --concurrency in (0, 256]")

    png, x = digit()
    print(f"classify, {args.concurrency} concurrent clients, {args.seconds:g} s per protocol, one digit per request")
    print(f"{'protocol':<30} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} {'errors':>7}")
    failed = False
    for name, factory in make_callers(args.url, args.grpc_port, png, x).items():
        r = run(factory, args.seconds, args.concurrency)
        failed |= r["errors"] > 0 or r["requests"] == 0
        print(f"{name:<30} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['requests']:>9} {r['errors']:>7}",
              flush=True)
        if r["first_error"]:
            print(f"  first error: {r['first_error']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
