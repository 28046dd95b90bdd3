"""Image denoising: a residual CNN in the manner of DnCNN (Zhang et al. 2017) that predicts the noise,
conditioned on a noise level map as in FFDNet; a level of -1 means "unknown" (blind denoising).
The ``unet`` architecture puts the same residual prediction on the segment family's U-Net, whose
pooling gives a wide receptive field for the compute (the DRUNet idea, Zhang et al. 2021)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from contract import ImageSpec, ModelContract, TensorSpec
from training.data import load_denoise_benchmark, load_photos
from training.family import Data, ExportSpec, Family

BLIND = -1.0  # noise_level value that asks the model to estimate the noise itself


@dataclass
class DenoiseConfig:
    architecture: str = "residual-cnn"  # residual-cnn | unet | conv-dae
    channels: int = 48  # residual-cnn width; the U-Net's first stage has base_channels
    layers: int = 10
    base_channels: int = 32
    depth: int = 3
    patch_size: int = 48
    max_sigma: float = 55.0  # training noise levels are drawn from [0, max_sigma] on the 0-255 scale
    blind_fraction: float = 0.5  # share of training patches shown without their noise level
    clip_noisy: bool = True  # training inputs clipped to [0, 1] like a PNG upload; the benchmark convention is not
    eval_sigma: float = 25.0
    eval_crop: int = 256  # held-out figures are the mean over every eval_crop-square tile of the held-out images


class ResidualDenoiser(nn.Module):
    def __init__(self, cfg: DenoiseConfig):
        super().__init__()
        c = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(cfg.layers - 2):
            layers += [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(c, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, noisy, noise_level):  # (B, 1, H, W), (B, 1) -> (B, 1, H, W)
        return (noisy - self.body(_with_level(noisy, noise_level))).clamp(0, 1)


def _with_level(noisy, noise_level):
    """The network's input: the image, the noise level map and a "level is known" map."""
    level = noise_level[:, :, None, None].expand_as(noisy)
    known = (level >= 0).to(noisy.dtype)
    return torch.cat([noisy, level.clamp(min=0), known], dim=1)


def _padded_input(noisy, noise_level, multiple: int):
    """``_with_level``, padded by reflection to a multiple of ``multiple`` on each side (inside the
    graph, so any size goes in; the caller crops back)."""
    h, w = noisy.shape[-2:]
    return F.pad(_with_level(noisy, noise_level), (0, (-w) % multiple, 0, (-h) % multiple), mode="reflect")


