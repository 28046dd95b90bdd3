"""Data loaders shared by the families: real data that ships in packages by default, standard
on-disk layouts (MNIST IDX, ImageFolder, Oxford-IIIT Pet, text files) when pointed at them."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from training.artifacts import fingerprint

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


def endless_batches(tensors: tuple[torch.Tensor, ...], batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Reshuffled mini-batches forever; the loop decides when to stop."""
    gen = torch.Generator().manual_seed(seed)
    n = tensors[0].shape[0]
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield tuple(t[idx] for t in tensors)


def split_indices(n: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * heldout_fraction))
    return order[cut:], order[:cut]


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size), antialiased like the service's PIL resize."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


# --- labelled grayscale images (classify, sample) -------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    _, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for pattern in (f"{stem}*", f"**/{stem}*"):
        hits = sorted(p for p in root.glob(pattern) if p.is_file())
        if hits:
            return hits[0]
    return None


DIGITS_SIZE = 8  # scikit-learn's digits are 8x8 scans; load_labelled_images upsamples them


def load_labelled_images(data_path: Path | None, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str], str, str]:
    """Returns images (N, 1, size, size) in [0, 1] with light strokes on dark, labels, class names,
    a fingerprint and a description. Default: scikit-learn's handwritten digits."""
    if data_path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = (digits.images / 16.0).astype(np.float32)  # DIGITS_SIZE square, 0..16 in the original
        labels = digits.target.astype(np.int64)
        names = [str(i) for i in range(10)]
        desc = "scikit-learn digits (1797 8x8 images, upsampled)"
        raw = pixels
    else:
        data_path = Path(data_path)
        idx_images = _find(data_path, "train-images-idx3-ubyte") or _find(data_path, "train-images.idx3-ubyte")
        if idx_images is not None:
            idx_labels = _find(data_path, "train-labels-idx1-ubyte") or _find(data_path, "train-labels.idx1-ubyte")
            if idx_labels is None:
                raise FileNotFoundError(f"{data_path}: found {idx_images.name} but no train-labels-idx1-ubyte")
            pixels = _read_idx(idx_images).astype(np.float32) / 255.0
            labels = _read_idx(idx_labels).astype(np.int64)
            names = [str(i) for i in range(int(labels.max()) + 1)]
            desc = f"IDX files in {data_path}"
        else:
            class_dirs = sorted(d for d in data_path.iterdir() if d.is_dir())
            if not class_dirs:
                raise FileNotFoundError(f"{data_path}: neither MNIST IDX files nor one folder per class")
            images, label_list = [], []
            for class_id, d in enumerate(class_dirs):
                for f in sorted(d.iterdir()):
                    if f.suffix.lower() in IMAGE_SUFFIXES:
                        img = Image.open(f).convert("L").resize((size, size), Image.Resampling.BILINEAR)
                        images.append(np.asarray(img, dtype=np.float32) / 255.0)
                        label_list.append(class_id)
            pixels, labels = np.stack(images), np.asarray(label_list, dtype=np.int64)
            names = [d.name for d in class_dirs]
            desc = f"ImageFolder {data_path} ({len(labels)} images)"
            if pixels.mean() > 0.5:  # dark strokes on light paper: flip to the contract's light-on-dark
                pixels = 1.0 - pixels
        raw = pixels
    images = resize_batch(torch.from_numpy(pixels)[:, None], size)
    return images, torch.from_numpy(labels), names, fingerprint(raw.tobytes(), labels.tobytes()), desc


