"""Serving benchmark: the suite against a hand-written FastAPI server, in one run on one machine.

    python -m loadtest.bench_serving                   # what `make bench` runs (BENTOML_HOME: the models)
    python -m loadtest.bench_serving --seconds 5 --connections 8,32
    python -m loadtest.bench_serving --classifier resnet50 --only reference,classify   # any stored classifier

Starts, on free loopback ports and one at a time:
* the reference (``loadtest/reference_server.py``: FastAPI + uvicorn + ONNX Runtime, same model file,
  same decode -> preprocess -> run -> top-k) with one worker, then with as many workers as the suite;
* the suite (``bentoml serve``) with its default settings, then again with batching off.
Drives each with the same load generator: ``wrk`` (HTTP/1.1, one thread) for HTTP and ``h2load``
(HTTP/2) for gRPC, both C programs that cost the servers little CPU. Every row sends the same
payload for its whole run: the 64x64 PNG digit (classify), the preprocessed 1x1x28x28 tensor
(Open Inference Protocol), a 64x64 scene (segment), a 64x64 noisy photo at sigma 25 (denoise).
With ``--classifier NAME`` (any stored image classifier: an imported one too) the classify rows
serve that model's graph, in the suite and in the references, with a 451x300 RGB photo (JPEG) as
the payload; ONNX Runtime alone, in this process, at its best batch size, is measured first (the
ceiling a server's overhead is counted against). Before each row one request is checked for content
with a real client, and after it the server must still answer. Prints req/s, p50, p99 and errors
per row, and the ratios to the references."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.servers import Server, free_port, start_server, start_suite, suite_worker_count

REPO = Path(__file__).resolve().parent.parent


def start_labelled_suite(env_overrides: dict, workdir: Path, suite_dir: Path) -> Server:
    label = ("suite" + "".join(f"_{k}={v}" for k, v in env_overrides.items())).replace("/", "_")[:200]
    # start_suite waits for every worker, not only the first: a worker still loading accepts
    # nothing, and wrk's keep-alive connections would all stay with the first.
    return start_suite(env_overrides, workdir / f"{label}.log", cwd=suite_dir)


def start_reference(workers: int, model: Path, cores: int, workdir: Path) -> Server:
    port = free_port()
    ready = Path(tempfile.mkdtemp(dir=workdir))
    env = {**os.environ, "REFERENCE_MODEL": str(model), "REFERENCE_THREADS": str(max(1, cores // workers)),
           "REFERENCE_READY_DIR": str(ready), "REFERENCE_WORKERS": str(workers)}
    command = [sys.executable, "-m", "loadtest.reference_server", "--port", str(port), "--workers", str(workers)]
    return start_server(command, port=port, env=env, cwd=REPO, ready_path="/ready",
                        log_path=workdir / f"reference_{workers}w.log")


# ---- payloads --------------------------------------------------------------------------------------

BOUNDARY = "benchBoundary7MA4YWxkTrZu0gW"


def multipart(image: bytes, **fields: str) -> tuple[bytes, str]:
    body = b""
    for name, value in fields.items():
        body += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    kind = "jpeg" if image.startswith(b"\xff\xd8") else "png"
    body += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.{kind}"\r\n'
             f"Content-Type: image/{kind}\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={BOUNDARY}"


def model_input(png: bytes, contract) -> np.ndarray:
    """The upload preprocessed exactly as the suite does it (the model's input tensor)."""
    from common.imaging import decode_image, to_model_input

    return to_model_input(decode_image(png, "image", 10 ** 8), contract.image)


def oip_binary(x: np.ndarray) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                "Content-Type": "application/octet-stream"}


def grpc_frame(x: np.ndarray) -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name="classify")
    request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    message = request.SerializeToString()
    return b"\0" + struct.pack(">I", len(message)) + message


# ---- load generators -------------------------------------------------------------------------------

@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def wrk(url: str, path: str, body: bytes, headers: dict, connections: int, seconds: float, workdir: Path) -> Result:
    body_file = workdir / "body.bin"
    body_file.write_bytes(body)
    script = workdir / "post.lua"
    lines = ['wrk.method = "POST"', f'local f = io.open("{body_file}", "rb")', "wrk.body = f:read('*all')", "f:close()"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s",
                          "-s", str(script), url + path], capture_output=True, text=True, timeout=seconds + 60).stdout
    return parse_wrk(out)


