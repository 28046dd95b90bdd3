"""Servers started as subprocesses on free loopback ports and waited for: what the tests'
``bentoml serve`` fixture and the serving benchmark share."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    grpc_port: int | None
    process: subprocess.Popen
    log_path: Path
    probe_port: int | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, grace: float = 30) -> None:
        """SIGTERM to the whole process group (BentoML's workers too), SIGKILL after ``grace`` s."""
        if self.process.poll() is not None:
            return  # stopped already (a test may stop it itself)
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()


def start_server(command: list[str], *, port: int, env: dict, cwd: Path, log_path: Path,
                 grpc_port: int | None = None, ready_path: str = "/readyz", timeout: float = 240) -> Server:
    """Starts ``command`` (which serves on ``port``) and returns once ``ready_path`` answers 200."""
    import requests

    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", grpc_port, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:4]} exited with {process.returncode}:\n{server.log()[-4000:]}")
        try:
            if requests.get(server.url + ready_path, timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"not ready in {timeout}s:\n{server.log()[-4000:]}")


def suite_worker_count(environ: Mapping[str, str]) -> int:
    """How many worker processes ``bentoml serve`` of the suite starts under ``environ``
    (``SUITE_WORKERS`` through the rule ``ServingConfig.worker_count`` uses; the load tests import
    nothing from services)."""
    from common.resources import worker_count

    return worker_count(int(environ.get("SUITE_WORKERS") or 0))


def start_suite(env_overrides: dict, log_path: Path, cwd: Path = REPO, timeout: float = 240,
                ready_path: str = "/readyz") -> Server:
    """``bentoml serve`` of the suite in ``cwd`` on free loopback HTTP and gRPC ports, with
    ``SUITE_*`` settings from ``env_overrides`` on top of this process's environment."""
    port, grpc_port, probe_port = free_port(), free_port(), free_port()
    if "BENTOML_HOME" not in env_overrides and os.environ.get("BENTOML_HOME"):
        # A home of its own around the shared store: `bentoml serve` empties
        # <BENTOML_HOME>/prometheus_multiproc_dir at start, which would freeze the /metrics of every
        # other server started from the same home.
        env_overrides = {**env_overrides, "BENTOML_HOME": str(own_home(Path(os.environ["BENTOML_HOME"]), log_path))}
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "SUITE_GRPC_PORT": str(grpc_port),
           "SUITE_HTTP_PORT": str(port), "SUITE_PROBE_PORT": str(probe_port), "SUITE_HOST": "127.0.0.1",
           **env_overrides}
    command = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = start_server(command, port=port, grpc_port=grpc_port, env=env, cwd=cwd, log_path=log_path,
                          timeout=timeout, ready_path=ready_path)
    server.probe_port = probe_port
    if ready_path == "/readyz":  # the caller waits for readiness, so for every worker's
        try:
            wait_every_worker_ready(server, suite_worker_count(env), timeout=timeout)
        except BaseException:
            server.stop()
            raise
    return server


def wait_every_worker_ready(server: Server, workers: int, timeout: float = 120) -> None:
    """Returns once every worker has started listening and the probe port has answered ready
    ``8 × workers`` times in a row.

    The main port's /readyz answers from whichever worker has started accepting. The probe port is
    bound by every worker with SO_REUSEPORT, but only once it has started: until then probes all
    reach the others, and right after, one may reach it while it loads its models ("starting").
    So first each worker's start-up line ("worker N listening", services/service.py), then
    probes, each on a fresh connection, which the kernel hashes onto a worker afresh: a worker still
    starting is missed by all of them with probability (1 - 1/workers)^(8 × workers) < e^-8."""
    import requests

    deadline = time.monotonic() + timeout

    def check_alive() -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every worker ready in {timeout}s:\n{server.log()[-4000:]}")
        if server.process.poll() is not None:
            raise RuntimeError(f"the suite exited with {server.process.returncode}:\n{server.log()[-4000:]}")

    def all_listening() -> bool:
        text = server.log()
        # (or, from a checkout before that line, which bench_serving --suite-dir may start, BentoML's own)
        return (len(set(re.findall(r"\] worker (\d+) listening", text))) >= workers
                or text.count("Completed async startup hook: start_listeners") >= workers)

    while not all_listening():
        check_alive()
        time.sleep(0.1)
    needed, in_a_row = 8 * max(1, workers), 0
    url = f"http://127.0.0.1:{server.probe_port}/readyz"
    while in_a_row < needed:
        check_alive()
        try:
            ready = requests.get(url, timeout=2, headers={"Connection": "close"}).status_code == 200
        except requests.RequestException:
            ready = False
        in_a_row = in_a_row + 1 if ready else 0
        if not ready:
            time.sleep(0.2)


def own_home(shared: Path, log_path: Path) -> Path:
    """A BentoML home beside ``log_path`` whose model store is ``shared``'s (a link, so exports
    into the shared store are seen) and whose metrics folder and control state are its own."""
    home = log_path.parent / f"{log_path.stem}-home"
    home.mkdir(parents=True, exist_ok=True)
    store = home / "models"
    if not store.exists():
        (shared / "models").mkdir(parents=True, exist_ok=True)
        store.symlink_to(shared / "models", target_is_directory=True)
    return home


@dataclass
class RunningSuite:
    """A suite someone else started, given by its addresses."""

    url: str
    grpc_port: int | None = None
    probe_port: int | None = None


@contextlib.contextmanager
def suite_to_drive(url: str | None, log_path: Path, grpc_port: int | None = None, probe_port: int | None = None,
                   cwd: Path = REPO):
    """The running suite at ``url`` (left running), or the one in ``cwd`` started on free ports and
    stopped after."""
    if url:
        yield RunningSuite(url.rstrip("/"), grpc_port, probe_port)
        return
    server = start_suite({}, log_path, cwd=cwd)
    try:
        yield server
    finally:
        server.stop()


def worker_pids(server: Server) -> list[int]:
    """The worker processes of a ``bentoml serve`` (children of its arbiter)."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []
