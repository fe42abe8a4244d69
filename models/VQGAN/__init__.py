from .vqgan import VQGAN, VQGANConfig

__all__ = ["VQGAN", "VQGANConfig"]
