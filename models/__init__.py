from .convert import CheckpointLayoutError, convert_transformer_state_dict, load_transformer_state
from .decoding import DecodeResult, decode_step, image_generators, iterative_decode
from .schedules import SCHEDULES, gamma_func
from .Transformer import BidirectionalTransformer, TransformerConfig
from .Transformer.modules import MultiHeadAttention
from .VQGAN import VQGAN, VQGANConfig
from .VQGAN_Transformer import MaskGit

__all__ = ["MaskGit", "VQGAN", "VQGANConfig", "BidirectionalTransformer", "TransformerConfig", "MultiHeadAttention",
           "gamma_func", "SCHEDULES", "decode_step", "iterative_decode", "image_generators", "DecodeResult",
           "convert_transformer_state_dict", "load_transformer_state", "CheckpointLayoutError"]
