"""Fuzzing of a running suite: schemathesis over the served OpenAPI document (every native, OpenAI
and Open Inference Protocol REST route) with the not-a-server-error check, and a gRPC fuzz of
malformed ModelInfer requests. ``make fuzz`` runs the long form against a suite it starts:

    python -m loadtest.fuzz --examples 5000 --grpc-requests 5000

and prints, per route, the requests sent and the answers by status; the test suite runs the same
functions with a few examples. Model control routes (/v2/repository/...) are left out: loading and
unloading is tested on its own, and fuzzing them would unload the models the rest is fuzzing."""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

EXCLUDED_PATHS = "^/v2/repository/"


@dataclass
class FuzzReport:
    requests: dict[str, collections.Counter] = field(default_factory=dict)  # route -> status -> count
    server_errors: list[str] = field(default_factory=list)  # what went wrong, one line each
    seconds: float = 0.0

    def add(self, route: str, status: int | str) -> None:
        self.requests.setdefault(route, collections.Counter())[status] += 1

    def table(self) -> str:
        lines = [f"{'route':<52} {'requests':>9}  answers by status"]
        for route, counts in sorted(self.requests.items()):
            spread = ", ".join(f"{s}: {n}" for s, n in sorted(counts.items(), key=lambda kv: str(kv[0])))
            lines.append(f"{route:<52} {sum(counts.values()):>9}  {spread}")
        return "\n".join(lines)


def schemathesis_run(url: str, examples: int, seed: int, workdir: Path, workers: int = 1,
                     report: FuzzReport | None = None) -> FuzzReport:
    """schemathesis on ``{url}/docs.json`` with the not_a_server_error check; the HAR file it writes
    gives every request and answer, which the report counts per route."""
    report = report or FuzzReport()
    har = workdir / "schemathesis.har"
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/docs.json",
               "--checks", "not_a_server_error", "--max-examples", str(examples), "--seed", str(seed),
               "--exclude-path-regex", EXCLUDED_PATHS, "--workers", str(workers), "--request-timeout", "60",
               "--report", "har", "--report-har-path", str(har), "--suppress-health-check", "all",
               "--continue-on-failure"]
    started = time.monotonic()
    run = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                         env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""})
    report.seconds += time.monotonic() - started
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    for entry in entries:
        method, target = entry["request"]["method"], entry["request"]["url"]
        path = "/" + target.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
        status = entry["response"]["status"]
        report.add(f"{method} {_template(path)}", status)
        body = entry["response"].get("content", {}).get("text", "") or ""
        if status >= 500 and status != 503:
            report.server_errors.append(f"{method} {path} -> {status}: {body[:200]}")
        elif status >= 400 and "Traceback" in body:
            # Error bodies only: the text model, trained on Python's docs, writes "Traceback" itself
            # (11 of 5,151 fuzzed /generate answers did in the first full run).
            report.server_errors.append(f"{method} {path} -> {status}: a stack trace in the body")
    if run.returncode != 0 and not report.server_errors:
        # schemathesis exits non-zero for failed checks (counted above) and for its own errors (shown here)
        failures = [line for line in run.stdout.splitlines() if "Server error" in line or "rror" in line][:20]
        if any("Server error" in line for line in failures) or not entries:
            report.server_errors.append("schemathesis: " + " | ".join(failures or run.stdout.splitlines()[-20:]))
    return report


def _template(path: str) -> str:
    parts = path.split("/")
    if len(parts) > 3 and parts[1] == "v2" and parts[2] == "models":
        parts[3] = "{model}"
        if len(parts) > 5 and parts[4] == "versions":
            parts[5] = "{version}"
    if len(parts) > 3 and parts[1] == "v1" and parts[2] == "models":
        parts[3] = "{model}"
    return "/".join(parts)


# ---- gRPC -----------------------------------------------------------------------------------------

DATATYPES = ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "UINT16", "UINT32", "UINT64", "FP16", "FP32",
             "FP64", "BYTES", "", "FP8", "nonsense"]
OK_CODES = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED"}


