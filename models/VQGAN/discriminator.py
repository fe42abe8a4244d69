"""PatchGAN discriminator for stage-1 training (not part of the lab's VQGAN.pt)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """Conv stack that scores overlapping patches: (B,3,H,W) -> (B,1,h,w) logits."""

    def __init__(self, in_channels: int = 3, base: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, base, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = base
        for i in range(1, n_layers):
            c_out = base * min(2 ** i, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2 if i < n_layers - 1 else 1, 1), nn.GroupNorm(min(32, c_out), c_out),
                       nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.model(x)

    def features(self, x) -> list:
        """The activations after each LeakyReLU, then the logits (the last entry equals forward(x))."""
        feats = []
        for layer in self.model:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                feats.append(x)
        return feats + [x]


def d_loss_fn(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    if kind == "bce":
        return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
    raise ValueError(f"disc loss must be 'hinge' or 'bce', got {kind!r}")


def g_loss_fn(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean() if kind == "hinge" else F.softplus(-fake_logits).mean()


def feature_matching_loss(real_feats: list, fake_feats: list) -> torch.Tensor:
    """Discriminator feature matching (Salimans et al. 2016; pix2pixHD's form): the mean over the
    hidden layers of the mean absolute difference between the activations of the real and the
    reconstructed image. The real activations are targets (detached); the logits are left out."""
    terms = [(f.float() - r.detach().float()).abs().mean() for r, f in zip(real_feats[:-1], fake_feats[:-1])]
    return torch.stack(terms).mean()


def r1_penalty(disc, x: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al., ICML 2018) on real images: the mean over images of ||grad_x s(x)||^2, where
    an image's score s is the mean of its patch logits (what the mean-reduced GAN loss sees; so gamma
    keeps the scale it has for a one-logit discriminator such as StyleGAN2's). In fp32, with a graph
    for the discriminator's update; the caller multiplies by gamma / 2."""
    x = x.detach().float().requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x).float().flatten(1).mean(1).sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
