"""Iterative confidence-based decoding (MaskGIT) as pure functions over a batch.

Token mask polarity: bool (B, N), **True = masked** (to be generated).

Step t of T uses r = (t+1)/T. The number of hole tokens that stay masked follows the schedule
with the official code's clamp (``masked_count``); which ones stay masked is decided by the
confidence order (the lab's, with p or log p) or by the fixed Halton order (``halton_order``).

Randomness is counter based (``ImageNoise``): every draw of image b is a hash of (seed, image index,
step, stream, position), made for the whole batch in a few integer tensor ops, so an image decodes to
the same tokens whether it is decoded alone or inside a batch (same seed, same result).
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


# ---- counter-based noise: image b's draws are a hash of (seed, image index, step, stream, position) ----
# SplitMix64 (Steele, Lea, Flood 2014) on torch int64: + and * wrap mod 2**64 on CPU and CUDA, and
# torch's >> is arithmetic, so every right shift is masked to act as the unsigned (logical) one.
_M64 = 2 ** 64 - 1
_GOLDEN, _MUL1, _MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
SAMPLE_STREAM, CONFIDENCE_STREAM = 0, 1  # token sampling (N,) uniforms, confidence noise (N,) Gumbel draws
_UNIFORM_BITS = 24  # two uniforms per 64-bit hash: bits 40..63 and 8..31


def _signed(v: int) -> int:
    """An unsigned 64-bit int as the int64 with the same bits."""
    return v - 2 ** 64 if v >= 2 ** 63 else v


def splitmix64_int(z: int) -> int:
    """The SplitMix64 output function on a Python int (mod 2**64): the reference of :func:`splitmix64`."""
    z &= _M64
    z = ((z ^ (z >> 30)) * _MUL1) & _M64
    z = ((z ^ (z >> 27)) * _MUL2) & _M64
    return z ^ (z >> 31)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on every element of an int64 tensor (the 64 bits read as
    unsigned), in place; returns ``z``."""
    z.bitwise_xor_((z >> 30).bitwise_and_(2 ** 34 - 1)).mul_(_signed(_MUL1))  # logical >> 30, then * mod 2**64
    z.bitwise_xor_((z >> 27).bitwise_and_(2 ** 37 - 1)).mul_(_signed(_MUL2))
    return z.bitwise_xor_((z >> 31).bitwise_and_(2 ** 33 - 1))


def hash_key(*values: int) -> int:
    """A 64-bit key (unsigned Python int) of a tuple of ints in [0, 2**64)."""
    h = _GOLDEN
    for v in values:
        if not 0 <= v <= _M64:
            raise ValueError(f"noise keys are ints in [0, 2**64), got {v}")
        h = splitmix64_int(h ^ v)
    return h


@functools.lru_cache(maxsize=8)
def _weyl_steps(m: int, device) -> torch.Tensor:
    """(m,) int64 (i + 1) * golden mod 2**64, the SplitMix64 state increments (do not modify)."""
    return torch.arange(1, m + 1, dtype=torch.int64, device=device).mul_(_signed(_GOLDEN))