class ConvDenoisingAutoencoder(nn.Module):
    """The classic convolutional denoising autoencoder (Vincent et al. 2008, convolutional as in
    Masci et al. 2011): strided convolutions squeeze the noisy image into a code at 1/2**depth of
    its size, transposed convolutions rebuild the clean image from the code alone: no skip
    connections and no residual, which is what sets it apart from the residual CNN and the U-Net."""

    def __init__(self, cfg: DenoiseConfig):
        super().__init__()
        self.multiple = 2 ** cfg.depth
        widths = [cfg.base_channels * 2 ** i for i in range(cfg.depth)]
        down: list[nn.Module] = []
        cin = 3
        for w in widths:
            down += [nn.Conv2d(cin, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                     nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            cin = w
        up: list[nn.Module] = []
        for w in reversed([cfg.base_channels] + widths[:-1]):
            up += [nn.ConvTranspose2d(cin, w, 4, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                   nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            cin = w
        self.encoder = nn.Sequential(*down)
        self.decoder = nn.Sequential(*up, nn.Conv2d(cin, 1, 3, padding=1), nn.Sigmoid())

    def forward(self, noisy, noise_level):
        h, w = noisy.shape[-2:]
        return self.decoder(self.encoder(_padded_input(noisy, noise_level, self.multiple)))[..., :h, :w]


class UNetDenoiser(nn.Module):
    """The residual prediction on a U-Net; any size, padded by reflection to a multiple of
    2**depth inside the graph and cropped back."""

    def __init__(self, cfg: DenoiseConfig):
        super().__init__()
        from training.families.segment import SegmentConfig, UNet

        self.multiple = 2 ** cfg.depth
        self.body = UNet(SegmentConfig(num_classes=1, base_channels=cfg.base_channels, depth=cfg.depth))

    def forward(self, noisy, noise_level):
        h, w = noisy.shape[-2:]
        return (noisy - self.body(_padded_input(noisy, noise_level, self.multiple))[..., :h, :w]).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def seeded_noisy(images: list[torch.Tensor], sigma: float, clip: bool) -> list[torch.Tensor]:
    """Gaussian noise of ``sigma`` (0-255 scale) on each image, one generator seeded 0 per call,
    so every model is measured on the same noisy images."""
    gen = torch.Generator().manual_seed(0)
    noisy = [x + torch.randn(x.shape, generator=gen) * sigma / 255 for x in images]
    return [n.clamp(0, 1) for n in noisy] if clip else noisy


def _tiles(img: np.ndarray, size: int) -> list[np.ndarray]:
    """Every whole ``size``-square tile of ``img`` (the centred crop when it has none): small
    crops are what users send, and borders weigh more in them."""
    h, w = img.shape
    if h < size or w < size:
        return [_center_crop(img, size)]
    top, left = (h % size) // 2, (w % size) // 2
    return [img[y:y + size, x:x + size] for y in range(top, h - size + 1, size) for x in range(left, w - size + 1, size)]


def _center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[top:top + size, left:left + size]


class DenoiseFamily(Family):
    name = "denoise"
    task = "image-denoising"
    config_cls = DenoiseConfig
    primary_metric = "psnr_gain_blind"
    # Blind PSNR gain at sigma 25 over the 128-square tiles of the held-out photos (small crops, what
    # users send: issue 27's measure); the standard recipe gave 8.33 dB here.
    floor = 7.0
    profiles = {
        "quick": {"train": {"steps": 120, "eval_every": 60, "lr": 2e-3, "batch_size": 16, "warmup_steps": 10},
                  "model": {"channels": 16, "layers": 5, "eval_crop": 96}},
        # 1,000 steps: 700 left it short (7.62 dB blind on the small tiles against 8.33; issue 27).
        "standard": {"train": {"steps": 1000, "eval_every": 250, "lr": 2e-3, "batch_size": 24},
                     "model": {"eval_crop": 128}},
        # Train400 -> Set12 at sigma 15/25/50 (DnCNN's benchmark); the model is picked on 40 held-out
        # Train400 images, Set12 is measured once at the end. 12,000 steps took 40 min here (issue 27):
        # Set12 at sigma 25 went from 28.82 dB (2,400 steps) to 29.05 (3,600) to 29.81 given / 29.63
        # blind (12,000), the validation PSNR still rising at the end; the gap was compute.
        "benchmark": {"name": "denoise-bsd", "data": "denoise",
                      "train": {"steps": 12000, "eval_every": 1500, "lr": 2e-3, "batch_size": 16,
                                "warmup_steps": 100},
                      "model": {"architecture": "unet", "base_channels": 32, "depth": 3, "patch_size": 64,
                                "blind_fraction": 0.3, "clip_noisy": False, "eval_crop": 180}},
    }
    benchmark_sigmas = (15.0, 25.0, 50.0)
    benchmark_columns = {"set12_psnr_sigma15": "Set12 σ=15 (dB)", "set12_psnr_sigma25": "Set12 σ=25 (dB)",
                         "set12_psnr_sigma50": "Set12 σ=50 (dB)"}
    anchors = {"BM3D": {"set12_psnr_sigma15": 32.37, "set12_psnr_sigma25": 29.97, "set12_psnr_sigma50": 26.72},
               "DnCNN-S": {"set12_psnr_sigma15": 32.86, "set12_psnr_sigma25": 30.44, "set12_psnr_sigma50": 27.18}}
    benchmark_goal = "beat BM3D at σ=25 (29.97 dB), noise level given"

    def build(self, cfg: DenoiseConfig) -> nn.Module:
        if cfg.architecture == "unet":
            return UNetDenoiser(cfg)
        if cfg.architecture == "residual-cnn":
            return ResidualDenoiser(cfg)
        if cfg.architecture == "conv-dae":
            return ConvDenoisingAutoencoder(cfg)
        raise ValueError(f"architecture: {cfg.architecture!r}; choose residual-cnn, unet or conv-dae")

    def load_data(self, cfg: DenoiseConfig, train_cfg, data_path, seed) -> Data:
        test: dict[str, np.ndarray] = {}
        if data_path is not None and (Path(data_path) / "set12").is_dir():
            train, heldout, test, fp, desc = load_denoise_benchmark(Path(data_path))
        else:
            train, heldout, fp, desc = load_photos(data_path)
        crops = [torch.from_numpy(tile.copy())[None, None] for p in heldout for tile in _tiles(p, cfg.eval_crop)]
        gen = torch.Generator().manual_seed(seed + 1)
        noisy = [c + torch.randn(c.shape, generator=gen) * cfg.eval_sigma / 255 for c in crops]
        noisy = [n.clamp(0, 1) if cfg.clip_noisy else n for n in noisy]
        return Data(self._patches(train, cfg, train_cfg.batch_size, seed), (crops, noisy), fp, desc,
                    meta={"eval_sigma": cfg.eval_sigma}, extra={"test": test})

    @staticmethod
    def _patches(photos, cfg: DenoiseConfig, batch_size: int, seed: int):
        rng = np.random.default_rng(seed)
        p = cfg.patch_size
        weights = np.array([ph.size for ph in photos], float)
        weights /= weights.sum()
        while True:
            batch = []
            for i in rng.choice(len(photos), size=batch_size, p=weights):
                ph = photos[i]
                top, left = rng.integers(0, ph.shape[0] - p + 1), rng.integers(0, ph.shape[1] - p + 1)
                patch = np.rot90(ph[top:top + p, left:left + p], k=rng.integers(4))
                batch.append(patch[:, ::-1] if rng.random() < 0.5 else patch)
            clean = torch.from_numpy(np.stack(batch).copy())[:, None]
            sigma = torch.from_numpy(rng.uniform(0, cfg.max_sigma, size=(batch_size, 1)).astype(np.float32)) / 255
            noisy = clean + torch.from_numpy(rng.standard_normal(clean.shape, dtype=np.float32)) * sigma[:, :, None, None]
            if cfg.clip_noisy:
                noisy = noisy.clamp(0, 1)
            blind = torch.from_numpy(rng.random((batch_size, 1)) < cfg.blind_fraction)
            level = torch.where(blind, torch.full_like(sigma, BLIND), sigma)
            yield noisy, level, clean

    variant_tolerance = 0.2  # dB of PSNR gain
    # Quantized as trained, the stack of 3x3 convolutions loses 0.7 dB (each layer's rounding adds up);
    # fine-tuned with the rounding simulated it loses none (README, issue 27).
    int8_finetune_steps = 300

    def graph_model(self, run, cfg: DenoiseConfig):
        return lambda noisy, level: torch.from_numpy(run({"noisy": noisy.numpy(), "noise_level": level.numpy()})["denoised"])

    def calibration_inputs(self, data: Data, cfg, batches: int = 8):
        return [(noisy, level) for noisy, level, _ in itertools.islice(data.train_batches, batches)]

    def loss(self, model, batch):
        noisy, level, clean = batch
        return F.mse_loss(model(noisy, level), clean)

    @torch.no_grad()
    def evaluate(self, model, data: Data) -> dict[str, float]:
        crops, noisy = data.heldout
        sigma = data.meta["eval_sigma"] / 255
        noisy_psnr = np.mean([psnr(n, c) for n, c in zip(noisy, crops)])
        blind = np.mean([psnr(model(n, torch.full((1, 1), BLIND)), c) for n, c in zip(noisy, crops)])
        known = np.mean([psnr(model(n, torch.full((1, 1), sigma)), c) for n, c in zip(noisy, crops)])
        return {"psnr_gain_blind": float(blind - noisy_psnr), "psnr_gain_known_sigma": float(known - noisy_psnr),
                "psnr_denoised_blind": float(blind), "psnr_noisy": float(noisy_psnr)}

    @torch.no_grad()
    def benchmark(self, model, data: Data) -> dict[str, float]:
        """Set12 PSNR (dB) at each benchmark sigma, noise level given, in the published convention:
        noise added to the clean image in [0, 1] (seed 0 per sigma), not clipped; output clipped to
        [0, 1] and rounded to 8 bits. Also at sigma 25: blind, and through PNGs (noisy input
        clipped and rounded too, what a client of /denoise sends)."""
        test = data.extra.get("test") or {}
        if not test:
            return {}
        figures: dict[str, float] = {}

        cleans = [torch.from_numpy(clean)[None, None] for clean in test.values()]

        def run(sigma: float, level: float, png: bool) -> float:
            values = []
            for noisy, x in zip(seeded_noisy(cleans, sigma, clip=png), cleans):
                if png:
                    noisy = (noisy * 255).round() / 255
                out = (model(noisy, torch.full((1, 1), level)) * 255).round() / 255
                values.append(psnr(out, x))
            return float(np.mean(values))

        for sigma in self.benchmark_sigmas:
            figures[f"set12_psnr_sigma{sigma:g}"] = run(sigma, sigma / 255, png=False)
        figures["set12_psnr_sigma25_blind"] = run(25.0, BLIND, png=False)
        figures["set12_psnr_sigma25_png"] = run(25.0, 25 / 255, png=True)
        return figures

    @torch.no_grad()
    def tensorboard_samples(self, model, data: Data) -> dict:
        crops, noisy = data.heldout
        n = noisy[0][..., :128, :128]
        out = model(n, torch.full((1, 1), data.meta["eval_sigma"] / 255))
        return {"samples/noisy_denoised_clean": torch.cat([n, out, crops[0][..., :128, :128]], dim=-1)}

    @torch.no_grad()
    def report_figures(self, model, checkpoint: dict, ckpt_dir: Path) -> dict:
        from training.data import HELDOUT_PHOTOS, _skimage_photo

        clean = torch.from_numpy(_center_crop(_skimage_photo(HELDOUT_PHOTOS[0]), 128).copy())[None, None]
        gen = torch.Generator().manual_seed(0)
        rows, title = [], []
        for sigma in self.benchmark_sigmas:
            noisy = (clean + torch.randn(clean.shape, generator=gen) * sigma / 255).clamp(0, 1)
            out = model(noisy, torch.full((1, 1), sigma / 255))
            rows.append(torch.cat([noisy, out, clean], dim=-1)[0, 0])
            title.append(f"σ={sigma:g}: {psnr(noisy, clean):.1f} -> {psnr(out, clean):.1f} dB")
        return {"Noisy | denoised | clean, one row per noise level (" + "; ".join(title) + ")":
                torch.cat(rows, dim=0).numpy(),
                "PSNR (dB) on the held-out photos": self._heldout_table(model)}

    @torch.no_grad()
    def _heldout_table(self, model) -> str:
        """Mean PSNR over the packaged held-out photos (256 x 256 centre crops) at each benchmark
        sigma, noise seed 0, clipped to [0, 1] like a PNG upload: the same figures for every
        denoise model, whatever it was trained on, so architectures compare on one table."""
        from training.data import HELDOUT_PHOTOS, _skimage_photo

        crops = [torch.from_numpy(_center_crop(_skimage_photo(n), 256).copy())[None, None] for n in HELDOUT_PHOTOS]
        lines = [f"photos: {', '.join(HELDOUT_PHOTOS)}", f"{'sigma':>6} {'noisy':>7} {'given':>7} {'blind':>7}"]
        for sigma in self.benchmark_sigmas:
            noisy = seeded_noisy(crops, sigma, clip=True)
            row = [np.mean([psnr(n, c) for n, c in zip(noisy, crops)])]
            for level in (sigma / 255, BLIND):
                row.append(np.mean([psnr(model(n, torch.full((1, 1), level)), c) for n, c in zip(noisy, crops)]))
            lines.append(f"{sigma:>6g} " + " ".join(f"{v:>7.2f}" for v in row))
        return "\n".join(lines)

    def heldout_examples(self, data: Data):
        _, noisy = data.heldout
        x = noisy[0][:, :, :64, :96]
        return [(x, torch.full((1, 1), BLIND)), (torch.cat([x, x.flip(-1)]), torch.tensor([[25 / 255], [BLIND]]))]

    def export_spec(self, model, cfg: DenoiseConfig, checkpoint: dict) -> ExportSpec:
        examples = list(checkpoint["heldout_examples"])
        x, level = examples[-1]
        examples.append((x[..., :61, :90].contiguous(), level))  # sizes that are no multiple of anything
        b = Dim("batch", min=1, max=1024)
        return ExportSpec(model, examples[1], ["noisy", "noise_level"], ["denoised"],
                          ({0: b, 2: Dim("h", min=8, max=8192), 3: Dim("w", min=8, max=8192)}, {0: b}), examples)

    def contract(self, cfg: DenoiseConfig, checkpoint: dict, ckpt_dir: Path) -> ModelContract:
        architecture = {"unet": f"unet-denoiser-depth{cfg.depth}x{cfg.base_channels}",
                        "conv-dae": f"conv-dae-depth{cfg.depth}x{cfg.base_channels}"}.get(
                            cfg.architecture, f"residual-cnn-{cfg.layers}x{cfg.channels}")
        return ModelContract(
            name=self.name, family=self.name, task=self.task, architecture=architecture,
            inputs=[TensorSpec("noisy", "float32", [-1, 1, -1, -1], ["batch", "channel", "height", "width"],
                               "one grayscale channel in [0, 1]; colour images go channel by channel"),
                    TensorSpec("noise_level", "float32", [-1, 1], ["batch", "level"],
                               f"sigma / 255, or {BLIND} for blind denoising")],
            outputs=[TensorSpec("denoised", "float32", [-1, 1, -1, -1], ["batch", "channel", "height", "width"])],
            image=ImageSpec(height=0, width=0, channels=1),
            limits={"max_pixels": 4_000_000, "max_sigma": 100, "min_side": 8, "max_batch": 64},
            extra={"blind_level": BLIND, "trained_max_sigma": cfg.max_sigma},
        )
