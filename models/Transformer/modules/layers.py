"""Transformer building blocks in the lab's layout, with hand-written multi-head attention."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention written out: fused QKV projection, scaled QK^T, softmax,
    dropout on the attention weights, weighted sum of V, output projection.

    All heads are computed in one batched matmul (no Python loop over heads).
    Parameters: ``qkv`` Linear(dim, 3*dim) whose output rows are [q; k; v], each split into
    ``num_heads`` heads of ``dim // num_heads``; ``proj`` Linear(dim, dim).

    The hand-written path is the default and the reference (the lab's rule). ``fused_attn=True``
    computes the same function with ``F.scaled_dot_product_attention`` (same parameters, same scale,
    same dropout rate on the attention weights); ``return_attention=True`` always takes the
    hand-written path, since the fused kernel never forms the weights. tests/test_attention.py pins
    the two paths together.

    ``recompute_attn=True`` keeps the hand-written math but does not keep its (B, H, N, N) maps for
    the backward pass: the weights are formed again there (activation checkpointing of
    ``attend``, with the dropout mask replayed from the saved RNG state), so training memory no
    longer grows with layers x heads x N^2, for one extra ``q @ k^T`` and softmax per layer. It
    only acts where gradients are recorded; the outputs and gradients are those of the default path.
    """

    def __init__(self, dim: int = 768, num_heads: int = 16, attn_drop: float = 0.1, fused_attn: bool = False,
                 recompute_attn: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.recompute_attn = recompute_attn
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) over keys: (B,H,N,D) x (B,H,M,D) -> (B,H,N,M)."""
        # (q @ k^T) * scale, then softmax, dropout and @ v in forward: the pattern of inductor's
        # attention fusion. torch 2.14 on CPU rewrites it into one fused kernel under torch.compile;
        # torch 2.11 on an H100 did not (bench/attn_fusion.py asks the compiler; README, Speed).
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, M)
        # dtype= keeps the maps in the matmul's dtype under autocast (which would otherwise write
        # them in fp32 only for the next matmul to cast them back): half the memory traffic and the
        # memory kept for backward; the kernel still accumulates the max and the sum in fp32.
        return scores.softmax(dim=-1, dtype=scores.dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """dropout(softmax(q k^T / sqrt(d))) @ v: (B,H,N,D) -> (B,H,N,D), the hand-written core."""
        return self.attn_drop(self.attention_weights(q, k)) @ v

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
        if self.fused_attn and not return_attention:
            drop_p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop_p, scale=self.scale)  # (B, H, N, D)
            attn = None
        elif self.recompute_attn and not return_attention and torch.is_grad_enabled():
            attn = None  # formed again in the backward pass instead of kept (same dropout mask)
            out = checkpoint(self.attend, q, k, v, use_reentrant=False, preserve_rng_state=True)
        else:
            attn = self.attention_weights(q, k)  # (B, H, N, N)
            out = self.attn_drop(attn) @ v  # (B, H, N, D)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))  # (B, H, N, D) -> (B, N, H, D) -> (B, N, C)
        return (out, attn) if return_attention else out


class MLP(nn.Sequential):
    """Keys MLP.0 / MLP.2 are Linear layers; MLP.1 exact GELU; MLP.3 dropout."""

    def __init__(self, dim: int = 768, hidden_dim: int = 1536, drop_p: float = 0.1):
        super().__init__(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim), nn.Dropout(drop_p))


class TokenPredictor(nn.Sequential):
    def __init__(self, dim: int = 768):
        super().__init__(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=1e-12))


class Encoder(nn.Module):
    """Post-LN transformer block: x = LN1(x + drop(Attn(x))); x = LN2(x + MLP(x))."""

    def __init__(self, dim: int = 768, hidden_dim: int = 1536, num_heads: int = 16, drop_p: float = 0.1,
                 attn_drop: float = 0.1, fused_attn: bool = False, recompute_attn: bool = False):
        super().__init__()
        self.Attention = MultiHeadAttention(dim, num_heads, attn_drop, fused_attn, recompute_attn)
        self.LayerNorm1 = nn.LayerNorm(dim, eps=1e-12)
        self.LayerNorm2 = nn.LayerNorm(dim, eps=1e-12)
        self.MLP = MLP(dim, hidden_dim, drop_p)
        self.dropout = nn.Dropout(drop_p)

    def forward(self, x):
        x = self.LayerNorm1(x + self.dropout(self.Attention(x)))
        return self.LayerNorm2(x + self.MLP(x))
