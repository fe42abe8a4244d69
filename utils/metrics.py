"""Paired image metrics on [0,1] images (B,3,H,W): PSNR, SSIM and L1, whole image or a region."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _region_mean(x: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """Mean of a per-pixel map x (B,C,H,W) over region (B,1,H,W) (1 = counted) -> (B,)."""
    if region is None:
        return x.flatten(1).mean(1)
    w = region.expand_as(x).float()
    return (x * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1)


def psnr(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    mse = _region_mean((pred - target) ** 2, region).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def l1(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    return _region_mean((pred - target).abs(), region)


def _gaussian_window(size: int = 11, sigma: float = 1.5, channels: int = 3, dtype=torch.float32) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=dtype) - size // 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()  # (C, 1, k, k)


def ssim_map(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM map (Wang et al. 2004: by default an 11x11 Gaussian window, sigma 1.5, K1 0.01,
    K2 0.03, range 1), computed with reflect 'same' padding so it has one value per pixel: (B,C,H,W)."""
    C = pred.shape[1]
    w = _gaussian_window(window, sigma, channels=C, dtype=pred.dtype).to(pred.device)
    pad = w.shape[-1] // 2

    def filt(x):
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), w, groups=C)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y = filt(pred), filt(target)
    sxx = filt(pred * pred) - mu_x ** 2
    syy = filt(target * target) - mu_y ** 2
    sxy = filt(pred * target) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))


def ssim(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    return _region_mean(ssim_map(pred, target), region)


def paired_metrics(pred: torch.Tensor, target: torch.Tensor, hole: torch.Tensor) -> dict:
    """All metrics per image: on the hole region (hole (B,1,H,W), 1 = hole pixel) and whole image."""
    return {"psnr_hole": psnr(pred, target, hole), "ssim_hole": ssim(pred, target, hole), "l1_hole": l1(pred, target, hole),
            "psnr": psnr(pred, target), "ssim": ssim(pred, target), "l1": l1(pred, target)}