def random_affine(images: torch.Tensor, gen: torch.Generator, degrees: float = 10, scale: float = 0.1,
                  shift: float = 0.1) -> torch.Tensor:
    """Small random rotations, scalings and shifts: the digits set is tiny, augmentation carries it."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * degrees * np.pi / 180
    s = 1 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    t = (torch.rand(n, 2, generator=gen) * 2 - 1) * shift * 2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / s, -torch.sin(angle) / s
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / s, torch.cos(angle) / s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


# --- photographs (denoise) --------------------------------------------------------------------------

HELDOUT_PHOTOS = ("camera", "coins", "chelsea")
TRAIN_PHOTOS = ("astronaut", "coffee", "brick", "grass", "gravel", "hubble_deep_field", "moon", "page",
                "retina", "rocket", "motorcycle_left", "ihc", "text", "clock_motion", "microaneurysms", "cell")


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    path = next(p for p in folder.iterdir() if p.stem == name)
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0


def load_photos(data_path: Path | None) -> tuple[list[np.ndarray], list[np.ndarray], str, str]:
    """Grayscale photographs in [0, 1]: (train, held-out, fingerprint, description).
    Default: the natural photographs bundled with scikit-image; else every image under data_path
    (the last 10 % by name held out)."""
    if data_path is None:
        train = [_skimage_photo(n) for n in TRAIN_PHOTOS]
        heldout = [_skimage_photo(n) for n in HELDOUT_PHOTOS]
        desc = f"scikit-image photos; held out: {', '.join(HELDOUT_PHOTOS)}"
    else:
        files = sorted(p for p in Path(data_path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < 2:
            raise FileNotFoundError(f"{data_path}: need at least two images")
        photos = [np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0 for f in files]
        cut = max(1, len(photos) // 10)
        train, heldout = photos[:-cut], photos[-cut:]
        desc = f"{len(files)} images under {data_path}"
    fp = fingerprint(*(p.tobytes() for p in train + heldout))
    return train, heldout, fp, desc


def _gray_images(folder: Path) -> tuple[list[str], list[np.ndarray]]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [f.stem for f in files], [np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0 for f in files]


def load_denoise_benchmark(root: Path, val_images: int = 40):
    """The DnCNN benchmark layout: ``train400/`` (training; its last ``val_images`` by name held out
    for picking the model) and ``set12/`` (the test images, only measured at the end).
    -> (train, val, {name: test image}, fingerprint, description)."""
    _, train400 = _gray_images(root / "train400")
    names, set12 = _gray_images(root / "set12")
    if len(train400) <= val_images or not set12:
        raise FileNotFoundError(f"{root}: expected train400/ (> {val_images} images) and set12/")
    train, val = train400[:-val_images], train400[-val_images:]
    fp = fingerprint(*(p.tobytes() for p in train400 + set12))
    desc = f"Train400 under {root} ({len(train)} train, {len(val)} val); test: Set12 ({len(set12)} images)"
    return train, val, dict(zip(names, set12)), fp, desc


# --- text (generate) ---------------------------------------------------------------------------------

def load_text(data_path: Path | None) -> tuple[str, str, str]:
    """(text, fingerprint, description). Default: the English documentation shipped with Python."""
    if data_path is None:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k].strip() for k in sorted(topics))
        desc = f"pydoc_data topics ({len(text)} characters)"
    else:
        data_path = Path(data_path)
        files = [data_path] if data_path.is_file() else sorted(data_path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{data_path}: no .txt files")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
        desc = f"{len(files)} text file(s) under {data_path} ({len(text)} characters)"
    return text, fingerprint(text.encode()), desc


# --- road scenes (segment) ----------------------------------------------------------------------------

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist"]
CAMVID_UNLABELLED = 11  # the label PNGs' "Unlabelled" id: ignored by the loss and the IoU


def _camvid_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for png in sorted((root / split).glob("*.png")):
        annot = root / f"{split}annot" / png.name
        if not annot.exists():
            raise FileNotFoundError(f"{png}: no label image {annot}")
        images.append(np.asarray(Image.open(png).convert("RGB"), np.float32) / 255.0)
        labels.append(np.asarray(Image.open(annot), np.uint8))
    if not images:
        raise FileNotFoundError(f"{root / split}: no PNG images")
    return np.stack(images), np.stack(labels)


def load_camvid(root: Path):
    """The SegNet tutorial's CamVid layout: ``train/``, ``trainannot/``, ``val/``, ``valannot/`` (label
    PNG pixel = class id, 11 = unlabelled). -> (train images (N, H, W, 3) in [0, 1], train labels
    (N, H, W), val images, val labels, fingerprint, description)."""
    x_train, y_train = _camvid_split(root, "train")
    x_val, y_val = _camvid_split(root, "val")
    fp = fingerprint(x_train.tobytes(), y_train.tobytes(), x_val.tobytes(), y_val.tobytes())
    h, w = x_train.shape[1:3]
    desc = f"CamVid under {root} ({len(x_train)} train, {len(x_val)} val, {w}x{h}, 11 classes)"
    return x_train, y_train, x_val, y_val, fp, desc