def malformed_infer_request(rng: random.Random, models: list[str]):
    """A ModelInferRequest that is wrong in one or more random ways (or, now and then, right)."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=rng.choice(models + ["", "nope", "classify:x", "../etc"]),
                                   model_version=rng.choice(["", "", "", "nope", "1"]))
    raw = rng.random() < 0.6
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        tensor = request.inputs.add()
        tensor.name = rng.choice(["image", "noisy", "noise_level", "latent", "class_id", "text_input", "", "x"])
        tensor.datatype = rng.choice(DATATYPES)
        rank = rng.choice([0, 1, 2, 4, 4, 4, 9])
        tensor.shape.extend(rng.choice([1, 2, 28, 64, 0, -1, 2**31, 2**62]) for _ in range(rank))
        if raw:
            size = rng.choice([0, 1, 3, 4, 16, 3136, 12544, 100_000])
            request.raw_input_contents.append(rng.randbytes(size))
        elif tensor.datatype == "BYTES":
            tensor.contents.bytes_contents.extend(rng.randbytes(rng.randint(0, 8)) for _ in range(rng.randint(0, 3)))
        elif tensor.datatype in ("FP32", "FP64", "FP16"):
            tensor.contents.fp32_contents.extend(rng.uniform(-1e6, 1e6) for _ in range(rng.choice([0, 1, 784, 1000])))
        else:
            tensor.contents.int_contents.extend(rng.randint(-2**31, 2**31 - 1) for _ in range(rng.choice([0, 1, 4])))
    if raw and rng.random() < 0.2:
        request.raw_input_contents.append(b"\x00" * 8)  # one more raw blob than inputs
    for _ in range(rng.choice([0, 0, 1, 2])):
        key = rng.choice(["seed", "max_new_tokens", "temperature", "noise_level", "binary_data_output", "x"])
        parameter = request.parameters[key]
        choice = rng.randrange(4)
        if choice == 0:
            parameter.int64_param = rng.choice([-1, 0, 5, 2**62])
        elif choice == 1:
            parameter.double_param = rng.choice([-1.0, 0.5, float("nan"), float("inf")])
        elif choice == 2:
            parameter.string_param = rng.choice(["", "x" * 1000, "5"])
        else:
            parameter.bool_param = rng.random() < 0.5
    for _ in range(rng.choice([0, 0, 1])):
        request.outputs.add().name = rng.choice(["probabilities", "nope", ""])
    return request


def grpc_fuzz(port: int, requests: int, seed: int, models: list[str], report: FuzzReport | None = None) -> FuzzReport:
    """``requests`` malformed ModelInfer calls; any code outside OK_CODES (INTERNAL, UNKNOWN, a
    dropped connection) is a server error."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    report = report or FuzzReport()
    rng = random.Random(seed)
    started = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 2**30)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(requests):
            request = malformed_infer_request(rng, models)
            try:
                stub.ModelInfer(request, timeout=60)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                if code not in OK_CODES or "Traceback" in (exc.details() or ""):
                    report.server_errors.append(f"gRPC ModelInfer {request.model_name!r} -> {code}: "
                                                f"{(exc.details() or '')[:200]}")
            report.add("gRPC ModelInfer", code)
    report.seconds += time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    import requests as http

    from loadtest.servers import suite_to_drive

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="schemathesis examples per operation")
    parser.add_argument("--grpc-requests", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--url", help="fuzz a running suite instead of starting one (needs --grpc-port)")
    parser.add_argument("--grpc-port", type=int)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="suite-fuzz-"))
    with suite_to_drive(args.url, workdir / "serve.log", grpc_port=args.grpc_port) as suite:
        report = schemathesis_run(suite.url, args.examples, args.seed, workdir)
        if suite.grpc_port:
            grpc_fuzz(suite.grpc_port, args.grpc_requests, args.seed,
                      ["classify", "segment", "denoise", "sample", "generate"], report)
        alive = http.get(f"{suite.url}/readyz", timeout=10).status_code
    print(report.table())
    total = sum(sum(c.values()) for c in report.requests.values())
    print(f"\n{total} requests in {report.seconds:.0f} s; server errors: {len(report.server_errors)}; "
          f"/readyz after: {alive}")
    for line in report.server_errors[:30]:
        print("  " + line)
    return 1 if report.server_errors or alive != 200 else 0


if __name__ == "__main__":
    sys.exit(main())
