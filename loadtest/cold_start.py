"""Cold start from zero: seconds from starting the suite's container to its first answer, what a
request held by the KEDA HTTP add-on's interceptor waits when the Deployment is at zero replicas
(deploy/overlays/scale-to-zero).

    make image && python -m loadtest.cold_start --image localhost/model-suite:latest --runs 3

Each run starts the image with the production hardening (read-only root, a tmpfs /tmp, no
capabilities; two workers, as a pod with a 2-CPU limit), then sends ``POST /classify`` every 50 ms
from the moment ``podman run`` is called until one answers 200 (a connection refused or a 503 while
the models load is a retry). Prints each run and the median; the container is removed after."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import uuid

import requests

from loadtest.payloads import digit_png
from loadtest.servers import free_port


def one_run(image: str, workers: int) -> tuple[float, float]:
    """-> (seconds to the first answer, seconds `podman run` itself took to return)."""
    port, probe = free_port(), free_port()
    name = f"cold-start-{uuid.uuid4().hex[:8]}"
    png, _ = digit_png()
    started = time.perf_counter()
    subprocess.run(["podman", "run", "--detach", "--name", name, "--network=host", "--read-only",
                    "--tmpfs", "/tmp:rw,size=256m", "--cap-drop=ALL", "--security-opt=no-new-privileges",
                    "-e", "SUITE_GRPC_PORT=0", "-e", f"SUITE_PROBE_PORT={probe}", "-e", "SUITE_HOST=127.0.0.1",
                    "-e", f"SUITE_WORKERS={workers}", "-e", "SUITE_INTRA_OP_THREADS=1",
                    image, "serve", "--host", "127.0.0.1", "--port", str(port)], check=True, capture_output=True)
    launched = time.perf_counter() - started
    try:
        while time.perf_counter() - started < 300:
            try:
                reply = requests.post(f"http://127.0.0.1:{port}/classify", data=png,
                                      headers={"Content-Type": "image/png"}, timeout=5)
                if reply.status_code == 200:
                    return time.perf_counter() - started, launched
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{image}: no answer within 300 s")
    finally:
        subprocess.run(["podman", "rm", "--force", "--time", "5", name], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="localhost/model-suite:latest")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    firsts = []
    for run in range(args.runs):
        first, launched = one_run(args.image, args.workers)
        firsts.append(first)
        print(f"run {run + 1}: first answer {first:.2f} s after `podman run` (which returned after {launched:.2f} s)",
              flush=True)
    print(f"cold start to first answer: median {statistics.median(firsts):.2f} s over {len(firsts)} runs "
          f"(min {min(firsts):.2f}, max {max(firsts):.2f})")


if __name__ == "__main__":
    main()
