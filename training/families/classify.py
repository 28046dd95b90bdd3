"""Image classification: LeNet-5, an AlexNet-style net, a small VGG and a small ResNet over 28x28
grayscale images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from training.config import derived
from contract import ImageSpec, ModelContract, TensorSpec
from training.data import endless_batches, load_labelled_images, random_affine, split_indices
from training.family import Data, ExportSpec, Family


@dataclass
class ClassifyConfig:
    architecture: str = "lenet5"  # lenet5 | alexnet | vgg | resnet
    image_size: int = 28
    num_classes: int = derived(10)
    width: int = 32  # channels of the first stage (VGG/ResNet); LeNet-5 keeps its classic 6/16
    dropout: float = 0.1
    mean: float = derived(0.1)  # of the training pixels in [0, 1]
    std: float = derived(0.3)


class LeNet5(nn.Module):
    """LeCun et al. 1998, with ReLU and max-pooling as is usual today."""

    def __init__(self, cfg: ClassifyConfig):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # (B, 6, 14, 14)
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 5, 5)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, cfg.num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


class AlexNet(nn.Module):
    """Krizhevsky et al. 2012 at 28x28: five convolutions with ReLU, local response normalisation
    after the first two (the paper's constants), overlapping 3x3/2 max-pooling, and two wide
    fully connected layers with dropout 0.5. The 11x11/4 first layer becomes 5x5/1 at this size."""

    def __init__(self, cfg: ClassifyConfig):
        super().__init__()
        w = cfg.width
        lrn = lambda: nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(1, 2 * w, 5, padding=2), nn.ReLU(), lrn(), nn.MaxPool2d(3, 2),  # 13x13
            nn.Conv2d(2 * w, 4 * w, 5, padding=2), nn.ReLU(), lrn(), nn.MaxPool2d(3, 2),  # 6x6
            nn.Conv2d(4 * w, 6 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(6 * w, 6 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(6 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),  # 2x2
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * w * 2 * 2, 8 * w), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(8 * w, 8 * w), nn.ReLU(), nn.Linear(8 * w, cfg.num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


class VGG(nn.Module):
    """Two VGG blocks of 3x3 convolutions, global average pooling, linear head."""

    def __init__(self, cfg: ClassifyConfig):
        super().__init__()
        w = cfg.width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(1, w), *block(w, 2 * w), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(2 * w, cfg.num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """He et al. 2016 basic blocks, three stages, sized for 28x28 inputs."""

    def __init__(self, cfg: ClassifyConfig):
        super().__init__()
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout),
                                  nn.Linear(4 * w, cfg.num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


ARCHITECTURES = {"lenet5": LeNet5, "alexnet": AlexNet, "vgg": VGG, "resnet": ResNet}


class Probabilities(nn.Module):
    """What is exported: softmax over the logits, so every client gets calibrated scores."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image):
        return torch.softmax(self.model(image), dim=-1)


class ClassifyFamily(Family):
    name = "classify"
    task = "image-classification"
    config_cls = ClassifyConfig
    primary_metric = "accuracy"
    floor = 0.98
    profiles = {
        "quick": {"train": {"steps": 150, "eval_every": 75, "lr": 3e-3, "warmup_steps": 10}, "model": {}},
        "standard": {"train": {"steps": 2500, "eval_every": 250, "lr": 3e-3, "batch_size": 64}, "model": {}},
    }

    def build(self, cfg: ClassifyConfig) -> nn.Module:
        if cfg.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, not {cfg.architecture!r}")
        return ARCHITECTURES[cfg.architecture](cfg)

    def load_data(self, cfg: ClassifyConfig, train_cfg, data_path, seed) -> Data:
        images, labels, names, fp, desc = load_labelled_images(data_path, cfg.image_size)
        train_idx, held_idx = split_indices(len(labels), 0.2, seed)
        cfg.num_classes = len(names)
        cfg.mean, cfg.std = float(images[train_idx].mean()), float(images[train_idx].std())
        gen = torch.Generator().manual_seed(seed)
        raw = endless_batches((images[train_idx], labels[train_idx]), train_cfg.batch_size, seed)
        batches = ((self.normalize(cfg, random_affine(x, gen)), y) for x, y in raw)
        heldout = (self.normalize(cfg, images[held_idx]), labels[held_idx])
        return Data(batches, heldout, fp, desc, meta={"labels": names, "heldout_size": len(held_idx)})

    @staticmethod
    def normalize(cfg: ClassifyConfig, images: torch.Tensor) -> torch.Tensor:
        return (images - cfg.mean) / cfg.std

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, label_smoothing=0.05)

    @torch.no_grad()
    def evaluate(self, model, data: Data) -> dict[str, float]:
        x, y = data.heldout
        logits = model(x)
        return {"accuracy": float((logits.argmax(-1) == y).float().mean()),
                "heldout_loss": float(F.cross_entropy(logits, y))}

    def heldout_examples(self, data: Data) -> list[tuple[torch.Tensor, ...]]:
        x, _ = data.heldout
        return [(x[:1],), (x[1:17],)]

    def export_spec(self, model, cfg: ClassifyConfig, checkpoint: dict) -> ExportSpec:
        examples = checkpoint["heldout_examples"]
        return ExportSpec(Probabilities(model), examples[-1], ["image"], ["probabilities"],
                          ({0: Dim("batch", min=1, max=1024)},), examples)

    def contract(self, cfg: ClassifyConfig, checkpoint: dict, ckpt_dir: Path) -> ModelContract:
        s = cfg.image_size
        return ModelContract(
            name=self.name, family=self.name, task=self.task, architecture=cfg.architecture,
            inputs=[TensorSpec("image", "float32", [-1, 1, s, s], ["batch", "channel", "height", "width"],
                               "grayscale, light strokes on dark, (pixel/255 - mean) / std")],
            outputs=[TensorSpec("probabilities", "float32", [-1, cfg.num_classes], ["batch", "class"])],
            image=ImageSpec(height=s, width=s, channels=1, mean=cfg.mean, std=cfg.std, foreground="light"),
            labels=list(checkpoint["data"]["labels"]),
            limits={"max_pixels": 16_000_000, "max_batch": 256},
        )
