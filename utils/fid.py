"""FID (and KID) with pytorch-fid's features, computed on CPU or GPU, offline.

Sources of images: a folder of images, the lab's ``test_gt.csv`` (one row of 12,288 HWC pixel
values 0-255 per image, header line), or an ``.npz`` of precomputed ``mu``/``sigma``.

Python API::

    from utils.fid import compute_fid
    fid = compute_fid("test_results", "../shared/data/lab3_test_gt")
"""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import atomic_write
from .data import DataError, list_images, pil_to_tensor01, read_image
from .inception import CACHE_DIR, FIDInception

log = logging.getLogger("maskgit")
STATS_DIR = os.path.join(CACHE_DIR, "fid_stats")


class FIDError(ValueError):
    pass


class _Files(Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return pil_to_tensor01(read_image(self.paths[i]))  # (3, H, W) in [0, 1]


class _Array(Dataset):
    def __init__(self, arr: np.ndarray):
        self.arr = arr  # (N, H, W, 3) uint8

    def __len__(self):
        return len(self.arr)

    def __getitem__(self, i):
        return torch.from_numpy(self.arr[i].copy()).permute(2, 0, 1).float() / 255.0


def read_gt_csv(path: str, image_size: int = 64) -> np.ndarray:
    """The lab's test_gt.csv: a header line, then one row of H*W*3 pixel values (HWC, 0-255)."""
    n_vals = image_size * image_size * 3
    rows = []
    with open(path) as f:
        header = f.readline()
        if not header:
            raise FIDError(f"{path} is empty")
        first = header.strip().split(",")
        if len(first) == n_vals and all(_is_number(v) for v in first[:5]):
            rows.append(first)  # no header line after all
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            vals = line.strip().split(",")
            if len(vals) != n_vals:
                raise FIDError(f"{path}, line {lineno}: {len(vals)} values, expected {n_vals} "
                               f"({image_size}x{image_size}x3 pixels, HWC)")
            rows.append(vals)
    if not rows:
        raise FIDError(f"{path} has no data rows")
    arr = np.asarray(rows, dtype=np.float32)
    if arr.min() < 0 or arr.max() > 255:
        raise FIDError(f"{path}: pixel values must be in 0..255, found {arr.min()}..{arr.max()}")
    return arr.round().astype(np.uint8).reshape(len(rows), image_size, image_size, 3)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def image_files(folder: str, names: set | None = None) -> list[str]:
    try:
        paths = list_images(folder, "image")
    except DataError as e:
        raise FIDError(str(e)) from e
    if names is not None:
        paths = [p for p in paths if os.path.basename(p) in names]
    return paths


@torch.no_grad()
def activations(source, model: FIDInception, batch_size: int = 50, device="cpu", num_workers: int = 0,
                progress: bool = True, desc: str = "inception") -> np.ndarray:
    """(N, dims) float64 features of a list of image paths or an (N,H,W,3) uint8 array."""
    ds = _Array(source) if isinstance(source, np.ndarray) else _Files(source)
    if len(ds) < 2:
        raise FIDError(f"FID needs at least 2 images, got {len(ds)}")
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    model = model.to(device)
    chunk = 16 if torch.device(device).type == "cpu" else batch_size  # CPU: small chunks stay in cache
    out = []
    for x in tqdm(loader, desc=desc, disable=not progress, leave=False):
        for part in x.split(chunk):
            out.append(model(part.to(device)).double().cpu())
    return torch.cat(out).numpy()


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, device="cpu") -> float:
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64 on ``device``.

    tr((S1 S2)^1/2) = tr((sqrt(S1) S2 sqrt(S1))^1/2) = the sum of the singular values of
    sqrt(S2) sqrt(S1) (whose Gram matrix that is). Symmetric eigendecompositions give the two
    square roots, an SVD the singular values: no private SciPy internals, and no square root of
    near-zero eigenvalues of the product, so rank-deficient covariances (fewer images than
    dimensions) stay accurate. With S1 = V diag(l) V^T, sqrt(S1) = W V^T for W = V sqrt(l), and
    V^T is orthogonal, so the singular values are those of sqrt(S2) W; both factors keep only the
    columns of their matrix's numerical rank (eigenvalues above d * eps * max, the rest is rounding
    noise of zero): for n < d images an SVD of d x (n - 1) instead of d x d.
    """
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64, device=device)  # noqa: E731
    mu1, mu2, s1, s2 = t(mu1), t(mu2), t(sigma1), t(sigma2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise FIDError(f"statistics of different dimensions: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2

    def sqrt_factor(s):  # W with sqrt(s) = W V^T, only the columns of s's numerical rank
        lam, vec = torch.linalg.eigh(s)
        keep = lam > lam.abs().max() * lam.numel() * torch.finfo(lam.dtype).eps
        return vec[:, keep] * lam[keep].sqrt(), vec[:, keep]  # (D, r), (D, r)

    w2, v2 = sqrt_factor(s2)
    w1, _ = sqrt_factor(s1)
    tr_covmean = torch.linalg.svdvals(w2 @ (v2.T @ w1)).sum()  # sqrt(S2) W1 = W2 V2^T W1
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, n_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3, averaged over random subsets. Returns (mean, std)."""
    rng = np.random.default_rng(seed)
    d = f1.shape[1]
    m = min(len(f1), len(f2), subset_size)
    if m < 2:
        raise FIDError("KID needs at least 2 images in each set")
    vals = []
    for _ in range(n_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                    - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def source_key(path: str, dims: int, weights_source: str, names: set | None = None) -> str:
    """Content hash of a GT source (CSV bytes or every image file), dims and weights."""
    h = hashlib.sha256(f"{dims}|{os.path.basename(weights_source)}".encode())
    if os.path.isdir(path):
        for p in image_files(path, names):
            h.update(os.path.basename(p).encode())
            with open(p, "rb") as f:
                h.update(hashlib.sha1(f.read()).digest())
    else:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:20]


