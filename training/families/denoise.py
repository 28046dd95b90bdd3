"""Image denoising: a residual CNN in the manner of DnCNN (Zhang et al. 2017) that predicts the noise,
conditioned on a noise level map as in FFDNet; a level of -1 means "unknown" (blind denoising)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from contract import ImageSpec, ModelContract, TensorSpec
from training.data import load_photos
from training.family import Data, ExportSpec, Family

BLIND = -1.0  # noise_level value that asks the model to estimate the noise itself


@dataclass
class DenoiseConfig:
    channels: int = 48
    layers: int = 10
    patch_size: int = 48
    max_sigma: float = 55.0  # training noise levels are drawn from [0, max_sigma] on the 0-255 scale
    blind_fraction: float = 0.5  # share of training patches shown without their noise level
    eval_sigma: float = 25.0
    eval_crop: int = 256


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
        level = noise_level[:, :, None, None].expand_as(noisy)
        known = (level >= 0).to(noisy.dtype)
        x = torch.cat([noisy, level.clamp(min=0), known], dim=1)
        return (noisy - self.body(x)).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def _center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[top:top + size, left:left + size]


class DenoiseFamily(Family):
    name = "denoise"
    task = "image-denoising"
    config_cls = DenoiseConfig
    primary_metric = "psnr_gain_blind"
    floor = 6.0
    profiles = {
        "quick": {"train": {"steps": 120, "eval_every": 60, "lr": 2e-3, "batch_size": 16, "warmup_steps": 10},
                  "model": {"channels": 16, "layers": 5, "eval_crop": 96}},
        "standard": {"train": {"steps": 700, "eval_every": 175, "lr": 2e-3, "batch_size": 24}, "model": {}},
    }

    def build(self, cfg: DenoiseConfig) -> nn.Module:
        return ResidualDenoiser(cfg)

    def load_data(self, cfg: DenoiseConfig, train_cfg, data_path, seed) -> Data:
        train, heldout, fp, desc = load_photos(data_path)
        crops = [torch.from_numpy(_center_crop(p, cfg.eval_crop).copy())[None, None] for p in heldout]
        gen = torch.Generator().manual_seed(seed + 1)
        noisy = [(c + torch.randn(c.shape, generator=gen) * cfg.eval_sigma / 255).clamp(0, 1) for c in crops]
        return Data(self._patches(train, cfg, train_cfg.batch_size, seed), (crops, noisy), fp, desc,
                    meta={"eval_sigma": cfg.eval_sigma})

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
            noisy = (clean + torch.randn_like(clean) * sigma[:, :, None, None]).clamp(0, 1)
            blind = torch.from_numpy(rng.random((batch_size, 1)) < cfg.blind_fraction)
            level = torch.where(blind, torch.full_like(sigma, BLIND), sigma)
            yield noisy, level, clean

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

    def heldout_examples(self, data: Data):
        _, noisy = data.heldout
        x = noisy[0][:, :, :64, :96]
        return [(x, torch.full((1, 1), BLIND)), (torch.cat([x, x.flip(-1)]), torch.tensor([[25 / 255], [BLIND]]))]

    def export_spec(self, model, cfg: DenoiseConfig, checkpoint: dict) -> ExportSpec:
        examples = checkpoint["heldout_examples"]
        b = Dim("batch", min=1, max=1024)
        return ExportSpec(model, examples[-1], ["noisy", "noise_level"], ["denoised"],
                          ({0: b, 2: Dim("h", min=8, max=8192), 3: Dim("w", min=8, max=8192)}, {0: b}), examples)

    def contract(self, cfg: DenoiseConfig, checkpoint: dict, ckpt_dir: Path) -> ModelContract:
        return ModelContract(
            name=self.name, family=self.name, task=self.task, architecture=f"residual-cnn-{cfg.layers}x{cfg.channels}",
            inputs=[TensorSpec("noisy", "float32", [-1, 1, -1, -1], ["batch", "channel", "height", "width"],
                               "one grayscale channel in [0, 1]; colour images go channel by channel"),
                    TensorSpec("noise_level", "float32", [-1, 1], ["batch", "level"],
                               f"sigma / 255, or {BLIND} for blind denoising")],
            outputs=[TensorSpec("denoised", "float32", [-1, 1, -1, -1], ["batch", "channel", "height", "width"])],
            image=ImageSpec(height=0, width=0, channels=1),
            limits={"max_pixels": 4_000_000, "max_sigma": 100, "min_side": 8, "max_batch": 64},
            extra={"blind_level": BLIND, "trained_max_sigma": cfg.max_sigma},
        )