def counter_bits(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) int32 random 24-bit words in [0, 2**24). Row b is the SplitMix64 sequence seeded with
    ``keys[b]`` (int64): hash i = splitmix64(keys[b] + (i + 1) * golden) gives word 2i (bits 8..31)
    and word 2i + 1 (bits 40..63)."""
    m = (n + 1) // 2  # hashes per row
    z = splitmix64(_weyl_steps(m, keys.device)[None, :] + keys[:, None])  # (B, m)
    w = z.view(torch.int32)  # (B, 2m): low then high 32-bit half of each hash (little endian: CPU and CUDA)
    return w[:, :n].bitwise_right_shift(32 - _UNIFORM_BITS).bitwise_and_(2 ** _UNIFORM_BITS - 1)  # (B, n)


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """24-bit words k -> float64 uniforms (k + 1/2) / 2**24, in (0, 1) and symmetric about 1/2."""
    return bits.double().add_(0.5).mul_(2.0 ** -_UNIFORM_BITS)


def bits_to_unit_float(bits: torch.Tensor) -> torch.Tensor:
    """24-bit words k -> float32 k / 2**24: exact in float32 and in [0, 1), never 1 (for the inverse CDF)."""
    return bits.float().mul_(2.0 ** -_UNIFORM_BITS)


def bits_to_gumbel(bits: torch.Tensor) -> torch.Tensor:
    """24-bit words k -> float32 standard Gumbel -log(-log u) of the same u = (k + 1/2) / 2**24 as
    :func:`bits_to_uniform`. -log u is computed as log1p((1 - u) / u) = log1p((2**25 - 2k - 1) / (2k + 1))
    from exact integers, so it keeps its relative precision in float32 even at u = 1 - 2**-25."""
    den = bits.bitwise_left_shift(1).bitwise_or_(1)  # (..) 2k + 1, int32
    ratio = torch.rsub(den, 2 ** (_UNIFORM_BITS + 1)).float().div_(den.float())  # (..) (1 - u) / u, float32
    return ratio.log1p_().log_().neg_()  # -log(-log u)


@dataclass(frozen=True, eq=False)
class ImageNoise:
    """The decoding noise of a batch of images. Image b draws from a counter-based hash of (seed,
    its image index, step, stream, position): its noise does not depend on the batch it is in, and
    one call covers the whole batch (no generator per image). Build with :func:`image_noise`;
    ``iterative_decode`` moves it to step t with :meth:`at_step`."""
    image_keys: torch.Tensor  # (B,) int64: the 64-bit hash of (seed, image index)
    step: int = 0

    def at_step(self, step: int) -> "ImageNoise":
        return ImageNoise(self.image_keys, step)

    def _keys(self, stream: int) -> torch.Tensor:
        """(B,) int64 seeds of this step and stream, one per image."""
        return splitmix64(self.image_keys ^ _signed(hash_key(self.step, stream)))

    def uniform(self, shape_per_image, stream: int) -> torch.Tensor:
        """(B, *shape_per_image) float64 uniforms in (0, 1) of this step and stream."""
        bits = counter_bits(self._keys(stream), math.prod(shape_per_image))  # (B, n)
        return bits_to_uniform(bits).view(-1, *shape_per_image)  # (B, n) -> (B, *shape)

    def unit_float(self, shape_per_image, stream: int) -> torch.Tensor:
        """(B, *shape_per_image) float32 uniforms k / 2**24 in [0, 1) of this step and stream (a new tensor)."""
        bits = counter_bits(self._keys(stream), math.prod(shape_per_image))  # (B, n)
        return bits_to_unit_float(bits).view(-1, *shape_per_image)  # (B, n) -> (B, *shape)

    def gumbel(self, shape_per_image, stream: int) -> torch.Tensor:
        """(B, *shape_per_image) float32 standard Gumbel draws of this step and stream (a new tensor)."""
        bits = counter_bits(self._keys(stream), math.prod(shape_per_image))  # (B, n)
        return bits_to_gumbel(bits).view(-1, *shape_per_image)  # (B, n) -> (B, *shape)


def image_noise(seed: int, indices, device) -> ImageNoise:
    """Noise for images ``indices`` (ints >= 0) of a run seeded with ``seed`` (any int, taken
    mod 2**64): the same (seed, index) gives the same draws alone or in any batch."""
    seed = int(seed) % 2 ** 64
    keys = [_signed(hash_key(seed, int(i))) for i in indices]
    return ImageNoise(torch.tensor(keys, dtype=torch.int64, device=device))


def gumbel_like(noise, shape_per_image, stream: int) -> torch.Tensor:
    """(B, *shape_per_image) float32 Gumbel noise of ``noise`` (an :class:`ImageNoise` at its step)
    for ``stream``, a new tensor (decode_step adds into it): decode_step's confidence noise."""
    return noise.gumbel(shape_per_image, stream)


