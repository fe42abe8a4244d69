"""Datasets, normalization constants and mask conventions of the lab.

Mask polarity, stated once for the whole repository:
  * pixel masks read from disk (``mask64/mask_XXX.png``): 0 = hole (missing), 255 = known;
    as tensors they are float {0., 1.} with **1 = known**;
  * token masks: bool (B, N) with **True = masked** (to be predicted).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .config import REPO_ROOT

log = logging.getLogger("maskgit")

# --- pixel-range constants: nothing else in the repository writes these numbers ---------------
TRAIN_MEAN = (0.4816, 0.4324, 0.3845)  # statistics of lab train+val, used for train/val inputs
TRAIN_STD = (0.2602, 0.2518, 0.2537)
TEST_MEAN = (0.4868, 0.4341, 0.3844)  # statistics of the lab test set; also de-normalizes outputs
TEST_STD = (0.2620, 0.2527, 0.2543)
HOLE_GRAY = 128  # value of hole pixels in masked_image/*.png (known pixels can be 128 too)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(ValueError):
    """Bad input data: the message names the file or folder and what is wrong."""


def normalize(x: torch.Tensor, mean=TRAIN_MEAN, std=TRAIN_STD) -> torch.Tensor:
    """[0,1] images (B,3,H,W) or (3,H,W) -> normalized."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean=TEST_MEAN, std=TEST_STD) -> torch.Tensor:
    """Normalized images -> [0,1] (clamped). Default constants are the lab's test constants."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def to_uint8(x01: torch.Tensor) -> np.ndarray:
    """[0,1] (..., 3, H, W) tensor -> (..., H, W, 3) uint8 array, rounding like torchvision.save_image."""
    return x01.mul(255).add_(0.5).clamp_(0, 255).movedim(-3, -1).to("cpu", torch.uint8).numpy()


def list_images(folder: str, what: str = "images") -> list[str]:
    """Sorted image paths in ``folder``; a clear error for a missing or empty folder."""
    if not os.path.isdir(folder):
        raise DataError(f"{what} folder not found: {folder}")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise DataError(f"{what} folder is empty (no {'/'.join(IMAGE_EXTS)} files): {folder}")
    return [os.path.join(folder, f) for f in files]


def read_image(path: str, size: int | None = None, resize: bool = False, mode: str = "RGB") -> Image.Image:
    """Open an image, naming the file on any failure; wrong size is an error unless ``resize``."""
    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({' '.join(str(e).split())})") from e
    if size is not None and img.size != (size, size):
        if not resize:
            raise DataError(f"{path}: is {img.size[0]}x{img.size[1]}, expected {size}x{size} (pass --resize to "
                            f"resize it)")
        img = img.resize((size, size), Image.BICUBIC if mode == "RGB" else Image.NEAREST)
    return img


def pil_to_tensor01(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (C, H, W)


class ImageFolder(Dataset):
    """Images of a folder, normalized with the given constants. Returns (3,H,W) float tensors."""

    def __init__(self, root: str, image_size: int = 64, mean=TRAIN_MEAN, std=TRAIN_STD,
                 resize: bool = False, hflip: bool = False, limit: int | None = None):
        self.paths = list_images(root)[:limit]
        self.image_size, self.mean, self.std, self.resize, self.hflip = image_size, mean, std, resize, hflip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = normalize(pil_to_tensor01(read_image(self.paths[i], self.image_size, self.resize)), self.mean, self.std)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


def load_mask(path: str, size: int | None = None, resize: bool = False, invert: bool = False) -> torch.Tensor:
    """Read a pixel mask as float (1,H,W) with 1 = known, 0 = hole (``invert``: files with
    255 = hole, 0 = known, as in many other inpainting repositories).

    Non-binary masks (e.g. JPEG-saved) are thresholded at 128 (:meth:`MaskedImageSet.check` warns).
    """
    arr = np.asarray(read_image(path, size, resize, mode="L"), dtype=np.uint8)
    return torch.from_numpy(known_pixels(arr, invert).astype(np.float32))[None]  # (1, H, W)


def known_pixels(arr: np.ndarray, invert: bool = False) -> np.ndarray:
    """The one rule of mask polarity on disk: bool array, True = known (>= 128; < 128 with ``invert``)."""
    return (arr < 128) if invert else (arr >= 128)


MAX_NON_BINARY = 0.05  # masks with more pixels outside {0, 255} than this are not masks


class MaskedImageSet(Dataset):
    """Pairs ``masked_image/*`` with ``mask64/*`` by sorted order (the lab's rule).

    Returns (image normalized with the test constants (3,H,W), pixel mask (1,H,W) 1=known, index).
    Call :meth:`check` before any model work: it reads every pair once and reports all problems.
    """

    def __init__(self, image_dir: str, mask_dir: str, image_size: int = 64, mean=TEST_MEAN, std=TEST_STD,
                 resize: bool = False, limit: int | None = None, invert_mask: bool = False):
        self.images = list_images(image_dir, "masked image")
        self.masks = list_images(mask_dir, "mask")
        if len(self.images) != len(self.masks):
            raise DataError(f"{len(self.images)} masked images in {image_dir} but {len(self.masks)} masks in "
                            f"{mask_dir}: they are paired by sorted order, so the counts must match")
        self.images, self.masks = self.images[:limit], self.masks[:limit]
        self.image_size, self.mean, self.std, self.resize = image_size, mean, std, resize
        self.invert_mask = invert_mask

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = normalize(pil_to_tensor01(read_image(self.images[i], self.image_size, self.resize)), self.mean, self.std)
        m = load_mask(self.masks[i], self.image_size, self.resize, self.invert_mask)
        return x, m, i

    def check(self) -> dict:
        """Read every image and mask: unreadable files, wrong sizes (without ``resize``) and
        non-masks (more than 5% of pixels outside {0, 255}) are listed together in one
        :class:`DataError` (the first 10 and a count). Warns about JPEG-like masks (thresholded) and
        about masks that look inverted (most masks mostly holes: add ``--invert-mask``).
        Returns {"hole_fraction": mean hole fraction, "inverted_looking": masks that are > 50% holes}."""
        bad, fuzzy, hole_fracs = [], 0, []
        for img_path, mask_path in zip(self.images, self.masks):
            for path, mode in ((img_path, "RGB"), (mask_path, "L")):
                try:
                    arr = np.asarray(read_image(path, self.image_size, self.resize, mode), dtype=np.uint8)
                except DataError as e:
                    bad.append(str(e))
                    continue
                if mode == "L":
                    off = ~np.isin(arr, (0, 255))
                    if off.mean() > MAX_NON_BINARY:
                        bad.append(f"{path}: not a binary mask ({100 * off.mean():.0f}% of pixels are neither 0 "
                                   f"nor 255)")
                        continue
                    fuzzy += bool(off.any())
                    hole_fracs.append(float(1.0 - known_pixels(arr, self.invert_mask).mean()))
        if bad:
            raise DataError(bad_files_message(bad, "inputs", "fix or remove them (masked images and masks are paired "
                                                             "by sorted order)"))
        if fuzzy:
            log.warning("%d masks in %s are not exactly {0,255} (JPEG?): thresholded at 128", fuzzy,
                        os.path.dirname(self.masks[0]))
        inverted = sum(f > 0.5 for f in hole_fracs)
        if inverted > len(hole_fracs) / 2:
            log.warning("%d of %d masks in %s are mostly holes: masks here are 0 = hole, 255 = known; if yours are "
                        "the other way round (255 = hole), add --invert-mask", inverted, len(hole_fracs),
                        os.path.dirname(self.masks[0]))
        return {"hole_fraction": sum(hole_fracs) / max(1, len(hole_fracs)), "inverted_looking": inverted}


DATA_CANDIDATES = ("lab3_dataset", "lab5_dataset", "../shared/data/lab3_dataset")


def default_data_root() -> str | None:
    """The first lab dataset found in the current directory or beside the repository."""
    for c in DATA_CANDIDATES:
        for base in (os.getcwd(), str(REPO_ROOT)):
            p = os.path.join(base, c)
            if os.path.isdir(p):
                return os.path.normpath(p)
    return None


@dataclass
class LabLayout:
    train: str
    val: str
    masked_image: str
    mask64: str


def find_lab_layout(root: str) -> LabLayout:
    """Accept both lab layouts:
    ``lab3_dataset/{train,val,masked_image,mask64}`` and
    ``lab5_dataset/cat_face/{train,val,masked_image}`` + ``lab5_dataset/mask64``.
    """
    if not os.path.exists(root):
        raise DataError(f"dataset folder {root} does not exist")
    if os.path.isdir(os.path.join(root, "cat_face")):
        base = os.path.join(root, "cat_face")
        return LabLayout(os.path.join(base, "train"), os.path.join(base, "val"),
                         os.path.join(base, "masked_image"), os.path.join(root, "mask64"))
    if os.path.isdir(os.path.join(root, "train")):
        return LabLayout(*(os.path.join(root, d) for d in ("train", "val", "masked_image", "mask64")))
    raise DataError(f"{root} is not a lab dataset: expected train/ (lab3_dataset) or cat_face/ (lab5_dataset)")


def pixel_to_token_mask(pixel_mask: torch.Tensor, latent_resolution: int = 16, rule: str = "lab") -> torch.Tensor:
    """Pixel mask (B,1,H,W), 1 = known -> token mask (B, h*w) bool, **True = masked**.

    rule "lab": a token stays known only if all its pixels are known (average pool == 1).
    rule "dilated": additionally mask the 8 neighbours of every masked token (more context
    is regenerated, which hides seams at the hole border).
    """
    B, _, H, W = pixel_mask.shape
    f = H // latent_resolution
    known_frac = F.avg_pool2d(pixel_mask.float(), kernel_size=f, stride=f)  # (B, 1, h, w)
    masked = known_frac < 1.0  # (B, 1, h, w)
    if rule == "dilated":
        masked = F.max_pool2d(masked.float(), kernel_size=3, stride=1, padding=1) > 0
    elif rule != "lab":
        raise ValueError(f"mask rule must be 'lab' or 'dilated', got {rule!r}")
    return masked.flatten(1)  # (B, h*w) raster order


def bad_files_message(bad: list, what: str = "images", fix: str = "") -> str:
    """One line listing unusable files: the first 10 (name: problem) and how many in all."""
    head = "; ".join(bad[:10]) + (f"; ... and {len(bad) - 10} more" if len(bad) > 10 else "")
    return f"{len(bad)} unusable {what}: {head}{'; ' + fix if fix else ''}"


def unreadable_images(paths: list[str], what: str = "images") -> None:
    """Open every file once; raise one :class:`DataError` listing all that cannot be read as images."""
    bad = []
    for p in paths:
        try:
            read_image(p)
        except DataError as e:
            bad.append(str(e))
    if bad:
        raise DataError(bad_files_message(bad, what, "fix or remove them"))


def load_image_stack(folder: str, image_size: int = 64, resize: bool = False, limit: int | None = None,
                     progress: bool = True, skip_bad: bool = False, return_names: bool = False):
    """Every image of ``folder`` (the first ``limit``) as one uint8 tensor (N, 3, H, W) held in memory.

    Every file is checked before this returns: unreadable or wrongly sized images are collected
    and reported together (the first 10 and a count) in one :class:`DataError`, or, with
    ``skip_bad``, logged and left out. The lab's 12,000 training images take 147 MB this way, and
    loading once beats decoding PNGs every epoch. With ``return_names``: (images, the file names kept).
    """
    from tqdm import tqdm

    paths = list_images(folder)[:limit]
    out = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    bad, kept = [], []
    for p in tqdm(paths, desc=f"loading {os.path.basename(folder.rstrip('/'))}", disable=not progress, leave=False):
        try:
            arr = np.asarray(read_image(p, image_size, resize), dtype=np.uint8)  # (H, W, 3)
        except DataError as e:
            bad.append(str(e).replace(os.path.dirname(p) + os.sep, ""))  # the folder is named once, below
            continue
        out[len(kept)] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        kept.append(os.path.basename(p))
    if bad and not skip_bad:
        raise DataError(bad_files_message(bad, f"images in {folder}",
                                          "fix or remove them, or pass --skip-bad-images to leave them out"))
    if bad:
        log.warning("skipping %s", bad_files_message(bad, f"images in {folder}"))
    if not kept:
        raise DataError(f"no usable image in {folder}")
    return (out[:len(kept)], kept) if return_names else out[:len(kept)]


def uint8_to_normalized(x: torch.Tensor, mean=TRAIN_MEAN, std=TRAIN_STD) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float normalized, on x's device."""
    return normalize(x.float().div_(255.0), mean, std)
