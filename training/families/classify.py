"""Image classification: LeNet-5, an AlexNet-style net, a small VGG and a small ResNet over 28x28
grayscale images; beside the classifier, a convolutional autoencoder of the training digits whose
reconstruction error, calibrated on the held-out digits, is the out-of-distribution score."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    ood: bool = True  # train the out-of-distribution autoencoder beside the classifier
    ood_channels: int = 16
    ood_latent: int = 16  # a narrow code, so only digit-like inputs come back well


OOD_QUANTILES = 101  # calibration: the held-out digits' reconstruction error at every percentile


class DigitAutoencoder(nn.Module):
    """The out-of-distribution detector: a convolutional autoencoder of the training digits with a
    narrow dense code. Its mean squared reconstruction error is low for inputs like the digits and
    high for what it never saw; ``calibration`` holds that error's percentiles over the held-out
    digits (set by each evaluation, so it travels with the state it describes), and the score is
    where an input's error falls in that distribution: 0.5 = a typical digit, 1.0 = worse than every
    held-out digit."""

    def __init__(self, cfg: ClassifyConfig):
        super().__init__()
        c, side = cfg.ood_channels, cfg.image_size // 4
        self.encode = nn.Sequential(
            nn.Conv2d(1, c, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * c * side * side, cfg.ood_latent))
        self.decode = nn.Sequential(
            nn.Linear(cfg.ood_latent, 2 * c * side * side), nn.ReLU(), nn.Unflatten(1, (2 * c, side, side)),
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.ReLU(), nn.ConvTranspose2d(c, 1, 4, stride=2, padding=1))
        self.register_buffer("calibration", torch.zeros(OOD_QUANTILES))

    def error(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) normalised -> (B,)
        return (self.decode(self.encode(x)) - x).pow(2).mean(dim=(1, 2, 3))

    def score(self, error: torch.Tensor) -> torch.Tensor:
        """The held-out digits' error distribution at ``error``, linear between percentiles: each
        percentile interval counts the part of it below the error. Continuous, so ONNX Runtime and
        PyTorch agree to rounding even for an input whose error is a percentile."""
        low, high = self.calibration[:-1], self.calibration[1:]
        covered = (error[:, None] - low[None]) / (high - low).clamp_min(1e-12)[None]
        return covered.clamp(0.0, 1.0).mean(dim=-1)

    def calibrate(self, heldout_errors: torch.Tensor) -> None:
        self.calibration.copy_(torch.quantile(heldout_errors, torch.linspace(0, 1, OOD_QUANTILES)))


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
    """What is exported: softmax over the logits, so every client gets calibrated scores; with the
    detector, also each image's reconstruction error and out-of-distribution score."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image):
        probabilities = torch.softmax(self.model(image), dim=-1)
        detector = getattr(self.model, "detector", None)
        if detector is None:
            return probabilities
        error = detector.error(image)
        return probabilities, error, detector.score(error)


