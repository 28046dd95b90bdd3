"""The container image, built and run for real with podman: `make image`'s script builds it from a
bento of the session's quick models on a base made from Debian's packages; the image then serves
every protocol on loopback (the smoke check of loadtest/smoke.py) as a non-root user with a
read-only root file system, holds none of the training dependencies, stops gracefully on SIGTERM
with a request in flight, and the CPU overlay's Deployment runs under `podman kube play`.

These need podman (and root, for the base image and host networking): .ci/run installs it from
Debian's packages; elsewhere run `sudo deploy/image/tools.sh` first."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

from loadtest.payloads import png_bytes
from loadtest.servers import free_port
from loadtest.smoke import Smoke, report
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(
    shutil.which("podman") is None or os.geteuid() != 0,
    reason="the image tests need podman as root: .ci/run installs it; here run `deploy/image/tools.sh` as root, "
           "then `make test`")
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "deploy/image/containers.conf")}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=PODMAN_ENV, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} exited {result.returncode}: {result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def image(built_models, tmp_path_factory) -> str:
    """deploy/image/build.sh (what `make image` runs) on the session's store of quick models."""
    log = tmp_path_factory.mktemp("image") / "build.log"
    env = {**PODMAN_ENV, "IMAGE": "localhost/model-suite-test", "IMAGE_TAG": uuid.uuid4().hex[:8],
           "BENTOML": str(Path(sys.executable).parent / "bentoml")}
    with open(log, "w") as stderr:
        result = subprocess.run([str(REPO / "deploy/image/build.sh")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, timeout=900)
    assert result.returncode == 0, log.read_text()[-5000:]
    tag = result.stdout.strip().splitlines()[-1]
    print(log.read_text().splitlines()[-1])  # build time and size
    yield tag
    podman("rmi", "--force", tag, "localhost/model-suite-test:latest", check=False)


def wait_ready(url: str, log, running=lambda: True, timeout: float = 180) -> float:
    """Seconds until ``url``/readyz answers 200; fails with ``log()`` if the server stops or times out."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        assert running(), log()
        assert time.monotonic() - started < timeout, f"not ready in {timeout:.0f} s:\n{log()}"
        time.sleep(0.5)


@contextlib.contextmanager
def container(image: str, *options: str):
    """The image on free loopback ports with the production hardening: read-only root, a tmpfs on
    /tmp, no capabilities, no privilege escalation; yields (name, Smoke) once /readyz answers."""
    port, grpc_port, probe_port = free_port(), free_port(), free_port()
    name = f"suite-test-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, "--network=host", "--read-only", "--tmpfs", "/tmp:rw,size=256m",
           "--cap-drop=ALL", "--security-opt=no-new-privileges",
           "-e", f"SUITE_GRPC_PORT={grpc_port}", "-e", f"SUITE_PROBE_PORT={probe_port}", "-e", "SUITE_HOST=127.0.0.1",
           "-e", "SUITE_WORKERS=2", "-e", "SUITE_INTRA_OP_THREADS=1", *options,
           image, "serve", "--host", "127.0.0.1", "--port", str(port))
    try:
        url = f"http://127.0.0.1:{port}"
        seconds = wait_ready(url, lambda: podman("logs", name).stderr[-4000:],
                             lambda: json.loads(podman("inspect", name).stdout)[0]["State"]["Running"])
        print(f"{image} ready in {seconds:.1f} s")
        yield name, Smoke(url, grpc_port, probe_port)
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)


def test_image_serves_every_protocol_hardened(image):
    with container(image) as (name, smoke):
        checks = smoke.run()
        assert all(c.ok for c in checks), report(checks)
        assert {c.name for c in checks} >= {"native POST /classify", "OIP REST infer segment", "OIP gRPC infer generate",
                                           "OpenAI completions", "probe port GET /readyz"}
        assert podman("exec", name, "id", "-u").stdout.strip() == "1034"  # BentoML's bentoml user, not root
        assert podman("exec", name, "touch", "/home/bentoml/x", check=False).returncode != 0  # read-only root
        top = podman("top", name, "pid", "comm").stdout
        assert "dumb-init" in top.splitlines()[1], top  # PID 1 is the init process


def test_image_has_serving_dependencies_only(image):
    probe = ("import importlib.util as u; import onnxruntime, tritonclient.grpc, tokenizers, bentoml; "
             "print([m for m in ('torch', 'transformers', 'sklearn', 'skimage') if u.find_spec(m)])")
    result = podman("run", "--rm", "--network=none", "--entrypoint", "/app/.venv/bin/python", image, "-c", probe)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_image_drains_on_sigterm(image):
    """`podman stop` sends SIGTERM to PID 1 (dumb-init), which hands it to BentoML: the request in
    flight finishes, then the container exits before the stop timeout."""
    picture = png_bytes((np.random.default_rng(1).random((1024, 1024)) * 255).astype(np.uint8))
    with container(image) as (name, smoke):
        answers: list[int] = []
        request = threading.Thread(target=lambda: answers.append(requests.post(
            f"{smoke.url}/denoise", data=picture, headers={"Content-Type": "image/png"}, timeout=120).status_code))
        request.start()
        time.sleep(0.5)
        started = time.monotonic()
        podman("stop", "--time", "40", name, timeout=60)
        stopped = time.monotonic() - started
        request.join(60)
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert answers == [200], answers
        assert stopped < 35, f"took {stopped:.1f} s: SIGTERM was not handled, podman killed it"
        assert state["ExitCode"] == 0, (state, podman("logs", name).stderr[-3000:])


def kube_manifest(image: str, port: int, grpc_port: int, probe_port: int) -> str:
    """The CPU overlay's Deployment as rendered for the cluster, with the test image, one replica
    and free loopback ports (podman's pods share the host network here); the rest (security
    context, read-only root with its emptyDir, probes, resources, the downward-API worker count)
    as rendered."""
    import yaml

    rendered = subprocess.run(["kubectl", "kustomize", str(REPO / "deploy/overlays/cpu")], capture_output=True,
                              text=True, check=True).stdout
    deployment = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    deployment["spec"]["replicas"] = 1
    spec = deployment["spec"]["template"]["spec"]
    spec["hostNetwork"] = True
    suite = next(c for c in spec["containers"] if c["name"] == "suite")
    suite["image"] = image
    suite["args"] = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    ports = {"SUITE_GRPC_PORT": grpc_port, "SUITE_PROBE_PORT": probe_port, "SUITE_HOST": "127.0.0.1"}
    suite["env"] = [e for e in suite.get("env", []) if e["name"] not in ports]
    suite["env"] += [{"name": k, "value": str(v)} for k, v in ports.items()]
    # On the host network the declared ports are the real ones, and podman refuses port mappings there.
    assert {p["containerPort"] for p in suite.pop("ports")} == {3000, 9000, 3001}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in suite:
            suite[probe]["httpGet"]["port"] = probe_port
    return yaml.safe_dump(deployment)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) is not installed")
def test_cpu_deployment_runs_under_podman_kube_play(image, tmp_path):
    port, grpc_port, probe_port = free_port(), free_port(), free_port()
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(kube_manifest(image, port, grpc_port, probe_port))
    podman("kube", "play", "--network", "host", str(manifest), timeout=180)
    try:
        smoke = Smoke(f"http://127.0.0.1:{port}", grpc_port, probe_port)
        wait_ready(smoke.url, lambda: podman("pod", "logs", "--latest", check=False).stderr[-4000:])
        checks = smoke.run()
        assert all(c.ok for c in checks), report(checks)
    finally:
        podman("kube", "down", str(manifest), check=False, timeout=120)


def test_image_runs_the_batch_job(image, tmp_path):
    """deploy/batch/job.yaml's command, working folder and environment, as written there, in the
    image with the same hardening: shard 0 of 4 of a manifest, by the models built into the image."""
    import yaml

    job = yaml.safe_load((REPO / "deploy/batch/job.yaml").read_text())
    (spec,) = job["spec"]["template"]["spec"]["containers"]
    values = {"SHARD": "0", "CPUS": "1"}
    expand = lambda text: text.replace("$(SHARD)", values["SHARD"]).replace("$(CPUS)", values["CPUS"])  # noqa: E731
    env = [f"{e['name']}={e['value']}" for e in spec["env"] if "value" in e] + [f"{k}={v}" for k, v in values.items()]
    data = tmp_path / "data"
    (data / "out").mkdir(parents=True)
    pixels = (np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)
    for i in range(8):
        (data / f"{i}.png").write_bytes(png_bytes(pixels))
    (data / "manifest.jsonl").write_text("".join(json.dumps({"id": f"n{i}", "image": f"{i}.png"}) + "\n"
                                                 for i in range(8)))
    os.chmod(data / "out", 0o777)  # the image's user (uid 1034) writes the results
    result = podman("run", "--rm", "--network=none", "--read-only", "--tmpfs", "/tmp:rw,size=256m", "--cap-drop=ALL",
                    "--security-opt=no-new-privileges", "-v", f"{data}:/data:Z", "-w", spec["workingDir"],
                    *[f"--env={e}" for e in env], "--entrypoint", spec["command"][0], image,
                    *spec["command"][1:], *map(expand, spec["args"]), check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in (data / "out" / "results-0.jsonl").read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == ["n0", "n4"]  # every 4th item from the first
    assert all(line["model"].startswith("classify:") and line["predictions"] for line in lines)
