"""Map users' transformer state_dicts onto our layout.

Accepted: a raw lab state_dict; a dict wrapping one under ``model`` / ``state_dict`` /
``transformer`` (also our own training checkpoints); ``module.`` (DDP) and ``_orig_mod.``
(torch.compile) prefixes; a ``transformer.`` prefix (a whole MaskGit state_dict); and the
students' attention layouts under ``blocks.i.Attention.``:

* fused ``qkv`` / ``to_qkv`` / ``qkv_layer`` / ``qkv_proj`` (rows [q; k; v], bias optional) with an
  output projection ``proj`` / ``out_proj`` / ``out`` / ``projection``;
* separate q/k/v/out Linears: ``W_q,W_k,W_v,W_o``; ``query,key,value,proj``;
  ``linear_q,linear_k,linear_v,linear_out``; ``q_proj,k_proj,v_proj,out_proj``.

Missing biases become zeros (a Linear without bias computes the same function).
"""
from __future__ import annotations

import re

import torch

WRAPPER_KEYS = ("model", "state_dict", "transformer", "model_state_dict", "net")
STRIP_PREFIXES = ("module.", "_orig_mod.", "transformer.")
FUSED_QKV = ("qkv", "to_qkv", "qkv_layer", "qkv_proj")
FUSED_OUT = ("proj", "out_proj", "out", "projection")
SEPARATE = (("W_q", "W_k", "W_v", "W_o"), ("query", "key", "value", "proj"),
            ("linear_q", "linear_k", "linear_v", "linear_out"), ("q_proj", "k_proj", "v_proj", "out_proj"))

_ATTN = re.compile(r"^blocks\.(\d+)\.Attention\.(.+)\.(weight|bias)$")


class CheckpointLayoutError(ValueError):
    pass


def unwrap_state_dict(obj) -> dict:
    """Find the tensor dict inside a checkpoint object and strip known prefixes."""
    for _ in range(4):  # descend through wrapper dicts; EMA weights win when a checkpoint has them
        if not isinstance(obj, dict):
            break
        key = next((k for k in ("ema",) + WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointLayoutError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointLayoutError(f"no state_dict found: top-level keys are {sorted(obj)[:20]}")
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    if any(k.startswith("transformer.") for k in sd):  # a whole MaskGit: keep the transformer part
        sd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    return sd


def _convert_attention(names: dict, block: str) -> dict:
    """names: {sub-name: {'weight': t, 'bias': t?}} of one block's attention -> our qkv/proj."""
    def wb(name, out_dim):
        w = names[name]["weight"]
        b = names[name].get("bias")
        return w, (b if b is not None else torch.zeros(out_dim, dtype=w.dtype))

    for q, k, v, o in SEPARATE:
        if set(names) == {q, k, v, o}:
            dim = names[q]["weight"].shape[0]
            ws, bs = zip(*(wb(n, dim) for n in (q, k, v)))
            ow, ob = wb(o, names[o]["weight"].shape[0])
            return {"qkv.weight": torch.cat(ws, 0), "qkv.bias": torch.cat(bs, 0), "proj.weight": ow, "proj.bias": ob}
    q_name = next((n for n in FUSED_QKV if n in names), None)
    o_name = next((n for n in FUSED_OUT if n in names), None)
    if not (q_name and o_name and len(names) == 2):
        raise CheckpointLayoutError(f"{block}.Attention: unrecognised attention layout with sub-modules {sorted(names)}")
    qw, qb = wb(q_name, names[q_name]["weight"].shape[0])
    ow, ob = wb(o_name, names[o_name]["weight"].shape[0])
    return {"qkv.weight": qw, "qkv.bias": qb, "proj.weight": ow, "proj.bias": ob}


def convert_transformer_state_dict(obj) -> dict:
    """Any accepted checkpoint object -> a state_dict in our layout (not yet checked)."""
    sd = unwrap_state_dict(obj)
    out, attn = {}, {}
    for k, v in sd.items():
        m = _ATTN.match(k)
        if m:
            attn.setdefault(m.group(1), {}).setdefault(m.group(2), {})[m.group(3)] = v
        else:
            out[k] = v
    for i, names in attn.items():
        for k, v in _convert_attention(names, f"blocks.{i}").items():
            out[f"blocks.{i}.Attention.{k}"] = v
    return out


def describe_mismatch(own: dict, sd: dict) -> str | None:
    """None if ``sd`` fits ``own`` key for key and shape for shape, else what does not."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if not (missing or unexpected or shapes):
        return None

    def cut(xs):
        return ", ".join(xs[:12]) + (f" ... (+{len(xs) - 12} more)" if len(xs) > 12 else "")
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {cut(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {cut(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): {cut(shapes)}")
    return "; ".join(parts)


def load_transformer_state(model: torch.nn.Module, obj) -> None:
    """Convert and load strictly; on mismatch raise listing missing / unexpected / misshapen keys."""
    sd = convert_transformer_state_dict(obj)
    own = model.state_dict()
    problem = describe_mismatch(own, sd)
    if problem:
        raise CheckpointLayoutError("transformer checkpoint does not fit this architecture; " + problem)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
