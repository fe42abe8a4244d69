import os

import numpy as np
import pytest
import torch
from PIL import Image

from utils.composite import fill_holes, paste_known, smooth_fill
from utils.data import (TEST_MEAN, TEST_STD, TRAIN_MEAN, TRAIN_STD, DataError, ImageFolder, MaskedImageSet,
                        denormalize, find_lab_layout, load_mask, normalize, pixel_to_token_mask, uint8_to_normalized)


def test_token_mask_rule_on_real_lab_masks(lab3):
    ds = MaskedImageSet(os.path.join(lab3, "masked_image"), os.path.join(lab3, "mask64"))
    masks = torch.stack([load_mask(p) for p in ds.masks])  # (747, 1, 64, 64) 1 = known
    counts = pixel_to_token_mask(masks).sum(1).float()
    assert len(counts) == 747
    assert counts.mean().item() == pytest.approx(85.0, abs=0.05)
    assert counts.min().item() == 31 and counts.max().item() == 139
    hole_frac = 1 - masks.mean(dim=(1, 2, 3))
    assert 0.09 < hole_frac.min() and hole_frac.max() < 0.30
    # every token that contains a hole pixel is masked, every fully-known token is not
    m = masks[0, 0].view(16, 4, 16, 4).amin(dim=(1, 3))  # (16, 16) 1 if all 16 pixels known
    assert torch.equal(pixel_to_token_mask(masks[:1])[0], (m < 1).flatten())


def test_dilated_rule_is_superset():
    m = torch.ones(1, 1, 64, 64)
    m[0, 0, 32:36, 32:36] = 0  # exactly token (8, 8)
    lab = pixel_to_token_mask(m)
    dil = pixel_to_token_mask(m, rule="dilated")
    assert lab.sum() == 1 and dil.sum() == 9 and (dil | lab).equal(dil)


def test_lab_layouts(tmp_path, lab3):
    lay = find_lab_layout(lab3)
    assert lay.mask64.endswith("mask64") and os.path.isdir(lay.train)
    (tmp_path / "lab5_dataset" / "cat_face" / "train").mkdir(parents=True)
    lay5 = find_lab_layout(str(tmp_path / "lab5_dataset"))
    assert lay5.mask64 == str(tmp_path / "lab5_dataset" / "mask64")
    assert lay5.masked_image.endswith(os.path.join("cat_face", "masked_image"))
    with pytest.raises(DataError, match="not a lab dataset"):
        find_lab_layout(str(tmp_path))


def test_normalize_roundtrip_and_real_image(lab3):
    ds = ImageFolder(os.path.join(lab3, "train"), limit=4)
    x = ds[0]
    assert x.shape == (3, 64, 64)
    raw = np.asarray(Image.open(ds.paths[0]).convert("RGB"), dtype=np.float32) / 255
    back = denormalize(normalize(torch.from_numpy(raw).permute(2, 0, 1), TEST_MEAN, TEST_STD))
    torch.testing.assert_close(back, torch.from_numpy(raw).permute(2, 0, 1), atol=1e-6, rtol=0)


