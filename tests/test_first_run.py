"""A quiet first run of `make models` (issue 28): a bar per stage and a summary on the console, the
exporters' and libraries' chatter (Python's and native) in the log file whose path it names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 60  # the whole first `make serve`, server start-up included, is held to this
CHATTER = ("Skipping constant folding", "Replaced initializer", "Warning", "UserWarning")
# Each family's headline metric as the summary names it (export/console.py).
HEADLINES = {"classify": "accuracy", "segment": "mean IoU", "generate": "nats/char", "denoise": "PSNR gain",
             "sample": "class agreement"}


def test_output_to_sends_python_native_and_child_output_to_the_log_and_restores_it(tmp_path, capfd):
    import ctypes

    from export.console import output_to

    log = tmp_path / "run.log"
    libc = ctypes.CDLL(None)
    with output_to(log):
        print("python stdout")
        print("python stderr", file=sys.stderr)
        os.write(1, b"descriptor 1\n")
        os.write(2, b"descriptor 2\n")
        libc.printf(b"C stdio, still buffered\n")  # flushed into the log before the descriptors go back
        subprocess.run([sys.executable, "-c", "import sys; print('child'); print('child err', file=sys.stderr)"],
                       check=True)
    print("after")
    os.write(2, b"after 2\n")
    written = log.read_text()
    for text in ("python stdout", "python stderr", "descriptor 1", "descriptor 2", "C stdio", "child", "child err"):
        assert text in written
    out, err = capfd.readouterr()
    assert out == "after\n" and err == "after 2\n"
    assert "after" not in written


def test_a_failed_stage_names_itself_and_the_log_on_the_console_and_fails(tmp_path, monkeypatch, capsys):
    from export.__main__ import main

    monkeypatch.setenv("SUITE_ARTIFACTS", str(tmp_path))
    assert main(["segment", "--name", "never-trained"]) == 1
    out, err = capsys.readouterr()
    assert "[never-trained] export failed after" in err and "no checkpoint at" in err
    logs = list((tmp_path / "logs").glob("models-*.log"))
    assert len(logs) == 1 and f"details: {logs[0]}" in err
    assert "Traceback" in logs[0].read_text() and "Traceback" not in out + err


@pytest.mark.slow
def test_first_build_of_every_model_is_quiet(tmp_path):
    """`python -m export all --build-missing --profile quick` on a fresh store and artifacts
    folder, its stderr not a terminal: at most 60 lines, no chatter, every model in the summary
    with its headline metric, the chatter in the log it names."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "SUITE_ARTIFACTS": str(tmp_path / "artifacts"),
           "BENTOML_DO_NOT_TRACK": "true"}
    done = subprocess.run([sys.executable, "-m", "export", "all", "--build-missing", "--profile", "quick"], cwd=REPO,
                          env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=1800)
    console = done.stdout
    assert done.returncode == 0, console
    lines = console.splitlines()
    assert console.count("\n") <= MAX_LINES and "\r" not in console, console
    for chatter in CHATTER:
        assert chatter not in console, console
    for family, metric in HEADLINES.items():
        row = next((line for line in lines if line.split()[:1] == [family]), None)
        assert row is not None and re.search(re.escape(metric) + r".*\d", row), console
    logs = list((tmp_path / "artifacts" / "logs").glob("models-*.log"))
    assert len(logs) == 1 and f"log: {logs[0]}" in lines[-1], console
    log = logs[0].read_text()
    assert "Skipping constant folding" in log  # torch.onnx's optimizer, no longer on the console
    assert "[classify] step " in log  # each evaluation of training
