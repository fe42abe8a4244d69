"""Mask schedules gamma(r, N): the fraction of tokens that stay masked at ratio r in [0, 1].

One implementation, shared by training (masked-token count of MVTM) and inference
(tokens re-masked after each decoding step). N is the number of tokens to fill (per image
when decoding: its hole size; in MVTM: the tokens that may be masked).

* The lab's ``linear`` 1 - r, ``cosine`` cos(pi r / 2), ``square`` 1 - r^2, and the MaskGIT
  paper's ``cubic`` 1 - r^3 and ``sqrt`` 1 - sqrt(r): exact, clipped to [0, 1], independent of
  N; gamma(0) = 1, gamma(1) = 0, non-increasing.
* ``log`` -log2(r) / log2(N) and ``exp`` 1 - 2^(-log2(N) (1 - r)), as in the official code
  (google-research/maskgit, ``libml/mask_schedule.py``), clipped like it to [1e-6, 1]. They
  depend on N and need it. ``log``: gamma(0) = 1, gamma(1) = 1e-6. ``exp``: gamma(0) = 1 - 1/N,
  gamma(1) = 1e-6. Both non-increasing. For N <= 1 (log2 N = 0), ``log`` is 1 for r < 1 and
  ``exp`` is 1e-6: with a single token the decoding clamp decides anyway.

Both kinds reach 0 tokens at r = 1 after flooring (floor(1e-6 N) = 0 for N < 1e6); the decoding
unmasks everything at its last step regardless (``models.decoding``).
"""
from __future__ import annotations

import math

import torch

_LAB = {  # f(r), float64 tensors
    "linear": lambda r: 1.0 - r,
    "cosine": lambda r: torch.cos(r * math.pi / 2),
    "square": lambda r: 1.0 - r ** 2,
    "cubic": lambda r: 1.0 - r ** 3,  # concave, from the MaskGIT paper
    "sqrt": lambda r: 1.0 - r.sqrt(),  # convex, from the MaskGIT paper
}
_OFFICIAL_N = {  # f(r, log2 N), float64 tensors; the official code's formulas
    "log": lambda r, log_n: -torch.log2(r) / log_n,  # convex
    "exp": lambda r, log_n: 1.0 - torch.exp2(-log_n * (1.0 - r)),  # concave
}
SCHEDULES = tuple(_LAB) + tuple(_OFFICIAL_N)
NEEDS_N = tuple(_OFFICIAL_N)  # schedules that depend on the number of tokens to fill
OFFICIAL_CLIP = (1e-6, 1.0)  # the official clip of ``log`` and ``exp``


def gamma_func(mode: str = "cosine"):
    """Return gamma(r, n=None) for a schedule name.

    ``r``: a float or a tensor of ratios; ``n``: the number of tokens to fill, an int or a
    tensor broadcastable with ``r`` (required by ``log`` and ``exp``, ignored by the others).
    Floats in, float out; a tensor in, a tensor out (float64 when ``n`` is given, else the
    dtype of ``r``).
    """
    if mode not in SCHEDULES:
        raise ValueError(f"unknown mask schedule {mode!r}; choose from {', '.join(SCHEDULES)}")

    def gamma(r, n=None):
        if mode in NEEDS_N and n is None:
            raise ValueError(f"mask schedule {mode!r} depends on N, the number of tokens to fill: call gamma(r, n)")
        device = next((v.device for v in (r, n) if isinstance(v, torch.Tensor)), None)
        rt = torch.as_tensor(r, dtype=torch.float64, device=device)
        if mode in _LAB:
            v = _LAB[mode](rt).clamp(0.0, 1.0)
        else:
            log_n = torch.log2(torch.as_tensor(n, dtype=torch.float64, device=device).clamp(min=1.0))
            v = _OFFICIAL_N[mode](rt, log_n)
            v = torch.nan_to_num(v, nan=0.0, posinf=1.0).clamp(*OFFICIAL_CLIP)  # N <= 1: 0/0 at r = 1, x/0 below
        if isinstance(r, torch.Tensor) or isinstance(n, torch.Tensor):
            if n is None and isinstance(r, torch.Tensor) and r.is_floating_point():
                return v.to(r.dtype)
            return v
        return float(v)

    gamma.__name__ = f"gamma_{mode}"
    return gamma
