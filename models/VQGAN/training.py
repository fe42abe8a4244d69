"""Stage-1 training pieces that are not part of the tokenizer's weights: the EMA codebook update
with k-means initialisation and dead-code restart, the SSIM loss and the LeCam regulariser of
the discriminator. Pure tensor code: the trainer (train_vqgan.py) owns the loop and the files.

Latents here are flattened BHWC rows (M, D), already projected as the codebook searches them
(``Codebook.project``: l2-normalised with ``codebook_norm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.metrics import ssim_map


def kmeans(z: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on rows z (M, D), initialised from k distinct random rows (k <= M, else
    with replacement). An empty cluster keeps its previous centre. Returns (centres (k, D),
    counts (k,) of the last assignment)."""
    z = z.float()
    pick = (torch.randperm(len(z), generator=generator, device=generator.device)[:k] if k <= len(z)
            else torch.randint(0, len(z), (k,), generator=generator, device=generator.device))
    centres = z[pick.to(z.device)].clone()  # (k, D)
    counts = torch.zeros(k, device=z.device)
    for _ in range(iters):
        assign = torch.cdist(z, centres).argmin(1)  # (M,)
        counts = torch.bincount(assign, minlength=k).float()  # (k,)
        sums = torch.zeros_like(centres).index_add_(0, assign, z)  # (k, D)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres, counts


class EMACodebook:
    """Codebook learned by exponential moving averages instead of gradients (VQ-VAE-2, taming's
    EMAVectorQuantizer): per code, N_k <- d N_k + (1-d) n_k and m_k <- d m_k + (1-d) sum of the
    latents assigned to it; code_k = m_k / N~_k with Laplace-smoothed counts
    N~_k = (N_k + eps) / (sum N + K eps) * sum N. The first batch seeds the codes by k-means;
    ``restart_dead`` moves dead codes onto latents of the current batch and resets their statistics."""

    def __init__(self, embedding: torch.nn.Embedding, decay: float = 0.99, eps: float = 1e-5, kmeans_iters: int = 10):
        self.weight = embedding.weight  # (K, D) parameter, updated in place (no gradient)
        self.weight.requires_grad_(False)
        K, D = self.weight.shape
        self.decay, self.eps, self.kmeans_iters = decay, eps, kmeans_iters
        dev = self.weight.device
        self.cluster_size = torch.zeros(K, device=dev)  # N_k
        self.embed_sum = self.weight.detach().float().clone()  # m_k
        self.initialised = False

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, generator: torch.Generator) -> None:
        centres, counts = kmeans(z, len(self.weight), self.kmeans_iters, generator)
        self.weight.copy_(centres.to(self.weight.dtype))
        self.cluster_size.copy_(counts.clamp_min(1.0))
        self.embed_sum.copy_(centres * self.cluster_size[:, None])
        self.initialised = True

    @torch.no_grad()
    def update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        """One EMA step from latents z (M, D) assigned to codes idx (M,)."""
        z = z.float()
        K = len(self.weight)
        n = torch.bincount(idx, minlength=K).float()  # (K,)
        s = torch.zeros_like(self.embed_sum).index_add_(0, idx, z)  # (K, D)
        self.cluster_size.lerp_(n, 1 - self.decay)
        self.embed_sum.lerp_(s, 1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + K * self.eps) * total  # (K,)
        self.weight.copy_((self.embed_sum / smoothed[:, None]).to(self.weight.dtype))

    @torch.no_grad()
    def restart_dead(self, counts: torch.Tensor, z: torch.Tensor, generator: torch.Generator) -> int:
        """Move the codes with counts == 0 (unused since the last restart) onto random rows of
        z (M, D); each restarted code's statistics become that one point (N_k = 1, m_k = z)."""
        dead = (counts == 0).nonzero().flatten()
        if len(dead):
            pick = torch.randint(0, len(z), (len(dead),), generator=generator, device=generator.device).to(z.device)
            new = z[pick].float()  # (n_dead, D)
            self.weight[dead] = new.to(self.weight.dtype)
            self.cluster_size[dead] = 1.0
            self.embed_sum[dead] = new
        return len(dead)

    def state_dict(self) -> dict:
        return {"cluster_size": self.cluster_size, "embed_sum": self.embed_sum, "initialised": self.initialised}

    def load_state_dict(self, state: dict) -> None:
        self.cluster_size.copy_(state["cluster_size"])
        self.embed_sum.copy_(state["embed_sum"])
        self.initialised = bool(state["initialised"])


@torch.no_grad()
def restart_dead_codes(embedding: torch.nn.Embedding, counts: torch.Tensor, z: torch.Tensor,
                       generator: torch.Generator) -> int:
    """Gradient-trained codebook: re-initialise codes with counts == 0 (unused since the last
    restart) with random latents z (M, D) of the current batch plus a little noise."""
    dead = (counts == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    pool = z.detach().float()  # (M, D)
    pick = torch.randint(0, len(pool), (len(dead),), generator=generator, device=generator.device).to(pool.device)
    noise = torch.randn(len(dead), pool.shape[1], generator=generator, device=generator.device).to(pool.device)
    new = pool[pick] + 0.01 * pool.std() * noise
    embedding.weight.data[dead.to(pool.device)] = new.to(embedding.weight.dtype)
    return len(dead)


def ssim_loss(pred01: torch.Tensor, target01: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """1 - mean SSIM of [0, 1] images (B, 3, H, W) with a ``window`` x ``window`` Gaussian window."""
    return 1.0 - ssim_map(pred01, target01, window, sigma).mean()


class LeCam:
    """LeCam regulariser of the discriminator (Tseng et al., CVPR 2021):
    R = mean(relu(D(real) - a_fake)^2) + mean(relu(a_real - D(fake))^2), where a_real / a_fake
    are EMAs (decay 0.99) of the mean real / fake logits (the relu form of the authors' code). Keeps D's outputs from drifting apart when
    data are few (12,000 training images here)."""

    def __init__(self, decay: float = 0.99):
        self.decay = decay
        self.ema_real = torch.zeros(())
        self.ema_fake = torch.zeros(())

    def __call__(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.ema_real = self.decay * self.ema_real.to(real_logits.device) + (1 - self.decay) * real_logits.float().mean()
            self.ema_fake = self.decay * self.ema_fake.to(fake_logits.device) + (1 - self.decay) * fake_logits.float().mean()
        return (F.relu(real_logits.float() - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - fake_logits.float()).pow(2).mean())

    def state_dict(self) -> dict:
        return {"ema_real": self.ema_real.cpu(), "ema_fake": self.ema_fake.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.ema_real, self.ema_fake = state["ema_real"], state["ema_fake"]
