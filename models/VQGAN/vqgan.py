"""VQGAN stage-1 tokenizer, written so the lab's ``VQGAN.pt`` loads with ``strict=True``.

Built from :class:`VQGANConfig`. With the lab config it has exactly the 315 tensors
(70,775,299 parameters) listed in ``shared/spec/vqgan_state_dict_keys.txt``; other configs
(channel lists, residual blocks per stage, codebook size) build smaller tokenizers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config_base import StrictConfig


@dataclass
class VQGANConfig(StrictConfig):
    image_channels: int = 3
    enc_channels: list = field(default_factory=lambda: [128, 128, 128, 256, 256, 512])
    dec_channels: list = field(default_factory=lambda: [128, 128, 256, 256, 512])
    latent_dim: int = 256
    img_resolution: int = 64
    latent_resolution: int = 16
    num_codebook_vectors: int = 1024
    beta: float = 0.25
    enc_num_res_blocks: int = 2  # residual blocks per encoder stage (lab: 2)
    dec_num_res_blocks: int = 3  # residual blocks per decoder stage (lab: 3)
    codebook_norm: bool = False  # l2-normalised lookup (ViT-VQGAN): nearest code by cosine (lab: False)
    # GroupNorm of the encoder / decoder: at least this many channels per group. 1 is the lab's rule (32
    # groups where the channels allow, else gcd(32, C)); the lab's 128+ channels get 4+ per group either
    # way, but a 16- or 32-channel stage of a small config gets one channel per group: an instance norm,
    # which erases each image's per-channel mean and contrast (in the decoder's last norm, right before
    # the output conv, nothing bypasses it). N > 1 halves the group count until every group has N channels.
    enc_norm_group_channels: int = 1
    dec_norm_group_channels: int = 1

    def __post_init__(self):
        for k in ("enc_norm_group_channels", "dec_norm_group_channels"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")

    @property
    def num_downsamplings(self) -> int:
        ratio = self.img_resolution // self.latent_resolution
        if ratio * self.latent_resolution != self.img_resolution or ratio & (ratio - 1):
            raise ValueError(f"img_resolution {self.img_resolution} / latent_resolution {self.latent_resolution} "
                             "must be a power of two")
        return int(math.log2(ratio))


def _groups(c: int, min_channels: int = 1) -> int:
    g = 32 if c % 32 == 0 else math.gcd(32, c)  # a power of two that divides c
    while g > 1 and c // g < min_channels:
        g //= 2
    return g


class GroupNorm(nn.Module):
    """GroupNorm wrapper; the attribute name ``gn`` is part of the lab's state_dict layout."""

    def __init__(self, channels: int, min_group_channels: int = 1):
        super().__init__()
        self.gn = nn.GroupNorm(num_groups=_groups(channels, min_group_channels), num_channels=channels, eps=1e-6,
                               affine=True)

    def forward(self, x):
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            # autocast would run the norm in fp32 and hand fp32 to the activation and the next conv
            # (which casts it back); in the activation dtype the kernel still keeps its statistics
            # in fp32, and the decoder moves half the bytes.
            gn = self.gn
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, gn.num_groups, gn.weight.to(x.dtype), gn.bias.to(x.dtype), gn.eps)
        return self.gn(x)


class Swish(nn.Module):
    def forward(self, x):
        return F.silu(x)  # x * sigmoid(x) in one kernel


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, min_group_channels: int = 1):
        super().__init__()
        m = min_group_channels
        self.block = nn.Sequential(
            GroupNorm(in_channels, m), Swish(), nn.Conv2d(in_channels, out_channels, 3, 1, 1),
            GroupNorm(out_channels, m), Swish(), nn.Conv2d(out_channels, out_channels, 3, 1, 1),
        )
        if in_channels != out_channels:
            self.channel_up = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x):
        skip = self.channel_up(x) if hasattr(self, "channel_up") else x
        return skip + self.block(x)


class DownSampleBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom by 1


class UpSampleBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class NonLocalBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, channels: int, min_group_channels: int = 1):
        super().__init__()
        self.norm = GroupNorm(channels, min_group_channels)
        self.q = nn.Conv2d(channels, channels, 1, 1, 0)
        self.k = nn.Conv2d(channels, channels, 1, 1, 0)
        self.v = nn.Conv2d(channels, channels, 1, 1, 0)
        self.proj_out = nn.Conv2d(channels, channels, 1, 1, 0)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).flatten(2)  # (B, C, HW)
        v = self.v(h).flatten(2)  # (B, C, HW)
        attn = torch.softmax(torch.bmm(q, k) * C ** -0.5, dim=-1)  # (B, HW_q, HW_k)
        out = torch.bmm(v, attn.transpose(1, 2)).view(B, C, H, W)  # (B, C, HW_q) -> (B, C, H, W)
        return x + self.proj_out(out)


def _encoder_down_stages(channels: list, n_down: int) -> set:
    """Stages after which the encoder halves the resolution: those whose channels grow
    (the lab's [128,128,128,256,256,512] downsamples after stages 2 and 4); if fewer stages
    grow than downsamplings are needed, the last stages are used."""
    n_stages = len(channels) - 1
    growing = [i for i in range(n_stages) if channels[i + 1] != channels[i]]
    chosen = growing[-n_down:] if len(growing) >= n_down else list(range(n_stages))[-n_down:]
    if len(chosen) < n_down:
        raise ValueError(f"enc_channels {channels} has {n_stages} stages, fewer than the {n_down} downsamplings needed")
    return set(chosen)


