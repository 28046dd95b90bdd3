"""The built bento, served the way a deployment serves it: `bentoml serve <bento tag>` from a fresh
virtual environment holding only the bento's own Python packages (its env/python/requirements.txt,
installed with uv from the package index), called on every protocol. A serving dependency missing
from bentofile.yaml fails here, and so would a training one creeping in (torch is checked absent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.servers import free_port, start_server
from loadtest.smoke import Smoke, report
from tests.conftest import build_bento

UV = str(Path(sys.executable).parent / "uv")


@pytest.fixture(scope="module")
def bento(built_models) -> tuple[str, Path]:
    """(tag, folder) of a bento built from the session's quick models."""
    import bentoml

    tag = build_bento()
    return tag, Path(bentoml.get(tag).path)


@pytest.fixture(scope="module")
def bento_venv(bento, tmp_path_factory) -> Path:
    """A virtual environment with the bento's requirements and nothing else."""
    _, folder = bento
    venv = tmp_path_factory.mktemp("bento-venv") / "venv"
    subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=120)
    result = subprocess.run([UV, "pip", "install", "--quiet", "--python", str(venv / "bin/python"),
                             "-r", str(folder / "env/python/requirements.txt")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return venv


def test_bento_lists_serving_packages_only(bento):
    tag, folder = bento
    requirements = (folder / "env/python/requirements.txt").read_text().lower()
    for package in ("bentoml", "onnxruntime", "tritonclient", "tokenizers", "dumb-init"):
        assert package in requirements, package
    for package in ("torch", "transformers", "scikit-learn", "scikit-image", "locust"):
        assert package not in requirements, package
    source = folder / "src"  # the code: serving, the contract and what serving shares with the rest
    for package in ("services", "contract", "common"):
        assert (source / package / "__init__.py").is_file(), package
    for package in ("training", "export", "loadtest", "tests"):
        assert not (source / package).exists(), package
    import bentoml

    models = {m.tag.name for m in bentoml.get(tag).info.all_models}  # resolved from the store when served
    assert models >= {"classify", "segment", "generate", "denoise", "sample"}, models


def test_bento_serves_every_protocol_from_its_own_packages(bento, bento_venv, tmp_path):
    tag, _ = bento
    check = subprocess.run([str(bento_venv / "bin/python"), "-c", "import torch"], capture_output=True, text=True)
    assert check.returncode != 0  # no training dependency came along
    port, grpc_port, probe_port = free_port(), free_port(), free_port()
    env = {**os.environ, "SUITE_GRPC_PORT": str(grpc_port), "SUITE_PROBE_PORT": str(probe_port),
           "SUITE_HOST": "127.0.0.1", "SUITE_WORKERS": "1", "SUITE_INTRA_OP_THREADS": "1",
           "PATH": f"{bento_venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(bento_venv)}
    # From an empty folder, so that nothing of the checkout can be imported: the bento's own code only.
    server = start_server([str(bento_venv / "bin/bentoml"), "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
                          port=port, grpc_port=grpc_port, env=env, cwd=tmp_path, log_path=tmp_path / "serve.log",
                          timeout=180)
    try:
        checks = Smoke(server.url, grpc_port, probe_port).run()
        assert all(c.ok for c in checks), report(checks) + "\n" + server.log()[-3000:]
    finally:
        server.stop(grace=20)
