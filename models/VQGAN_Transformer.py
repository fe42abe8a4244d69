"""MaskGit: a frozen VQGAN tokenizer + a bidirectional transformer trained with masked
visual token modeling (MVTM), decoded by iterative confidence-based sampling.

Token mask polarity everywhere: bool (B, N), **True = masked**.
Nothing here reads files; ``utils.build`` builds a MaskGit from the YAML configs and
loads the checkpoints.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .decoding import TOKEN_CHOICES, iterative_decode
from .schedules import gamma_func
from .Transformer import BidirectionalTransformer, TransformerConfig
from .VQGAN import VQGAN, VQGANConfig

MODEL_PARAM_KEYS = {"VQ_Configs", "num_image_tokens", "num_codebook_vectors", "choice_temperature", "gamma_type",
                    "token_choice", "sample_temperature", "Transformer_param", "training_param"}


def decoding_defaults(configs: dict) -> dict:
    """The token choice a ``model_param`` section names for decoding, checked: ``token_choice`` (argmax |
    sample) and ``sample_temperature`` (of sample; 1 = the model's softmax). Ours; the lab's config names
    neither, which means argmax (the lab's choice) and 1."""
    choice = configs.get("token_choice", "argmax")
    if choice not in TOKEN_CHOICES:
        raise ValueError(f"model_param.token_choice must be one of {', '.join(TOKEN_CHOICES)}, got {choice!r}")
    temperature = configs.get("sample_temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"model_param.sample_temperature must be a number > 0, got {temperature!r}")
    return {"token_choice": choice, "sample_temperature": float(temperature)}


class MaskGit(nn.Module):
    def __init__(self, configs: dict, vqgan_config: VQGANConfig | dict | None = None):
        """``configs`` is the lab's ``model_param`` section of ``MaskGit.yml``."""
        super().__init__()
        unknown = sorted(set(configs) - MODEL_PARAM_KEYS)
        if unknown:
            raise ValueError(f"model_param: unknown keys {unknown}; known keys are {sorted(MODEL_PARAM_KEYS)}")
        self.vqgan = VQGAN(vqgan_config).eval().requires_grad_(False)
        tcfg = TransformerConfig.from_dict(dict(configs.get("Transformer_param", {})))
        self.num_image_tokens = int(configs.get("num_image_tokens", tcfg.num_image_tokens))
        self.mask_token_id = int(configs.get("num_codebook_vectors", tcfg.num_codebook_vectors))
        self.choice_temperature = float(configs.get("choice_temperature", 4.5))
        self.gamma_type = configs.get("gamma_type", "cosine")
        self.gamma = self.gamma_func(self.gamma_type)
        self.decoding = decoding_defaults(configs)  # how inpainting.py, the app and the demo decode unless told
        vq = self.vqgan.cfg
        checks = [("Transformer_param.num_image_tokens", tcfg.num_image_tokens, "num_image_tokens", self.num_image_tokens),
                  ("Transformer_param.num_image_tokens", tcfg.num_image_tokens, "VQGAN latent_resolution^2",
                   vq.latent_resolution ** 2),
                  ("Transformer_param.num_codebook_vectors", tcfg.num_codebook_vectors, "num_codebook_vectors",
                   self.mask_token_id),
                  ("Transformer_param.num_codebook_vectors", tcfg.num_codebook_vectors,
                   "VQGAN num_codebook_vectors", vq.num_codebook_vectors)]
        for a, va, b, vb in checks:
            if va != vb:
                raise ValueError(f"config mismatch: {a} = {va} but {b} = {vb}")
        self.transformer = BidirectionalTransformer(tcfg)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vqgan.eval()  # the tokenizer is frozen
        return self

    @staticmethod
    def gamma_func(mode: str = "cosine"):
        return gamma_func(mode)

    @torch.no_grad()
    def encode_to_z(self, x: torch.Tensor):
        """Images (B,3,H,W), normalized -> (z_q (B,D,h,w), token ids (B, h*w) raster order)."""
        ids = self.vqgan.encode_indices(x)  # (B, h*w)
        r = self.vqgan.cfg.latent_resolution
        return self.vqgan.codebook.lookup(ids, r, r), ids  # (B, D, h, w), (B, h*w)

    @torch.no_grad()
    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N) -> images (B,3,H,W) in normalized space."""
        return self.vqgan.decode_indices(ids)

    def mask_tokens(self, ids: torch.Tensor, generator: torch.Generator | None = None,
                    region: torch.Tensor | None = None):
        """MVTM masking. Per sample a ratio r ~ U(0,1); exactly ceil(gamma(r, N) * N) tokens
        (at least 1) are masked, at uniformly random positions.

        ``region`` (B, N) bool, optional: per sample, only its True positions may be masked and
        N counts them (an inpainting hole: the rest of the image is known, as when decoding).
        A row with no True position is treated as the whole image.

        Returns (input ids with masked positions = mask id (B, N), mask (B, N) bool True = masked).
        """
        B, N = ids.shape
        dev = generator.device if generator is not None else ids.device
        r = torch.rand(B, generator=generator, device=dev)  # (B,)
        scores = torch.rand(B, N, generator=generator, device=dev)  # (B, N)
        size = torch.full((B,), N, device=dev)
        if region is not None:
            region = region.to(dev)
            region = region | ~region.any(-1, keepdim=True)  # empty row -> whole image
            scores = scores.masked_fill(~region, 2.0)  # outside the region: ranked last
            size = region.sum(-1)
        n_masked = torch.minimum(torch.ceil(self.gamma(r.double(), size) * size).long().clamp_(min=1), size)  # (B,)
        rank = scores.argsort(dim=-1).argsort(dim=-1)  # (B, N) a random permutation per row
        mask = (rank < n_masked[:, None]).to(ids.device)  # (B, N)
        return ids.masked_fill(mask, self.mask_token_id), mask

    def forward_tokens(self, ids: torch.Tensor, generator: torch.Generator | None = None):
        """MVTM on token ids (B, N) -> (logits (B, N, V), targets (B, N)); unmasked targets are
        -100, the default ``ignore_index`` of ``F.cross_entropy``, so only masked tokens count."""
        inputs, mask = self.mask_tokens(ids, generator)
        logits = self.transformer(inputs)  # (B, N, V)
        targets = ids.masked_fill(~mask, -100)  # (B, N)
        return logits, targets

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """The lab's interface: images (B,3,H,W) -> (logits, targets)."""
        _, ids = self.encode_to_z(x)
        return self.forward_tokens(ids, generator)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy over masked tokens only (targets == -100 are ignored)."""
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                           ignore_index=-100, label_smoothing=label_smoothing)

    def choice_temperature_for(self, choice_temperature: float | None = None) -> float:
        """The choice temperature a decode runs at: the one given, or the config's (None)."""
        return self.choice_temperature if choice_temperature is None else choice_temperature

    @torch.no_grad()
    def inpaint(self, ids: torch.Tensor, mask: torch.Tensor, total_iter: int, noise, mask_func: str | None = None,
                sweet_spot: int = 0, token_choice: str = "argmax", autocast_ctx=None, confidence: str = "prob",
                order: str = "confidence", sample_temperature: float = 1.0, choice_temperature: float | None = None):
        """Fill the masked tokens (True = masked) of ``ids`` (B, N) with the noise of ``noise`` (an
        ``ImageNoise``); see ``models.decoding``. ``choice_temperature`` None: the config's
        (``self.choice_temperature``), which a call never changes."""
        gamma = self.gamma if mask_func is None else self.gamma_func(mask_func)
        return iterative_decode(self.transformer, ids, mask, gamma, total_iter, noise, self.mask_token_id,
                                self.choice_temperature_for(choice_temperature), sweet_spot, token_choice,
                                autocast_ctx, confidence, order, sample_temperature)

