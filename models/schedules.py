"""Mask schedules gamma(r): the fraction of tokens that stay masked at ratio r in [0, 1].

One implementation, shared by training (masked-token count of MVTM) and inference
(tokens re-masked after each decoding step). Every schedule has gamma(0) = 1, gamma(1) = 0
and is non-increasing.
"""
from __future__ import annotations

import math

import torch

_SCHEDULES = {
    "linear": lambda r: 1.0 - r,
    "cosine": lambda r: torch.cos(r * math.pi / 2),
    "square": lambda r: 1.0 - r ** 2,
    "cubic": lambda r: 1.0 - r ** 3,  # concave, from the MaskGIT paper
    "sqrt": lambda r: 1.0 - r.sqrt(),  # convex, from the MaskGIT paper
    "log": lambda r: 1.0 - torch.log2(1.0 + r),  # convex
}
SCHEDULES = tuple(_SCHEDULES)


def gamma_func(mode: str = "cosine"):
    """Return gamma(r) for a schedule name; accepts floats or tensors, returns the same kind."""
    if mode not in _SCHEDULES:
        raise ValueError(f"unknown mask schedule {mode!r}; choose from {', '.join(SCHEDULES)}")
    fn = _SCHEDULES[mode]

    def gamma(r):
        if isinstance(r, torch.Tensor):
            return fn(r.double()).clamp(0.0, 1.0).to(r.dtype if r.is_floating_point() else torch.float64)
        return float(fn(torch.tensor(float(r), dtype=torch.float64)).clamp(0.0, 1.0))

    gamma.__name__ = f"gamma_{mode}"
    return gamma
