"""Checkpoint I/O: atomic writes, tolerant reads with clear errors."""
from __future__ import annotations

import os
import tempfile

import torch


def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves a
    half-written checkpoint at ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=folder)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, what: str = "checkpoint"):
    """torch.load on CPU; a missing or corrupt file raises with the path in the message."""
    if not path:
        raise FileNotFoundError(f"no {what} path given")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise RuntimeError(f"cannot read {what} {path}: {e}") from e
