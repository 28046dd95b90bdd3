"""What the operations features cost the requests they watch, in one run on one machine:

    python -m loadtest.bench_operations                       # BENTOML_HOME: the models (classify, 2+ versions)
    python -m loadtest.bench_operations --seconds 5 --repeats 9 --connections 32

Serves ``classify`` alone (the smallest model: a request's cost is mostly the server's own, so an
overhead shows most), one server per setting, all started first; then drives ``POST /classify``
with ``wrk`` on each in turn, ``--repeats`` rounds (the baseline's own spread is the noise floor):

- ``baseline``: the defaults;
- ``shadow10``: a rollout shadowing 10 % of requests on another stored version of classify (the
  same cost: the shadow run is a real second inference), compared by top-1 agreement;
- ``payload100``: payload logging at 100 % sampling to a file, summaries only (no raw payloads);
- ``batch``: the offline batch command (``python -m services.batch``, as many processes as the
  server's workers) over a folder of ``--batch-items`` digit PNGs of the same size, timed from the
  command's start (model loading included) to its output file.

Prints req/s (the median of ``--repeats`` runs), p50/p99, the ratio of medians, and the median of
the per-round ratios (each setting against the baseline run just before it: the figure the machine's
drift disturbs least)."""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--batch-items", type=int, default=40_000)
    parser.add_argument("--payload-log", type=Path, help="where payload100 writes (default: a temporary folder)")
    parser.add_argument("--only", default="baseline,shadow10,payload100,batch", help="comma-separated rows")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-operations-"))
    base = {"SUITE_MODELS": "classify", "SUITE_DEFAULT_MODELS": "false", "SUITE_VARIANT": "fp32"}
    settings = {
        "baseline": {},
        "shadow10": {"SUITE_ROLLOUTS": f"classify={other_version('classify')};shadow=10"},
        "payload100": {"SUITE_PAYLOAD_LOG": str(args.payload_log or workdir / "payloads.jsonl"),
                       "SUITE_PAYLOAD_LOG_SAMPLE": "1"},
    }
    wanted = set(args.only.split(",")) | {"baseline"}
    settings = {label: env for label, env in settings.items() if label in wanted}
    image, _ = digit_png()
    body, content_type = multipart(image)
    headers = {"Content-Type": content_type}
    # All three servers up at once, driven one at a time in turns (baseline, shadow, payload, baseline,
    # ...): drift of the machine over the run falls on every setting alike. An idle server costs
    # little: its watch loops wake a few times a second.
    servers = {}
    try:
        store = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "models"
        for label, env in settings.items():
            # Its own BENTOML_HOME (BentoML clears its Prometheus folder there at start-up), the shared models.
            home = {"BENTOML_HOME": str(workdir / f"home-{label}"), "SUITE_MODEL_DIR": str(store)}
            servers[label] = start_labelled_suite({**home, **base, **env}, workdir, REPO)
            wrk(servers[label].url, "/classify", body, headers, args.connections, 2, workdir)  # warm-up
        runs = {label: [] for label in settings}
        for _ in range(args.repeats):
            for label, server in servers.items():
                runs[label].append(wrk(server.url, "/classify", body, headers, args.connections, args.seconds,
                                       workdir))
        if "payload100" in settings:
            written = Path(settings["payload100"]["SUITE_PAYLOAD_LOG"])
            records = sum(1 for f in written.parent.glob(written.name + "*") for _ in f.open())
            print(f"payload100: {records} records written")
        if "shadow10" in settings:
            import requests

            metrics = requests.get(servers["shadow10"].url + "/metrics", timeout=10).text
            print("shadow10:", [line for line in metrics.splitlines() if line.startswith("suite_shadow_measure_count")])
    finally:
        for server in servers.values():
            server.stop(grace=10)
    rows = {}
    for label, results in runs.items():
        ordered = sorted(results, key=lambda r: r.rps)
        rows[label] = median = ordered[len(ordered) // 2]
        print(f"{label:15s} {median.rps:8.1f} req/s  p50 {median.p50_ms:6.2f} ms  p99 {median.p99_ms:6.2f} ms  "
              f"runs in turn {[round(r.rps) for r in results]}  errors {sum(r.errors for r in results)}", flush=True)
    batch_rate = run_batch(workdir, args.batch_items) if "batch" in wanted else None
    baseline = rows["baseline"].rps
    print(f"\nbaseline (median): {baseline:.1f} req/s; its runs spread {spread(runs['baseline']):.1%}")
    for label in [label for label in ("shadow10", "payload100") if label in settings]:
        # Paired by round (runs next to each other in time), so the machine's drift cancels.
        paired = sorted(r.rps / b.rps for r, b in zip(runs[label], runs["baseline"]))
        print(f"{label}: {rows[label].rps / baseline:.3f}x the baseline's median throughput; median of the "
              f"rounds' ratios {statistics.median(paired):.3f}x (cost {1 - statistics.median(paired):+.1%}; "
              f"rounds {[round(x, 3) for x in paired]})")
    if batch_rate is not None:
        print(f"batch: {batch_rate:.1f} images/s = {batch_rate / baseline:.2f}x the server's baseline req/s")


def spread(results) -> float:
    values = [r.rps for r in results]
    return (max(values) - min(values)) / statistics.median(values)


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