def _ms(text: str) -> float:
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
    for unit in ("us", "ms", "s", "m"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


def parse_wrk(out: str) -> Result:
    rps = p50 = p99 = float("nan")
    requests = errors = 0
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(words[1])
        elif len(words) == 2 and words[0] == "50%":
            p50 = _ms(words[1])
        elif len(words) == 2 and words[0] == "99%":
            p99 = _ms(words[1])
        elif "requests in" in line:
            requests = int(words[0])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            errors += int(words[-1])
        elif line.strip().startswith("Socket errors:"):
            errors += sum(int(w.rstrip(",")) for w in words if w.rstrip(",").isdigit())
    if np.isnan(rps):
        raise RuntimeError(f"wrk printed no result:\n{out}")
    return Result(rps, p50, p99, requests, errors)


def h2load_grpc(port: int, frame: bytes, connections: int, seconds: float, workdir: Path) -> Result:
    body_file, log_file = workdir / "grpc.bin", workdir / "h2load.log"
    body_file.write_bytes(frame)
    log_file.unlink(missing_ok=True)
    out = subprocess.run(["h2load", "-t1", f"-c{connections}", "-m1", f"-D{seconds:g}", "--warm-up-time=1",
                          "-d", str(body_file), "-H", "content-type: application/grpc", "-H", "te: trailers",
                          f"--log-file={log_file}",
                          f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    rows = [line.split("\t") for line in log_file.read_text().splitlines() if line.strip()]
    # log columns: start time (us since the epoch), HTTP status, duration (us)
    durations = np.array([int(r[2]) for r in rows]) / 1000
    errors = sum(1 for r in rows if r[1] != "200")
    for line in out.splitlines():
        if line.startswith("requests:"):
            words = line.replace(",", "").split()
            errors += int(words[words.index("failed") - 1]) + int(words[words.index("errored") - 1])
    window = (max(int(r[0]) + int(r[2]) for r in rows) - min(int(r[0]) for r in rows)) / 1e6 if rows else seconds
    return Result(len(rows) / max(window, 1e-9), float(np.percentile(durations, 50)) if rows else float("nan"),
                  float(np.percentile(durations, 99)) if rows else float("nan"), len(rows), errors)


# ---- content checks -----------------------------------------------------------------------------------

def onnxruntime_alone(model: Path, x: np.ndarray, threads: int, seconds: float,
                      batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> list[tuple[int, float]]:
    """Images/s of ONNX Runtime alone in this process (``threads`` intra-op threads, its default
    spinning) running ``x`` (one preprocessed image) in batches of each size: no server, no
    decoding, the ceiling for serving this graph on this machine. -> [(batch, images/s)]."""

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = []
    for batch in batches:
        feeds = {name: np.repeat(x, batch, axis=0)}
        session.run(None, feeds)  # warm-up
        images, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            session.run(None, feeds)
            images += batch
        out.append((batch, images / (time.perf_counter() - started)))
    return out


def check_classify(url: str, body: bytes, content_type: str, label: int) -> None:
    import requests

    r = requests.post(url + "/classify", data=body, headers={"Content-Type": content_type}, timeout=30)
    r.raise_for_status()
    assert r.json()["predictions"][0]["class_id"] == label, r.text


def check_oip(url: str, grpc_port: int, x: np.ndarray, label: int) -> None:
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    for module, address in ((thttp, url.removeprefix("http://")), (tgrpc, f"127.0.0.1:{grpc_port}")):
        client = module.InferenceServerClient(address)
        tensor = module.InferInput("image", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        assert int(client.infer("classify", [tensor]).as_numpy("probabilities").argmax()) == label
        client.close()


def check_png(url: str, path: str, body: bytes, content_type: str) -> None:
    import requests

    r = requests.post(url + path, data=body, headers={"Content-Type": content_type}, timeout=60)
    r.raise_for_status()
    assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG"), r.text[:200]


# ---- the run ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the row shows the median run by req/s")
    parser.add_argument("--connections", default="8,32", help="comma-separated connection counts")
    parser.add_argument("--suite-dir", type=Path, default=REPO, help="checkout whose service to start")
    parser.add_argument("--only", default="", help="comma-separated row groups: reference,classify,oip,batching,variants")
    parser.add_argument("--classifier", default="classify",
                        help="the stored classifier the reference and classify rows serve (any image classifier in the "
                             "store, an imported one too); other than the default, only reference and classify rows")
    args = parser.parse_args(argv)
    connections = [int(c) for c in args.connections.split(",")]
    if not 0 < args.seconds <= 120 or not all(0 < c <= 512 for c in connections) or not 1 <= args.repeats <= 9:
        parser.error("--seconds in (0, 120], connections in (0, 512], --repeats in 1..9")
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        parser.error(f"needs {missing} (Debian: apt-get install wrk nghttp2-client)")
    groups = set(filter(None, args.only.split(","))) or {"reference", "classify", "oip", "batching", "variants"}
    if args.classifier != "classify":
        groups &= {"reference", "classify"}  # the other rows need the digit models
    os.environ.setdefault("BENTOML_HOME", str(REPO / ".bentoml"))  # the Makefile's store
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

    import bentoml

    from loadtest.payloads import digit_png, photo_png, scene_png
    from common.resources import available_cores
    from common.runtime import read_contract

    cores = available_cores()
    suite_workers = suite_worker_count(os.environ)
    model = Path(bentoml.models.get(args.classifier).path) / "model.onnx"
    contract = read_contract(model)
    if args.classifier == "classify":
        png, label = digit_png(1700)
        classify_body, classify_type = multipart(png, top_k="5")
        x = model_input(png, contract)
        suite_env: dict[str, str] = {}
    else:  # a photo, and the top-1 class ONNX Runtime gives it (what every server must answer)
        png = photo_jpeg()
        classify_body, classify_type = multipart(png, top_k="5", model=args.classifier)
        x = model_input(png, contract)
        label = int(np.argmax(onnxruntime_output(model, x)))
        # No time budget on the queue: a ResNet-50 request is ~80 ms of CPU, so 32 connections wait
        # over the default 1 s and get 503 at once; the references queue without limit, so the
        # comparison counts answered requests of both under the same (no) admission policy.
        suite_env = {"SUITE_MODELS": args.classifier, "SUITE_MAX_QUEUE_WAIT_MS": "0"}
    oip_body, oip_headers = oip_binary(x)
    frame = grpc_frame(x)
    scene_body, scene_type = multipart(scene_png()[0])
    photo_body, photo_type = multipart(photo_png(size=64)[0], sigma="25")

    print(f"serving benchmark: {cores} cores, suite workers {suite_workers}, {args.repeats} runs of {args.seconds:g} s "
          f"per row (median shown), connections {connections}; load: wrk -t1 (HTTP/1.1), h2load -t1 -m1 (gRPC, HTTP/2)")
    print(f"model {args.classifier}:{model.parent.name} ({contract.architecture}); same machine for servers and load "
          f"generator; suite settings {suite_env or 'defaults'}")
    rows: list[tuple[str, int, Result]] = []
    quality: dict[str, str] = {}  # row name -> the variant's held-out figure (its gate, from the store)
    alone: list[tuple[int, float]] = []
    if "classify" in groups:  # first, on a quiet machine: the ceiling
        alone = onnxruntime_alone(model, x, cores, min(args.seconds, 5.0))
        print("  onnxruntime alone, in process, " + ", ".join(f"batch {b}: {rps:.1f} images/s" for b, rps in alone),
              flush=True)

    def row(name: str, c: int, measure) -> None:
        runs = sorted((measure() for _ in range(args.repeats)), key=lambda r: r.rps)
        result = runs[len(runs) // 2]
        result.errors = sum(r.errors for r in runs)
        rows.append((name, c, result))
        print(f"  {name:<38} c={c:<3} {result.rps:8.1f} req/s  p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms"
              f"  {result.requests:7d} requests  {result.errors} errors", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    try:
        if "reference" in groups:
            for workers in sorted({1, suite_workers}):
                ref = start_reference(workers, model, cores, workdir)
                try:
                    check_classify(ref.url, classify_body, classify_type, label)
                    for c in connections:
                        row(f"reference FastAPI {workers}w /classify", c, lambda: wrk(
                            ref.url, "/classify", classify_body, {"Content-Type": classify_type}, c, args.seconds, workdir))
                    check_classify(ref.url, classify_body, classify_type, label)
                finally:
                    ref.stop()
        for batching, wanted in (("true", groups & {"classify", "oip", "batching"}), ("false", groups & {"batching"})):
            if not wanted:
                continue
            # fp32, the graph the reference serves, whatever variants the store holds
            suite = start_labelled_suite({"SUITE_BATCHING": batching, "SUITE_VARIANT": "fp32", **suite_env}, workdir,
                                         args.suite_dir)
            try:
                if batching == "true" and "classify" in groups:
                    check_classify(suite.url, classify_body, classify_type, label)
                    for c in connections:
                        row("suite native /classify", c, lambda: wrk(
                            suite.url, "/classify", classify_body, {"Content-Type": classify_type}, c, args.seconds, workdir))
                if batching == "true" and "oip" in groups:
                    check_oip(suite.url, suite.grpc_port, x, label)
                    for c in connections:
                        row("suite OIP REST binary classify", c, lambda: wrk(
                            suite.url, "/v2/models/classify/infer", oip_body, oip_headers, c, args.seconds, workdir))
                    for c in connections:
                        row("suite OIP gRPC classify", c, lambda: h2load_grpc(suite.grpc_port, frame, c, args.seconds, workdir))
                    check_oip(suite.url, suite.grpc_port, x, label)
                if "batching" in groups:
                    for path, body, ctype in (("/segment", scene_body, scene_type), ("/denoise", photo_body, photo_type)):
                        check_png(suite.url, path, body, ctype)
                        for c in connections:
                            row(f"suite {path} batching={batching}", c, lambda: wrk(
                                suite.url, path, body, {"Content-Type": ctype}, c, args.seconds, workdir))
                        check_png(suite.url, path, body, ctype)
            finally:
                suite.stop()
        if "variants" in groups:
            payloads = {"classify": (png, {"top_k": "5"}), "segment": (scene_png()[0], {}),
                        "denoise": (photo_png(size=64)[0], {"sigma": "25"})}
            # fp32 for a plain model name; each variant by its own name, side by side in one server
            variants = {family: stored_variants(family) for family in payloads}
            env = {"SUITE_VARIANT": "fp32"}
            if os.environ.get("SUITE_MODELS"):  # a chosen set of models: the variants' own names join it
                named = [n for found in variants.values() for _, n, _ in found]
                env["SUITE_MODELS"] = ",".join(dict.fromkeys([*os.environ["SUITE_MODELS"].split(","), *named]))
            suite = start_labelled_suite(env, workdir, args.suite_dir)
            try:
                for family, (image, fields) in payloads.items():
                    for variant, name, gate in variants[family]:
                        body, ctype = multipart(image, model=name, **fields)
                        if family == "classify":
                            check_classify(suite.url, body, ctype, label)
                        else:
                            check_png(suite.url, f"/{family}", body, ctype)
                        row(f"suite /{family} variant={variant}", connections[0], lambda: wrk(
                            suite.url, f"/{family}", body, {"Content-Type": ctype}, connections[0], args.seconds, workdir))
                        quality[f"suite /{family} variant={variant}"] = gate
            finally:
                suite.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    summarize(rows, suite_workers, quality)
    if alone:
        batch, best = max(alone, key=lambda a: a[1])
        for name, c, r in rows:
            if name == "suite native /classify":
                print(f"suite /classify c={c}: {r.rps:.1f} images/s = {r.rps / best:.2f} of ONNX Runtime alone at its best "
                      f"batch ({batch}: {best:.1f} images/s)")
    return 1 if any(r.errors for _, _, r in rows) else 0


def onnxruntime_output(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0][0]


def photo_jpeg() -> bytes:
    """scikit-image's cat photo (451x300 RGB) as a JPEG of quality 90: what a client uploads."""
    import io

    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def stored_variants(family: str) -> list[tuple[str, str, str]]:
    """(variant, served name, quality figure) for the family's default model and each export
    variant of it in the store (its gate's figure; fp32's is the one the gates compared with)."""
    import bentoml

    found = [("fp32", family, "")]
    for m in bentoml.models.list():
        meta = m.info.metadata
        if meta.get("variant_of") == family and m.tag.name not in {n for _, n, _ in found}:
            gate = meta.get("gate") or {}
            found.append((meta["variant"], m.tag.name, f"{gate.get('metric')} {gate.get('value', float('nan')):.4f}"))
            if not found[0][2]:
                found[0] = ("fp32", family, f"{gate.get('metric')} {gate.get('fp32', float('nan')):.4f}")
    return found


def summarize(rows: list[tuple[str, int, Result]], suite_workers: int, quality: dict[str, str] | None = None) -> None:
    by = {(name, c): r for name, c, r in rows}
    ref1 = {c: r for (name, c), r in by.items() if name.startswith("reference FastAPI 1w ")}
    refn = {c: r for (name, c), r in by.items() if name.startswith(f"reference FastAPI {suite_workers}w ")}
    print()
    print(f"| server and route | conns | req/s | p50 ms | p99 ms | errors | vs reference 1w | vs reference {suite_workers}w |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, c, r in rows:
        same_work = "classify" in name  # the references only classify
        ratio1 = f"{r.rps / ref1[c].rps:.2f}x" if same_work and c in ref1 else "-"
        ration = f"{r.rps / refn[c].rps:.2f}x" if same_work and c in refn else "-"
        print(f"| {name} | {c} | {r.rps:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors} | {ratio1} | {ration} |")
    variant_rows = [(name, c, r) for name, c, r in rows if "variant=" in name]
    if variant_rows:
        print()
        print("| route | variant | conns | req/s | p50 ms | p99 ms | vs fp32 | held-out figure |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, c, r in variant_rows:
            route, variant = name.removeprefix("suite ").split(" variant=")
            fp32 = by.get((f"suite {route} variant=fp32", c))
            ratio = f"{r.rps / fp32.rps:.2f}x" if fp32 else "-"
            print(f"| {route} | {variant} | {c} | {r.rps:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {ratio} | "
                  f"{(quality or {}).get(name) or '-'} |")
    for path in ("/segment", "/denoise"):
        for c in sorted({c for _, c, _ in rows}):
            on, off = by.get((f"suite {path} batching=true", c)), by.get((f"suite {path} batching=false", c))
            if on and off:
                print(f"{path} c={c}: batching on / off = {on.rps / off.rps:.2f}x req/s")


if __name__ == "__main__":
    sys.exit(main())