def _write(folder, n, size=64, mode="RGB", value=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.full((size, size) if mode == "L" else (size, size, 3), 255 if value is None else value, np.uint8)
        Image.fromarray(arr, mode).save(folder / f"image_{i:03d}.png")


def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not found"):
        ImageFolder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        ImageFolder(str(tmp_path / "empty"))
    _write(tmp_path / "img", 3)
    _write(tmp_path / "msk", 2, mode="L")
    with pytest.raises(DataError, match="3 masked images .* but 2 masks"):
        MaskedImageSet(str(tmp_path / "img"), str(tmp_path / "msk"))
    (tmp_path / "img" / "image_001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="image_001.png"):
        ImageFolder(str(tmp_path / "img"))[1]
    _write(tmp_path / "big", 1, size=80)
    with pytest.raises(DataError, match="80x80, expected 64x64"):
        ImageFolder(str(tmp_path / "big"))[0]
    assert ImageFolder(str(tmp_path / "big"), resize=True)[0].shape == (3, 64, 64)
    _write(tmp_path / "gray", 1, mode="L", value=200)
    assert (load_mask(str(tmp_path / "gray" / "image_000.png")) == 1).all()  # thresholded at 128
    _write(tmp_path / "one", 1)
    with pytest.raises(DataError, match="image_000.png: not a binary mask"):  # 200 everywhere: not a mask
        MaskedImageSet(str(tmp_path / "one"), str(tmp_path / "gray")).check()
    jpeg_like = np.full((64, 64), 255, np.uint8)
    jpeg_like[:8, :8], jpeg_like[0, 0] = 0, 7  # one pixel off {0, 255}: JPEG noise, thresholded
    Image.fromarray(jpeg_like, "L").save(tmp_path / "gray" / "image_000.png")
    import utils.data as data_mod
    seen = []
    monkeypatch.setattr(data_mod.log, "warning", lambda msg, *a: seen.append(msg % a))
    stats = MaskedImageSet(str(tmp_path / "one"), str(tmp_path / "gray")).check()
    assert any("not exactly {0,255}" in m for m in seen) and abs(stats["hole_fraction"] - 64 / 4096) < 1e-9


def _ramp(h=64, w=64):
    """A linear image per channel: harmonic, so the exact hole fill of a Laplace solver is itself."""
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([0.02 * i - 0.5, -0.01 * j + 0.3, 0.015 * (i + j) - 1.0])[None]  # (1, 3, H, W)


def test_fill_holes_keeps_known_pixels_and_solves_laplace():
    x = _ramp()
    pm = torch.ones(1, 1, 64, 64, dtype=torch.float64)
    pm[..., 20:44, 12:40] = 0
    holed = x * pm  # holes at 0, as in the normalized masked images
    fast = fill_holes(holed, pm)
    assert torch.equal(fast[pm.expand_as(x) > 0], x[pm.expand_as(x) > 0])
    exact = fill_holes(holed, pm, smooth_iters=3000)
    hole = pm.expand_as(x) == 0
    assert (exact - x)[hole].abs().max() < 1e-3  # converges to the closed form
    assert (fast - x)[hole].abs().max() < 0.25 * (holed - x)[hole].abs().max()  # default: most of the way
    empty = fill_holes(torch.randn(2, 3, 16, 16), torch.zeros(2, 1, 16, 16))  # nothing known: no NaN
    assert torch.isfinite(empty).all()


def test_seamless_paste_removes_colour_offsets_that_a_plain_paste_keeps():
    orig = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pm = torch.ones(2, 1, 32, 32)
    pm[0, :, 8:20, 5:25] = 0
    pm[1, :, 0:10, 0:10] = 0  # a hole at the image corner
    shifted = orig + torch.tensor([0.2, -0.1, 0.05])[None, :, None, None]  # a prediction with a colour cast
    out = paste_known(shifted, orig, pm, "seamless")
    torch.testing.assert_close(out, orig, atol=1e-6, rtol=0)  # a constant residual is filled exactly
    hard = pm * orig + (1 - pm) * shifted
    assert (hard - orig).abs().max() > 0.19
    # a smooth (harmonic) offset is removed too, given iterations, where the hole has a known border all
    # around (at the image edge the fill has no border to meet: zero slope there, as for any Laplace fill)
    tilted = orig + 0.3 * _ramp(32, 32).float()
    torch.testing.assert_close(paste_known(tilted, orig, pm, "seamless", smooth_iters=3000)[:1], orig[:1], atol=2e-3, rtol=0)


def _grid(h=40, w=40):
    i, j = torch.meshgrid(torch.arange(h, dtype=torch.float64) / h, torch.arange(w, dtype=torch.float64) / w,
                          indexing="ij")
    return i, j


def _interior_holes(b=2, h=40, w=40):
    """Holes at least two pixels from the image edges (where the grid operator is the textbook stencil)."""
    pm = torch.ones(b, 1, h, w, dtype=torch.float64)
    pm[0, :, 6:30, 9:33] = 0
    pm[-1, :, 4:14, 4:36] = 0
    pm[-1, :, 20:34, 15:25] = 0  # two holes in one image
    return pm


def test_smooth_fill_reproduces_harmonic_and_biharmonic_polynomials():
    """Closed forms: a harmonic function (order 1) and a biharmonic one (order 2) are their own fill;
    x^2 - y^2... is harmonic, x^3 and x y^2 are biharmonic but not harmonic, so the membrane must miss them."""
    i, j = _grid()
    harmonic = torch.stack([0.7 * i - 0.2 * j, i * j, i ** 2 - j ** 2])[None].expand(2, -1, -1, -1)
    biharmonic = torch.stack([i ** 3, i * j ** 2, (i ** 2 + j ** 2) * i - 0.3 * j ** 3])[None].expand(2, -1, -1, -1)
    pm = _interior_holes()
    hole = pm.expand(2, 3, -1, -1) == 0
    for order, f in ((1, harmonic), (2, harmonic), (2, biharmonic)):
        holed = f * pm - 5 * (1 - pm)  # whatever the hole holds is ignored
        out = smooth_fill(holed, pm, order=order)
        torch.testing.assert_close(out, f.contiguous(), atol=1e-10, rtol=0)
    assert (smooth_fill(biharmonic * pm, pm, order=1) - biharmonic)[hole].abs().max() > 1e-3


def test_smooth_fill_solves_the_textbook_stencils():
    """Random known pixels: in the hole the 5-point Laplacian (order 1) and the 13-point biharmonic
    stencil (order 2), applied by convolution here, vanish."""
    g = torch.Generator().manual_seed(0)
    x, pm = torch.rand(2, 3, 40, 40, generator=g, dtype=torch.float64), _interior_holes()
    lap = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float64)
    bih = torch.tensor([[0, 0, 1, 0, 0], [0, 2, -8, 2, 0], [1, -8, 20, -8, 1], [0, 2, -8, 2, 0], [0, 0, 1, 0, 0]],
                       dtype=torch.float64)
    hole = pm.expand(2, 3, -1, -1) == 0
    for order, k in ((1, lap), (2, bih)):
        out = smooth_fill(x, pm, order=order)
        assert torch.equal(out[~hole], x[~hole])  # known pixels untouched
        r = k.shape[-1] // 2
        res = torch.nn.functional.conv2d(out.reshape(-1, 1, 40, 40), k[None, None]).reshape(2, 3, 40 - 2 * r, -1)
        assert res[hole[..., r:-r, r:-r]].abs().max() < 1e-9, order
        assert res.abs().max() > 0.1  # not trivially zero: the known pixels are noise


def test_smooth_fill_edge_cases_and_dtype():
    x = torch.rand(3, 3, 16, 16)
    pm = torch.ones(3, 1, 16, 16)
    pm[1] = 0  # nothing known: returned as given
    pm[2, :, :5, :] = 0  # a hole along the image edge (reflecting edges: still one solution)
    out = smooth_fill(x, pm)
    assert out.dtype == torch.float32 and torch.equal(out[:2], x[:2]) and torch.isfinite(out).all()
    torch.testing.assert_close(smooth_fill(torch.full((1, 3, 16, 16), 0.25), pm[2:]), torch.full((1, 3, 16, 16), 0.25))


def test_biharmonic_paste_removes_curved_offsets_the_membrane_keeps():
    """The default blend: a prediction off by any biharmonic field (constant, tilt, curvature) comes back
    exactly; the membrane ("seamless", converged) removes the tilt but not the curvature."""
    i, j = _grid()
    orig = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pm = _interior_holes()
    offset = torch.stack([0.1 + 0 * i, 0.3 * i - 0.2 * j, 0.8 * i ** 3 + 0.5 * i * j ** 2])[None]
    out = paste_known(orig + offset, orig, pm, "biharmonic")
    torch.testing.assert_close(out, orig, atol=1e-9, rtol=0)
    membrane = paste_known(orig + offset, orig, pm, "seamless", smooth_iters=4000)
    torch.testing.assert_close(membrane[:, :2], orig[:, :2], atol=1e-4, rtol=0)
    assert (membrane[:, 2] - orig[:, 2]).abs().max() > 5e-3


def test_smooth_prefill_keeps_the_known_tokens_of_real_images(lab3):
    """The reason for --prefill smooth: on the lab's test images with recovered originals, the
    known tokens of the encoded masked image agree far more often with the original's codes."""
    from inpainting import BUNDLED_CONFIG
    from utils.build import build_maskgit
    from utils.config import REPO_ROOT, load_maskgit_config

    gt_dir = os.path.join(os.path.dirname(lab3), "lab3_test_gt")
    if not os.path.isdir(gt_dir):
        pytest.skip(f"recovered originals not found at {gt_dir}")
    names = sorted(os.listdir(gt_dir))[:48]
    model = build_maskgit(load_maskgit_config(str(REPO_ROOT / BUNDLED_CONFIG))).eval()

    def load(folder, n):
        img = np.asarray(Image.open(os.path.join(folder, n)).convert("RGB"), dtype=np.float32) / 255
        return normalize(torch.from_numpy(img).permute(2, 0, 1), TEST_MEAN, TEST_STD)

    orig = torch.stack([load(gt_dir, n) for n in names])
    masked = torch.stack([load(os.path.join(lab3, "masked_image"), n) for n in names])
    pm = torch.stack([load_mask(os.path.join(lab3, "mask64", n.replace("image", "mask"))) for n in names])
    known = ~pixel_to_token_mask(pm)
    with torch.no_grad():
        ref = model.encode_to_z(orig)[1]
        gray = (model.encode_to_z(masked)[1] == ref)[known].float().mean().item()
        smooth = (model.encode_to_z(fill_holes(masked, pm))[1] == ref)[known].float().mean().item()
    # measured on 200 images: 0.58 -> 0.73 with the bundled tokenizer (0.60 -> 0.82 with the 2.71M one before it)
    assert smooth > gray + 0.10, (gray, smooth)


def test_bench_composites_keep_known_pixels_and_the_seamless_one_removes_a_colour_cast(tmp_path):
    """bench/run.py's composited rows: both blends paste the masked input's known pixels exactly;
    for a prediction that is the original with a colour cast, the seamless one recovers the original."""
    import sys

    from conftest import ROOT
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from run import composite

    rng = np.random.default_rng(0)
    orig = rng.integers(40, 200, (32, 32, 3), dtype=np.uint8)
    mask = np.full((32, 32), 255, np.uint8)
    mask[8:20, 6:22] = 0
    masked = np.where(mask[..., None] == 255, orig, 128).astype(np.uint8)
    for sub, arr in (("masked_image", masked), ("pred", np.clip(orig.astype(int) + 30, 0, 255).astype(np.uint8))):
        (tmp_path / sub).mkdir()
        Image.fromarray(arr).save(tmp_path / sub / "image_000.png")
    (tmp_path / "mask64").mkdir()
    Image.fromarray(mask).save(tmp_path / "mask64" / "mask_000.png")
    hole = mask == 0
    for blend in ("hard", "seamless", "biharmonic"):
        out = np.asarray(Image.open(os.path.join(composite(str(tmp_path / "pred"), str(tmp_path),
                                                           str(tmp_path / blend), blend), "image_000.png")))
        assert np.array_equal(out[~hole], orig[~hole])
        err = np.abs(out[hole].astype(int) - orig[hole]).max()
        assert err <= 1 if blend != "hard" else err == 30


def test_bench_hole_metrics_count_only_the_lab_hole_pixels(tmp_path):
    """bench/run.py's hole PSNR / L1 by hand: a prediction off by exactly 51/255 = 0.2 inside the hole
    and exact outside gives L1 0.2 and PSNR 10 log10(1 / 0.04) = 13.98 dB, whatever the known pixels
    hold, and over the whole image (54 of 256 pixels off) 10 log10(256 / (0.04 * 54)); a mask saved with grey levels is read with the lab's >= 128 rule (utils.data.load_mask)."""
    import sys

    from conftest import ROOT
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from run import hole_metrics

    rng = np.random.default_rng(1)
    orig = rng.integers(60, 190, (16, 16, 3), dtype=np.uint8)
    mask = np.full((16, 16), 200, np.uint8)  # known (>= 128), not 255
    mask[4:10, 3:12] = 90  # hole (< 128), not 0
    hole = mask < 128
    pred = orig.copy()
    pred[hole] += 51
    pred[~hole] = orig[~hole]
    for sub, arr in (("masked_image", orig), ("originals", orig), ("pred", pred)):
        (tmp_path / sub).mkdir()
        Image.fromarray(arr).save(tmp_path / sub / "image_000.png")
    (tmp_path / "mask64").mkdir()
    Image.fromarray(mask).save(tmp_path / "mask64" / "mask_000.png")
    m = hole_metrics(str(tmp_path / "pred"), str(tmp_path))
    assert m["l1_hole"] == pytest.approx(0.2, abs=1e-6)
    assert m["psnr_hole"] == pytest.approx(10 * np.log10(1 / 0.04), abs=1e-4)
    assert m["psnr"] == pytest.approx(10 * np.log10(256 / (0.04 * 54)), abs=1e-4)


def test_normalization_constants_are_the_labs():
    assert TRAIN_MEAN == (0.4816, 0.4324, 0.3845) and TRAIN_STD == (0.2602, 0.2518, 0.2537)
    assert TEST_MEAN == (0.4868, 0.4341, 0.3844) and TEST_STD == (0.2620, 0.2527, 0.2543)


def test_normalize_and_denormalize_by_hand(tmp_path):
    """A pixel of 200 in every channel, worked out by hand with the lab's numbers (train constants
    in, test constants out): a wrong constant, swapped mean and std, or swapped train/test defaults
    change these values, which a round trip alone would not notice."""
    x = torch.zeros(3, 2, 2)
    x[:, 1, 0] = 200 / 255
    by_hand = torch.tensor([1.16339, 1.39759, 1.57593])  # (200/255 - 0.4816)/0.2602, .../0.2518, .../0.2537
    torch.testing.assert_close(normalize(x)[:, 1, 0], by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(uint8_to_normalized(torch.full((1, 3, 2, 2), 200, dtype=torch.uint8))[0, :, 1, 0],
                               by_hand, atol=1e-5, rtol=0)
    _write(tmp_path / "img", 1, value=200)  # the training set's loader uses the train constants
    torch.testing.assert_close(ImageFolder(str(tmp_path / "img"))[0][:, 5, 7], by_hand, atol=1e-5, rtol=0)
    z = torch.zeros(3, 2, 2)
    z[:, 0, 1] = 1.0
    z[:, 1, 1] = -1.0
    out = denormalize(z)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([0.4868, 0.4341, 0.3844]), atol=1e-6, rtol=0)  # 0 -> mean
    torch.testing.assert_close(out[:, 0, 1], torch.tensor([0.7488, 0.6868, 0.6387]), atol=1e-6, rtol=0)  # mean + std
    torch.testing.assert_close(out[:, 1, 1], torch.tensor([0.2248, 0.1814, 0.1301]), atol=1e-6, rtol=0)  # mean - std
    torch.testing.assert_close(denormalize(torch.full((3, 1, 1), -2.0)).flatten(), torch.zeros(3))  # clamped at 0


def test_unseen_val_paths_leave_out_val_images_whose_pixels_occur_in_train(tmp_path):
    from utils.tokens import unseen_val_paths
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(6)]
    # val 0..4; train holds val 1 and val 3 under other names and formats (same pixels), and image 5
    for sub, named in (("val", {f"v{i}.png": i for i in range(5)}),
                       ("train", {"a.png": 3, "b.bmp": 1, "c.png": 5})):
        (tmp_path / sub).mkdir()
        for name, i in named.items():
            Image.fromarray(imgs[i]).save(tmp_path / sub / name)
    want = [str(tmp_path / "val" / f"v{i}.png") for i in (0, 2, 4)]
    assert unseen_val_paths(str(tmp_path)) == want
    assert unseen_val_paths(str(tmp_path), 2) == want[:2]