def load_source(path: str, names: set | None = None):
    """A folder -> list of files; a .csv -> uint8 array; raises FIDError for anything else."""
    if os.path.isdir(path):
        return image_files(path, names)
    if not os.path.exists(path):
        raise FIDError(f"not found: {path}")
    if path.lower().endswith(".csv"):
        return read_gt_csv(path)
    raise FIDError(f"{path}: expected a folder of images, a .csv of pixel rows or an .npz of mu/sigma")


def gt_statistics(path: str, model: FIDInception, batch_size=50, device="cpu", num_workers=0, cache: bool = True,
                  progress: bool = True, names: set | None = None, return_feats: bool = False):
    """(mu, sigma[, feats]) of the ground truth, cached by content so repeat runs skip it."""
    if path.lower().endswith(".npz"):
        if not os.path.isfile(path):
            raise FIDError(f"statistics file not found: {path}")
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise FIDError(f"{path} must hold arrays 'mu' and 'sigma'")
            if return_feats and "feats" not in f:
                raise FIDError(f"{path} holds no features: KID needs images or a --save-stats file made with --kid")
            return (f["mu"], f["sigma"], f["feats"]) if return_feats else (f["mu"], f["sigma"])
    key = source_key(path, model.dims, model.weights_source, names)
    cached = os.path.join(STATS_DIR, f"{key}.npz")
    if cache and os.path.isfile(cached):
        with np.load(cached) as f:
            if not return_feats or "feats" in f:
                log.info("ground-truth statistics from cache %s", cached)
                return (f["mu"], f["sigma"], f["feats"]) if return_feats else (f["mu"], f["sigma"])
    feats = activations(load_source(path, names), model, batch_size, device, num_workers, progress, "ground truth")
    mu, sigma = statistics(feats)
    if cache:
        atomic_write(cached, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma, feats=feats.astype(np.float32)), ".npz")
    return (mu, sigma, feats) if return_feats else (mu, sigma)


_MODELS: dict = {}


def get_model(dims: int = 2048, weights: str | None = None) -> FIDInception:
    key = (dims, weights)
    if key not in _MODELS:
        _MODELS[key] = FIDInception(dims, weights)
    return _MODELS[key]


def compute_fid(pred_dir: str, gt: str, dims: int = 2048, batch_size: int = 50, device=None, num_workers: int = 0,
                match_names: bool = False, weights: str | None = None, progress: bool = False) -> float:
    """FID between a folder of predictions and a ground truth (folder, lab CSV or .npz).

    ``match_names`` keeps only the files present in both folders (e.g. the 570 test images with
    recovered originals)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = get_model(dims, weights)
    pred = image_files(pred_dir)
    names = None
    if match_names and os.path.isdir(gt):
        names = {os.path.basename(p) for p in pred} & {os.path.basename(p) for p in image_files(gt)}
        pred = [p for p in pred if os.path.basename(p) in names]
    mu2, s2 = gt_statistics(gt, model, batch_size, device, num_workers, progress=progress, names=names)
    mu1, s1 = statistics(activations(pred, model, batch_size, device, num_workers, progress, "predictions"))
    return frechet_distance(mu1, s1, mu2, s2, device)