def uniform_like(noise, shape_per_image, stream: int) -> torch.Tensor:
    """(B, *shape_per_image) float32 uniforms in [0, 1) of ``noise`` for ``stream``: decode_step's
    token sampling. With :func:`gumbel_like`, the only places decode_step draws randomness."""
    return noise.unit_float(shape_per_image, stream)


def sample_codes(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, N) codes drawn from softmax(logits / temperature) for logits (B, N, K), by inverting the
    CDF at the uniforms ``u`` (B, N) in [0, 1): the first code k whose cumulative weight exceeds u
    times the total. One uniform per token instead of K Gumbel draws (Gumbel-max draws the same
    distribution): the (B, N, K) work is one exp and one cumsum, in float32 (the CDF is exact up to
    float32 rounding). ``temperature`` < 1 sharpens the distribution towards the argmax."""
    if not temperature > 0:
        raise ValueError(f"the sampling temperature must be > 0, got {temperature!r}")
    w = logits.float()  # (B, N, K) a copy only for half-precision logits
    if temperature != 1.0:
        w = w / temperature  # (B, N, K)
    cdf = (w - w.amax(-1, keepdim=True)).exp_().cumsum_(-1)  # (B, N, K) unnormalised, last = total >= 1
    target = (u * cdf[..., -1]).unsqueeze(-1)  # (B, N, 1) in [0, total)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=w.shape[-1] - 1)  # (B, N)


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


def least_confident(score: torch.Tensor, n_keep: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """(B, N) bool, True for the ``n_keep[b]`` lowest scores of row b of ``score`` (B, N); ties go
    to the lower position, as the first n_keep of a stable ascending sort (``least_confident_sorted``).
    ``k``: an int >= max(n_keep) (default N); only the k lowest scores of a row are sorted (topk)."""
    B, N = score.shape
    k = N if k is None else min(k, N)
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    low = score.topk(k, dim=-1, largest=False, sorted=True).values  # (B, k) ascending
    thr = low.gather(-1, (n_keep - 1).clamp(0, k - 1)[:, None])  # (B, 1) the n_keep-th lowest score
    below, tie = score < thr, score == thr  # (B, N), (B, N)
    room = n_keep[:, None] - below.sum(-1, keepdim=True)  # (B, 1) ties that still fit (0 when n_keep = 0)
    return below | (tie & (tie.cumsum(-1) <= room))  # (B, N) lowest-position ties first


def least_confident_sorted(score: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """The reference of :func:`least_confident`: rank every token by a stable sort (two of them)."""
    rank = score.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)  # (B, N) rank 0 = least confident
    return rank < n_keep[:, None]  # (B, N)


def decode_step(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, n_hole: torch.Tensor, r: float,
                gamma, noise, choice_temperature: float = 4.5, token_choice: str = "argmax",
                confidence: str = "prob", order: str = "confidence", max_keep: int | None = None,
                sample_temperature: float = 1.0):
    """One decoding step.

    logits: (B, N, V) of the transformer on ``ids`` with masked positions set to the mask id;
    only the first ``V - 1`` columns (real codes) can be chosen. ``token_choice``: "argmax"
    takes the most probable code, "sample" draws one from softmax(logits / sample_temperature)
    (``sample_codes``); the confidence below is always the model's own p(chosen), untempered.
    ``order``: "confidence" keeps the least confident tokens masked, with confidence
    p(chosen) (``confidence="prob"``, the lab's) or log p(chosen) (``"logprob"``, the official
    code's), plus choice_temperature * (1 - r) * Gumbel noise; "halton" keeps masked the hole
    tokens that come last in the fixed Halton order (``halton_order``), with no noise.
    ``noise``: an :class:`ImageNoise` at this step. ``max_keep``: an int >= every image's
    ``masked_count`` (a bound known without a host sync; default N).
    Returns (new ids (B, N), new mask (B, N) with ``masked_count`` True per image).
    """
    B, N, V = logits.shape
    logits = logits[..., : V - 1]  # (B, N, K) view: never predict the mask token
    if token_choice == "sample":  # a draw from softmax(logits / T): inverse CDF, one uniform per token
        chosen = sample_codes(logits, uniform_like(noise, (N,), SAMPLE_STREAM), sample_temperature)  # (B, N)
    elif token_choice == "argmax":
        chosen = logits.argmax(-1)  # (B, N) exact in any dtype
    else:
        raise ValueError(f"token_choice must be one of {TOKEN_CHOICES}, got {token_choice!r}")
    new_ids = torch.where(mask, chosen, ids)  # known and already decoded tokens never change
    if order == "halton":
        score = -halton_rank(N, logits.device).float().expand(B, N)  # (B, N) earlier in the order = surer
    elif order == "confidence":
        if confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
        logits = logits.float()  # (B, N, K) a copy only for half-precision logits
        score = logits.gather(-1, chosen[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (B, N) log p(chosen)
        if confidence == "prob":
            score = score.exp()  # (B, N) p(chosen), no (B, N, K) softmax kept
        scale = choice_temperature * (1.0 - r)
        if scale != 0:
            score = score + scale * gumbel_like(noise, (N,), CONFIDENCE_STREAM)  # (B, N)
    else:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    score = torch.where(mask, score, torch.full_like(score, math.inf))  # known / decoded: never re-masked
    n_keep_masked = masked_count(gamma, r, n_hole, mask.sum(-1)).to(logits.device)  # (B,)
    return new_ids, least_confident(score, n_keep_masked, max_keep)


@torch.no_grad()
def iterative_decode(transformer, ids: torch.Tensor, mask: torch.Tensor, gamma, total_iter: int, noise: ImageNoise,
                     mask_token_id: int, choice_temperature: float = 4.5, sweet_spot: int = 0,
                     token_choice: str = "argmax", autocast_ctx=None, confidence: str = "prob",
                     order: str = "confidence", sample_temperature: float = 1.0) -> DecodeResult:
    """Fill the masked tokens of ``ids`` (B, N) in ``total_iter`` steps (ratio r = (t+1)/T; see
    ``decode_step`` for ``token_choice``, ``sample_temperature``, ``confidence`` and ``order``); step t draws from
    ``noise.at_step(t)``.

    ``sweet_spot`` > 0 stops after that many steps and keeps the tokens decoded so far.
    """
    if total_iter < 1:
        raise ValueError(f"total_iter must be >= 1, got {total_iter}")
    n_hole = mask.sum(-1)  # (B,) per-image hole size, fixed for the whole decode
    # the counts per step follow from the hole sizes alone: a host copy bounds every step's topk
    # (+1: the host's and the device's float64 schedules may round apart by one token)
    n_hole_host = n_hole.cpu()  # (B,) the decode's one host sync
    unknown_host = n_hole_host
    steps = total_iter if sweet_spot <= 0 else min(sweet_spot, total_iter)
    ids_hist, mask_hist = [], []
    for t in range(steps):
        r = (t + 1) / total_iter
        unknown_host = masked_count(gamma, r, n_hole_host, unknown_host)  # (B,) on the host
        max_keep = int(unknown_host.max()) + 1 if len(unknown_host) else 0
        inputs = ids.masked_fill(mask, mask_token_id)  # (B, N)
        if autocast_ctx is not None:
            with autocast_ctx():
                logits = transformer(inputs)
        else:
            logits = transformer(inputs)  # (B, N, V)
        ids, mask = decode_step(logits, ids, mask, n_hole, r, gamma, noise.at_step(t), choice_temperature,
                                token_choice, confidence, order, max_keep, sample_temperature)
        ids_hist.append(ids)
        mask_hist.append(mask)
    return DecodeResult(ids, mask, ids_hist, mask_hist, steps)
