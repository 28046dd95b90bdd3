"""Semantic segmentation: U-Net (Ronneberger et al. 2015), fully convolutional, any size that is a
multiple of 2**depth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.export import Dim

from training.config import derived
from contract import ImageSpec, ModelContract, TensorSpec
from training.artifacts import fingerprint
from training.data import endless_batches
from training.family import Data, ExportSpec, Family
from training.scenes import SCENE_CLASSES, generate_scenes

PET_CLASSES = ["background", "pet", "border"]


@dataclass
class SegmentConfig:
    image_size: int = 64
    num_classes: int = derived(4)
    base_channels: int = 16
    depth: int = 3  # down-sampling steps; inputs must be multiples of 2**depth
    train_scenes: int = 4000
    heldout_scenes: int = 300


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, cfg: SegmentConfig):
        super().__init__()
        widths = [cfg.base_channels * 2 ** i for i in range(cfg.depth + 1)]
        self.down = nn.ModuleList([conv_block(3, widths[0])] +
                                  [conv_block(widths[i], widths[i + 1]) for i in range(cfg.depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(cfg.depth))])
        self.merge = nn.ModuleList([conv_block(2 * widths[i], widths[i]) for i in reversed(range(cfg.depth))])
        self.head = nn.Conv2d(widths[0], cfg.num_classes, 1)

    def forward(self, x):  # (B, 3, H, W) -> (B, classes, H, W)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class Mask(nn.Module):
    """Exports the per-pixel arg-max: one small int tensor per image, so clients need no
    post-processing and the batched serving path carries a single output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model(image).argmax(dim=1)


