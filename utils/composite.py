"""Pixel-space compositing around the tokenizer: fill the holes before encoding
(:func:`fill_holes`) and paste the known pixels back after decoding (:func:`paste_known`).
Pixel masks: float (B,1,H,W), 1 = known, 0 = hole."""
from __future__ import annotations

import functools

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F


PREFILLS = ("smooth", "biharmonic", "gray")
BLENDS = ("biharmonic", "seamless", "hard")


def fill_holes(x: torch.Tensor, pixel_mask: torch.Tensor, smooth_iters: int = 30) -> torch.Tensor:
    """Fill the holes of x (B,C,H,W) from the known pixels (pixel_mask (B,1,H,W), 1 = known);
    known pixels are returned unchanged.

    Push-pull: averages of the known pixels over 2x2, 4x4, ... blocks fill the holes coarse to
    fine, then ``smooth_iters`` Jacobi steps of the 3x3 mean (centre included) smooth the filled
    values; their fixed point is harmonic for the 8-neighbour Laplacian (each hole pixel the mean of
    its 8 neighbours), which the fill approaches as iters grows. Why: the VQGAN encoder sees past
    each 4x4 patch, so gray holes change the codes of the known tokens around them (on the lab's
    test images, with the bundled tokenizer, 42% of the known tokens get another code than the
    original's, 27% after this fill; with the 2.71M tokenizer before it 40% and 18%).
    """
    known = pixel_mask.to(x.dtype)
    levels, xs, ws = [], x * known, known
    while min(xs.shape[-2:]) > 1:
        levels.append((xs, ws))
        xs, ws = F.avg_pool2d(xs, 2), F.avg_pool2d(ws, 2)  # block sums / block area
    fill = xs / ws.clamp_min(1e-8)  # (B, C, 1, 1): the mean of the known pixels
    for xs_l, ws_l in reversed(levels):
        up = F.interpolate(fill, size=xs_l.shape[-2:], mode="bilinear", align_corners=False)
        fill = xs_l + (1 - ws_l) * up  # blend: the known part of each block, the coarser fill for the rest
    for _ in range(smooth_iters):
        avg = F.avg_pool2d(F.pad(fill, (1, 1, 1, 1), mode="replicate"), 3, 1)
        fill = known * x + (1 - known) * avg
    return known * x + (1 - known) * fill


@functools.lru_cache(maxsize=16)
def grid_operator(h: int, w: int, order: int) -> sp.csr_matrix:
    """The 5-point Laplacian of an h x w pixel grid to the power ``order`` (1: membrane, 2: thin
    plate), as a sparse (h*w, h*w) matrix over row-major pixels; the image edges reflect (a pixel
    on the edge has fewer neighbours), so nothing outside the image is assumed."""
    idx = np.arange(h * w).reshape(h, w)
    rows, cols, vals = [], [], []
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        src = idx[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)].ravel()  # pixels with this neighbour
        dst = idx[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)].ravel()    # the neighbour
        rows += [src, src]
        cols += [dst, src]
        vals += [np.ones(src.size), -np.ones(src.size)]
    lap = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(h * w, h * w))
    op = lap
    for _ in range(order - 1):
        op = op @ lap
    return op.tocsr()


def smooth_fill(x: torch.Tensor, pixel_mask: torch.Tensor, order: int = 2) -> torch.Tensor:
    """Fill the holes of x (B,C,H,W; pixel_mask (B,1,H,W), 1 = known) with the smoothest surface
    through the known pixels: the solution of Laplacian^order u = 0 on the hole pixels, the known
    pixels as boundary values (order 1: harmonic, the membrane :func:`fill_holes` approaches;
    order 2: biharmonic / thin plate, whose slope also continues across the hole border). Solved
    exactly (sparse LU in float64 on the CPU, one factorisation per image); an image with no hole or
    no known pixel is returned unchanged."""
    hole = (pixel_mask < 0.5).flatten(1).cpu().numpy()  # (B, H*W)
    B, C, H, W = x.shape
    vals = x.detach().to("cpu", torch.float64).reshape(B, C, H * W).numpy().copy()
    op = grid_operator(H, W, order)
    for b in range(B):
        h = hole[b]
        if not h.any() or h.all():
            continue
        rows = op[h]
        lu = spla.splu(rows[:, h].tocsc())
        vals[b][:, h] = lu.solve(-(rows[:, ~h] @ vals[b][:, ~h].T)).T
    return torch.from_numpy(vals).reshape(B, C, H, W).to(x.device, x.dtype)


def paste_known(pred: torch.Tensor, orig: torch.Tensor, pixel_mask: torch.Tensor, blend: str = "biharmonic",
                smooth_iters: int = 30) -> torch.Tensor:
    """Known pixels from ``orig``, hole pixels from ``pred`` (B,C,H,W; pixel_mask (B,1,H,W), 1 = known).

    blend "hard": the plain paste. "seamless" and "biharmonic": the hole pixels get a smooth
    correction that makes them meet the known pixels at the hole border (gradient-domain / Poisson
    compositing, Perez et al. 2003): the residual orig - pred on the known pixels is filled into the
    hole and added to ``pred``. The prediction keeps its texture; its colour and brightness offsets
    against the surroundings, and the seams, go. "seamless" fills the residual with the membrane of
    :func:`fill_holes` (``smooth_iters`` steps); "biharmonic" (the default) with the exact thin-plate
    fill of :func:`smooth_fill`, whose correction also meets the residual's slope at the border
    (unseen val images, the previous bundled pair: composited FID 9.71 -> 8.73, hole PSNR +0.5 dB;
    README)."""
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    known = pixel_mask.to(pred.dtype)
    if blend == "seamless":
        pred = pred + fill_holes(orig - pred, pixel_mask, smooth_iters)
    elif blend == "biharmonic":
        pred = pred + smooth_fill(orig - pred, pixel_mask, order=2)
    return known * orig + (1 - known) * pred
