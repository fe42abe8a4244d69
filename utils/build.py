"""Build a MaskGit from a resolved config and load the users' checkpoints."""
from __future__ import annotations

import logging
import os

import torch

from models import MaskGit, VQGANConfig, load_transformer_state
from models.convert import CheckpointLayoutError, describe_mismatch, unwrap_state_dict

from .checkpoint import load_checkpoint, stored_config
from .config import ConfigError, apply_overrides, complete_config, config_diff, load_maskgit_config, resolve_path

BUNDLED_CONFIG = "config/MaskGit_small.yml"  # the bundled small models (README, model zoo)
BUNDLED_TRANSFORMER = "checkpoints/transformer_small_fp16.pth"
VQGAN_HINT = ("put the lab's VQGAN.pt there, or pass --vqgan-ckpt PATH together with the tokenizer config it was "
              "trained with (the tokenizer YAML a MaskGit YAML names in model_param.VQ_Configs.VQ_config_path), use a "
              "bundled tokenizer (see the README's model zoo) or train one with train_vqgan.py")


# tokenizer config keys that change what the weights compute without changing the state_dict layout
SILENT_VQGAN_KEYS = ("codebook_norm", "enc_norm_group_channels", "dec_norm_group_channels")
# the parts of a tokenizer that make its tokens (train_vqgan.py --new-decoder loads only these), and the config keys
# that change only the others (a tokenizer differing from another in these has the same tokens)
TOKEN_PARTS = ("encoder.", "quant_conv.", "codebook.")
DECODER_KEYS = ("dec_channels", "dec_num_res_blocks", "dec_norm_group_channels")


def read_vqgan_file(path: str):
    """The content of the tokenizer file ``path`` (read as data only); a missing file says what to do."""
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VQGAN checkpoint not found: {path}; {VQGAN_HINT}")
    return load_checkpoint(path, "VQGAN checkpoint")


def load_vqgan_weights(vqgan: torch.nn.Module, path: str, may_differ: tuple = (), parts: tuple | None = None,
                       raw=None) -> list:
    """Load a VQGAN state_dict (the lab's raw fp32 dict, or ours, fp16 allowed) with strict=True.
    A file whose stored config differs from the tokenizer's in a key of SILENT_VQGAN_KEYS is refused
    unless the key is in ``may_differ`` (a fine-tune that changes it on purpose); returns those
    differences, one line each. ``parts``: load only the weights under these key prefixes (e.g.
    TOKEN_PARTS), strictly among them, and leave the rest of ``vqgan`` as it is (the file's other
    parts may have another layout). ``raw``: the file's content when already read (read_vqgan_file)."""
    path = resolve_path(path)
    raw = read_vqgan_file(path) if raw is None else raw
    sd = unwrap_state_dict(raw)
    sd = {k[len("vqgan."):] if k.startswith("vqgan.") else k: v for k, v in sd.items()}
    mine = vqgan.state_dict()
    if parts is not None:
        sd = {k: v for k, v in sd.items() if k.startswith(parts)}
        mine = {k: v for k, v in mine.items() if k.startswith(parts)}
    problem = describe_mismatch(mine, sd)
    own, changed = vqgan_file_config(raw), []
    if not problem and own is not None and hasattr(vqgan, "cfg"):  # keys that change the computation, not the layout
        changed = [k for k in SILENT_VQGAN_KEYS if own[k] != getattr(vqgan.cfg, k)]
        silent = [f"{k} ({own[k]!r} in the file, {getattr(vqgan.cfg, k)!r} here)"
                  for k in changed if k not in may_differ]
        if silent:
            raise CheckpointLayoutError(f"VQGAN checkpoint {path} was trained with another config than this "
                                        f"tokenizer's in {', '.join(silent)}: its weights would load but compute "
                                        f"something else; use a tokenizer YAML with the values the file stores")
    if problem:
        note = ""
        if own is not None and hasattr(vqgan, "cfg"):  # a file of ours names the architecture it was trained as
            want = vqgan.cfg.to_dict()
            diff = [f"{k} ({own.get(k)!r} in the file, {want.get(k)!r} here)" for k in config_diff(own, want)]
            note = "; the file stores the config it was trained with, which differs from this one in " + ", ".join(diff)
        raise CheckpointLayoutError(f"VQGAN checkpoint {path} does not fit the tokenizer config (a checkpoint needs the "
                                    f"config it was trained with: the tokenizer YAML, which a MaskGit YAML names in "
                                    f"model_param.VQ_Configs.VQ_config_path): {problem}{note}")
    vqgan.load_state_dict({k: v.float() for k, v in sd.items()}, strict=parts is None)
    return [f"{k}: {own[k]!r} in {path}, {getattr(vqgan.cfg, k)!r} here" for k in changed]


