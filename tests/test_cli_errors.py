"""What happens when a user feeds the scripts bad input: one line on stderr naming the file, a
non-zero exit status, no traceback, nothing written, nothing executed from a checkpoint.

Each test runs a script's ``main`` through ``utils.cli.run_cli`` in-process (as ``python
script.py`` does) and checks the exit status, the message and the output folder.
"""
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_T
from models import BidirectionalTransformer
from utils.cli import run_cli

import inpainting  # noqa: E402
import train_vqgan  # noqa: E402
import training_transformer  # noqa: E402


def _load_fid_script():
    spec = importlib.util.spec_from_file_location("fid_score_gpu", os.path.join(ROOT, "faster-pytorch-fid",
                                                                                "fid_score_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Payload:
    """Unpickling this creates a file: the stand-in for a checkpoint that runs code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_checkpoint(path, marker):
    torch.save({"model": {"w": torch.zeros(1)}, "config": Payload(str(marker))}, path)
    assert not os.path.exists(marker)
    return str(path)


def run(main, argv, capsys):
    """(exit status, stderr) of ``run_cli(main, argv)``."""
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv, prog="script")
    err = capsys.readouterr().err
    return e.value.code, err


def one_line_error(err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("script: error: "), err
    assert "Traceback" not in err, err
    return lines[-1]


@pytest.fixture
def tiny_ckpt(tiny_world, tmp_path):
    """A raw lab-layout transformer state_dict that fits the tiny world's config."""
    from utils.build import build_maskgit
    from utils.config import load_maskgit_config
    model = build_maskgit(load_maskgit_config(tiny_world["config"]), load_vqgan=False)
    path = tmp_path / "transformer.pth"
    torch.save(model.transformer.state_dict(), path)
    return str(path)


def inpaint_args(world, ckpt, out, *extra):
    return ["--MaskGitConfig", world["config"], "--load-transformer-ckpt-path", ckpt, "--test-maskedimage-path",
            world["masked_image"], "--test-mask-path", world["mask64"], "--out-dir", str(out), "--no-vis",
            "--no-progress", "--device", "cpu", "--total-iter", "3", *extra]


# --- checkpoints are data only ------------------------------------------------------------------
def test_code_in_checkpoint_never_runs_inpainting(tiny_world, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = evil_checkpoint(tmp_path / "evil.pth", marker)
    out = tmp_path / "out"
    code, err = run(inpainting.main, inpaint_args(tiny_world, ckpt, out), capsys)
    line = one_line_error(err)
    assert code == 1 and not marker.exists() and not out.exists()
    assert ckpt in line and "refusing" in line


def test_code_in_checkpoint_never_runs_vqgan_resume(tiny_world, tmp_path, capsys):
    marker, out = tmp_path / "pwned", tmp_path / "vq"
    out.mkdir()
    ckpt = evil_checkpoint(out / "last.pt", marker)
    code, err = run(train_vqgan.main, ["--data", tiny_world["train"], "--config", "x.yml", "--out-dir", str(out),
                                       "--resume", "--device", "cpu", "--no-progress"], capsys)
    one_line_error(err)  # the config does not exist: found before the checkpoint is touched
    vq_cfg = tmp_path / "vq.yml"
    import yaml
    from conftest import TINY_VQ
    vq_cfg.write_text(yaml.safe_dump(dict(TINY_VQ)))
    code, err = run(train_vqgan.main, ["--data", tiny_world["train"], "--config", str(vq_cfg), "--out-dir", str(out),
                                       "--resume", "--steps", "2", "--device", "cpu", "--no-progress"], capsys)
    line = one_line_error(err)
    assert code == 1 and not marker.exists() and ckpt in line and "refusing" in line


def test_code_in_checkpoint_never_runs_transformer_resume(tiny_world, tmp_path, capsys):
    marker, out = tmp_path / "pwned", tmp_path / "t"
    out.mkdir()
    ckpt = evil_checkpoint(out / "last.pt", marker)
    code, err = run(training_transformer.main, [
        "--MaskGitConfig", tiny_world["config"], "--train_d_path", tiny_world["train"], "--val_d_path",
        tiny_world["val"], "--out_d_path", str(out), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "8",
        "--epochs", "1", "--device", "cpu", "--no-progress", "--resume"], capsys)
    line = one_line_error(err)
    assert code == 1 and not marker.exists() and ckpt in line and "refusing" in line


def test_code_in_checkpoint_never_runs_fid_inception_weights(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = evil_checkpoint(tmp_path / "inception.pth", marker)
    pred = tmp_path / "pred"
    pred.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(pred / "image_000.png")
    code, err = run(_load_fid_script().main, ["--predicted-path", str(pred), "--gtcsv-path", str(pred),
                                               "--inception-weights", ckpt, "--device", "cpu"], capsys)
    line = one_line_error(err)
    assert code == 1 and not marker.exists() and ckpt in line and "refusing" in line


def test_lab_style_raw_state_dicts_still_load(tiny_world, tiny_ckpt, tmp_path, capsys):
    """The lab's VQGAN.pt (a plain state_dict) and a student's raw transformer state_dict load."""
    out = tmp_path / "out"
    summary = inpainting.main(inpaint_args(tiny_world, tiny_ckpt, out))
    assert summary["images"] == 6 and len(os.listdir(out / "test_results")) == 7  # + the summary json


# --- bad inputs are found before any output, all at once --------------------------------------------
def test_corrupt_and_missized_images_listed_together_before_any_output(tiny_world, tiny_ckpt, tmp_path, capsys):
    imgs = tiny_world["masked_image"]
    with open(os.path.join(imgs, "image_001.png"), "wb") as f:
        f.write(b"not a png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(os.path.join(imgs, "image_004.png"))
    out = tmp_path / "out"
    code, err = run(inpainting.main, inpaint_args(tiny_world, tiny_ckpt, out), capsys)
    line = one_line_error(err)
    assert code == 1 and not out.exists()
    assert "2 unusable inputs" in line and "image_001.png: not a readable image" in line
    assert "image_004.png: is 20x20, expected 16x16 (pass --resize" in line
    os.remove(os.path.join(imgs, "image_001.png"))
    os.remove(os.path.join(tiny_world["mask64"], "mask_001.png"))
    summary = inpainting.main(inpaint_args(tiny_world, tiny_ckpt, out, "--resize"))  # --resize exists and works
    assert summary["images"] == 5


def test_non_binary_mask_and_count_mismatch(tiny_world, tiny_ckpt, tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(
        os.path.join(tiny_world["mask64"], "mask_002.png"))
    out = tmp_path / "out"
    code, err = run(inpainting.main, inpaint_args(tiny_world, tiny_ckpt, out), capsys)
    line = one_line_error(err)
    assert code == 1 and "mask_002.png: not a binary mask" in line and not out.exists()
    os.remove(os.path.join(tiny_world["mask64"], "mask_002.png"))
    code, err = run(inpainting.main, inpaint_args(tiny_world, tiny_ckpt, out), capsys)
    line = one_line_error(err)
    assert code == 1 and "6 masked images" in line and "5 masks" in line and not out.exists()


def test_inverted_masks_warn_and_invert_mask_gives_the_same_output(tiny_world, tiny_ckpt, tmp_path, capsys):
    ref = inpainting.main(inpaint_args(tiny_world, tiny_ckpt, tmp_path / "ref"))
    inv = tmp_path / "inverted"
    inv.mkdir()
    for name in sorted(os.listdir(tiny_world["mask64"])):
        m = np.asarray(Image.open(os.path.join(tiny_world["mask64"], name)))
        Image.fromarray(255 - m, "L").save(inv / name)
    args = inpaint_args(tiny_world, tiny_ckpt, tmp_path / "a")
    args[args.index("--test-mask-path") + 1] = str(inv)
    capsys.readouterr()
    inpainting.main(args)
    err = capsys.readouterr().err
    assert "6 of 6 masks" in err and "add --invert-mask" in err
    args[args.index("--out-dir") + 1] = str(tmp_path / "b")
    inpainting.main(args + ["--invert-mask"])
    assert "--invert-mask" not in capsys.readouterr().err
    for name in os.listdir(tmp_path / "ref" / "test_results"):
        if name.endswith(".png"):
            a = np.asarray(Image.open(tmp_path / "ref" / "test_results" / name))
            b = np.asarray(Image.open(tmp_path / "b" / "test_results" / name))
            assert np.array_equal(a, b), name
    assert ref["images"] == 6


# --- hints that say the right thing ---------------------------------------------------------------
def test_missing_dataset_says_does_not_exist(tiny_ckpt, tiny_world, tmp_path, capsys):
    code, err = run(inpainting.main, ["--MaskGitConfig", tiny_world["config"], "--load-transformer-ckpt-path",
                                      tiny_ckpt, "--data", str(tmp_path / "nope")], capsys)
    line = one_line_error(err)
    assert code == 1 and f"{tmp_path / 'nope'} does not exist" in line


def test_set_with_a_wrongly_typed_value(tiny_ckpt, tiny_world, tmp_path, capsys):
    code, err = run(inpainting.main, inpaint_args(tiny_world, tiny_ckpt, tmp_path / "o", "--set",
                                                  "model_param.Transformer_param.dim=abc"), capsys)
    line = one_line_error(err)
    assert code == 1 and "dim must be an integer, got 'abc'" in line and not (tmp_path / "o").exists()


def test_unknown_key_in_vq_configs(tiny_world, tiny_ckpt, tmp_path, capsys):
    import yaml
    cfg = yaml.safe_load(open(tiny_world["config"]))
    cfg.pop("vqgan")
    cfg["model_param"]["VQ_Configs"] = {"VQ_config_path": "models/VQGAN/config/VQGAN.yml", "VQ_ckpt_path": "x.pt"}
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg))
    code, err = run(inpainting.main, inpaint_args(tiny_world, tiny_ckpt, tmp_path / "o")[:0] + [
        "--MaskGitConfig", str(path), "--load-transformer-ckpt-path", tiny_ckpt, "--data", tiny_world["root"]],
        capsys)
    line = one_line_error(err)
    assert code == 1 and "unknown keys ['VQ_ckpt_path'] in model_param.VQ_Configs" in line


def test_vqgan_checkpoint_of_another_config_names_the_config(tiny_world, tiny_ckpt, tmp_path, capsys):
    from models import VQGAN
    from conftest import TINY_VQ
    other = tmp_path / "other_vq.pt"
    torch.save(VQGAN(dict(TINY_VQ, latent_dim=16)).state_dict(), other)
    code, err = run(inpainting.main, inpaint_args(tiny_world, tiny_ckpt, tmp_path / "o", "--vqgan-ckpt", str(other)),
                    capsys)
    line = one_line_error(err)
    assert code == 1 and str(other) in line and "VQ_config_path" in line and not (tmp_path / "o").exists()


def test_corrupt_and_missing_checkpoints(tiny_world, tmp_path, capsys):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"\x00" * 100)
    code, err = run(inpainting.main, inpaint_args(tiny_world, str(bad), tmp_path / "o"), capsys)
    line = one_line_error(err)
    assert code == 1 and f"cannot read transformer checkpoint {bad}" in line
    code, err = run(inpainting.main, inpaint_args(tiny_world, str(tmp_path / "none.pth"), tmp_path / "o"), capsys)
    line = one_line_error(err)
    assert code == 1 and "transformer checkpoint not found" in line and "none.pth" in line
    assert not (tmp_path / "o").exists()


def test_bad_option_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        inpainting.parse_args(["--total-iter", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--total-iter: invalid int value: 'x'" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--token-choice", "argmax", "--sample-temperature", "0.5"], "--sample-temperature only changes --token-choice "
                                                                  "sample"),
    (["--sample-temperature", "0"], "--sample-temperature must be a number > 0"),
    (["--token-choice", "sample", "--sample-temperature", "0"], "--sample-temperature must be a number > 0"),
    (["--token-choice", "sample", "--sample-temperature", "inf"], "--sample-temperature must be a number > 0"),
    (["--choice-temperature", "-1"], "--choice-temperature must be a number >= 0"),
    (["--choice-temperature", "nan"], "--choice-temperature must be a number >= 0"),
    (["--refine", "-1"], "--refine must be a number of steps >= 0"),
])
def test_temperatures_and_refine_steps_are_checked_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        inpainting.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0]
    assert inpainting.parse_args(["--token-choice", "sample", "--sample-temperature", "0.6"]).sample_temperature == 0.6
    # alone: the model's config may choose sample (checked against it in main)
    assert inpainting.parse_args(["--sample-temperature", "0.6"]).sample_temperature == 0.6
    assert inpainting.parse_args(["--choice-temperature", "0"]).choice_temperature == 0.0  # no noise: allowed


