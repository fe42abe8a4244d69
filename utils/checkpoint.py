"""Checkpoint I/O: atomic writes, data-only reads with clear errors.

Every checkpoint is read with ``torch.load(..., weights_only=True)``: only tensors and plain
data (dicts, lists, tuples, strings, numbers, None) are rebuilt, so a crafted file cannot run
code while it loads. Everything we write is such plain data (configs as dicts of primitives,
RNG states as tensors and numbers), and so are the lab's ``VQGAN.pt`` and the students' raw
state_dicts. A file that needs anything more is refused with one line naming it.
"""
from __future__ import annotations

import copy
import os
import pickle
import tempfile
from collections import OrderedDict

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not plain data; the message names the file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write, suffix: str = ".tmp") -> None:
    """``write(tmp)`` writes a temp file in ``path``'s folder, which then replaces ``path``: a crash
    never leaves a half-written file at ``path``. The file gets the mode a plain ``open`` would give
    (0666 minus the umask), not mkstemp's 0600. ``suffix``: the temp name's ending (np.savez wants .npz)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path: str) -> None:
    """torch.save through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), ".pt")


def atomic_write_text(path: str, text: str) -> None:
    """A text file through :func:`atomic_write`."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def _first_line(e: Exception) -> str:
    """The useful line of torch's long weights_only message (e.g. 'Unsupported global: GLOBAL os.system')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Unsupported"):
            return ln.rstrip(".")
    return (lines[0] if lines else type(e).__name__)[:200]


def load_checkpoint(path: str, what: str = "checkpoint"):
    """Read a checkpoint on CPU as plain data (``weights_only=True``).

    Raises :class:`CheckpointError` (message: the file, what is wrong, what to do) for a missing
    path, a corrupt file, or a file that holds Python objects beyond tensors and plain data;
    nothing in the file is executed in any case.
    """
    if not path:
        raise CheckpointError(f"no {what} path given")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "Unsupported class" not in str(e):  # not a pickle of objects
            raise CheckpointError(f"cannot read {what} {path}: {_first_line(e)} (a truncated or non-PyTorch "
                                  f"file?)") from e
        raise CheckpointError(
            f"refusing to load {what} {path}: it holds Python objects, not only tensors and plain data "
            f"({_first_line(e)}); loading it could run code. If you trust its source, load it once yourself and "
            f"re-save only its state_dict (tensors) with torch.save") from e
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(f"cannot read {what} {path}: {_first_line(e)} (a truncated or non-PyTorch file?)") from e


CONFIG_KEY = "maskgit_config"  # the entry of a raw state_dict's ``_metadata`` that holds the resolved config


def lab_state_dict(module: torch.nn.Module, cfg: dict) -> OrderedDict:
    """``module.state_dict()`` as CPU tensors in the lab's raw layout, with the resolved config
    ``cfg`` (plain data) in the dict's ``_metadata[CONFIG_KEY]["config"]``.

    ``_metadata`` is the attribute where ``state_dict()`` keeps per-module versions: ``torch.save``
    pickles it with the dict, ``torch.load(..., weights_only=True)`` restores it, and
    ``load_state_dict`` reads only the entries of its own module prefixes. So the file loads as
    before with the lab's strict ``model.load_state_dict(torch.load(path))``, and a loader that
    wants the architecture reads the config back (``stored_config``)."""
    sd = module.state_dict()
    out = OrderedDict((k, v.detach().cpu()) for k, v in sd.items())
    out._metadata = OrderedDict(getattr(sd, "_metadata", {}))
    out._metadata[CONFIG_KEY] = {"config": copy.deepcopy(cfg)}
    return out


def half_state_dict(sd: dict) -> OrderedDict:
    """A state_dict for bundling: floating tensors in fp16, every tensor on the CPU, the
    ``_metadata`` kept (module versions and a config stored by :func:`lab_state_dict`)."""
    out = OrderedDict((k, (v.half() if v.is_floating_point() else v).cpu()) for k, v in sd.items())
    out._metadata = OrderedDict(getattr(sd, "_metadata", {}))
    return out


def stored_config(obj) -> dict | None:
    """The resolved config stored in a checkpoint we wrote: ``obj["config"]`` of a training
    checkpoint, or the ``_metadata`` entry of a raw state_dict (:func:`lab_state_dict`); else None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("config"), dict):
        return obj["config"]
    entry = (getattr(obj, "_metadata", None) or {}).get(CONFIG_KEY)
    return entry.get("config") if isinstance(entry, dict) and isinstance(entry.get("config"), dict) else None
