"""Seeded generator of lab-like inpainting masks: free-form blobs, boxes, brush strokes and
random walks (the lab's test holes look like the walks: ragged, one connected region).

Masks follow the lab's files: uint8 (H, W), **0 = hole**, 255 = known. The lab's test holes
cover 9.7%-29.9% of the pixels (mean 20.8%), irregular and not aligned to the token grid;
the default coverage range (0.10, 0.30) matches that.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data import pixel_to_token_mask

KINDS = ("blob", "box", "stroke", "walk", "mixed")


def _blob(d: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    """An irregular blob: a polygon around a centre with a random radius per vertex."""
    cx, cy = rng.uniform(0.15, 0.85) * size, rng.uniform(0.15, 0.85) * size
    r = rng.uniform(0.06, 0.16) * size
    n = rng.randint(7, 12)
    pts = [(cx + r * rng.uniform(0.6, 1.3) * math.cos(2 * math.pi * k / n),
            cy + r * rng.uniform(0.6, 1.3) * math.sin(2 * math.pi * k / n)) for k in range(n)]
    d.polygon(pts, fill=0)


def _box(d: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    w, h = rng.uniform(0.1, 0.35) * size, rng.uniform(0.1, 0.35) * size
    x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
    d.rectangle([x, y, x + w, y + h], fill=0)


def _stroke(d: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    """A brush stroke: a random walk drawn with a thick round pen."""
    x, y = rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size
    width = max(2, int(rng.uniform(0.05, 0.11) * size))
    angle = rng.uniform(0, 2 * math.pi)
    pts = [(x, y)]
    for _ in range(rng.randint(2, 5)):
        angle += rng.uniform(-1.2, 1.2)
        step = rng.uniform(0.08, 0.22) * size
        x = min(max(x + step * math.cos(angle), 0), size - 1)
        y = min(max(y + step * math.sin(angle), 0), size - 1)
        pts.append((x, y))
    d.line(pts, fill=0, width=width, joint="curve")
    for px, py in (pts[0], pts[-1]):
        d.ellipse([px - width / 2, py - width / 2, px + width / 2, py + width / 2], fill=0)


def _walk(d: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    """A random walk of small squares: a ragged, connected region like the lab's test holes."""
    x, y = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size
    pen = max(1, round(size / 32))
    for _ in range(rng.randint(40, 80)):
        x = min(max(x + rng.choice((-1, 0, 1)) * pen * 1.5, 0), size - 1)
        y = min(max(y + rng.choice((-1, 0, 1)) * pen * 1.5, 0), size - 1)
        w = pen * rng.randint(1, 3)
        d.rectangle([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=0)


_DRAW = {"blob": _blob, "box": _box, "stroke": _stroke, "walk": _walk}


def generate_mask(seed: int, size: int = 64, kind: str = "mixed", coverage=(0.10, 0.30)) -> np.ndarray:
    """One mask, uint8 (size, size), 0 = hole; its hole fraction lies in ``coverage``.

    Shapes are added until the hole fraction reaches a target drawn uniformly from the range;
    a draw that overshoots the upper bound is redrawn (same seed, same mask)."""
    if kind not in KINDS:
        raise ValueError(f"mask kind must be one of {KINDS}, got {kind!r}")
    lo, hi = coverage
    if not 0 < lo <= hi < 1:
        raise ValueError(f"coverage must satisfy 0 < low <= high < 1, got {coverage}")
    rng = random.Random(seed)
    best = None
    for _ in range(100):
        target = rng.uniform(lo, hi)
        img = Image.new("L", (size, size), 255)
        d = ImageDraw.Draw(img)
        frac = 0.0
        while frac < target:
            shape = kind if kind != "mixed" else rng.choice(("blob", "blob", "box", "stroke"))
            _DRAW[shape](d, rng, size)
            arr = np.asarray(img)
            frac = float((arr == 0).mean())
        arr = np.where(np.asarray(img) < 128, 0, 255).astype(np.uint8)
        frac = float((arr == 0).mean())
        if lo <= frac <= hi:
            return arr
        if best is None or abs(frac - (lo + hi) / 2) < abs(best[0] - (lo + hi) / 2):
            best = (frac, arr)
    return best[1]


def hole_fraction(mask: np.ndarray) -> float:
    return float((mask == 0).mean())


def token_hole_bank(count: int, seed: int = 0, size: int = 64, latent_resolution: int = 16,
                    kinds=("walk", "mixed")) -> torch.Tensor:
    """``count`` generated masks at token level (count, latent_resolution**2) bool, **True = hole
    token** under the lab rule (a token is a hole if any of its pixels is). Kinds alternate.
    Used to train the transformer on inpainting-shaped masked regions."""
    pix = np.stack([generate_mask(seed * 1_000_003 + i, size, kinds[i % len(kinds)]) for i in range(count)])
    return pixel_to_token_mask(torch.from_numpy(pix >= 128)[:, None], latent_resolution)
