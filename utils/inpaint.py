"""The inpainting engine: the decoding options, one batch from masked images to inpainted images
(:func:`inpaint_batch`) and unconditional generation (:func:`generate_images`). No file I/O:
``utils.outputs`` writes the lab's files, ``utils.composite`` holds the pixel-space fill and paste.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from models import CONFIDENCES, ORDERS, image_noise

from .composite import BLENDS, PREFILLS, fill_holes, paste_known, smooth_fill
from .data import TEST_MEAN, TEST_STD, denormalize, pixel_to_token_mask
from .runtime import autocast


@dataclass
class InpaintOptions:
    """How to decode. The token choice is explicit here (argmax unless set; a model config's default is
    ``token_choice_options(model.decoding)``, as inpainting.py, the page and demo.py pass it); the choice
    temperature, a number the lab's config always names, defaults to the model's own (None)."""
    total_iter: int = 10
    mask_func: str = "cosine"
    sweet_spot: int = 0
    seed: int = 0
    token_choice: str = "argmax"
    sample_temperature: float = 1.0  # softmax temperature of token_choice "sample" (1: the model's distribution)
    choice_temperature: float | None = None  # scale of the confidences' Gumbel noise; None: the model config's
    confidence: str = "prob"  # prob (the lab's) | logprob (the official MaskGIT code's)
    order: str = "confidence"  # confidence (MaskGIT) | halton (fixed Halton order over the hole)
    mask_rule: str = "lab"
    prefill: str = "smooth"
    paste_known: bool = False
    blend: str = "biharmonic"
    refine: int = 0  # steps of :func:`refine_decode` after decoding (0: the plain decode of the tokens, the lab's)
    visualize: bool = True
    gif: bool = False
    precision: str = "fp32"

    def __post_init__(self):
        if self.prefill not in PREFILLS or self.blend not in BLENDS:
            raise ValueError(f"prefill must be one of {PREFILLS} and blend one of {BLENDS}, got {self.prefill!r}, "
                             f"{self.blend!r}")
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise ValueError(f"refine must be a whole number of steps >= 0, got {self.refine!r}")
        if not self.sample_temperature > 0:
            raise ValueError(f"sample_temperature must be > 0, got {self.sample_temperature!r}")
        if self.choice_temperature is not None and not 0 <= self.choice_temperature < float("inf"):
            raise ValueError(f"choice_temperature must be None or a finite number >= 0, got "
                             f"{self.choice_temperature!r}")
        if self.confidence not in CONFIDENCES or self.order not in ORDERS:
            raise ValueError(f"confidence must be one of {CONFIDENCES} and order one of {ORDERS}, got "
                             f"{self.confidence!r}, {self.order!r}")


def sampling_options(temperature: float | None) -> dict:
    """The token-choice fields of :class:`InpaintOptions`: None = argmax, else ``sample`` at this
    ``sample_temperature``."""
    if temperature is None:
        return {"token_choice": "argmax", "sample_temperature": 1.0}
    return {"token_choice": "sample", "sample_temperature": temperature}


def token_choice_options(defaults: dict, token_choice: str | None = None,
                         sample_temperature: float | None = None) -> dict:
    """The token-choice fields of :class:`InpaintOptions`: those given, the rest from ``defaults`` (a
    model's ``decoding``: what its config names, ``models.VQGAN_Transformer.decoding_defaults``). A
    temperature given with a choice that comes out argmax is an error (argmax takes the most probable
    token at any temperature)."""
    choice = token_choice or defaults["token_choice"]
    if choice != "sample":
        if sample_temperature is not None:
            raise ValueError(f"a sample temperature only changes token choice 'sample', and the choice is {choice!r}"
                             + ("" if token_choice else " (the model config's)"))
        return sampling_options(None)
    return sampling_options(defaults["sample_temperature"] if sample_temperature is None else sample_temperature)


def token_choice_label(token_choice: str, sample_temperature: float) -> str:
    """The token-choice fields in words, as reports and logs show them: "argmax" or "sample, temperature T"."""
    return f"sample, temperature {sample_temperature:g}" if token_choice == "sample" else token_choice


def latent_mask_images(mask: torch.Tensor, res: int) -> torch.Tensor:
    """Token masks (S, N) True = masked -> (S, 3, res, res) images, white = known, black = masked."""
    return (~mask).float().view(-1, 1, res, res).expand(-1, 3, -1, -1)  # (S, 3, h, w)


def prefill(x: torch.Tensor, pixel_mask: torch.Tensor, how: str) -> torch.Tensor:
    """What the tokenizer sees in the holes: smooth (the push-pull membrane of :func:`fill_holes`),
    biharmonic (the exact thin-plate fill of :func:`smooth_fill`) or gray (x as given)."""
    if how == "smooth":
        return fill_holes(x, pixel_mask)
    return smooth_fill(x, pixel_mask, order=2) if how == "biharmonic" else x


REFINE_LR = 0.1  # Adam's step size in refine_decode (chosen on 64 unseen val images: docs/HISTORY.md, session 33)


def refine_decode(vqgan, ids: torch.Tensor, x: torch.Tensor, pixel_mask: torch.Tensor, steps: int,
                  lr: float = REFINE_LR, autocast_ctx=None) -> torch.Tensor:
    """Decode the tokens ``ids`` (B, N) from latents fitted to the known pixels.

    The tokens stay as the transformer chose them; their code vectors z_q (B, D, h, w), the decoder's
    input, get an offset that ``steps`` Adam steps fit to minimise each image's mean squared error on its
    known pixels (x (B,3,H,W) in the tokenizer's normalized space, pixel_mask (B,1,H,W), 1 = known); the
    decoder's weights are not touched. What it buys: the decode of the known region approaches the
    input (the quantisation's loss of detail and colour there is won back), and the hole pixels, decoded
    from the same latents, meet their surroundings (GAN-inversion style, on the VQGAN decoder). Each
    image's loss is its own mean and Adam's update is elementwise, so an image's result does not depend
    on the batch around it; an image without known pixels keeps its plain decode.
    Returns the decoded images (B,3,H,W) in the normalized space, without gradients."""
    r = vqgan.cfg.latent_resolution
    known = pixel_mask.to(x.dtype)
    per_image = known.flatten(1).sum(1).mul(x.shape[1]).clamp_min(1)  # (B,) known values per image
    with torch.no_grad():
        z = vqgan.codebook.lookup(ids, r, r).float()  # (B, D, h, w)
    offset = torch.zeros_like(z, requires_grad=True)
    opt = torch.optim.Adam([offset], lr=lr)
    ctx = autocast_ctx or contextlib.nullcontext
    params = [p for p in vqgan.parameters() if p.requires_grad]
    try:
        for p in params:  # gradients only for the offset
            p.requires_grad_(False)
        with torch.enable_grad():
            for _ in range(steps):
                with ctx():
                    y = vqgan.decode(z + offset).float()  # (B, 3, H, W)
                loss = ((y - x).pow(2) * known).flatten(1).sum(1).div(per_image).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p in params:
            p.requires_grad_(True)
    with torch.no_grad(), ctx():
        return vqgan.decode(z + offset.detach()).float()


@torch.no_grad()
def inpaint_batch(model, x: torch.Tensor, pixel_mask: torch.Tensor, indices, opts: InpaintOptions, device,
                  with_steps: bool = False):
    """x: (B,3,H,W) normalized with the test constants; pixel_mask (B,1,H,W) 1 = known.

    Returns (final images in [0,1] (B,3,H,W), DecodeResult, token mask at the start (B, N),
    decoded image after every step (B, S, 3, H, W) in [0,1] or None). With ``with_steps`` the
    final image is the last step's decode, so the final tokens are decoded once, not twice; with
    ``opts.refine`` the final image (and the last step's) is :func:`refine_decode`'s.
    """
    res = model.vqgan.cfg.latent_resolution
    _, ids = model.encode_to_z(prefill(x, pixel_mask, opts.prefill))  # (B, N)
    token_mask = pixel_to_token_mask(pixel_mask, res, opts.mask_rule).to(device)  # (B, N) True = masked
    noise = image_noise(opts.seed, indices, device)  # image i's draws depend on (seed, i), not on the batch
    result = model.inpaint(ids, token_mask, opts.total_iter, noise, opts.mask_func, opts.sweet_spot, opts.token_choice,
                           autocast_ctx=(lambda: autocast(device, opts.precision)), confidence=opts.confidence,
                           order=opts.order, sample_temperature=opts.sample_temperature,
                           choice_temperature=opts.choice_temperature)
    seq = result.ids_per_step if with_steps else [result.ids]  # S x (B, N)
    with autocast(device, opts.precision):  # one step at a time: memory and cache stay at batch scale
        dec = [model.decode_tokens(ids).float() for ids in (seq[:-1] if opts.refine else seq)]
    if opts.refine:  # the final tokens decoded from latents fitted to the known pixels
        dec.append(refine_decode(model.vqgan, result.ids, x, pixel_mask, opts.refine,
                                 autocast_ctx=lambda: autocast(device, opts.precision)))
    imgs = denormalize(torch.stack(dec, 1), TEST_MEAN, TEST_STD)  # (B, S, 3, H, W) in [0, 1]
    out = imgs[:, -1]  # the final tokens are the last step's
    if opts.paste_known:
        orig = denormalize(x, TEST_MEAN, TEST_STD)
        out = paste_known(out, orig, pixel_mask, opts.blend)
    return out, result, token_mask, (imgs if with_steps else None)


@torch.no_grad()
def generate_images(model, n: int, opts: InpaintOptions, device, seed_offset: int = 1, with_steps: bool = False):
    """Unconditional samples: every token starts masked and is decoded as in :func:`inpaint_batch`
    (schedule, T, token choice, confidence, order of ``opts``; no sweet spot, no pixels to paste).

    Image i draws its noise from ``image_noise(opts.seed + seed_offset, [i])`` (offset 1: the
    seeds of ``inpainting.py --unconditional``). Returns (images in [0,1] (n,3,H,W), DecodeResult,
    decoded image after every step (n, S, 3, H, W) in [0,1] or None).
    """
    N = model.num_image_tokens
    ids = torch.zeros(n, N, dtype=torch.long, device=device)  # (n, N) any ids: every position is masked
    mask = torch.ones(n, N, dtype=torch.bool, device=device)  # (n, N) True = masked
    noise = image_noise(opts.seed + seed_offset, range(n), device)
    result = model.inpaint(ids, mask, opts.total_iter, noise, opts.mask_func, 0, opts.token_choice,
                           autocast_ctx=(lambda: autocast(device, opts.precision)), confidence=opts.confidence,
                           order=opts.order, sample_temperature=opts.sample_temperature,
                           choice_temperature=opts.choice_temperature)
    seq = result.ids_per_step if with_steps else [result.ids]  # S x (n, N)
    with autocast(device, opts.precision):
        imgs = torch.stack([model.decode_tokens(ids).float() for ids in seq], 1)  # (n, S, 3, H, W)
    imgs = denormalize(imgs, TEST_MEAN, TEST_STD)  # in [0, 1]
    return imgs[:, -1], result, (imgs if with_steps else None)
