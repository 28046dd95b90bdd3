"""Records a load ramp's metrics timeline: what an autoscaler would read from one pod while the
offered load climbs from below its capacity to 4x it (tests/test_autoscaling.py replays it).

    python -m loadtest.record_ramp --model resnet50 --out tests/data/ramp-resnet50-20s.json
    python -m loadtest.record_ramp --model resnet50 --ramp-s 120 --hold-s 0 --out tests/data/ramp-resnet50-120s.json

Serves ``--model`` alone (``bentoml serve``, as many workers as cores), measures its capacity
(requests/s at 16 connections, closed loop, ``--calibrate-s``), then offers an open-loop ramp from
0.25x to 4x that capacity over ``--ramp-s`` seconds: locust users that each send one request a
second (``constant_throughput(1)``), the user count set every second. Every second it samples the
requests answered and refused, the requests waiting in the batchers (``suite_queue_depth`` from
/metrics, summed over the workers) and the CPU the server's process tree used (a fraction of the
cores). A model with a low capacity keeps the load generator's own CPU small beside the server's."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from loadtest.bench_serving import REPO, multipart, start_labelled_suite


def tree_cpu_seconds(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def queue_depth(url: str) -> float:
    import requests

    text = requests.get(url + "/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(r"^suite_queue_depth\{[^}]*\} (\S+)$", text, re.M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibrate-s", type=float, default=15.0)
    parser.add_argument("--ramp-s", type=int, default=20, help="seconds from 0.25x to 4x")
    parser.add_argument("--hold-s", type=int, default=60, help="seconds at 4x after the ramp")
    args = parser.parse_args()

    import os
    import tempfile

    import gevent
    from locust import HttpUser, constant_throughput, task
    from locust.env import Environment

    from common.resources import available_cores
    from loadtest.bench_serving import wrk
    from loadtest.payloads import photo_png

    workdir = Path(tempfile.mkdtemp(prefix="ramp-"))
    image, _ = photo_png("camera", 224)
    body, content_type = multipart(image)
    server = start_labelled_suite({"SUITE_MODELS": args.model, "SUITE_DEFAULT_MODELS": "false"}, workdir, REPO)
    try:
        wrk(server.url, "/classify", body, {"Content-Type": content_type}, 16, 3, workdir)  # warm-up
        capacity = wrk(server.url, "/classify", body, {"Content-Type": content_type}, 16, args.calibrate_s,
                       workdir).rps
        print(f"{args.model}: capacity {capacity:.1f} req/s (16 connections, closed loop)", flush=True)

        refusals = [0]

        class Client(HttpUser):
            wait_time = constant_throughput(1)
            host = server.url

            @task
            def classify(self):
                with self.client.post("/classify", data=body, headers={"Content-Type": content_type},
                                      catch_response=True, timeout=30) as reply:
                    if reply.status_code == 503:
                        refusals[0] += 1
                        reply.success()  # a refusal is a figure of the ramp, not a failure of the recorder

        environment = Environment(user_classes=[Client])
        runner = environment.create_local_runner()
        cores = available_cores()
        samples = []
        last_cpu, last_t = tree_cpu_seconds(server.process.pid), time.monotonic()
        answered_before = refused_before = 0
        for second in range(args.ramp_s + args.hold_s):
            offered = capacity * (0.25 + 3.75 * min(1.0, second / (args.ramp_s - 1)))
            runner.start(max(1, round(offered)), spawn_rate=1000)
            gevent.sleep(1.0)
            now, cpu = time.monotonic(), tree_cpu_seconds(server.process.pid)
            stats = environment.stats.total
            answered = stats.num_requests - stats.num_failures - refusals[0]
            samples.append({"t": second, "offered_rps": round(offered, 2), "users": runner.user_count,
                            "answered_rps": answered - answered_before, "refused_rps": refusals[0] - refused_before,
                            "queue_depth": queue_depth(server.url),
                            "cpu_utilization": round((cpu - last_cpu) / (now - last_t) / cores, 4),
                            "p50_ms": stats.get_current_response_time_percentile(0.5) or 0})
            answered_before, refused_before, last_cpu, last_t = answered, refusals[0], cpu, now
            print(samples[-1], flush=True)
        runner.quit()
    finally:
        server.stop(grace=10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {"model": args.model, "cores": cores, "workers": cores, "capacity_rps": round(capacity, 2),
                "recorded_by": "python -m loadtest.record_ramp " + " ".join(
                    f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
                "machine": f"{os.cpu_count()} cores", "samples": samples}
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(document, indent=0) + "\n")
    temporary.replace(args.out)
    print(f"wrote {args.out} ({len(samples)} samples)")


if __name__ == "__main__":
    main()
