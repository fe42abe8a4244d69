"""Iterative confidence-based decoding (MaskGIT) as pure functions over a batch.

Token mask polarity: bool (B, N), **True = masked** (to be generated).

Step t of T uses r = (t+1)/T. The number of hole tokens that stay masked follows the schedule
with the official code's clamp (``masked_count``); which ones stay masked is decided by the
confidence order (the lab's, with p or log p) or by the fixed Halton order (``halton_order``).

Randomness comes from one ``torch.Generator`` per image, so an image decodes to the same
tokens whether it is decoded alone or inside a batch (same seed, same result).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

TOKEN_CHOICES = ("argmax", "sample")
CONFIDENCES = ("prob", "logprob")
ORDERS = ("confidence", "halton")


@dataclass
class DecodeResult:
    ids: torch.Tensor  # (B, N) final token ids
    mask: torch.Tensor  # (B, N) bool, True = still masked (non-empty only with a sweet spot)
    ids_per_step: list  # [(B, N)] ids after each step (masked positions hold that step's guesses)
    mask_per_step: list  # [(B, N) bool] mask after each step
    steps: int  # steps actually run


def image_generators(seed: int, indices, device) -> list:
    """One generator per image, seeded from (seed, image index)."""
    gens = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed((int(seed) * 1_000_003 + int(i)) % (2**63 - 1))
        gens.append(g)
    return gens


def _uniform(generators, shape_per_image, device) -> torch.Tensor:
    """(B, *shape) uniforms in (0, 1), image b drawn from generators[b]."""
    u = torch.stack([torch.rand(shape_per_image, generator=g, device=device) for g in generators])
    return u.clamp_(1e-20, 1.0 - 1e-7)


def gumbel_like(generators, shape_per_image, device) -> torch.Tensor:
    return -torch.log(-torch.log(_uniform(generators, shape_per_image, device)))


def halton_sequence(base: int, n: int) -> list:
    """The first ``n`` points of the 1-D Halton sequence (radical inverse of 1, 2, 3, ... in
    ``base``): base 2 gives 1/2, 1/4, 3/4, 1/8, ...; base 3 gives 1/3, 2/3, 1/9, 4/9, ..."""
    out = []
    for i in range(1, n + 1):
        num, den = 0, 1
        while i:  # mirror the base-b digits of i around the radix point
            i, digit = divmod(i, base)
            num, den = num * base + digit, den * base
        out.append(num / den)
    return out


@functools.lru_cache(maxsize=None)
def halton_order(side: int) -> tuple:
    """Raster indices (row * side + col) of a side x side token grid in the 2-D Halton order
    (bases 2 and 3) of Besnier et al., "Halton Scheduler for Masked Generative Image Transformer"
    (ICLR 2025): point k of the sequence falls in column floor(side * h2(k)) and row
    floor(side * h3(k)); a cell is listed when a point first falls in it. A permutation of
    range(side * side)."""
    order, seen, n = [], set(), 0
    while len(order) < side * side:
        n = max(4 * side * side, 2 * n)  # more points until every cell was hit
        order, seen = [], set()
        for hx, hy in zip(halton_sequence(2, n), halton_sequence(3, n)):
            cell = int(hy * side) * side + int(hx * side)
            if cell not in seen:
                seen.add(cell)
                order.append(cell)
    return tuple(order)


@functools.lru_cache(maxsize=None)
def halton_rank(num_tokens: int, device) -> torch.Tensor:
    """(N,) position of every raster token in the Halton order (0 = filled first); built once per
    grid and device (do not modify the returned tensor)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"the Halton order needs a square token grid, got {num_tokens} tokens")
    rank = torch.empty(num_tokens, dtype=torch.long)
    rank[list(halton_order(side))] = torch.arange(num_tokens)
    return rank.to(device)