def ood_images(cfg: ClassifyConfig, seed: int) -> dict[str, torch.Tensor]:
    """Inputs the classifier was never trained for, made into model inputs by the service's own
    preprocessing (grayscale, resize, dark-on-light flipped, normalised): crops of the natural
    photographs, generated scenes of shapes, and typed digits (a TrueType font, both polarities)."""
    from PIL import Image, ImageDraw, ImageFont

    from common.imaging import to_model_input
    from common.scenes import generate_scenes
    from contract import ImageSpec
    from training.data import HELDOUT_PHOTOS, TRAIN_PHOTOS, _skimage_photo

    spec = ImageSpec(height=cfg.image_size, width=cfg.image_size, channels=1, mean=cfg.mean, std=cfg.std)
    rng = np.random.default_rng(seed)
    photos = [_skimage_photo(n) for n in (*TRAIN_PHOTOS, *HELDOUT_PHOTOS)]
    crops = []
    for _ in range(200):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(16, min(photo.shape) // 2))
        y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        crops.append(Image.fromarray((photo[y:y + side, x:x + side] * 255).astype(np.uint8)))
    scenes = [Image.fromarray((s * 255).astype(np.uint8)) for s in generate_scenes(200, seed + 1)[0]]
    typed = []
    for i in range(200):
        size = int(rng.integers(18, 27))
        font = ImageFont.load_default(size=size)
        ink, paper = (0, 255) if i % 2 else (255, 0)
        canvas = Image.new("L", (28, 28), paper)
        ImageDraw.Draw(canvas).text((14 + rng.integers(-2, 3), 14 + rng.integers(-2, 3)), str(i % 10), fill=ink,
                                    font=font, anchor="mm")
        typed.append(canvas)
    return {name: torch.from_numpy(np.concatenate([to_model_input(im, spec) for im in images]))
            for name, images in (("photos", crops), ("scenes", scenes), ("typed", typed))}


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """Probability that an outlier scores above an inlier (ties count half): the ROC area."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inliers)), np.ones(len(outliers))], np.r_[inliers, outliers]))


class ClassifyFamily(Family):
    name = "classify"
    task = "image-classification"
    config_cls = ClassifyConfig
    primary_metric = "accuracy"
    floor = 0.98
    graph_version = 2  # 2: reconstruction_error and ood_score out beside the probabilities
    # Accuracy reaches 1.0 on the digits early; of the states that tie, the lowest held-out training
    # objective (cross-entropy + the autoencoder's error) wins, so the detector is not left half-trained.
    lower_is_better = ("heldout_loss", "heldout_objective", "ood_heldout_error_median")
    tie_break = "heldout_objective"
    profiles = {
        "quick": {"train": {"steps": 150, "eval_every": 75, "lr": 3e-3, "warmup_steps": 10}, "model": {}},
        "standard": {"train": {"steps": 2500, "eval_every": 250, "lr": 3e-3, "batch_size": 64}, "model": {}},
    }

    def build(self, cfg: ClassifyConfig) -> nn.Module:
        if cfg.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, not {cfg.architecture!r}")
        model = ARCHITECTURES[cfg.architecture](cfg)
        if cfg.ood:
            model.detector = DigitAutoencoder(cfg)  # its own parameters; the classifier's forward ignores it
        return model

    def load_data(self, cfg: ClassifyConfig, train_cfg, data_path, seed) -> Data:
        images, labels, names, fp, desc = load_labelled_images(data_path, cfg.image_size)
        train_idx, held_idx = split_indices(len(labels), 0.2, seed)
        cfg.num_classes = len(names)
        cfg.mean, cfg.std = float(images[train_idx].mean()), float(images[train_idx].std())
        gen = torch.Generator().manual_seed(seed)
        raw = endless_batches((images[train_idx], labels[train_idx]), train_cfg.batch_size, seed)
        batches = ((self.normalize(cfg, random_affine(x, gen)), y) for x, y in raw)
        heldout = (self.normalize(cfg, images[held_idx]), labels[held_idx])
        # The training labels' distribution: the reference the server's drift metric (PSI of predicted
        # classes) compares its answers against.
        counts = torch.bincount(labels[train_idx], minlength=len(names)).double()
        distribution = [round(float(c), 6) for c in counts / counts.sum()]
        return Data(batches, heldout, fp, desc, meta={"labels": names, "heldout_size": len(held_idx),
                                                       "label_distribution": distribution},
                    extra={"ood": ood_images(cfg, seed) if cfg.ood else {}})

    @staticmethod
    def normalize(cfg: ClassifyConfig, images: torch.Tensor) -> torch.Tensor:
        return (images - cfg.mean) / cfg.std

    def loss(self, model, batch):
        x, y = batch
        loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
        if hasattr(model, "detector"):  # separate parameters: the sum trains both in one step
            loss = loss + model.detector.error(x).mean()
        return loss

    @torch.no_grad()
    def evaluate(self, model, data: Data) -> dict[str, float]:
        """Accuracy on the held-out digits; with the detector, it is calibrated on them and its ROC
        area for them against each non-digit set (error as the score; 1.0 = always tells)."""
        x, y = data.heldout
        logits = model(x)
        metrics = {"accuracy": float((logits.argmax(-1) == y).float().mean()),
                   "heldout_loss": float(F.cross_entropy(logits, y))}
        if hasattr(model, "detector"):
            digits = model.detector.error(x)
            model.detector.calibrate(digits)
            outliers = {name: model.detector.error(images).numpy() for name, images in data.extra["ood"].items()}
            metrics["ood_auroc"] = auroc(digits.numpy(), np.concatenate(list(outliers.values())))
            metrics.update({f"ood_auroc_{name}": auroc(digits.numpy(), errors) for name, errors in outliers.items()})
            metrics["ood_heldout_error_median"] = float(digits.median())
        metrics["heldout_objective"] = metrics["heldout_loss"] + (float(digits.mean()) if hasattr(model, "detector") else 0.0)
        return metrics

    variant_tolerance = 0.01  # accuracy: one point

    def graph_model(self, run, cfg: ClassifyConfig):
        # Log-probabilities stand for the logits: the same argmax and the same cross-entropy.
        return lambda x: torch.from_numpy(run({"image": x.numpy()})["probabilities"]).clamp_min(1e-30).log()

    def calibration_inputs(self, data: Data, cfg, batches: int = 8):
        return [(x,) for x, _ in itertools.islice(data.train_batches, batches)]

    def heldout_examples(self, data: Data) -> list[tuple[torch.Tensor, ...]]:
        x, _ = data.heldout
        return [(x[:1],), (x[1:17],)]

    def export_spec(self, model, cfg: ClassifyConfig, checkpoint: dict) -> ExportSpec:
        examples = checkpoint["heldout_examples"]
        outputs = ["probabilities", *(["reconstruction_error", "ood_score"] if cfg.ood else [])]
        return ExportSpec(Probabilities(model), examples[-1], ["image"], outputs,
                          ({0: Dim("batch", min=1, max=1024)},), examples)

    def contract(self, cfg: ClassifyConfig, checkpoint: dict, ckpt_dir: Path) -> ModelContract:
        s = cfg.image_size
        return ModelContract(
            name=self.name, family=self.name, task=self.task, architecture=cfg.architecture,
            inputs=[TensorSpec("image", "float32", [-1, 1, s, s], ["batch", "channel", "height", "width"],
                               "grayscale, light strokes on dark, (pixel/255 - mean) / std")],
            outputs=[TensorSpec("probabilities", "float32", [-1, cfg.num_classes], ["batch", "class"]),
                     *([TensorSpec("reconstruction_error", "float32", [-1], ["batch"],
                                   "the digit autoencoder's mean squared error on the normalised input"),
                        TensorSpec("ood_score", "float32", [-1], ["batch"],
                                   "where this input's error falls among the held-out digits' errors (their "
                                   "distribution, linear between percentiles): about 0.5 for a digit, 1.0 when "
                                   "worse than every held-out digit")] if cfg.ood else [])],
            image=ImageSpec(height=s, width=s, channels=1, mean=cfg.mean, std=cfg.std, foreground="light"),
            labels=list(checkpoint["data"]["labels"]),
            limits={"max_pixels": 16_000_000, "max_batch": 256},
            extra={"label_distribution": checkpoint["data"]["label_distribution"]}
            if "label_distribution" in checkpoint["data"] else {},
        )
