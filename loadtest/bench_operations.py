"""What the operations features cost the requests they watch, in one run on one machine:

    python -m loadtest.bench_operations                       # BENTOML_HOME: the models (classify, 2+ versions)
    python -m loadtest.bench_operations --seconds 8 --repeats 3 --connections 32

Serves ``classify`` alone (the smallest model: a request's cost is mostly the server's own, so an
overhead shows most) and drives ``POST /classify`` with ``wrk`` under each setting in turn, the
baseline first and last (their spread is the noise floor):

- ``baseline``: the defaults;
- ``shadow10``: a rollout shadowing 10 % of requests on another stored version of classify (the
  same cost: the shadow run is a real second inference), compared by top-1 agreement;
- ``payload100``: payload logging at 100 % sampling to a file, summaries only (no raw payloads);
- ``batch``: the offline batch command (``python -m services.batch``, as many processes as the
  server's workers) over a folder of ``--batch-items`` digit PNGs of the same size, timed from the
  command's start (model loading included) to its output file.

Prints req/s (the median of ``--repeats`` runs), p50/p99 and the ratio to the baseline's mean."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from loadtest.bench_serving import REPO, multipart, start_labelled_suite, wrk
from loadtest.payloads import digit_png


def other_version(model: str) -> str:
    """An older stored version of ``model`` (the shadow's candidate)."""
    import bentoml

    versions = sorted(bentoml.models.list(model), key=lambda m: m.info.creation_time, reverse=True)
    if len(versions) < 2:
        raise SystemExit(f"{model} has one stored version; export it again for a second (python -m export {model})")
    return f"{model}:{versions[1].tag.version}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--batch-items", type=int, default=40_000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-operations-"))
    base = {"SUITE_MODELS": "classify", "SUITE_DEFAULT_MODELS": "false", "SUITE_VARIANT": "fp32"}
    settings = {
        "baseline": {},
        "shadow10": {"SUITE_ROLLOUTS": f"classify={other_version('classify')};shadow=10"},
        "payload100": {"SUITE_PAYLOAD_LOG": str(workdir / "payloads.jsonl"), "SUITE_PAYLOAD_LOG_SAMPLE": "1"},
        "baseline again": {},
    }
    image, _ = digit_png()
    body, content_type = multipart(image)
    rows = {}
    for label, env in settings.items():
        server = start_labelled_suite({**base, **env}, workdir, REPO)
        try:
            wrk(server.url, "/classify", body, {"Content-Type": content_type}, args.connections, 2, workdir)  # warm-up
            runs = [wrk(server.url, "/classify", body, {"Content-Type": content_type}, args.connections,
                        args.seconds, workdir) for _ in range(args.repeats)]
            if label == "payload100":
                records = sum(1 for f in workdir.glob("payloads.jsonl*") for _ in f.open())
                print(f"payload100: {records} records written")
            if label == "shadow10":
                import requests

                metrics = requests.get(server.url + "/metrics", timeout=10).text
                compared = [line for line in metrics.splitlines() if line.startswith("suite_shadow_measure_count")]
                print(f"shadow10: {compared}")
        finally:
            server.stop(grace=10)
        runs.sort(key=lambda r: r.rps)
        median = runs[len(runs) // 2]
        rows[label] = median
        errors = sum(r.errors for r in runs)
        print(f"{label:15s} {median.rps:8.1f} req/s  p50 {median.p50_ms:6.2f} ms  p99 {median.p99_ms:6.2f} ms  "
              f"runs {[round(r.rps) for r in runs]}  errors {errors}", flush=True)
    batch_rate = run_batch(workdir, args.batch_items)
    baseline = statistics.mean([rows["baseline"].rps, rows["baseline again"].rps])
    print(f"\nbaseline (mean of first and last): {baseline:.1f} req/s; spread "
          f"{abs(rows['baseline'].rps - rows['baseline again'].rps) / baseline:.1%}")
    for label in ("shadow10", "payload100"):
        print(f"{label}: {rows[label].rps / baseline:.3f}x the baseline's throughput "
              f"(cost {1 - rows[label].rps / baseline:+.1%})")
    print(f"batch: {batch_rate:.1f} images/s = {batch_rate / baseline:.2f}x the server's baseline req/s")


def run_batch(workdir: Path, items: int) -> float:
    """Images/s of the batch command over ``items`` 64x64 digit PNGs (wall time of the command)."""
    import subprocess
    import sys
    import time

    import numpy as np
    from sklearn.datasets import load_digits

    from loadtest.payloads import png_bytes

    digits = load_digits().images
    folder = workdir / "digits"
    for i in range(items):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = np.kron((digits[i % len(digits)] / 16 * 255).astype(np.uint8), np.ones((8, 8), np.uint8))
        (sub / f"{i:06d}.png").write_bytes(png_bytes(pixels))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "services.batch", "classify", str(folder), str(workdir / "batch.jsonl"),
                    "--quiet"], check=True, cwd=REPO)
    rate = items / (time.perf_counter() - started)
    print(f"batch          {rate:8.1f} images/s  ({items} images, wall time of the command)", flush=True)
    return rate


if __name__ == "__main__":
    main()