def masked_count(gamma, r: float, n_hole: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
    """Tokens that stay masked after a step at ratio r, per image (B,), as the official
    parallel_decode: max(1, min(unknown - 1, floor(gamma(r, N_hole) * N_hole))) before the last
    step (r = 1), 0 at it. Every step before the last commits at least one token and keeps at
    least one masked; where the two conflict (one token left) it stays masked. ``unknown``: the
    tokens still masked before the step; an image with none keeps none."""
    if r >= 1.0:  # the last step unmasks everything
        return torch.zeros_like(unknown)
    n = torch.floor(gamma(r, n_hole) * n_hole.double()).long()  # (B,) the schedule's count
    n = torch.minimum(unknown - 1, n).clamp(min=1)  # commit >= 1 token, keep >= 1 masked
    return torch.minimum(n, unknown)  # (B,) no hole left: nothing to keep masked


def decode_step(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, n_hole: torch.Tensor, r: float,
                gamma, generators, choice_temperature: float = 4.5, token_choice: str = "argmax",
                confidence: str = "prob", order: str = "confidence"):
    """One decoding step.

    logits: (B, N, V) of the transformer on ``ids`` with masked positions set to the mask id;
    only the first ``V - 1`` columns (real codes) can be chosen. ``token_choice``: "argmax"
    takes the most probable code, "sample" draws one (Gumbel-max).
    ``order``: "confidence" keeps the least confident tokens masked, with confidence
    p(chosen) (``confidence="prob"``, the lab's) or log p(chosen) (``"logprob"``, the official
    code's), plus choice_temperature * (1 - r) * Gumbel noise; "halton" keeps masked the hole
    tokens that come last in the fixed Halton order (``halton_order``), with no noise.
    Returns (new ids (B, N), new mask (B, N) with ``masked_count`` True per image).
    """
    B, N, V = logits.shape
    logits = logits[..., : V - 1].float()  # (B, N, K): never predict the mask token
    if token_choice == "sample":  # Gumbel-max sampling from softmax(logits)
        chosen = (logits + gumbel_like(generators, (N, V - 1), logits.device)).argmax(-1)  # (B, N)
    elif token_choice == "argmax":
        chosen = logits.argmax(-1)  # (B, N)
    else:
        raise ValueError(f"token_choice must be one of {TOKEN_CHOICES}, got {token_choice!r}")
    new_ids = torch.where(mask, chosen, ids)  # known and already decoded tokens never change
    if order == "halton":
        score = -halton_rank(N, logits.device).float().expand(B, N)  # (B, N) earlier in the order = surer
    elif order == "confidence":
        if confidence == "prob":
            score = logits.softmax(-1).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)  # (B, N) p(chosen)
        elif confidence == "logprob":
            score = logits.log_softmax(-1).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)  # (B, N) log p(chosen)
        else:
            raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
        score = score + choice_temperature * (1.0 - r) * gumbel_like(generators, (N,), logits.device)  # (B, N)
    else:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    score = torch.where(mask, score, torch.full_like(score, math.inf))  # known / decoded: never re-masked
    n_keep_masked = masked_count(gamma, r, n_hole, mask.sum(-1)).to(logits.device)  # (B,)
    rank = score.argsort(dim=-1).argsort(dim=-1)  # (B, N) rank 0 = least confident
    new_mask = rank < n_keep_masked[:, None]  # (B, N)
    return new_ids, new_mask


@torch.no_grad()
def iterative_decode(transformer, ids: torch.Tensor, mask: torch.Tensor, gamma, total_iter: int, generators,
                     mask_token_id: int, choice_temperature: float = 4.5, sweet_spot: int = 0,
                     token_choice: str = "argmax", autocast_ctx=None, confidence: str = "prob",
                     order: str = "confidence") -> DecodeResult:
    """Fill the masked tokens of ``ids`` (B, N) in ``total_iter`` steps (ratio r = (t+1)/T; see
    ``decode_step`` for ``token_choice``, ``confidence`` and ``order``).

    ``sweet_spot`` > 0 stops after that many steps and keeps the tokens decoded so far.
    """
    if total_iter < 1:
        raise ValueError(f"total_iter must be >= 1, got {total_iter}")
    n_hole = mask.sum(-1)  # (B,) per-image hole size, fixed for the whole decode
    steps = total_iter if sweet_spot <= 0 else min(sweet_spot, total_iter)
    ids_hist, mask_hist = [], []
    for t in range(steps):
        r = (t + 1) / total_iter
        inputs = ids.masked_fill(mask, mask_token_id)  # (B, N)
        if autocast_ctx is not None:
            with autocast_ctx():
                logits = transformer(inputs)
        else:
            logits = transformer(inputs)  # (B, N, V)
        ids, mask = decode_step(logits, ids, mask, n_hole, r, gamma, generators, choice_temperature, token_choice,
                                confidence, order)
        ids_hist.append(ids)
        mask_hist.append(mask)
    return DecodeResult(ids, mask, ids_hist, mask_hist, steps)
