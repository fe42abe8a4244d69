from .convert import CheckpointLayoutError, convert_transformer_state_dict, load_transformer_state
from .decoding import (CONFIDENCES, ORDERS, TOKEN_CHOICES, DecodeResult, ImageNoise, decode_step, halton_order,
                       image_noise, iterative_decode, masked_count)
from .schedules import NEEDS_N, SCHEDULES, gamma_func
from .Transformer import BidirectionalTransformer, TransformerConfig
from .Transformer.modules import MultiHeadAttention
from .VQGAN import VQGAN, VQGANConfig
from .VQGAN_Transformer import MaskGit, decoding_defaults

__all__ = ["MaskGit", "decoding_defaults", "VQGAN", "VQGANConfig", "BidirectionalTransformer", "TransformerConfig",
           "MultiHeadAttention", "gamma_func", "SCHEDULES", "NEEDS_N", "decode_step", "iterative_decode", "masked_count",
           "halton_order", "image_noise", "ImageNoise", "DecodeResult", "TOKEN_CHOICES", "CONFIDENCES", "ORDERS",
           "convert_transformer_state_dict", "load_transformer_state", "CheckpointLayoutError"]