def test_a_temperature_for_a_config_that_chooses_argmax_is_one_line_before_any_work(tiny_world, tmp_path, capsys):
    """The tiny config names no token choice (the lab's argmax): a temperature alone is refused, naming the
    checkpoint and the way out, before a model is built or a file written; so is a bad token_choice."""
    torch.save(BidirectionalTransformer(TINY_T).state_dict(), tmp_path / "t.pth")
    out = tmp_path / "o"
    code, err = run(inpainting.main, inpaint_args(tiny_world, str(tmp_path / "t.pth"), out, "--sample-temperature",
                                                  "0.5"), capsys)
    line = one_line_error(err)
    assert code == 1 and not out.exists()
    assert f"the config used with {tmp_path / 't.pth'} chooses argmax: add --token-choice sample" in line
    code, err = run(inpainting.main, inpaint_args(tiny_world, str(tmp_path / "t.pth"), out, "--set",
                                                  "model_param.token_choice=greedy"), capsys)
    line = one_line_error(err)
    assert code == 1 and "t.pth" in line and "token_choice must be one of argmax, sample" in line
    assert not out.exists()


def test_debug_shows_the_traceback(tiny_world, tmp_path):
    from utils.checkpoint import CheckpointError
    with pytest.raises(CheckpointError):
        run_cli(inpainting.main, inpaint_args(tiny_world, str(tmp_path / "none.pth"), tmp_path / "o", "--debug"))


def test_fid_bad_inputs(tmp_path, capsys):
    fid = _load_fid_script().main
    code, err = run(fid, ["--predicted-path", str(tmp_path / "none")], capsys)
    assert code == 1 and str(tmp_path / "none") in one_line_error(err)
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "image_000.png").write_bytes(b"garbage")
    code, err = run(fid, ["--predicted-path", str(pred), "--gtcsv-path", str(pred)], capsys)
    line = one_line_error(err)
    assert code == 1 and "image_000.png: not a readable image" in line


def test_training_bad_images_listed_or_skipped(tiny_world, tmp_path, capsys):
    import yaml
    from conftest import TINY_VQ
    vq_cfg = tmp_path / "vq.yml"
    vq_cfg.write_text(yaml.safe_dump(dict(TINY_VQ)))
    (open(os.path.join(tiny_world["train"], "image_00003.png"), "wb")).write(b"junk")
    out = tmp_path / "vq"
    argv = ["--data", tiny_world["train"], "--config", str(vq_cfg), "--out-dir", str(out), "--steps", "1",
            "--batch-size", "4", "--device", "cpu", "--no-progress", "--eval-every", "1000"]
    code, err = run(train_vqgan.main, argv, capsys)
    line = one_line_error(err)
    assert code == 1 and "image_00003.png: not a readable image" in line and "--skip-bad-images" in line
    assert not os.path.exists(out / "vqgan.pt")
    result = train_vqgan.main(argv + ["--skip-bad-images"])
    assert result["step"] == 1 and os.path.exists(out / "vqgan.pt")


def test_checkpoints_get_the_umask_mode(tmp_path):
    from utils.checkpoint import atomic_save
    old = os.umask(0o022)
    try:
        atomic_save({"a": torch.ones(1)}, str(tmp_path / "c.pt"))
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "c.pt").st_mode & 0o777) == 0o644


def test_bundled_checkpoints_hold_cpu_tensors_only():
    import zipfile
    for name in ("transformer_small_fp16.pth", "vqgan_small_fp16.pt"):
        with zipfile.ZipFile(os.path.join(ROOT, "checkpoints", name)) as z:
            pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        assert b"cuda" not in pkl, name