def load_pets(root: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Oxford-IIIT Pet layout: images/*.jpg with annotations/trimaps/*.png (1 pet, 2 background, 3 border)."""
    images, masks = [], []
    for jpg in sorted((root / "images").glob("*.jpg")):
        trimap = root / "annotations" / "trimaps" / (jpg.stem + ".png")
        if not trimap.exists():
            continue
        img = Image.open(jpg).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        tri = np.asarray(Image.open(trimap).resize((size, size), Image.Resampling.NEAREST))
        images.append(np.asarray(img, np.float32) / 255.0)
        masks.append(np.choose(np.clip(tri, 1, 3) - 1, [1, 0, 2]).astype(np.uint8))
    if not images:
        raise FileNotFoundError(f"{root}: expected images/*.jpg and annotations/trimaps/*.png")
    return np.stack(images), np.stack(masks)


def mean_iou(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> float:
    """Intersection over union per class over the whole set, averaged over classes present."""
    ious = []
    for c in range(num_classes):
        inter = ((pred == c) & (truth == c)).sum().item()
        union = ((pred == c) | (truth == c)).sum().item()
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


class SegmentFamily(Family):
    name = "segment"
    task = "semantic-segmentation"
    config_cls = SegmentConfig
    primary_metric = "mean_iou"
    floor = 0.90
    profiles = {
        "quick": {"train": {"steps": 300, "eval_every": 100, "lr": 3e-3, "batch_size": 16, "warmup_steps": 10},
                  "model": {"train_scenes": 800, "heldout_scenes": 50, "base_channels": 12}},
        "standard": {"train": {"steps": 1500, "eval_every": 250, "lr": 3e-3, "batch_size": 16}, "model": {}},
    }

    def build(self, cfg: SegmentConfig) -> nn.Module:
        return UNet(cfg)

    def load_data(self, cfg: SegmentConfig, train_cfg, data_path, seed) -> Data:
        s = cfg.image_size
        if data_path is None:
            x_train, y_train = generate_scenes(cfg.train_scenes, seed, s, s)
            x_held, y_held = generate_scenes(cfg.heldout_scenes, seed + 10_000, s, s)  # disjoint stream
            labels, desc = SCENE_CLASSES, f"generated scenes (seed {seed}, {cfg.train_scenes}+{cfg.heldout_scenes})"
            fp = fingerprint(b"scenes", str((seed, s, cfg.train_scenes, cfg.heldout_scenes)).encode())
        else:
            x, y = load_pets(Path(data_path), s)
            cut = max(1, len(x) // 10)
            x_train, y_train, x_held, y_held = x[:-cut], y[:-cut], x[-cut:], y[-cut:]
            labels, desc = PET_CLASSES, f"Oxford-IIIT Pet layout under {data_path} ({len(x)} images)"
            fp = fingerprint(x.tobytes(), y.tobytes())
        cfg.num_classes = len(labels)
        to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
        raw = endless_batches((to_tensor(x_train), torch.from_numpy(y_train).long()), train_cfg.batch_size, seed)
        batches = (self._flip(x, y) for x, y in raw)
        heldout = (to_tensor(x_held), torch.from_numpy(y_held).long())
        return Data(batches, heldout, fp, desc, meta={"labels": labels})

    @staticmethod
    def _flip(x, y):
        if torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model, data: Data) -> dict[str, float]:
        x, y = data.heldout
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(64)])
        return {"mean_iou": mean_iou(pred, y, int(y.max()) + 1), "pixel_accuracy": float((pred == y).float().mean())}

    @torch.no_grad()
    def report_figures(self, model, checkpoint: dict, ckpt_dir: Path) -> dict:
        images = torch.cat([x for (x,) in checkpoint["heldout_examples"]])[:4]
        masks = model(images).argmax(1)
        palette = torch.tensor(np.random.default_rng(3).uniform(0.1, 1.0, (max(int(masks.max()) + 1, 12), 3)),
                               dtype=torch.float32)
        overlay = 0.5 * images + 0.5 * palette[masks].permute(0, 3, 1, 2)
        grid = torch.cat([torch.cat(list(images), dim=-1), torch.cat(list(overlay), dim=-1)], dim=-2)
        labels = ", ".join(checkpoint["data"]["labels"])
        return {f"Held-out images and their predicted masks over them (classes: {labels})":
                grid.permute(1, 2, 0).numpy()}

    def tensorboard_samples(self, model, data: Data) -> dict:
        x, y = data.heldout
        pred = model(x[:4]).argmax(1)
        scale = float(max(int(y.max()), 1))
        return {"samples/images": x[:4], "samples/predicted_mask": pred[:, None].float() / scale,
                "samples/true_mask": y[:4, None].float() / scale}

    def heldout_examples(self, data: Data):
        x, _ = data.heldout
        return [(x[:1],), (x[1:5],)]

    def export_spec(self, model, cfg: SegmentConfig, checkpoint: dict) -> ExportSpec:
        examples = list(checkpoint["heldout_examples"])
        # also a non-square size, to prove the dynamic height/width axes
        examples.append((F.interpolate(examples[-1][0], size=(cfg.image_size, 2 * cfg.image_size)),))
        m = 2 ** cfg.depth
        h, w = Dim("h", min=1, max=512), Dim("w", min=1, max=512)
        return ExportSpec(Mask(model), examples[1], ["image"], ["mask"],
                          ({0: Dim("batch", min=1, max=1024), 2: m * h, 3: m * w},), examples)

    def contract(self, cfg: SegmentConfig, checkpoint: dict, ckpt_dir: Path) -> ModelContract:
        axes = ["batch", "channel", "height", "width"]
        return ModelContract(
            name=self.name, family=self.name, task=self.task, architecture=f"unet-depth{cfg.depth}",
            inputs=[TensorSpec("image", "float32", [-1, 3, -1, -1], axes,
                               f"RGB in [0, 1]; height and width multiples of {2 ** cfg.depth}")],
            outputs=[TensorSpec("mask", "int64", [-1, -1, -1], ["batch", "height", "width"], "class id per pixel")],
            image=ImageSpec(height=cfg.image_size, width=cfg.image_size, channels=3, multiple_of=2 ** cfg.depth),
            labels=list(checkpoint["data"]["labels"]),
            limits={"max_pixels": 16_000_000, "max_batch": 64},
        )
