"""Token caching: the tokenizer is frozen, so a dataset is encoded once and training reads ids.

A cache file is keyed on the tokenizer's weights and the dataset's content (and the flip
option), so a stale cache is never used: change either and the key changes.
"""
from __future__ import annotations

import hashlib
import logging
import os

import torch
from tqdm import tqdm

from .checkpoint import atomic_save, load_checkpoint
from .data import list_images, load_image_stack, uint8_to_normalized
from .runtime import autocast

log = logging.getLogger("maskgit")


def state_dict_fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def folder_fingerprint(folder: str, limit: int | None = None) -> str:
    """Content hash of the first ``limit`` images of ``folder`` (all by default)."""
    h = hashlib.sha256()
    for p in list_images(folder)[:limit]:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            h.update(hashlib.sha1(f.read()).digest())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_images(vqgan, images_u8: torch.Tensor, device, precision: str = "fp32", batch_size: int = 256,
                  desc: str = "encoding", progress: bool = True) -> torch.Tensor:
    """uint8 images (N,3,H,W) -> token ids (N, h*w) int16 on CPU."""
    out = []
    for i in tqdm(range(0, len(images_u8), batch_size), desc=desc, disable=not progress, leave=False):
        x = uint8_to_normalized(images_u8[i:i + batch_size].to(device))
        with autocast(device, precision):
            ids = vqgan.encode_indices(x)  # (B, h*w)
        out.append(ids.to("cpu", torch.int16))
    return torch.cat(out)


def cached_tokens(vqgan, folder: str, cache_dir: str, device, image_size: int, hflip: bool = False,
                  precision: str = "fp32", progress: bool = True, vq_key: str | None = None, limit: int | None = None,
                  resize: bool = False, skip_bad: bool = False) -> dict:
    """Token ids of the first ``limit`` images in ``folder`` (all by default; and of their mirror
    images when ``hflip``). Every image is checked first: unusable ones are listed together in one
    error, or left out with ``skip_bad`` (see :func:`utils.data.load_image_stack`).

    Returns {"ids": (N or 2N, h*w) int16, "n_images": N, "key": cache key, "files": the N file
    names encoded, "folder_key": content hash of those files}.
    """
    vq_key = vq_key or state_dict_fingerprint(vqgan)
    folder_key = folder_fingerprint(folder, limit)
    key = (f"{vq_key}_{folder_key}_{'flip' if hflip else 'noflip'}_{precision}"
           f"{'_resize' if resize else ''}{'_skipbad' if skip_bad else ''}")
    path = os.path.join(cache_dir, f"tokens_{key}.pt")
    if os.path.exists(path):
        data = load_checkpoint(path, "token cache")
        if data.get("key") == key:
            log.info("token cache hit: %s (%d sequences)", path, len(data["ids"]))
            return {**data, "folder_key": folder_key}
    images, files = load_image_stack(folder, image_size, resize, limit, progress, skip_bad, return_names=True)
    ids = encode_images(vqgan, images, device, precision, desc=f"encoding {os.path.basename(folder.rstrip('/'))}",
                        progress=progress)
    if hflip:
        ids = torch.cat([ids, encode_images(vqgan, images.flip(-1), device, precision, desc="encoding flips",
                                            progress=progress)])
    data = {"ids": ids, "n_images": len(images), "key": key, "folder": os.path.abspath(folder), "files": files}
    atomic_save(data, path)
    data["folder_key"] = folder_key
    log.info("encoded %d images of %s once; cached at %s", len(images), folder, path)
    return data


def unseen_indices(val_folder: str, train_folder: str, val_files: list | None = None,
                   train_files: list | None = None) -> torch.Tensor:
    """Indices into ``val_files`` (default: every image of ``val_folder``) of the val images whose
    pixels occur nowhere in ``train_files`` of ``train_folder`` (exact duplicates removed): the
    only val images that measure generalization. Pass the ``files`` of :func:`cached_tokens` so
    the indices match the cached ids."""
    from PIL import Image

    def digests(folder, files):
        paths = [os.path.join(folder, f) for f in files] if files is not None else list_images(folder)
        out = []
        for p in paths:
            with Image.open(p) as im:
                out.append(hashlib.sha1(im.convert("RGB").tobytes()).digest())
        return out

    return _absent(digests(val_folder, val_files), digests(train_folder, train_files))


def unseen_rows(val: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Indices of the images of ``val`` (N, 3, H, W uint8, in memory) whose pixels are those of no
    image of ``train`` (same layout): :func:`unseen_indices` for image stacks already loaded."""
    def digests(images):
        return [hashlib.sha1(x.contiguous().numpy().tobytes()).digest() for x in images]
    return _absent(digests(val), digests(train))


def _absent(val_digests: list, train_digests: list) -> torch.Tensor:
    """Indices into ``val_digests`` of the digests that ``train_digests`` lacks (long tensor)."""
    seen = set(train_digests)
    return torch.tensor([i for i, d in enumerate(val_digests) if d not in seen], dtype=torch.long)


def unseen_val_paths(data_root: str, n: int | None = None) -> list:
    """Paths of the first ``n`` (default all) images of ``data_root/val`` that never occur in
    ``data_root/train`` (:func:`unseen_indices`), in file order: the held-out set every benchmark
    scores generalisation on."""
    val, train = os.path.join(data_root, "val"), os.path.join(data_root, "train")
    files = list_images(val)
    return [files[i] for i in unseen_indices(val, train).tolist()[:n]]
