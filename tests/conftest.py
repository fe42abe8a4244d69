import os
import shutil
import sys
import tempfile

import pytest
import torch

# keep the tests' caches (converted Inception weights, FID statistics) out of the user's cache; the folder
# is removed when the session ends (pytest_unconfigure), so a run leaves nothing in the temp folder
_OWN_CACHE = "MASKGIT_CACHE" not in os.environ
os.environ.setdefault("MASKGIT_CACHE", tempfile.mkdtemp(prefix="maskgit-test-cache-"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.abspath(os.path.join(ROOT, "..", "shared"))
LAB3 = os.path.join(SHARED, "data", "lab3_dataset")
TEST_GT = os.path.join(SHARED, "data", "lab3_test_gt")
SPEC = os.path.join(SHARED, "spec")

torch.set_num_threads(min(2, torch.get_num_threads()))


_OWN_BASETEMP = None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # tmp_path folders live in a fresh folder of this session (removed in pytest_unconfigure), not in the
    # shared pytest-of-<user>: a run leaves nothing behind, and two runs at once cannot clean up each other's
    global _OWN_BASETEMP
    if config.option.basetemp is None:
        _OWN_BASETEMP = config.option.basetemp = tempfile.mkdtemp(prefix="maskgit-pytest-")
    config.addinivalue_line("markers", "slow: long-running check (run with --runslow)")
    config.addinivalue_line("markers", "gpu: needs CUDA")


def pytest_unconfigure(config):
    for path in (os.environ["MASKGIT_CACHE"] if _OWN_CACHE else None, _OWN_BASETEMP):
        if path:
            shutil.rmtree(path, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def lab3():
    if not os.path.isdir(LAB3):
        pytest.skip(f"lab dataset not found at {LAB3}")
    return LAB3


TINY_VQ = dict(image_channels=3, enc_channels=[16, 32, 32], dec_channels=[16, 32, 32], latent_dim=8,
               img_resolution=16, latent_resolution=4, num_codebook_vectors=32, beta=0.25,
               enc_num_res_blocks=1, dec_num_res_blocks=1)
TINY_T = dict(num_image_tokens=16, num_codebook_vectors=32, dim=32, n_layers=2, hidden_dim=64, num_heads=4)


@pytest.fixture
def tiny_cfg():
    """A resolved MaskGit config small enough for CPU tests (16x16 images, 4x4 tokens)."""
    return {"MODEL_NAME": "MaskGit", "training_param": {},
            "model_param": {"VQ_Configs": {}, "num_image_tokens": 16, "num_codebook_vectors": 32,
                            "choice_temperature": 4.5, "gamma_type": "cosine", "Transformer_param": dict(TINY_T)},
            "vqgan": dict(TINY_VQ)}


GT_IDS = (0, 2, 3, 5)  # test images whose originals the fake --gt folder holds (the lab has 570 of 747)


def make_world(root, n_train=40, n_val=12, n_test=6, size=64, seed=0) -> dict:
    """A lab3_dataset-like folder of smooth random 64x64 images with holes, and a --gt folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)

    def img():
        return np.kron(rng.uniform(0, 255, (4, 4, 3)), np.ones((size // 4, size // 4, 1))).astype(np.uint8)

    root = str(root)
    dirs = {k: os.path.join(root, "data", k) for k in ("train", "val", "masked_image", "mask64")}
    dirs["gt"] = os.path.join(root, "gt")
    for d in dirs.values():
        os.makedirs(d)
    train = [img() for _ in range(n_train)]
    for i, a in enumerate(train):
        Image.fromarray(a).save(os.path.join(dirs["train"], f"image_{i:05d}.png"))
    for i in range(n_val):  # a quarter of val duplicates train, as in the lab
        Image.fromarray(train[i] if i < n_val // 4 else img()).save(os.path.join(dirs["val"], f"image_{i:05d}.png"))
    for i in range(n_test):
        a, m = img(), np.full((size, size), 255, np.uint8)
        y, x = rng.integers(0, size - 24, 2)
        m[y:y + 12 + 2 * i, x:x + 16] = 0  # 0 = hole
        if i in GT_IDS:
            Image.fromarray(a).save(os.path.join(dirs["gt"], f"image_{i:03d}.png"))
        a[m == 0] = 128
        Image.fromarray(a).save(os.path.join(dirs["masked_image"], f"image_{i:03d}.png"))
        Image.fromarray(m, "L").save(os.path.join(dirs["mask64"], f"mask_{i:03d}.png"))
    return {"root": os.path.join(root, "data"), **dirs}


def make_tiny_world(root, n_train=48, n_val=16, n_test=6, size=16, seed=0):
    """A lab-like dataset of smooth random 16x16 images, a random tiny VQGAN checkpoint and a
    MaskGit YAML pointing at it. Returns a dict of paths."""
    import numpy as np
    import yaml
    from PIL import Image

    from models import VQGAN

    rng = np.random.default_rng(seed)
    root = str(root)

    def img():
        base = rng.uniform(0, 255, (4, 4, 3))
        return np.kron(base, np.ones((size // 4, size // 4, 1))).astype(np.uint8)

    train_imgs = [img() for _ in range(n_train)]
    dirs = {k: os.path.join(root, k) for k in ("train", "val", "masked_image", "mask64")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    for i, a in enumerate(train_imgs):
        Image.fromarray(a).save(os.path.join(dirs["train"], f"image_{i:05d}.png"))
    for i in range(n_val):  # the first quarter of val duplicates train images, as in the lab
        a = train_imgs[i] if i < n_val // 4 else img()
        Image.fromarray(a).save(os.path.join(dirs["val"], f"image_{i:05d}.png"))
    for i in range(n_test):
        a = img()
        m = np.full((size, size), 255, np.uint8)
        y, x = rng.integers(0, size - 6, 2)
        m[y:y + 3 + i % 4, x:x + 5] = 0
        a[m == 0] = 128
        Image.fromarray(a).save(os.path.join(dirs["masked_image"], f"image_{i:03d}.png"))
        Image.fromarray(m, "L").save(os.path.join(dirs["mask64"], f"mask_{i:03d}.png"))
    torch.manual_seed(seed)
    vq = VQGAN(TINY_VQ)
    vq_path = os.path.join(root, "VQGAN.pt")
    torch.save(vq.state_dict(), vq_path)
    cfg = {"MODEL_NAME": "MaskGit", "vqgan": dict(TINY_VQ),
           "model_param": {"VQ_Configs": {"VQ_CKPT_path": vq_path}, "num_image_tokens": 16,
                           "num_codebook_vectors": 32, "choice_temperature": 4.5, "gamma_type": "cosine",
                           "Transformer_param": dict(TINY_T)}}
    cfg_path = os.path.join(root, "MaskGit_tiny.yml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    return dict(root=root, config=cfg_path, vqgan=vq_path, **dirs)


@pytest.fixture
def one_thread():
    """One intra-op thread for the tiny models: on a 2-core machine shared with other jobs two threads
    contend and run them up to 10x slower. Modules opt in with pytestmark = usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_world(tmp_path):
    return make_tiny_world(tmp_path / "world")
