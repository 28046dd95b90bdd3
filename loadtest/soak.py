"""Soak: mixed traffic for a long while (the locustfile's users: every route, streamed text too)
against a suite it starts, sampling each worker process's resident memory every ``--every`` s.

    python -m loadtest.soak --minutes 10

Prints the RSS of each worker at the end of the warm-up and at the end, the growth in between,
and the requests and failures locust counted. Goal (issue 8): growth <= 10 % after warm-up."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest.servers import REPO, start_suite, worker_pids


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=1.0)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--every", type=float, default=10.0)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="suite-soak-"))
    server = start_suite({}, workdir / "serve.log")
    seconds = args.minutes * 60
    try:
        pids = worker_pids(server)
        locust = subprocess.Popen(
            [str(Path(sys.executable).parent / "locust"), "-f", str(REPO / "loadtest" / "locustfile.py"), "--headless",
             "-u", str(args.users), "-r", str(args.users), "-t", f"{int(seconds)}s", "--host", server.url,
             "--only-summary", "--csv", str(workdir / "soak")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        started = time.monotonic()
        samples: list[tuple[float, dict[int, float | None]]] = []
        while locust.poll() is None:
            samples.append((time.monotonic() - started, {pid: rss_mb(pid) for pid in pids}))
            time.sleep(args.every)
        output = locust.stdout.read()
        replaced = sorted(set(worker_pids(server)) ^ set(pids))
    finally:
        server.stop()
    warm = next((s for t, s in samples if t >= args.warmup_minutes * 60), samples[0][1])
    end = samples[-1][1]
    print(f"soak: {args.minutes:g} min of mixed traffic, {args.users} locust users, RSS every {args.every:g} s")
    worst = 0.0
    for pid in pids:
        if warm.get(pid) and end.get(pid):
            growth = end[pid] / warm[pid] - 1
            worst = max(worst, growth)
            trace = " ".join(f"{s[pid]:.0f}" for _, s in samples[::max(1, len(samples) // 12)] if s.get(pid))
            print(f"worker {pid}: {warm[pid]:.0f} MB after warm-up -> {end[pid]:.0f} MB at the end ({growth:+.1%}); "
                  f"samples: {trace}")
        else:
            print(f"worker {pid}: gone during the soak")
    if replaced:
        print(f"workers replaced during the soak: {replaced}")
    stats = (workdir / "soak_stats.csv").read_text().splitlines() if (workdir / "soak_stats.csv").exists() else []
    aggregated = [line for line in stats if ",Aggregated," in line]
    if aggregated:
        fields = aggregated[0].split(",")
        print(f"locust: {fields[2]} requests, {fields[3]} failures, {float(fields[9]):.1f} req/s")
    else:
        print(output[-3000:])
    good = worst <= 0.10 and not replaced
    print(f"goal: RSS growth <= 10 % after warm-up: {'met' if good else 'MISSED'} (worst {worst:+.1%})")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
