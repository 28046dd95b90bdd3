"""Shared fixtures: quick-profile models trained and exported once per session into a private
artifacts folder and BentoML store, and a real `bentoml serve` on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before anything imports bentoml: a private store, never the user's.
_TMP = Path(tempfile.mkdtemp(prefix="suite-tests-"))
os.environ["BENTOML_HOME"] = str(_TMP / "bentoml")
os.environ["SUITE_ARTIFACTS"] = str(_TMP / "artifacts")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Built:
    metrics: dict
    parity: float
    tag: str


@pytest.fixture(scope="session")
def built_models() -> dict[str, Built]:
    """Every family: quick-profile training, export with parity check, saved to the store."""
    from export.onnx_export import export_onnx, save_to_store
    from training.__main__ import run
    from training.registry import FAMILIES

    built = {}
    for name, family in FAMILIES.items():
        metrics = run(name, "quick", progress=False)
        result = export_onnx(family)
        built[name] = Built(metrics, result.parity_max_abs_diff, save_to_store(result, family))
    return built


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    grpc_port: int
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not ready in {timeout}s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def server(built_models) -> Server:
    """A real `bentoml serve` of bentofile.yaml's service, from the quick models, on free ports."""
    port, grpc_port = free_port(), free_port()
    log_path = _TMP / "serve.log"
    env = {**os.environ, "SUITE_GRPC_PORT": str(grpc_port), "SUITE_INTRA_OP_THREADS": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_path)
        yield Server(url, grpc_port, process, log_path)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
