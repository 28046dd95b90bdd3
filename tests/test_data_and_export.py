"""Loaders for the on-disk layouts users point --data at, and export's refusal to write a model
that fails the parity check."""

from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pytest
from PIL import Image

from training.data import load_labelled_images, load_photos, load_text


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12) % 10)
    images, labels, names, fp, _ = load_labelled_images(tmp_path, 28)
    assert images.shape == (12, 1, 28, 28) and float(images.max()) <= 1.0
    assert labels.tolist() == (np.arange(12) % 10).tolist() and names == [str(i) for i in range(10)]
    assert fp.startswith("sha256:")


def test_image_folder_dark_on_light_is_flipped(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            pixels = np.full((40, 30), 250, np.uint8)
            pixels[10:20, 10:20] = 0  # dark ink on light paper
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    images, labels, names, _, _ = load_labelled_images(tmp_path, 28)
    assert names == ["cat", "dog"] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert images.shape == (6, 1, 28, 28) and float(images.mean()) < 0.5  # now light strokes on dark


def test_oxford_pet_layout(tmp_path):
    from training.families.segment import load_pets

    (tmp_path / "images").mkdir()
    (tmp_path / "annotations" / "trimaps").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(tmp_path / "images" / f"pet_{i}.jpg")
        trimap = np.full((50, 60), 2, np.uint8)
        trimap[10:30, 10:30] = 1
        trimap[30, 10:30] = 3
        Image.fromarray(trimap).save(tmp_path / "annotations" / "trimaps" / f"pet_{i}.png")
    images, masks = load_pets(tmp_path, 32)
    assert images.shape == (2, 32, 32, 3) and set(np.unique(masks)) <= {0, 1, 2} and (masks == 1).any()


def test_text_and_photo_folders(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.txt").write_text("second file")
    text, _, desc = load_text(tmp_path)
    assert "hello world" in text and "second file" in text and "2 text file" in desc
    for i in range(3):
        Image.fromarray(np.full((20, 20), i * 50, np.uint8)).save(tmp_path / f"{i}.png")
    train, heldout, _, _ = load_photos(tmp_path)
    assert len(train) == 2 and len(heldout) == 1


def test_export_fails_loudly_and_writes_nothing(built_models):
    from export.onnx_export import ParityError, export_onnx
    from training.artifacts import family_dir
    from training.registry import get

    onnx_path = family_dir("classify") / "model.onnx"
    before = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert built_models["classify"].parity > 0  # float outputs never match to the last bit
    with pytest.raises(ParityError):
        export_onnx(get("classify"), tolerance=0.0)
    assert hashlib.sha256(onnx_path.read_bytes()).hexdigest() == before
    assert not list(onnx_path.parent.glob(".model.onnx.tmp*"))