def _decoder_up_stages(channels_rev: list, n_up: int) -> set:
    """Mirror of the encoder rule: upsample after stages whose successor has other channels."""
    n_stages = len(channels_rev)
    changing = [i for i in range(n_stages - 1) if channels_rev[i + 1] != channels_rev[i]]
    chosen = changing[:n_up] if len(changing) >= n_up else list(range(n_stages))[:n_up]
    if len(chosen) < n_up:
        raise ValueError(f"dec_channels has {n_stages} stages, fewer than the {n_up} upsamplings needed")
    return set(chosen)


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch = list(cfg.enc_channels)
        down = _encoder_down_stages(ch, cfg.num_downsamplings)
        m = cfg.enc_norm_group_channels
        layers = [nn.Conv2d(cfg.image_channels, ch[0], 3, 1, 1)]
        for i in range(len(ch) - 1):
            c_in, c_out = ch[i], ch[i + 1]
            for _ in range(cfg.enc_num_res_blocks):
                layers.append(ResidualBlock(c_in, c_out, m))
                c_in = c_out
            if i in down:
                layers.append(DownSampleBlock(c_out))
        c = ch[-1]
        layers += [ResidualBlock(c, c, m), NonLocalBlock(c, m), ResidualBlock(c, c, m),
                   GroupNorm(c, m), Swish(), nn.Conv2d(c, cfg.latent_dim, 3, 1, 1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)  # (B, 3, H, W) -> (B, latent_dim, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch = list(reversed(cfg.dec_channels))  # lab: [512, 256, 256, 128, 128]
        up = _decoder_up_stages(ch, cfg.num_downsamplings)
        first_up = min(up) if up else len(ch)
        c_in, m = ch[0], cfg.dec_norm_group_channels
        layers = [nn.Conv2d(cfg.latent_dim, c_in, 3, 1, 1),
                  ResidualBlock(c_in, c_in, m), NonLocalBlock(c_in, m), ResidualBlock(c_in, c_in, m)]
        for i, c_out in enumerate(ch):
            for _ in range(cfg.dec_num_res_blocks):
                layers.append(ResidualBlock(c_in, c_out, m))
                c_in = c_out
                if i <= first_up:  # still at latent resolution: attention after every block
                    layers.append(NonLocalBlock(c_in, m))
            if i in up:
                layers.append(UpSampleBlock(c_in))
        layers += [GroupNorm(c_in, m), nn.Conv2d(c_in, cfg.image_channels, 3, 1, 1)]
        self.model = nn.Sequential(*layers)

    def forward(self, z):
        return self.model(z)  # (B, latent_dim, h, w) -> (B, 3, H, W), normalized space (no tanh)


class Codebook(nn.Module):
    """Nearest-neighbour vector quantizer with a straight-through estimator.

    With ``norm`` (ViT-VQGAN's l2-normalised lookup) latents and codes are projected onto the unit
    sphere before the search and the decoder receives the unit code: the nearest code is the one
    of highest cosine similarity, so code norms cannot decide usage and more codes stay alive."""

    def __init__(self, num_codebook_vectors: int, latent_dim: int, beta: float, norm: bool = False):
        super().__init__()
        self.num_codebook_vectors, self.latent_dim, self.beta, self.norm = num_codebook_vectors, latent_dim, beta, norm
        self.embedding = nn.Embedding(num_codebook_vectors, latent_dim)
        self.embedding.weight.data.uniform_(-1.0 / num_codebook_vectors, 1.0 / num_codebook_vectors)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """The space the search runs in: v itself, or v / ||v|| over the last dim with ``norm``."""
        return F.normalize(v, dim=-1) if self.norm else v

    def codes(self) -> torch.Tensor:
        """(K, D) code vectors as the decoder receives them."""
        return self.project(self.embedding.weight)

    def quantize_indices(self, z_flat: torch.Tensor) -> torch.Tensor:
        """(M, D) latents -> (M,) int64 index of the nearest code by squared L2 (in the projected space)."""
        e = self.codes().float()  # (K, D)
        z = self.project(z_flat.float())
        d = (z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)[None, :])  # (M, K)
        return d.argmin(dim=1)

    def forward(self, z: torch.Tensor):
        B, D, h, w = z.shape
        z_bhwc = self.project(z.permute(0, 2, 3, 1).contiguous())  # (B, h, w, D)
        idx = self.quantize_indices(z_bhwc.view(-1, D))  # (B*h*w,) raster order b*h*w + i*w + j
        z_q = F.embedding(idx, self.codes()).view(B, h, w, D).to(z.dtype)  # (B, h, w, D)
        loss = F.mse_loss(z_q.detach(), z_bhwc) + self.beta * F.mse_loss(z_q, z_bhwc.detach())
        z_q = z_bhwc + (z_q - z_bhwc).detach()  # straight-through
        return z_q.permute(0, 3, 1, 2), idx, loss  # (B, D, h, w), (B*h*w,), scalar

    def lookup(self, idx: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Token ids (B, h*w) -> z_q (B, D, h, w)."""
        B = idx.shape[0]
        return F.embedding(idx.reshape(B, h, w), self.codes()).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig | dict | None = None):
        super().__init__()
        if cfg is None:
            cfg = VQGANConfig()
        elif isinstance(cfg, dict):
            cfg = VQGANConfig.from_dict(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.codebook = Codebook(cfg.num_codebook_vectors, cfg.latent_dim, cfg.beta, cfg.codebook_norm)
        self.quant_conv = nn.Conv2d(cfg.latent_dim, cfg.latent_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_dim, cfg.latent_dim, 1)

    def encode(self, x):
        """(B,3,H,W) normalized -> (z_q (B,D,h,w), indices (B*h*w,), q_loss)."""
        return self.codebook(self.quant_conv(self.encoder(x)))

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) normalized -> token ids (B, h*w) in raster order: the one path from images to
        tokens (token cache, inpainting, MaskGit.encode_to_z); ``encode`` adds the straight-through
        z_q and the loss for training. The nearest-code search runs in fp32 under any autocast."""
        z = self.quant_conv(self.encoder(x))  # (B, D, h, w)
        B, D = z.shape[:2]
        idx = self.codebook.quantize_indices(z.float().permute(0, 2, 3, 1).reshape(-1, D))  # (B*h*w,)
        return idx.view(B, -1)  # (B, h*w)

    def decode(self, z_q):
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, h*w) -> images (B,3,H,W) in normalized space."""
        r = self.cfg.latent_resolution
        return self.decode(self.codebook.lookup(idx, r, r))

    def forward(self, x):
        z_q, idx, q_loss = self.encode(x)
        return self.decode(z_q), idx, q_loss
