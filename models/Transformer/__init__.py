from .transformer import BidirectionalTransformer, TransformerConfig

__all__ = ["BidirectionalTransformer", "TransformerConfig"]
