"""Shared fixtures: quick-profile models trained and exported once per session into a private
artifacts folder and BentoML store, and a real `bentoml serve` on free loopback ports."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtest.servers import Server, start_suite

# Before anything imports bentoml: a private store, never the user's.
_TMP = Path(tempfile.mkdtemp(prefix="suite-tests-"))
os.environ["BENTOML_HOME"] = str(_TMP / "bentoml")
os.environ["SUITE_ARTIFACTS"] = str(_TMP / "artifacts")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
REPO = Path(__file__).resolve().parent.parent


# Test kinds (pyproject's markers): `make test` runs them all, `make test-fast` the unit tests only.
# A test's kind follows from what it needs, so no test file restates it: deploy for the modules that
# check manifests, the bento and the images; server for whatever needs the trained models (they
# are what a served suite is made from); unit for the rest. `slow` is set by hand, on top.
DEPLOY_MODULES = {"test_deploy_manifests", "test_autoscaling", "test_bento", "test_image"}
MODEL_FIXTURES = {"built_models", "second_models", "variant_models", "server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in DEPLOY_MODULES:
            item.add_marker(pytest.mark.deploy)
        elif MODEL_FIXTURES & set(item.fixturenames) or item.get_closest_marker("server"):
            item.add_marker(pytest.mark.server)
        elif not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.unit)


@dataclass
class Built:
    metrics: dict
    parity: float
    tag: str
    family: str


@pytest.fixture(scope="session")
def built_models() -> dict[str, Built]:
    """Every family: quick-profile training, export with parity check, saved to the store."""
    from export.onnx_export import export_onnx, save_to_store
    from training.__main__ import run
    from training.registry import FAMILIES

    built = {}
    for name, family in FAMILIES.items():
        metrics = run(name, "quick", progress=False)
        result = export_onnx(family)
        built[name] = Built(metrics, result.parity_max_abs_diff, save_to_store(result, family), name)
    return built


SECOND = "-seed1"  # every family's second served model: the quick profile again with another seed
# More text models, served by the same routes: the recurrent language models (model name -> architecture).
RECURRENT = {"generate-lstm": "lstm", "generate-gru": "gru"}


@pytest.fixture(scope="session")
def second_models(built_models) -> dict[str, Built]:
    """A second model per family under its own name (family + SECOND), served beside the default,
    for the model choice on every API (as the benchmark models are); and the recurrent text models."""
    from export.onnx_export import export_onnx, save_to_store
    from training.__main__ import run
    from training.artifacts import family_dir
    from training.registry import FAMILIES

    built = {}
    for family_name, family in FAMILIES.items():
        name = family_name + SECOND
        metrics = run(family_name, "quick", train_overrides={"seed": 1}, progress=False, name=name)
        result = export_onnx(family, family_dir(name))
        built[name] = Built(metrics, result.parity_max_abs_diff, save_to_store(result, family, family_dir(name)),
                            family_name)
    for name, architecture in RECURRENT.items():
        family = FAMILIES["generate"]
        metrics = run("generate", "quick", model_overrides={"architecture": architecture}, progress=False, name=name)
        result = export_onnx(family, family_dir(name))
        built[name] = Built(metrics, result.parity_max_abs_diff, save_to_store(result, family, family_dir(name)),
                            "generate")
    return built


def build_bento(env: dict | None = None) -> str:
    """`bentoml build` of bentofile.yaml from the session's store; -> the bento's tag."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1].replace("__tag__:", "")


# Model control is off by default; the tests' servers turn it on with an admin key of their own.
ADMIN_KEY = "admin-key-test-9c1e"
MODEL_CONTROL = {"SUITE_MODEL_CONTROL": "explicit", "SUITE_ADMIN_KEY": ADMIN_KEY}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}


def control(url: str, model: str, action: str, body: dict | None = None, timeout: float = 180):
    """POST /v2/repository/models/<model>/<action> (load or unload) with the admin key."""
    import requests

    return requests.post(f"{url}/v2/repository/models/{model}/{action}", json=body or {}, headers=ADMIN,
                         timeout=timeout)


def scrape(url: str) -> dict[str, float]:
    """GET <url>/metrics -> {'name{label="value",...}': value}, labels in the order served, so a
    test asserts how much a series moved rather than only that it exists."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    series = {}
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            series[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return series


VARIANT = ("sample", "fp16")  # an export variant served beside its fp32 model; the server routes /sample to it


@pytest.fixture(scope="session")
def variant_models(built_models) -> dict[str, Built]:
    """The quick GAN's fp16 variant (gated on class agreement; no speed gate, so the same on any
    machine), stored as sample-fp16."""
    from export.variants import export_variant, save_variant_to_store
    from training.artifacts import family_dir
    from training.registry import FAMILIES

    family_name, variant = VARIANT
    family = FAMILIES[family_name]
    made = export_variant(family, family_dir(family_name), variant)
    tag = save_variant_to_store(made, family, family_dir(family_name))
    return {made.contract.name: Built(made.checkpoint["metrics"], float("nan"), tag, family_name)}


@pytest.fixture(scope="session")
def server(built_models, second_models, variant_models) -> Server:
    """A real `bentoml serve` of bentofile.yaml's service, from the quick models, on free ports:
    fp32 answers by default, except /sample, configured to its fp16 variant."""
    server = start_suite({"SUITE_INTRA_OP_THREADS": "1", "SUITE_VARIANT": "fp32",
                          "SUITE_MODEL_VARIANTS": "=".join(VARIANT), **MODEL_CONTROL}, _TMP / "serve.log", timeout=180)
    try:
        yield server
    finally:
        server.stop(grace=20)
