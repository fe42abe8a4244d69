"""Iterative confidence-based decoding (MaskGIT) as pure functions over a batch.

Token mask polarity: bool (B, N), **True = masked** (to be generated).

Randomness comes from one ``torch.Generator`` per image, so an image decodes to the same
tokens whether it is decoded alone or inside a batch (same seed, same result).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


def masked_count(gamma, r: float, n_hole: torch.Tensor) -> torch.Tensor:
    """n = floor(gamma(r) * N_hole) per image: tokens that stay masked after a step at ratio r."""
    return torch.floor(torch.tensor(gamma(r), dtype=torch.float64) * n_hole.double()).long()  # (B,)


def decode_step(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, n_hole: torch.Tensor, r: float,
                gamma, generators, choice_temperature: float = 4.5, token_choice: str = "argmax"):
    """One decoding step.

    logits: (B, N, V) of the transformer on ``ids`` with masked positions set to the mask id;
    only the first ``V - 1`` columns (real codes) can be chosen. ``token_choice``: "argmax"
    takes the most probable code, "sample" draws one (Gumbel-max); either way the confidence is
    its probability plus annealed Gumbel noise.
    Returns (new ids (B, N), new mask (B, N) with exactly floor(gamma(r)*N_hole) True per image).
    """
    B, N, V = logits.shape
    logits = logits[..., : V - 1].float()  # (B, N, K): never predict the mask token
    if token_choice == "sample":  # Gumbel-max sampling from softmax(logits)
        chosen = (logits + gumbel_like(generators, (N, V - 1), logits.device)).argmax(-1)  # (B, N)
    elif token_choice == "argmax":
        chosen = logits.argmax(-1)  # (B, N)
    else:
        raise ValueError(f"token_choice must be 'sample' or 'argmax', got {token_choice!r}")
    prob = logits.softmax(-1).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)  # (B, N) p(chosen token)
    new_ids = torch.where(mask, chosen, ids)  # known and already decoded tokens never change
    confidence = prob + choice_temperature * (1.0 - r) * gumbel_like(generators, (N,), logits.device)  # (B, N)
    confidence = torch.where(mask, confidence, torch.full_like(confidence, math.inf))
    n_keep_masked = masked_count(gamma, r, n_hole).to(logits.device)  # (B,)
    rank = confidence.argsort(dim=-1).argsort(dim=-1)  # (B, N) rank 0 = least confident
    new_mask = rank < n_keep_masked[:, None]  # (B, N)
    return new_ids, new_mask


@torch.no_grad()
def iterative_decode(transformer, ids: torch.Tensor, mask: torch.Tensor, gamma, total_iter: int, generators,
                     mask_token_id: int, choice_temperature: float = 4.5, sweet_spot: int = 0,
                     token_choice: str = "argmax", autocast_ctx=None) -> DecodeResult:
    """Fill the masked tokens of ``ids`` (B, N) in ``total_iter`` steps (ratio r = (t+1)/T).

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
        ids, mask = decode_step(logits, ids, mask, n_hole, r, gamma, generators, choice_temperature, token_choice)
        ids_hist.append(ids)
        mask_hist.append(mask)
    return DecodeResult(ids, mask, ids_hist, mask_hist, steps)
