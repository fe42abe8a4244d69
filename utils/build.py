"""Build a MaskGit from a resolved config and load the users' checkpoints."""
from __future__ import annotations

import os

import torch

from models import MaskGit, load_transformer_state
from models.convert import CheckpointLayoutError, describe_mismatch, unwrap_state_dict

from .checkpoint import load_checkpoint
from .config import resolve_path

VQGAN_HINT = ("put the lab's VQGAN.pt there, pass --vqgan-ckpt PATH, use a bundled tokenizer "
              "(see the README's model zoo) or train one with train_vqgan.py")


def load_vqgan_weights(vqgan: torch.nn.Module, path: str) -> None:
    """Load a VQGAN state_dict (the lab's raw fp32 dict, or ours, fp16 allowed) with strict=True."""
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQGAN checkpoint not found: {path}; {VQGAN_HINT}")
    sd = unwrap_state_dict(load_checkpoint(path, "VQGAN checkpoint"))
    sd = {k[len("vqgan."):] if k.startswith("vqgan.") else k: v for k, v in sd.items()}
    problem = describe_mismatch(vqgan.state_dict(), sd)
    if problem:
        raise CheckpointLayoutError(f"VQGAN checkpoint {path} does not fit the VQGAN config: {problem}")
    vqgan.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def build_maskgit(cfg: dict, load_vqgan: bool = True, vqgan_ckpt: str | None = None) -> MaskGit:
    """MaskGit from a resolved config (``utils.config.load_maskgit_config``); loads the frozen
    tokenizer from ``vqgan_ckpt`` or ``model_param.VQ_Configs.VQ_CKPT_path``."""
    model = MaskGit(cfg["model_param"], cfg["vqgan"])
    if load_vqgan:
        path = vqgan_ckpt or (cfg["model_param"].get("VQ_Configs") or {}).get("VQ_CKPT_path")
        if not path:
            raise FileNotFoundError(f"no VQGAN checkpoint configured (VQ_Configs.VQ_CKPT_path); {VQGAN_HINT}")
        load_vqgan_weights(model.vqgan, path)
    return model


def load_transformer_checkpoint(model: MaskGit, path: str) -> dict:
    """Load a transformer checkpoint (lab raw state_dict, students' layouts, or ours) into
    ``model.transformer``. Returns the checkpoint object (for its config, if any)."""
    obj = load_checkpoint(resolve_path(path) if path else path, "transformer checkpoint")
    try:
        load_transformer_state(model.transformer, obj)
    except CheckpointLayoutError as e:
        raise CheckpointLayoutError(f"{path}: {e}") from e
    return obj if isinstance(obj, dict) else {}
