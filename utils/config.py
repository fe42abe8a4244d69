"""Configuration: the lab's YAML files as they are, our own keys, CLI overrides on top.

Precedence: dataclass defaults < YAML < CLI (``--set a.b=value``). Unknown keys raise.
Relative paths inside the YAML are resolved against the current directory when they exist
there, else against the repository root (so scripts work from any directory).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from models.config_base import check_type
from models.Transformer import TransformerConfig
from models.VQGAN import VQGANConfig
from models.VQGAN_Transformer import decoding_defaults

REPO_ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_KEYS = {"MODEL_NAME", "model_param", "training_param"}
VQ_CONFIGS_KEYS = {"VQ_config_path", "VQ_CKPT_path"}


class ConfigError(ValueError):
    pass


def resolve_path(p: str | os.PathLike) -> str:
    p = os.path.expanduser(str(p))
    if os.path.isabs(p) or os.path.exists(p):
        return p
    return str(REPO_ROOT / p)


def load_yaml(path: str) -> dict:
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(cfg: dict, overrides: list[str] | None, where: str = "config") -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML). A path that does not exist raises."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        node, parts = cfg, key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {item!r}: {where} has no section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: {where} has no key {key!r} (known: {sorted(node)})")
        try:
            new = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from e
        old = node[parts[-1]]
        if old is not None and not isinstance(old, dict):  # the new value must be of the old one's kind
            try:
                check_type(key, new, {bool: "bool", int: "float" if isinstance(old, float) else "int",
                                      float: "float", str: "str", list: "list"}.get(type(old), ""), "override")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        node[parts[-1]] = new
    return cfg


def config_diff(a: dict, b: dict) -> list:
    """The keys (sorted) whose values differ between two flat configs, a key missing on one side included."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def load_vqgan_config(path: str) -> VQGANConfig:
    raw = load_yaml(path)
    params = raw.get("model_param", raw)
    try:
        return VQGANConfig.from_dict(params, where=resolve_path(path))
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e


def load_maskgit_config(path: str, overrides: list[str] | None = None) -> dict:
    """Read ``MaskGit.yml`` (+ the VQGAN YAML it names) into one resolved, self-contained dict:
    ``{"MODEL_NAME", "model_param", "training_param", "vqgan"}``. It is stored in every checkpoint
    and rebuilds the model without any file (``utils.build.build_maskgit``)."""
    raw = load_yaml(path)
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS - {"vqgan"})
    if unknown:
        raise ConfigError(f"{resolve_path(path)}: unknown top-level keys {unknown}; known: {sorted(TOP_LEVEL_KEYS)}")
    if "model_param" not in raw:
        raise ConfigError(f"{resolve_path(path)}: missing the 'model_param' section")
    cfg = {"MODEL_NAME": raw.get("MODEL_NAME", "MaskGit"), "model_param": raw["model_param"],
           "training_param": raw.get("training_param", raw["model_param"].get("training_param", {})) or {}}
    cfg["model_param"] = {k: v for k, v in cfg["model_param"].items() if k != "training_param"}
    vq_paths = cfg["model_param"].get("VQ_Configs") or {}
    unknown = sorted(set(vq_paths) - VQ_CONFIGS_KEYS)
    if unknown:
        raise ConfigError(f"{resolve_path(path)}: unknown keys {unknown} in model_param.VQ_Configs; known: "
                          f"{sorted(VQ_CONFIGS_KEYS)}")
    if "vqgan" in raw:  # a resolved config saved by us
        cfg["vqgan"] = VQGANConfig.from_dict(raw["vqgan"]).to_dict()
    elif "VQ_config_path" in vq_paths:
        cfg["vqgan"] = load_vqgan_config(vq_paths["VQ_config_path"]).to_dict()
    else:
        raise ConfigError(f"{resolve_path(path)}: model_param.VQ_Configs.VQ_config_path is missing")
    return apply_overrides(complete_config(cfg), overrides, where=resolve_path(path))


def complete_config(cfg: dict) -> dict:
    """Fill ``model_param.Transformer_param`` with the defaults of the keys the YAML leaves out
    (the lab's MaskGit.yml names 5 of them), and ``model_param`` with the decoding defaults (argmax,
    the lab's, when the YAML names no token choice), so that ``--set`` reaches every key and the
    stored config says everything: defaults < YAML < CLI."""
    cfg = copy.deepcopy(cfg)
    mp = cfg["model_param"]
    mp["Transformer_param"] = {**TransformerConfig().to_dict(), **(mp.get("Transformer_param") or {})}
    for key, value in decoding_defaults({}).items():
        mp.setdefault(key, value)
    return cfg
