from .layers import MLP, Encoder, MultiHeadAttention, TokenPredictor

__all__ = ["MultiHeadAttention", "MLP", "TokenPredictor", "Encoder"]
