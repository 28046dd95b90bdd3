"""The documentation is tested like code: every client example in README.md and docs/ runs against a
real `bentoml serve`, the generated references are not stale, links resolve, the README stays short.

An example is a fenced `bash` or `python` block. It runs unless the line before its fence says
`<!-- not run: <reason> -->` (long jobs, image builds, a cluster); `<!-- run: any-status -->` runs it
without failing on an HTTP error status (examples that show a refusal). Each block runs alone in a
fresh folder holding photo.jpg, digit.png and noisy.png, with localhost:3000 / :9000 / :3001
pointed at the test's server, and SUITE_ADMIN_KEY set."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY, MODEL_CONTROL, REPO, _TMP

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)\s*$")
NOT_RUN = re.compile(r"^<!-- not run: (.+?) -->$")
ANY_STATUS = "<!-- run: any-status -->"
RUNNABLE = ("bash", "python")


@dataclass
class Block:
    file: Path
    line: int
    language: str
    code: str
    skip_reason: str | None
    any_status: bool

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, language = i, match.group(1)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        reason = NOT_RUN.match(before)
        found.append(Block(path, start + 1, language, "\n".join(lines[start + 1:end]) + "\n",
                           reason.group(1) if reason else None, before == ANY_STATUS))
        i = end + 1
    return found


ALL_BLOCKS = [b for path in DOC_FILES for b in blocks(path)]
EXAMPLES = [b for b in ALL_BLOCKS if b.language in RUNNABLE and b.skip_reason is None]


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", REPO / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- unit: no server -------------------------------------------------------------------------------

def test_readme_is_short():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= 260, f"README.md has {lines} lines; the rest belongs in docs/"


def test_every_doc_topic_exists():
    for topic in ("architecture", "api", "configuration", "security", "deployment", "benchmarks", "training"):
        assert (REPO / "docs" / f"{topic}.md").is_file(), topic


def test_configuration_reference_is_current():
    generator = load_generator()
    assert generator.CONFIG_FILE.read_text() == generator.config_reference(), \
        "docs/reference/configuration.md is stale: run python docs/generate.py --only config"


def test_every_setting_is_documented():
    import dataclasses
    import inspect

    from services.config import ServingConfig

    comments = load_generator().field_comments(inspect.getsource(ServingConfig))
    missing = [f.name for f in dataclasses.fields(ServingConfig) if f.name != "extra" and not comments.get(f.name)]
    assert not missing, f"settings without a comment in services/config.py (the reference's text): {missing}"


def test_relative_links_resolve():
    broken = []
    for path in [*DOC_FILES, *(REPO / "docs").glob("reference/*.md")]:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            file = target.split("#", 1)[0]
            if file and not (path.parent / file).exists():
                broken.append(f"{path.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_blocks_not_run_say_why_and_examples_exist():
    assert EXAMPLES, "no runnable example found"
    for block in ALL_BLOCKS:
        if block.skip_reason is not None:
            assert len(block.skip_reason) > 8, f"{block.id}: say why it is not run"
    # Every protocol's client appears in at least one example that runs.
    code = "\n".join(b.code for b in EXAMPLES)
    for client in ("curl ", "tritonclient.grpc", "tritonclient.http", "openai", "requests"):
        assert client in code, f"no running example uses {client}"


# ---- server: the examples against a real suite ------------------------------------------------------

@pytest.fixture(scope="module")
def docs_server(built_models, second_models, variant_models):
    """A suite of its own: examples may load, unload and roll out models without disturbing the
    shared server."""
    from loadtest.servers import start_suite

    server = start_suite({"SUITE_INTRA_OP_THREADS": "1", **MODEL_CONTROL}, _TMP / "docs-serve.log", timeout=180)
    try:
        yield server
    finally:
        server.stop(grace=20)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The files the examples upload."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from loadtest.payloads import digit_png, photo_png

    folder = tmp_path_factory.mktemp("example-inputs")
    Image.fromarray(skimage.data.chelsea()).save(folder / "photo.jpg", quality=90)
    (folder / "digit.png").write_bytes(digit_png(size=28)[0])
    noisy, _ = photo_png("camera", 128)
    (folder / "noisy.png").write_bytes(noisy)
    assert np.asarray(Image.open(folder / "digit.png")).shape == (28, 28)
    return folder


def pointed_at(code: str, server) -> str:
    host = server.url.split("//", 1)[1].rsplit(":", 1)[0]
    for name in ("localhost", "127.0.0.1"):
        code = code.replace(f"{name}:3000", f"{host}:{server.url.rsplit(':', 1)[1]}")
        code = code.replace(f"{name}:9000", f"{host}:{server.grpc_port}")
        code = code.replace(f"{name}:3001", f"{host}:{server.probe_port}")
    return code


@pytest.mark.parametrize("block", EXAMPLES, ids=[b.id for b in EXAMPLES])
def test_example_runs(block: Block, docs_server, inputs, tmp_path):
    for file in inputs.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    code = pointed_at(block.code, docs_server)
    env = {**os.environ, "SUITE_ADMIN_KEY": ADMIN_KEY, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if block.language == "bash":
        curl = "" if block.any_status else 'curl() { command curl --silent --show-error --fail-with-body "$@"; }\n'
        command = ["bash", "-c", "set -euo pipefail\n" + curl + code]
    else:
        (tmp_path / "example.py").write_text(code)
        command = [sys.executable, "example.py"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, (f"{block.id} failed ({result.returncode}):\n{code}\n--- stdout\n"
                                    f"{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_http_api_reference_is_current(server):
    import requests

    generator = load_generator()
    document = requests.get(f"{server.url}/docs.json", timeout=30).json()
    assert generator.API_FILE.read_text() == generator.api_reference(document), \
        "docs/reference/http-api.md is stale: run python docs/generate.py --only api (against `make serve`)"
