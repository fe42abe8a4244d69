"""bench/generation_study.py: the reference is the val images unseen in train, every setting's samples
are generate_images' (recomputed here), the summary figures follow from the samples."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import generation_study  # noqa: E402
from utils.data import to_uint8  # noqa: E402
from utils.inpaint import InpaintOptions, generate_images  # noqa: E402


def test_saturation_by_hand():
    grey = torch.full((1, 3, 2, 2), 0.5)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 0.8
    half = torch.tensor([0.8, 0.4, 0.4]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert generation_study.saturation(grey) == 0 and generation_study.saturation(red) == pytest.approx(1.0)
    assert generation_study.saturation(torch.cat([red, half])) == pytest.approx(0.75)


def test_study_on_a_tiny_dataset(tmp_path, monkeypatch):
    fids = []  # FID itself is tested in test_fid.py: here, which folders it compares

    def fake_fid(pred, gt, device=None):
        fids.append((os.path.basename(pred), os.path.basename(gt), len(os.listdir(pred))))
        return float(len(fids))
    monkeypatch.setattr(generation_study, "compute_fid", fake_fid)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(5)]
    for sub, ids in (("val", [0, 1, 2, 3]), ("train", [1, 3, 4])):  # unseen in train: val 0 and 2
        (tmp_path / "data" / sub).mkdir(parents=True)
        for i in ids:
            Image.fromarray(imgs[i]).save(tmp_path / "data" / sub / f"image_{i}.png")
    out = tmp_path / "out"
    rows = generation_study.main(["--n", "3", "--batch-size", "2", "--temperatures", "0.5", "--total-iter", "2",
                                  "--data", str(tmp_path / "data"), "--out", str(out), "--per-row", "3",
                                  "--device", "cpu"])
    assert [r["setting"] for r in rows] == ["argmax", "sample T=0.5"]
    ref = sorted(os.listdir(out / "reference"))
    assert [np.array_equal(np.asarray(Image.open(out / "reference" / f)), imgs[i]) for f, i in zip(ref, [0, 2])] == \
        [True, True]
    model = generation_study.load_model(generation_study.parse_args(["--device", "cpu"])).eval()
    for folder, sampled in (("argmax", {}), ("sample_0.5", {"token_choice": "sample", "sample_temperature": 0.5})):
        opts = InpaintOptions(total_iter=2, seed=0, visualize=False, **sampled)
        want = torch.cat([generate_images(model, 2, opts, torch.device("cpu"), seed_offset=1)[0],
                          generate_images(model, 1, opts, torch.device("cpu"), seed_offset=2)[0]])
        got = [np.asarray(Image.open(out / folder / f"image_{k:04d}.png")) for k in range(3)]
        assert all(np.abs(g.astype(int) - to_uint8(w).astype(int)).max() <= 1 for g, w in zip(got, want)), folder
        row = rows[0 if folder == "argmax" else 1]
        assert row["samples"] == 3 and row["FID vs 2 unseen val"] == (1.0 if folder == "argmax" else 2.0)
        assert row["near-black share"] == pytest.approx(float((want.mean((1, 2, 3)) < 0.15).float().mean()))
    assert fids == [("argmax", "reference", 3), ("sample_0.5", "reference", 3)]
    assert Image.open(out / "generation.png").size == (110 + 3 * (128 + 4) + 4, 2 * (128 + 4) + 4)
    assert json.load(open(out / "generation_study.json")) == rows
    rows = generation_study.main(["--n", "1", "--temperatures", "0.5", "--total-iter", "2", "--no-fid", "--data",
                                  str(tmp_path / "nothing"), "--out", str(tmp_path / "nofid"), "--device", "cpu"])
    assert len(fids) == 2 and all("FID" not in k for r in rows for k in r)  # --no-fid: no reference needed
