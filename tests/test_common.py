"""common/: the pieces serving, training, export and the load tests share, without a server."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from common.files import atomic_write
from common.resources import process_alive, resident_bytes
from common.scores import probabilities, softmax
from contract import MODEL_NAME, ModelContract


def test_atomic_write_bytes_and_a_writer(tmp_path):
    target = tmp_path / "made" / "on" / "demand.json"  # the folder is made
    atomic_write(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write(target, lambda path: path.write_text("second"))  # torch.save, onnx.save: a path
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["demand.json"]  # no temporary left


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")

    def half_then_crash(path: Path) -> None:
        path.write_bytes(b"ha")
        raise RuntimeError("crashed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_atomic_write_mode_follows_the_umask(tmp_path):
    """Artifacts are read by other users (a container's non-root user): not mkstemp's 0600."""
    atomic_write(tmp_path / "a", b"x")
    atomic_write(tmp_path / "b", lambda path: path.write_bytes(b"x"))
    umask = os.umask(0)
    os.umask(umask)
    for name in ("a", "b"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_writers_in_threads_never_share_a_temporary(tmp_path):
    target = tmp_path / "shared.json"
    errors = []

    def write(i: int) -> None:
        try:
            for _ in range(50):
                atomic_write(target, str(i).encode() * 1000)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    content = target.read_bytes()
    assert content == content[:1] * 1000  # one writer's whole file


def test_probabilities_as_the_contract_says():
    logits = np.array([1.0, 3.0, 2.0], np.float32)
    own = ModelContract("c", "c", "image-classification", "tiny", [], [])
    imported = ModelContract("c", "c", "image-classification", "tiny", [], [], extra={"outputs_probabilities": False})
    assert probabilities(logits, own) is logits
    probs = probabilities(logits, imported)
    assert probs.dtype == np.float32 and abs(float(probs.sum()) - 1) < 1e-6 and int(np.argmax(probs)) == 1
    assert np.allclose(softmax(np.array([1000.0, 1000.0])), [0.5, 0.5])  # shifted: no overflow


def test_process_helpers():
    assert process_alive(os.getpid())
    assert resident_bytes() > 1 << 20
    assert resident_bytes(2 ** 22 + 1) == 0  # no such process


@pytest.mark.parametrize("name, ok", [("classify", True), ("denoise-bsd", True), ("generate.v2_x", True),
                                      ("Classify", False), ("-x", False), ("a" * 64, False), ("x\n", False),
                                      ("", False)])
def test_one_model_name_pattern(name, ok):
    assert bool(MODEL_NAME.fullmatch(name)) is ok