def tokenizer_file_config(path: str) -> dict | None:
    """The config a tokenizer file of ours stores (train_vqgan.py writes it into vqgan.pt's
    ``_metadata``), or None: no such file yet, or a file without one (the lab's VQGAN.pt). Keys a file
    of an older version lacks get their defaults (which kept that version's behaviour), so it compares
    equal to the same config read from a YAML today."""
    path = resolve_path(path)
    return vqgan_file_config(load_checkpoint(path, "VQGAN checkpoint")) if os.path.isfile(path) else None


def adopt_tokenizer(cfg: dict, path: str) -> str | None:
    """Point ``cfg`` (a resolved MaskGit config) at the tokenizer file ``path`` (its VQ_CKPT_path) and
    build that tokenizer as the file says: a file that stores its config (train_vqgan.py's vqgan.pt)
    brings its own architecture; for one without (the lab's VQGAN.pt) the YAML's tokenizer config
    stays. Returns a line for the log when the file's config replaced the YAML's, else None."""
    path = os.path.abspath(resolve_path(path))
    cfg["model_param"]["VQ_Configs"] = dict(cfg["model_param"].get("VQ_Configs") or {}, VQ_CKPT_path=path)
    own = tokenizer_file_config(path)
    if own is None or own == cfg["vqgan"]:
        return None
    note = (f"tokenizer config: the one stored in {path} (the YAML's differs in "
            f"{', '.join(config_diff(own, cfg['vqgan']))})")
    cfg["vqgan"] = own
    return note


def vqgan_file_config(obj) -> dict | None:
    """The tokenizer config ``obj`` (a loaded tokenizer file) stores, completed with the defaults of
    the keys added since it was written; None for a file without one."""
    own = stored_config(obj)
    return None if own is None else {**VQGANConfig().to_dict(), **own}


def build_maskgit(cfg: dict, load_vqgan: bool = True, vqgan_ckpt: str | None = None) -> MaskGit:
    """MaskGit from a resolved config (``utils.config.load_maskgit_config``); loads the frozen
    tokenizer from ``vqgan_ckpt`` or ``model_param.VQ_Configs.VQ_CKPT_path``. A tokenizer file that
    stores a config differing from ``cfg["vqgan"]`` in its decoder only (train_vqgan.py --new-decoder:
    the same tokens, another decoder) is built as the file says, and ``cfg["vqgan"]`` updated so."""
    path = None
    if load_vqgan:
        path = vqgan_ckpt or (cfg["model_param"].get("VQ_Configs") or {}).get("VQ_CKPT_path")
        if not path:
            raise FileNotFoundError(f"no VQGAN checkpoint configured (VQ_Configs.VQ_CKPT_path); {VQGAN_HINT}")
    raw = read_vqgan_file(path) if path else None  # read once: its stored config here, its weights below
    own = vqgan_file_config(raw) if raw is not None else None
    try:
        diff = config_diff(own, VQGANConfig.from_dict(cfg["vqgan"]).to_dict()) if own is not None else []
        if diff and set(diff) <= set(DECODER_KEYS):
            logging.getLogger("maskgit").info("tokenizer: %s stores another decoder than the config (%s) on the same "
                                              "tokens; built as the file says", path, ", ".join(diff))
            cfg["vqgan"] = own
        model = MaskGit(cfg["model_param"], cfg["vqgan"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config: {e}") from e
    if path:
        load_vqgan_weights(model.vqgan, path, raw=raw)
    return model


def load_transformer_checkpoint(model: MaskGit, path: str, obj=None) -> dict:
    """Load a transformer checkpoint (lab raw state_dict, students' layouts, or ours) into
    ``model.transformer``; ``obj``: the file's content when already read. Returns the checkpoint
    object (for its config, if any)."""
    if obj is None:
        obj = load_checkpoint(resolve_path(path) if path else path, "transformer checkpoint")
    try:
        load_transformer_state(model.transformer, obj)
    except CheckpointLayoutError as e:
        raise CheckpointLayoutError(f"{path}: {e}") from e
    return obj if isinstance(obj, dict) else {}


def checkpoint_config(ckpt_path: str, config_path: str | None = None, overrides: list | None = None):
    """(resolved config, checkpoint object) for inference: the config stored in our checkpoints, else
    ``config_path`` (default config/MaskGit.yml), with ``overrides`` (``--set``) on top. Reads the
    checkpoint as data only and builds nothing, so inputs can be checked before any model work."""
    obj = load_checkpoint(resolve_path(ckpt_path), "transformer checkpoint")
    stored = stored_config(obj)
    cfg = stored if config_path is None and stored is not None else load_maskgit_config(config_path or
                                                                                        "config/MaskGit.yml")
    return apply_overrides(complete_config(cfg), overrides, where="config"), obj


def load_inference_model(cfg: dict, obj, ckpt_path: str, vqgan_ckpt: str | None = None) -> MaskGit:
    """MaskGit built from ``cfg`` with the tokenizer and the transformer checkpoint (``obj``, read
    by :func:`checkpoint_config`) loaded, in eval mode on the CPU."""
    model = build_maskgit(cfg, vqgan_ckpt=vqgan_ckpt)
    load_transformer_checkpoint(model, ckpt_path, obj)
    return model.eval()
