"""Device, mixed precision and seeding: the one place that knows about them.

Every script asks this module for its device, its autocast context and its random
generators, so one training / decoding loop serves fp32 (CPU), bf16 and fp16 (CUDA).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import random
import sys

import numpy as np
import torch

PRECISIONS = ("fp32", "bf16", "fp16")


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory(largest: int = 64 << 20, keep: int = 1 << 30) -> bool:
    """Let glibc's malloc reuse the memory of freed tensors of up to ``largest`` bytes for the next ones.

    By default glibc serves every block above 32 MiB with its own ``mmap`` and returns it to the
    system when freed, so a CPU forward pass that makes such tensors (the attention maps of 16
    images x 8 heads x 256 x 256 tokens are 32 MiB + a header) gets fresh pages each time and
    spends its time in page faults: a hand-written attention call ran 2x faster with the blocks
    kept, the demo 1.7x (bench/cpu_malloc.py). Sets glibc's mmap threshold to ``largest`` (blocks
    up to it come from the heap) and its trim threshold to ``keep`` (up to that much free memory at
    the heap's top stays for reuse rather than going back to the system); outputs are unchanged.
    ``largest`` 64 MiB covers the demo's and the small transformer's training batches; 1 GiB also
    sped up a batch-256 evaluation pass (1.76x) but let the heap grow by fragmentation (peak RSS
    1.9 -> 4.5 GB), so larger blocks keep glibc's mmap. A trim threshold of 64 MiB gave back part
    of the attention's gain (two 32 MiB maps are freed together and went back to the system).

    Does nothing, returning False, off glibc or where the user already chose (MALLOC_*_ variables,
    malloc tunables in GLIBC_TUNABLES, or jemalloc / tcmalloc / mimalloc in LD_PRELOAD): setting
    ``MALLOC_TRIM_THRESHOLD_=131072`` (glibc's default) keeps glibc's defaults.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if (any(k in os.environ for k in MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or "malloc" in os.environ.get("LD_PRELOAD", "")):  # jemalloc, tcmalloc, mimalloc
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    largest, keep = (min(int(v), 2**31 - 1) for v in (largest, keep))
    return bool(mallopt(M_TRIM_THRESHOLD, keep)) and bool(mallopt(M_MMAP_THRESHOLD, largest))


def get_device(name: str | None = None) -> torch.device:
    """Resolve a device string. ``None``/``"auto"`` picks CUDA when present, else CPU.

    Asking for CUDA on a machine without it falls back to CPU with a warning instead of
    crashing, because the lab's scripts default to ``--device cuda``.
    """
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        logging.getLogger("maskgit").warning("CUDA requested (%s) but not available: using CPU", name)
        return torch.device("cpu")
    return dev


def default_precision(device: torch.device) -> str:
    """bf16 on CUDA (when supported), fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_precision(precision: str | None, device: torch.device) -> str:
    if precision in (None, "", "auto"):
        return default_precision(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or 'auto', got {precision!r}")
    if precision != "fp32" and device.type != "cuda":
        logging.getLogger("maskgit").warning("%s autocast needs CUDA; running fp32 on %s", precision, device)
        return "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """An autocast context for ``precision``; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Sampling code still takes explicit generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def rng_state() -> dict:
    """Every RNG state a resumed run needs to continue exactly, as plain data (tensors, ints,
    floats, lists) so that the checkpoint loads with ``weights_only=True``."""
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next],
             "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss_next))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def create_logger(name: str = "maskgit", log_file: str | None = None, rank: int = 0) -> logging.Logger:
    """A logger that prints on rank 0 only (DiT style); other ranks get a silent logger."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if rank != 0:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.ERROR)
        return logger
    logger.setLevel(logging.INFO)
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    logger.addHandler(handler)
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger
