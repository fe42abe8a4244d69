"""demo.py, the README's first command: the bundled models end to end on a tiny run (2 cats, T=2)."""

import numpy as np
import pytest
import torch
from PIL import Image

import demo
from utils.build import BUNDLED_CONFIG, BUNDLED_TRANSFORMER, build_maskgit, load_transformer_checkpoint
from utils.config import REPO_ROOT, load_maskgit_config
from utils.data import to_uint8
from utils.inpaint import InpaintOptions, generate_images


@pytest.fixture(scope="module")
def bundled():
    model = build_maskgit(load_maskgit_config(str(REPO_ROOT / BUNDLED_CONFIG)))
    load_transformer_checkpoint(model, str(REPO_ROOT / BUNDLED_TRANSFORMER))
    return model.eval()


def test_demo_generates_with_its_temperature_then_inpaints_and_reports(tmp_path, bundled):
    """The cats of the report are generate_images' with --token-choice sample at --gen-temperature,
    recomputed here through the library; every output of the report is written."""
    out = tmp_path / "demo"
    summary = demo.main(["--out-dir", str(out), "--n", "2", "--total-iter", "2", "--no-progress",
                         "--device", "cpu", "--gen-temperature", "0.5"])
    assert summary["images"] == 2
    assert summary["cats generated with"] == "sample, temperature 0.5"
    for name in ("report.html", "report.png", "schedules.png", "originals/image_000.png",
                 "inpaint_cosine/test_results/image_000.png", "inpaint_square/test_results/image_001.png"):
        assert (out / name).is_file(), name
    opts = InpaintOptions(total_iter=2, seed=0, token_choice="sample", sample_temperature=0.5)
    want, _, _ = generate_images(bundled, 2, opts, torch.device("cpu"))
    for i in range(2):
        got = np.asarray(Image.open(out / "originals" / f"image_{i:03d}.png"))
        assert np.abs(got.astype(int) - to_uint8(want[i]).astype(int)).max() <= 1, i
    page = (out / "report.html").read_text()
    assert "How the cats were generated" in page
    assert "--sample-temperature 0.5" in page
    # the holes are filled as inpainting.py fills them by default with the bundled model (its config's token
    # choice, read here from the YAML): the same images from the CLI on the demo's own test set
    import yaml
    import inpainting
    with open(REPO_ROOT / BUNDLED_CONFIG) as f:
        mp = yaml.safe_load(f)["model_param"]
    assert summary["holes filled with"] == (f"sample, temperature {mp['sample_temperature']:g}"
                                            if mp.get("token_choice") == "sample" else "argmax")
    assert summary["holes filled with"] in page
    inpainting.main(["--bundled", "--test-maskedimage-path", str(out / "masked_image"), "--test-mask-path",
                     str(out / "mask64"), "--total-iter", "2", "--mask-func", "cosine", "--no-vis", "--no-progress",
                     "--device", "cpu", "--out-dir", str(tmp_path / "cli")])
    for i in range(2):
        name = f"image_{i:03d}.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / "cli" / "test_results" / name)),
                              np.asarray(Image.open(out / "inpaint_cosine" / "test_results" / name))), i


def test_gen_temperature_zero_is_argmax_and_keeps_the_other_options():
    base = InpaintOptions(total_iter=3, seed=5, mask_func="linear")
    greedy, sampled = demo.generation_options(base, 0.0), demo.generation_options(base, 0.7)
    assert (greedy.token_choice, sampled.token_choice, sampled.sample_temperature) == ("argmax", "sample", 0.7)
    assert all((o.total_iter, o.seed, o.mask_func) == (3, 5, "linear") for o in (greedy, sampled))


def test_demo_rejects_a_negative_temperature(capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(["--gen-temperature", "-1"])
    assert e.value.code == 2 and "--gen-temperature must be a number >= 0" in capsys.readouterr().err
