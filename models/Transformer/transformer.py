"""Bidirectional transformer of the lab (``Transformer_param`` in ``MaskGit.yml``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config_base import StrictConfig
from .modules.layers import Encoder, TokenPredictor


@dataclass
class TransformerConfig(StrictConfig):
    num_image_tokens: int = 256
    num_codebook_vectors: int = 1024
    dim: int = 768
    n_layers: int = 15
    hidden_dim: int = 1536
    num_heads: int = 16
    dropout: float = 0.1
    attn_dropout: float = 0.1
    fused_attn: bool = False  # opt-in F.scaled_dot_product_attention; the hand-written path is the reference
    recompute_attn: bool = False  # opt-in: the hand-written attention maps are recomputed in backward, not kept


def weights_init(m: nn.Module) -> None:
    """The lab's init: trunc_normal(0, 0.02) on Linear/Embedding weights, zero Linear biases,
    LayerNorm to identity."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class BidirectionalTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig | dict | None = None):
        super().__init__()
        if cfg is None:
            cfg = TransformerConfig()
        elif isinstance(cfg, dict):
            cfg = TransformerConfig.from_dict(cfg)
        self.cfg = cfg
        self.num_image_tokens = cfg.num_image_tokens
        self.vocab_size = cfg.num_codebook_vectors + 1  # + the mask token (id = num_codebook_vectors)
        self.tok_emb = nn.Embedding(self.vocab_size, cfg.dim)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.num_image_tokens, cfg.dim))
        self.blocks = nn.Sequential(*[Encoder(cfg.dim, cfg.hidden_dim, cfg.num_heads, cfg.dropout, cfg.attn_dropout,
                                              cfg.fused_attn, cfg.recompute_attn) for _ in range(cfg.n_layers)])
        self.Token_Prediction = TokenPredictor(cfg.dim)
        self.LN = nn.LayerNorm(cfg.dim, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.bias = nn.Parameter(torch.zeros(cfg.num_image_tokens, self.vocab_size))
        self.apply(weights_init)
        nn.init.trunc_normal_(self.pos_emb, 0.0, 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N) (mask id allowed) -> logits (B, N, vocab_size)."""
        x = self.drop(self.LN(self.tok_emb(ids) + self.pos_emb))  # (B, N, dim)
        x = self.Token_Prediction(self.blocks(x))  # (B, N, dim)
        return x @ self.tok_emb.weight.t() + self.bias  # (B, N, vocab), logits tied to tok_emb
