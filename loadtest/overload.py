"""Overload: /classify driven past saturation, with what a user and a Kubernetes probe see.

1. Saturation: wrk at 4, 8, 16 and 32 connections; the peak goodput (2xx/s) and the fewest
   connections that reach 95 % of it (the saturating concurrency).
2. Overload: wrk at ``--factor`` (4) times that many connections. Meanwhile a sampler sends one
   /classify request at a time on a connection of its own (the latency of admitted requests, and
   of refusals), and two probes ask /readyz every 50 ms on new connections, as a kubelet does:
   one on the main port, one on the probe port.

    python -m loadtest.overload            # starts the suite on free ports (needs wrk)
    python -m loadtest.overload --url http://127.0.0.1:3000 --probe-port 3001

Goals (issue 8): goodput at 4x saturation >= 90 % of the peak, /readyz p99 < 50 ms."""

from __future__ import annotations

import argparse
import http.client
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from loadtest.bench_serving import parse_wrk
from loadtest.payloads import digit_png
from loadtest.servers import REPO, suite_to_drive

COUNTING_LUA = """
wrk.method = "POST"
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "image/png"
local threads = {{}}
setup = function(thread) table.insert(threads, thread) end
init = function(args) ok = 0; refused = 0; other = 0 end
response = function(status, headers, body)
  if status == 200 then ok = ok + 1 elseif status == 503 then refused = refused + 1 else other = other + 1 end
end
done = function(summary, latency, requests)
  local o, r, x = 0, 0, 0
  for _, t in ipairs(threads) do o = o + t:get("ok"); r = r + t:get("refused"); x = x + t:get("other") end
  io.write(string.format("STATUS ok=%d refused=%d other=%d\\n", o, r, x))
end
"""


def wrk_classify(url: str, connections: int, seconds: float, workdir: Path) -> dict:
    import subprocess

    body = workdir / "digit.png"
    body.write_bytes(digit_png()[0])
    script = workdir / "count.lua"
    script.write_text(COUNTING_LUA.format(body=body))
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s",
                          "-s", str(script), f"{url}/classify"], capture_output=True, text=True, check=True).stdout
    result = parse_wrk(out)
    counts = dict(part.split("=") for part in out.split("STATUS ", 1)[1].split()) if "STATUS " in out else {}
    ok, refused, other = (int(counts.get(k, 0)) for k in ("ok", "refused", "other"))
    return {"connections": connections, "goodput": ok / seconds, "ok": ok, "refused": refused, "other": other,
            "p50_ms": result.p50_ms, "p99_ms": result.p99_ms}


class Sampler(threading.Thread):
    """GETs or POSTs in a loop on fresh (probe) or kept (request) connections; latencies by status."""

    def __init__(self, host: str, port: int, path: str, body: bytes | None = None, interval: float = 0.05,
                 fresh_connection: bool = True):
        super().__init__(daemon=True)
        self.host, self.port, self.path, self.body = host, port, path, body
        self.interval, self.fresh = interval, fresh_connection
        self.latencies: dict[int | str, list[float]] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        conn = None
        while not self.stop_event.is_set():
            started = time.perf_counter()
            try:
                if conn is None or self.fresh:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                if self.body is None:
                    conn.request("GET", self.path)
                else:
                    conn.request("POST", self.path, body=self.body, headers={"Content-Type": "image/png"})
                response = conn.getresponse()
                response.read()
                status: int | str = response.status
                if self.fresh:
                    conn.close()
            except OSError as exc:
                status, conn = type(exc).__name__, None
            self.latencies.setdefault(status, []).append((time.perf_counter() - started) * 1000)
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def describe(name: str, sampler: Sampler) -> str:
    parts = []
    for status, values in sorted(sampler.latencies.items(), key=lambda kv: str(kv[0])):
        parts.append(f"{status}: n={len(values)} p50 {percentile(values, 0.5):.1f} ms, p99 {percentile(values, 0.99):.1f} ms, "
                     f"max {max(values):.1f} ms")
    return f"{name:<28} " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running suite (default: start one on free ports)")
    parser.add_argument("--probe-port", type=int, default=3001)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--connections", type=int, help="overload at this many connections instead of --factor "
                                                          "times the saturating concurrency")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--suite-dir", type=Path, default=REPO, help="checkout whose service to start (no --url)")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        parser.error("needs wrk (Debian: apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="suite-overload-"))
    with suite_to_drive(args.url, workdir / "serve.log", probe_port=args.probe_port, cwd=args.suite_dir) as suite:
        url, probe_port = suite.url, suite.probe_port
        host, port = url.removeprefix("http://").split(":")
        wrk_classify(url, 16, 3, workdir)  # warm-up
        sweep = [wrk_classify(url, c, 10, workdir) for c in (4, 8, 16, 32)]
        peak = max(r["goodput"] for r in sweep)
        saturating = min(r["connections"] for r in sweep if r["goodput"] >= 0.95 * peak)
        overload_connections = args.connections or int(args.factor * saturating)
        samplers = {"/readyz (main port)": Sampler(host, int(port), "/readyz"),
                    "/readyz (probe port)": Sampler(host, probe_port, "/readyz"),
                    "/classify sampled": Sampler(host, int(port), "/classify", digit_png()[0], 0.02, False)}
        for s in samplers.values():
            s.start()
        overload = wrk_classify(url, overload_connections, args.seconds, workdir)
        for s in samplers.values():
            s.stop()
    print("saturation sweep (wrk -t1, 10 s each): " + ", ".join(
        f"c={r['connections']} {r['goodput']:.0f}/s (p99 {r['p99_ms']:.0f} ms)" for r in sweep))
    print(f"peak goodput {peak:.0f}/s; saturating concurrency {saturating} connections")
    total = overload["ok"] + overload["refused"] + overload["other"]
    times = overload_connections / saturating
    print(f"overload: {overload_connections} connections ({times:g}x) for {args.seconds:g} s: goodput "
          f"{overload['goodput']:.0f}/s = {overload['goodput'] / peak:.0%} of the peak; 503 share "
          f"{overload['refused'] / max(1, total):.1%}; other non-2xx {overload['other']}; wrk latency (all answers) "
          f"p50 {overload['p50_ms']:.0f} ms, p99 {overload['p99_ms']:.0f} ms")
    for name, sampler in samplers.items():
        print(describe(name, sampler))
    ready = samplers["/readyz (probe port)"].latencies.get(200, [])
    ready_p95, ready_p99 = percentile(ready, 0.95), percentile(ready, 0.99)
    good = overload["goodput"] >= 0.9 * peak and ready_p99 < 50
    print(f"probe-port /readyz p95 {ready_p95:.1f} ms, p99 {ready_p99:.1f} ms")
    print(f"goals: goodput >= 90 % of peak and probe-port /readyz p99 < 50 ms: {'met' if good else 'MISSED'}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
