"""Semantic segmentation: U-Net (Ronneberger et al. 2015), fully convolutional; any size goes in
(padded by reflection to a multiple of 2**depth inside the graph, the logits cropped back). The
benchmark profile trains it from scratch on CamVid (11 road-scene classes at 240x180) with
ENet's inverse-log-frequency class weighting (SegNet's median frequency is the other choice), the
unlabelled pixels ignored."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.export import Dim

from common.scenes import SCENE_CLASSES, generate_scenes
from training.config import derived
from contract import ImageSpec, ModelContract, TensorSpec
from training.artifacts import fingerprint
from training.data import CAMVID_CLASSES, CAMVID_UNLABELLED, endless_batches, load_camvid
from training.family import Data, ExportSpec, Family

PET_CLASSES = ["background", "pet", "border"]
IGNORE_INDEX = 255  # label of pixels that count for nothing (CamVid's "Unlabelled")


@dataclass
class SegmentConfig:
    image_size: int = 64  # side of the generated scenes and pet images; CamVid keeps its own size
    image_height: int = derived(0)  # the size the model is trained at (the contract's), from the data
    image_width: int = derived(0)
    num_classes: int = derived(4)
    base_channels: int = 16
    depth: int = 3  # down-sampling steps
    train_scenes: int = 4000
    heldout_scenes: int = 300
    class_weighting: str = "none"  # none | median-frequency (SegNet) | inverse-log-frequency (ENet): rare classes weigh more
    crop_height: int = 0  # random training crops from the rescaled image; 0 = the whole image
    crop_width: int = 0
    scale_min: float = 1.0  # training images are rescaled by a factor drawn from [scale_min, scale_max]
    scale_max: float = 1.0
    color_jitter: float = 0.0  # random brightness and contrast of training images, +- this fraction


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
        self.multiple = 2 ** cfg.depth

    def forward(self, x):  # (B, C, H, W) -> (B, classes, H, W), any H, W >= 2**depth
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % self.multiple, 0, (-h) % self.multiple), mode="reflect")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)[..., :h, :w]


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


def confusion_matrix(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true class, predicted class) pixel counts over the whole set; ignored pixels left out."""
    valid = truth < num_classes
    return torch.bincount(truth[valid] * num_classes + pred[valid], minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def class_ious(confusion: torch.Tensor) -> np.ndarray:
    """Intersection over union per class; NaN for a class neither predicted nor present."""
    c = confusion.double()
    inter = c.diag()
    union = c.sum(0) + c.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.nan).numpy()


