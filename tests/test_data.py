import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import (TEST_MEAN, TEST_STD, DataError, ImageFolder, MaskedImageSet, denormalize, find_lab_layout,
                        load_mask, normalize, pixel_to_token_mask)


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


def test_bad_inputs(tmp_path, caplog):
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
    with caplog.at_level(logging.WARNING, logger="maskgit"):
        m = load_mask(str(tmp_path / "gray" / "image_000.png"))
    assert "not binary" in caplog.text and (m == 1).all()
