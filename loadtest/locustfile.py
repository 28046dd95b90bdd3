"""Locust load test over all five APIs. Bounded by the command line, e.g.

    locust -f loadtest/locustfile.py --headless -u 20 -r 10 -t 30s --host http://127.0.0.1:3000

or by a profile that also holds the service-level objectives (`make loadtest`):

    locust --config loadtest/profile.toml --host http://127.0.0.1:3000

Each task checks content, not only the status, so a wrong answer counts as a failure. With
objectives (the ``[tool.suite.slo]`` tables of the --config file, or of --slo-file), the run prints
each API's figures against them and exits 1 when one is missed. Runs distributed as it is
(``--master`` / ``--worker``): the master holds the merged statistics and checks them."""

from __future__ import annotations

import json
import random

from locust import HttpUser, between, events, task
from locust.runners import WorkerRunner

from loadtest.payloads import digit_png, photo_png, scene_png
from loadtest.slo import load_objectives, measured_from_locust, table, violations

PROMPTS = ["The assert statement", "Exceptions are", "A function definition", "The import system"]


class SuiteUser(HttpUser):
    wait_time = between(0.05, 0.2)

    def on_start(self):
        self.digit, self.digit_label = digit_png()
        self.scene, _ = scene_png()
        self.photo, _ = photo_png()

    @task(4)
    def classify(self):
        with self.client.post("/classify", files={"image": ("digit.png", self.digit, "image/png")},
                              data={"top_k": "3"}, catch_response=True) as r:
            if r.status_code != 200 or len(r.json().get("predictions", [])) != 3:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(2)
    def segment(self):
        with self.client.post("/segment", files={"image": ("scene.png", self.scene, "image/png")},
                              catch_response=True) as r:
            if r.status_code != 200 or r.headers.get("content-type") != "image/png":
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(2)
    def denoise(self):
        with self.client.post("/denoise", files={"image": ("photo.png", self.photo, "image/png")},
                              data={"sigma": "25"}, catch_response=True) as r:
            if r.status_code != 200 or r.headers.get("content-type") != "image/png":
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(2)
    def sample(self):
        with self.client.post("/sample", json={"n": 8, "seed": random.randrange(1000)}, catch_response=True) as r:
            if r.status_code != 200 or r.headers.get("content-type") != "image/png":
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(1)
    def generate(self):
        body = {"prompt": random.choice(PROMPTS), "max_new_tokens": 16, "temperature": 0.8, "top_k": 40,
                "seed": random.randrange(1000)}
        with self.client.post("/generate", json=body, catch_response=True) as r:
            if r.status_code != 200 or r.json().get("usage", {}).get("completion_tokens", 0) < 1:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(1)
    def completions_stream(self):
        """The OpenAI route, streamed: every event parses and the stream ends with [DONE]."""
        body = {"model": "generate", "prompt": random.choice(PROMPTS), "max_tokens": 16, "temperature": 0.8,
                "seed": random.randrange(1000), "stream": True}
        with self.client.post("/v1/completions", json=body, stream=True, catch_response=True,
                              name="/v1/completions stream") as r:
            events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
            if r.status_code != 200 or not events or events[-1] != "[DONE]":
                r.failure(f"{r.status_code}: {events[-1:] or r.text[:200]}")
            elif not all(json.loads(e).get("choices") for e in events[:-1]):
                r.failure(f"an event without choices: {events[:3]}")


@events.init_command_line_parser.add_listener
def _slo_option(parser) -> None:
    parser.add_argument("--slo-file", default="", help="TOML file with [tool.suite.slo] objectives "
                        "(default: the --config file when it is TOML)")


@events.quitting.add_listener
def _check_objectives(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None or isinstance(environment.runner, WorkerRunner):
        return  # a worker's statistics go to the master, which checks them
    configs = options.config if isinstance(options.config, list) else [options.config]
    path = options.slo_file or next((c for c in configs if c and str(c).endswith(".toml")), "")
    if not path:
        return
    objectives = load_objectives(path)
    measured = measured_from_locust(environment.stats)
    print(f"\nservice-level objectives ({path}):\n" + table(objectives, measured))
    missed = violations(objectives, measured)
    for line in missed:
        print(f"MISSED {line}")
    print("objectives: " + ("MISSED" if missed else "all met"))
    if missed:
        environment.process_exit_code = 1
