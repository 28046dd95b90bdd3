"""Locust load test over all five APIs. Bounded by the command line, e.g.

    locust -f loadtest/locustfile.py --headless -u 20 -r 10 -t 30s --host http://127.0.0.1:3000

Each task checks content, not only the status, so a wrong answer counts as a failure."""

from __future__ import annotations

import random

from locust import HttpUser, between, task

from loadtest.payloads import digit_png, photo_png, scene_png

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