def median_frequency_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """SegNet's class balancing (Eigen & Fergus 2015): weight = median frequency / class frequency,
    a class's frequency being its pixels over the labelled pixels of the images it appears in."""
    counts = np.stack([np.bincount(y.ravel(), minlength=256)[:num_classes] for y in labels]).astype(np.float64)
    present = counts > 0
    freq = counts.sum(0) / np.maximum((present * counts.sum(1, keepdims=True)).sum(0), 1)
    weights = np.where(freq > 0, np.median(freq[freq > 0]) / np.maximum(freq, 1e-12), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def inverse_log_frequency_weights(labels: np.ndarray, num_classes: int, c: float = 1.02) -> torch.Tensor:
    """ENet's class weighting (Paszke et al. 2016): 1 / ln(c + the class's share of the labelled
    pixels); bounded by 1 / ln(c), so rare classes weigh more but far less than median frequency
    would make them (a 13x spread on CamVid instead of 60x)."""
    counts = np.bincount(labels.ravel(), minlength=256)[:num_classes].astype(np.float64)
    return torch.tensor(1 / np.log(c + counts / counts.sum()), dtype=torch.float32)


def augmented_batches(x: torch.Tensor, y: torch.Tensor, cfg: SegmentConfig, batch_size: int, seed: int):
    """Endless shuffled batches with random rescaling, crops, flips and brightness/contrast, drawn
    from their own seeded generator (a resumed run replays them)."""
    rng = np.random.default_rng(seed)
    n, _, h, w = x.shape
    ch, cw = cfg.crop_height or h, cfg.crop_width or w
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = torch.from_numpy(order[start:start + batch_size])
            xb, yb = x[idx], y[idx]
            scale = rng.uniform(cfg.scale_min, cfg.scale_max)
            size = (max(ch, round(h * scale)), max(cw, round(w * scale)))
            if size != (h, w):
                xb = F.interpolate(xb, size=size, mode="bilinear", align_corners=False, antialias=scale < 1).clamp(0, 1)
                yb = F.interpolate(yb[:, None].float(), size=size, mode="nearest")[:, 0].long()
            xs, ys = [], []
            for i in range(batch_size):
                top, left = rng.integers(0, size[0] - ch + 1), rng.integers(0, size[1] - cw + 1)
                xi, yi = xb[i, :, top:top + ch, left:left + cw], yb[i, top:top + ch, left:left + cw]
                if rng.random() < 0.5:
                    xi, yi = xi.flip(-1), yi.flip(-1)
                if cfg.color_jitter:
                    brightness, contrast = 1 + rng.uniform(-cfg.color_jitter, cfg.color_jitter, 2)
                    mean = xi.mean()
                    xi = (((xi - mean) * contrast + mean) * brightness).clamp(0, 1)
                xs.append(xi)
                ys.append(yi)
            yield torch.stack(xs), torch.stack(ys)


class SegmentFamily(Family):
    name = "segment"
    task = "semantic-segmentation"
    config_cls = SegmentConfig
    primary_metric = "mean_iou"
    floor = 0.90
    graph_version = 2  # 2: any height and width (padded inside the graph), not only multiples of 2**depth
    profiles = {
        "quick": {"train": {"steps": 300, "eval_every": 100, "lr": 3e-3, "batch_size": 16, "warmup_steps": 10},
                  "model": {"train_scenes": 800, "heldout_scenes": 50, "base_channels": 12}},
        "standard": {"train": {"steps": 1500, "eval_every": 250, "lr": 3e-3, "batch_size": 16}, "model": {}},
        # CamVid train -> val, 11 classes at 240x180, from scratch; the figure is the val mean IoU.
        "benchmark": {"name": "segment-camvid", "data": "segment/camvid",
                      "train": {"steps": 4000, "eval_every": 500, "lr": 3e-3, "batch_size": 8, "warmup_steps": 100,
                                "weight_decay": 1e-4},
                      "model": {"base_channels": 16, "depth": 4, "class_weighting": "inverse-log-frequency",
                                "crop_height": 176, "crop_width": 224, "scale_min": 0.8, "scale_max": 1.4,
                                "color_jitter": 0.2}},
    }
    benchmark_columns = {"camvid_val_miou": "mean IoU (%)", "camvid_val_pixel_accuracy": "pixel accuracy (%)"}
    # ../shared/data/README.md: 480x360 test split, ImageNet-pretrained encoders.
    anchors = {"SegNet (test, pretrained)": {"camvid_val_miou": 46.4},
               "FCN-8s (test, pretrained)": {"camvid_val_miou": 57.0},
               "Dilation8 (test, pretrained)": {"camvid_val_miou": 65.3}}
    benchmark_goal = "val mean IoU ≥ 65 % over the 11 classes, from scratch, at 240x180"

    def build(self, cfg: SegmentConfig) -> nn.Module:
        return UNet(cfg)

    def load_data(self, cfg: SegmentConfig, train_cfg, data_path, seed) -> Data:
        s = cfg.image_size
        meta: dict = {}
        if data_path is not None and (Path(data_path) / "trainannot").is_dir():
            x_train, y_train, x_held, y_held, fp, desc = load_camvid(Path(data_path))
            y_train, y_held = (np.where(y == CAMVID_UNLABELLED, IGNORE_INDEX, y).astype(np.uint8)
                               for y in (y_train, y_held))
            labels, meta = CAMVID_CLASSES, {"benchmark": "camvid", "ignore_index": IGNORE_INDEX}
        elif data_path is None:
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
        cfg.image_height, cfg.image_width = x_train.shape[1:3]
        weighting = {"median-frequency": median_frequency_weights, "inverse-log-frequency": inverse_log_frequency_weights}
        if cfg.class_weighting not in ("none", *weighting):
            raise ValueError(f"class_weighting: {cfg.class_weighting!r}; choose none, {', '.join(weighting)}")
        to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
        x_t, y_t = to_tensor(x_train), torch.from_numpy(y_train).long()
        augmented = (cfg.crop_height, cfg.crop_width, cfg.scale_min, cfg.scale_max, cfg.color_jitter) != (0, 0, 1, 1, 0)
        if augmented:
            batches = augmented_batches(x_t, y_t, cfg, train_cfg.batch_size, seed)
        else:
            batches = (self._flip(x, y) for x, y in endless_batches((x_t, y_t), train_cfg.batch_size, seed))
        if cfg.class_weighting in weighting:
            weights = weighting[cfg.class_weighting](y_train, cfg.num_classes)
            meta["class_weights"] = [round(float(v), 4) for v in weights]
            batches = ((x, y, weights) for x, y in batches)
        heldout = (to_tensor(x_held), torch.from_numpy(y_held).long())
        return Data(batches, heldout, fp, desc, meta={"labels": labels, **meta})

    @staticmethod
    def _flip(x, y):
        if torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y

    variant_tolerance = 0.01  # mean IoU: one point

    def graph_model(self, run, cfg: SegmentConfig):
        # The graph returns the mask; its one-hot has the same argmax as the logits.
        return lambda x: F.one_hot(torch.from_numpy(run({"image": x.numpy()})["mask"]), cfg.num_classes).permute(0, 3, 1, 2)

    def calibration_inputs(self, data: Data, cfg, batches: int = 8):
        return [(batch[0],) for batch in itertools.islice(data.train_batches, batches)]

    def loss(self, model, batch):
        x, y, *weights = batch  # the class weights ride with the batch when the profile balances classes
        return F.cross_entropy(model(x), y, weight=weights[0] if weights else None, ignore_index=IGNORE_INDEX)

    @staticmethod
    def _confusion(model, data: Data) -> torch.Tensor:
        x, y = data.heldout
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(16)])
        return confusion_matrix(pred, y, len(data.meta["labels"]))

    @torch.no_grad()
    def evaluate(self, model, data: Data) -> dict[str, float]:
        confusion = self._confusion(model, data)
        return {"mean_iou": float(np.nanmean(class_ious(confusion))),
                "pixel_accuracy": float(confusion.diag().sum() / confusion.sum())}

    @torch.no_grad()
    def benchmark(self, model, data: Data) -> dict[str, float]:
        """CamVid: mean IoU over the 11 classes on val (in %), each class's IoU and the pixel accuracy,
        unlabelled pixels left out; for the model picked on val (``best_step``)."""
        if data.meta.get("benchmark") != "camvid":
            return {}
        confusion = self._confusion(model, data)
        ious = class_ious(confusion)
        figures = {"camvid_val_miou": round(100 * float(np.nanmean(ious)), 2),
                   "camvid_val_pixel_accuracy": round(100 * float(confusion.diag().sum() / confusion.sum()), 2)}
        figures.update({f"camvid_val_iou_{label}": round(100 * float(v), 2)
                        for label, v in zip(data.meta["labels"], ious)})
        return figures

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
        scale = float(max(len(data.meta["labels"]) - 1, 1))
        truth = torch.where(y[:4] == IGNORE_INDEX, 0, y[:4])
        return {"samples/images": x[:4], "samples/predicted_mask": pred[:, None].float() / scale,
                "samples/true_mask": truth[:, None].float() / scale}

    def heldout_examples(self, data: Data):
        x, _ = data.heldout
        return [(x[:1],), (x[1:5],)]

    def export_spec(self, model, cfg: SegmentConfig, checkpoint: dict) -> ExportSpec:
        examples = list(checkpoint["heldout_examples"])
        # also another shape, no multiple of 2**depth, to prove the dynamic axes and the padding
        x = examples[-1][0]
        examples.append((F.interpolate(x, size=(x.shape[2] - 3, 2 * x.shape[3] - 5)),))
        m = 2 ** cfg.depth
        # torch.export fails to trace the pad-and-crop from a size that is no multiple of 2**depth
        # (CamVid's 180 x 240), so it traces at the next multiple; the parity examples keep the rest
        size = [-(-n // m) * m for n in x.shape[2:]]
        trace = (F.interpolate(x, size=size),)
        examples.append(trace)
        h, w = Dim("h", min=m, max=4096), Dim("w", min=m, max=4096)
        return ExportSpec(Mask(model), trace, ["image"], ["mask"],
                          ({0: Dim("batch", min=1, max=1024), 2: h, 3: w},), examples)

    def contract(self, cfg: SegmentConfig, checkpoint: dict, ckpt_dir: Path) -> ModelContract:
        axes = ["batch", "channel", "height", "width"]
        return ModelContract(
            name=self.name, family=self.name, task=self.task,
            architecture=f"unet-depth{cfg.depth}x{cfg.base_channels}",
            inputs=[TensorSpec("image", "float32", [-1, 3, -1, -1], axes,
                               f"RGB in [0, 1]; height and width at least {2 ** cfg.depth}")],
            outputs=[TensorSpec("mask", "int64", [-1, -1, -1], ["batch", "height", "width"], "class id per pixel")],
            image=ImageSpec(height=cfg.image_height or cfg.image_size, width=cfg.image_width or cfg.image_size,
                            channels=3),
            labels=list(checkpoint["data"]["labels"]),
            limits={"max_pixels": 16_000_000, "max_batch": 64, "min_side": 2 ** cfg.depth},
        )
