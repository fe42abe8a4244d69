"""pipeline.py: the whole chain (tokenizer -> token cache -> transformer -> inpainting -> FID) on a
tiny generated lab dataset with the shipped smoke recipe; resume after an interrupt; recipe errors;
--stages / --force; --budget-minutes; the transformer's time budget kept on --resume."""
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import time
import types

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import pipeline
import training_transformer
from conftest import GT_IDS, LAB3, TEST_GT, make_world
from utils import pipeline as pipeline_module
from utils import train_engine
from utils.cli import UserError, run_cli
from utils.config import REPO_ROOT
from utils.data import TEST_MEAN, TEST_STD, MaskedImageSet, denormalize, to_uint8
from utils.pipeline import STAGES, Recipe, parser_flags, recipe_argv, script_flags

SMOKE = os.path.join(REPO_ROOT, "config", "pipeline_smoke.yml")


pytestmark = pytest.mark.usefixtures("one_thread")


def smoke_recipe(path, **changes) -> str:
    """The shipped smoke recipe, with fewer steps and a transformer batch that fits the tiny world;
    ``changes``: {"stage.key": value} of its args (None removes the key)."""
    with open(SMOKE) as f:
        recipe = yaml.safe_load(f)
    recipe["tokenizer"]["args"].update(steps=20, eval_every=20, ckpt_every=10)
    recipe["transformer"]["args"].update(partial=1.0, batch_size=8)  # 40 images: 5 steps/epoch, 2 epochs
    for key, value in changes.items():
        stage, name = key.split(".")
        if value is None:
            recipe[stage]["args"].pop(name, None)
        else:
            recipe[stage]["args"][name] = value
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return str(path)


def run(argv, capsys=None):
    """pipeline.py as a user runs it: (exit status, stderr)."""
    try:
        run_cli(pipeline.main, argv, prog="pipeline.py")
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err if capsys else ""


def args_for(world, recipe, out, *extra):
    return ["--recipe", recipe, "--out", str(out), "--data", world["root"], "--gt", world["gt"], "--device", "cpu",
            *extra]


def stamp(path):
    """A file's bytes and modification time: unchanged when a stage was skipped."""
    with open(path, "rb") as f:
        return f.read(), os.stat(path).st_mtime_ns


def finite_figures(summary):
    return {(s, k): v for s, rec in summary["stages"].items() for k, v in rec["figures"].items()
            if not (isinstance(v, str) or isinstance(v, (int, float)) and math.isfinite(v))}  # words: token choice


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One full smoke run of the chain, shared by the tests that read it (they copy it to change it)."""
    tmp = tmp_path_factory.mktemp("chain")
    world = make_world(tmp / "world")
    recipe = smoke_recipe(tmp / "recipe.yml")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread does (a module fixture is set up before it)
    try:
        summary = pipeline.main(args_for(world, recipe, tmp / "out"))
    finally:
        torch.set_num_threads(n)
    return {"world": world, "recipe": recipe, "out": str(tmp / "out"), "summary": summary}


def test_smoke_chain_writes_everything(chain):
    out, summary = chain["out"], chain["summary"]
    expected = ["summary.json", "summary.md", "pipeline.log",
                "tokenizer/vqgan.pt", "tokenizer/last.pt", "tokenizer/loss.png", "tokenizer/metrics.csv",
                "tokenizer/train_vqgan.log", "tokens/tokens.log", "decoder/vqgan.pt", "decoder/last.pt",
                "decoder/loss.png",
                "transformer/transformer_best.pth", "transformer/last.pt", "transformer/loss.png",
                "transformer/metrics.csv", "transformer/train.log", "inpaint/lab/report.png",
                "inpaint/lab/test_results/inpainting_summary.json", "inpaint/lab/imga/test_0.png",
                "inpaint/lab/mask_scheduling/test_0.png"]
    expected += [f"{s}/done.json" for s in STAGES]
    expected += [f"inpaint/{p}/test_results/image_{i:03d}.png" for p in ("lab", "composited") for i in range(6)]
    expected += [f"fid/recon/image_{i:03d}.png" for i in GT_IDS]
    assert [p for p in expected if not os.path.isfile(os.path.join(out, p))] == []
    assert sorted(os.listdir(os.path.join(out, "inpaint", "composited"))) == ["test_results"]  # no report, no steps
    assert len(os.listdir(os.path.join(out, "tokens", "cache"))) == 3  # train, val, the unseen-val index
    assert {s: r["status"] for s, r in summary["stages"].items()} == dict.fromkeys(STAGES, "done")
    assert finite_figures(summary) == {}
    figs = {s: r["figures"] for s, r in summary["stages"].items()}
    assert figs["tokenizer"]["steps"] == 20 and figs["transformer"]["steps"] == 10 and figs["decoder"]["steps"] == 10
    assert figs["tokens"]["train_sequences"] == 40 and figs["tokens"]["val_sequences"] == 12
    assert figs["inpaint"]["images"] == 6 and figs["fid"]["images"] == len(GT_IDS)
    assert figs["inpaint"]["tokens"] == "argmax"  # the smoke config names no token choice: the lab's
    assert {"recon_psnr", "recon_fid", "fid_lab", "fid_composited", "val_loss", "val_acc"} <= \
        set(figs["fid"]) | set(figs["transformer"])
    assert all(r["wall_s"] > 0 for r in summary["stages"].values())
    md = open(os.path.join(out, "summary.md")).read()
    assert all(f"| {s} | done |" in md for s in STAGES)
    assert "python train_vqgan.py" in md and "--paste-known" in md and "fid_score_gpu.py" in md
    assert "token choice argmax" in md
    lab_cmd, comp_cmd = summary["stages"]["inpaint"]["commands"]  # the lab's protocol scores the plain decode
    assert "--refine" not in lab_cmd and "--refine 2" in comp_cmd and "--report-ids" not in comp_cmd


@pytest.mark.slow
def test_smoke_recipe_as_shipped_on_the_lab_dataset(lab3, tmp_path):
    """config/pipeline_smoke.yml unchanged, on the lab's dataset and recovered originals (the
    command the README gives; 3,000 val images encoded)."""
    if not os.path.isdir(TEST_GT):
        pytest.skip(f"no originals at {TEST_GT}")
    summary = pipeline.main(["--recipe", SMOKE, "--out", str(tmp_path / "out"), "--data", lab3, "--gt", TEST_GT,
                             "--device", "cpu"])
    assert {s: r["status"] for s, r in summary["stages"].items()} == dict.fromkeys(STAGES, "done")
    assert finite_figures(summary) == {}
    with_gt = sum(os.path.isfile(os.path.join(TEST_GT, f"image_{i:03d}.png")) for i in range(8))
    assert summary["stages"]["fid"]["figures"]["images"] == with_gt > 0
    assert summary["stages"]["tokens"]["figures"]["val_sequences"] == 3000


def test_decoder_stage_keeps_the_tokens_and_the_later_stages_use_its_tokenizer(chain, tmp_path):
    """The decoder stage trains the tokenizer's post_quant_conv + decoder only: every other tensor of its
    vqgan.pt is the tokenizer stage's, bit for bit (so the transformer's tokens stay valid), its step-0 val
    PSNR is the tokenizer's final one (the same weights on the same images), and the inpaint and fid stages
    used its file: the fid stage's reconstructions are its encode -> decode, not the tokenizer stage's."""
    from models import VQGAN
    from utils.build import load_vqgan_weights
    from utils.checkpoint import stored_config
    from utils.pipeline import reconstruct_images
    out, figs = chain["out"], {s: r["figures"] for s, r in chain["summary"]["stages"].items()}
    tok, dec = (torch.load(os.path.join(out, s, "vqgan.pt"), weights_only=True) for s in ("tokenizer", "decoder"))
    assert tok.keys() == dec.keys() and stored_config(tok) == stored_config(dec)
    trained = {k for k, v in tok.items() if isinstance(v, torch.Tensor) and not torch.equal(v, dec[k])}
    assert trained and all(k.startswith(("decoder.", "post_quant_conv.")) for k in trained)
    assert len(trained) == len([k for k in tok if k.startswith(("decoder.", "post_quant_conv."))])  # all of them moved
    assert figs["decoder"]["init_val_psnr"] == pytest.approx(figs["tokenizer"]["val_psnr"], abs=1e-4)
    assert figs["decoder"]["val_psnr"] != figs["decoder"]["init_val_psnr"]
    inpaint = chain["summary"]["stages"]["inpaint"]["commands"]
    assert len(inpaint) == 2 and all(f"--vqgan-ckpt {os.path.join(out, 'decoder', 'vqgan.pt')}" in c for c in inpaint)
    names = sorted(os.listdir(os.path.join(out, "fid", "recon")))
    psnrs = {}
    for stage, sd in (("tokenizer", tok), ("decoder", dec)):
        vq = VQGAN(stored_config(sd))
        load_vqgan_weights(vq, os.path.join(out, stage, "vqgan.pt"))
        psnrs[stage] = reconstruct_images(vq.eval(), chain["world"]["gt"], names, str(tmp_path / stage), "cpu")
    assert figs["fid"]["recon_psnr"] == pytest.approx(psnrs["decoder"], abs=1e-9) != psnrs["tokenizer"]
    assert all(stamp(tmp_path / "decoder" / n)[0] == stamp(os.path.join(out, "fid", "recon", n))[0] for n in names)


def test_decoder_stage_reruns_only_what_was_made_from_it(chain, tmp_path, capsys):
    """The decoder depends on the tokenizer alone: a rerun of the transformer keeps it, a rerun of the decoder
    keeps the transformer and clears inpaint and fid; an unfinished decoder resumes from its last.pt. A recipe
    without decoder minutes or steps skips the stage, and inpaint and fid then use the tokenizer's vqgan.pt."""
    out = tmp_path / "out"
    shutil.copytree(chain["out"], out)
    world, recipe = chain["world"], chain["recipe"]
    before = {s: stamp(out / s / "done.json") for s in STAGES}
    code, err = run(args_for(world, recipe, out, "--stages", "transformer,decoder", "--force", "transformer"), capsys)
    assert code == 0, err
    assert stamp(out / "decoder" / "done.json") == before["decoder"] and stamp(out / "tokens" / "done.json") == \
        before["tokens"]
    assert not os.path.exists(out / "inpaint") and not os.path.exists(out / "fid")

    os.remove(out / "decoder" / "done.json")  # as if it had been cut off after its last checkpoint
    trans = stamp(out / "transformer" / "done.json")
    code, err = run(args_for(world, recipe, out, "--stages", "decoder"), capsys)
    assert code == 0, err
    done = yaml.safe_load(open(out / "decoder" / "done.json"))
    assert "--resume" in done["commands"][0] and done["figures"]["steps"] == 10
    assert "init_val_psnr" not in done["figures"] and math.isfinite(done["figures"]["val_psnr"])  # no step 0 this time
    assert stamp(out / "transformer" / "done.json") == trans

    off = smoke_recipe(tmp_path / "off.yml", **{"decoder.steps": None})
    shown = pipeline.main(args_for(world, off, tmp_path / "fresh", "--dry-run"))["commands"]
    assert shown["decoder"][0].startswith("# not run")
    assert all(f"--vqgan-ckpt {tmp_path / 'fresh' / 'tokenizer' / 'vqgan.pt'}" in c for c in shown["inpaint"])
    out = tmp_path / "off"  # the whole chain again, its inpaint and fid made with the decoder: forced, it clears them
    shutil.copytree(chain["out"], out)
    code, err = run(args_for(world, off, out, "--stages", "decoder,inpaint,fid", "--force", "decoder"), capsys)
    assert code == 0, err
    summary = yaml.safe_load(open(out / "summary.json"))
    assert summary["stages"]["decoder"]["status"] == "not run" and "no minutes" in summary["stages"]["decoder"]["note"]
    assert not os.path.exists(out / "decoder")
    assert all(f"--vqgan-ckpt {out / 'tokenizer' / 'vqgan.pt'}" in c for c in summary["stages"]["inpaint"]["commands"])
    assert summary["stages"]["fid"]["figures"]["recon_psnr"] != chain["summary"]["stages"]["fid"]["figures"]["recon_psnr"]


def test_a_wider_new_decoder_goes_through_inpainting_and_fid(chain, tmp_path, capsys):
    """decoder.new_decoder with a wider dec_channels: the decoder stage's file stores the wider config, and the
    inpaint and fid stages build that tokenizer under the transformer's stored config (which names the
    tokenizer stage's narrower one) and score with it."""
    from utils.checkpoint import stored_config
    out = tmp_path / "out"
    shutil.copytree(chain["out"], out)
    code, err = run(args_for(chain["world"], chain["recipe"], out, "--stages", "decoder,inpaint,fid", "--force",
                             "decoder", "--arg", "decoder.new_decoder=true", "decoder.set=dec_channels=[24,48,48]"),
                    capsys)
    assert code == 0, err
    dec = torch.load(out / "decoder" / "vqgan.pt", weights_only=True)
    assert stored_config(dec)["dec_channels"] == [24, 48, 48]
    assert stored_config(torch.load(out / "tokenizer" / "vqgan.pt", weights_only=True))["dec_channels"] == [16, 32, 32]
    summary = yaml.safe_load(open(out / "summary.json"))
    assert [summary["stages"][s]["status"] for s in ("decoder", "inpaint", "fid")] == ["done"] * 3
    assert finite_figures(summary) == {}
    assert summary["stages"]["fid"]["figures"]["recon_psnr"] != chain["summary"]["stages"]["fid"]["figures"]["recon_psnr"]


def test_composited_run_pastes_and_lab_run_does_not(chain):
    """The lab-protocol images are the plain decode; only the composited run got --paste-known."""
    out, world = chain["out"], chain["world"]
    x, known, _ = MaskedImageSet(world["masked_image"], world["mask64"], 16, resize=True)[0]  # as the model saw it
    masked = to_uint8(denormalize(x, TEST_MEAN, TEST_STD)).astype(int)  # (16, 16, 3)
    known = known[0].numpy() == 1  # (16, 16)
    lab, comp = (np.asarray(Image.open(os.path.join(out, f"inpaint/{p}/test_results/image_000.png"))).astype(int)
                 for p in ("lab", "composited"))
    assert known.sum() > 100
    assert np.abs(comp - masked)[known].max() <= 1 < np.abs(lab - masked)[known].mean()


def test_fid_stage_without_the_training_checkpoints(chain, tmp_path, capsys):
    """What a run on another machine sends back (bench/gpu_session.sh score): vqgan.pt and the
    images, no last.pt. The fid stage builds the tokenizer from the config vqgan.pt stores, or, for a
    file without one, from the recipe, and scores the same."""
    from utils.checkpoint import stored_config
    out = tmp_path / "out"
    shutil.copytree(chain["out"], out, ignore=shutil.ignore_patterns("last.pt", "cache", "fid"))
    assert not os.path.exists(out / "tokenizer" / "last.pt")
    want = chain["summary"]["stages"]["fid"]["figures"]
    vq = {s: torch.load(out / s / "vqgan.pt", weights_only=True) for s in ("tokenizer", "decoder")}
    assert stored_config(vq["decoder"])["latent_dim"] == 16  # config/VQGAN_smoke.yml
    for plain in (False, True):
        if plain:  # the layout of an older vqgan.pt: the recipe names the config
            for s, sd in vq.items():
                torch.save({k: v for k, v in sd.items()}, out / s / "vqgan.pt")
        code, _ = run(args_for(chain["world"], chain["recipe"], out, "--stages", "fid", "--force", "fid"), capsys)
        assert code == 0
        got = yaml.safe_load(open(out / "summary.json"))["stages"]["fid"]["figures"]
        assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.skipif(not os.path.isdir(LAB3), reason="bench/gpu_session.sh needs ../shared/data/lab3_dataset")
def test_gpu_session_sends_a_large_tokenizer_back_in_fp16(chain, tmp_path):
    """bench/gpu_session.sh sends back what its WORK folder holds, whatever happened (here: an unknown
    part). The tokenizer comes back as trained while its fp32 file is at most VQ_FP32_MAX bytes, else
    in fp16 under the same name (the wide tokenizer's 33 MB would pass the device tool's 64 MiB), with
    its stored config kept, and loads into the tokenizer that config describes; so does the decoder
    stage's (as vqgan_decoder.pt); the transformer always comes back in fp16."""
    from models import VQGAN
    from utils.build import load_vqgan_weights
    from utils.checkpoint import stored_config
    work = tmp_path / "work"
    shutil.copytree(chain["out"], work / "pipeline", ignore=shutil.ignore_patterns("cache", "test_results", "fid"))
    src = work / "pipeline" / "tokenizer" / "vqgan.pt"
    dec_src = work / "pipeline" / "decoder" / "vqgan.pt"
    assert os.path.getsize(dec_src) == os.path.getsize(src)
    for limit in (None, os.path.getsize(src) - 1):
        out = tmp_path / f"out_{limit}"
        env = {**os.environ, "WORK": str(work), "DEVICE": "cpu"}
        if limit is not None:
            env["VQ_FP32_MAX"] = str(limit)
        proc = subprocess.run(["bash", "bench/gpu_session.sh", "no_such_part", str(out)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "unknown part no_such_part" in proc.stderr
        trans = torch.load(out / "transformer_fp16.pth", weights_only=True)
        assert {v.dtype for v in trans.values() if v.is_floating_point()} == {torch.float16}
        for sent, name in ((src, "vqgan.pt"), (dec_src, "vqgan_decoder.pt")):
            if limit is None:  # as trained, byte for byte
                assert (out / name).read_bytes() == sent.read_bytes()
                continue
            vq, got = torch.load(sent, weights_only=True), torch.load(out / name, weights_only=True)
            assert f"{sent}: {os.path.getsize(sent)} bytes in fp32, sent back in fp16" in proc.stdout
            assert list(got) == list(vq) and stored_config(got) == stored_config(vq)
            for k, v in vq.items():
                assert torch.equal(got[k], v.half() if v.is_floating_point() else v), k
            load_vqgan_weights(VQGAN(stored_config(got)), str(out / name))  # strict


def test_a_given_tokenizer_is_copied_and_the_chain_runs_on_it(chain, tmp_path, capsys):
    """--tokenizer FILE: the tokenizer stage trains nothing and copies the file; the transformer, the
    inpainting and the FID run on it, and the tokenizer's reconstructions score exactly as when the
    same file was trained in the run (same weights, same originals). A file without a stored config
    (the lab's VQGAN.pt layout) takes the transformer YAML's tokenizer config."""
    from utils.checkpoint import stored_config
    src = tmp_path / "given" / "vqgan.pt"
    os.makedirs(src.parent)
    shutil.copyfile(os.path.join(chain["out"], "tokenizer", "vqgan.pt"), src)
    out = tmp_path / "out"
    code, err = run(args_for(chain["world"], chain["recipe"], out, "--tokenizer", str(src)), capsys)
    assert code == 0, err
    assert sorted(os.listdir(out / "tokenizer")) == ["attempts.json", "done.json", "vqgan.pt"]  # no training
    assert stamp(out / "tokenizer" / "vqgan.pt")[0] == stamp(src)[0]
    summary = yaml.safe_load(open(out / "summary.json"))
    assert {s: r["status"] for s, r in summary["stages"].items()} == dict.fromkeys(STAGES, "done")
    tok = summary["stages"]["tokenizer"]
    vq = torch.load(src, weights_only=True)
    assert tok["figures"]["source"] == str(src) and tok["minutes"] == 0
    assert tok["figures"]["parameters"] == sum(v.numel() for k, v in vq.items() if not k.startswith("_")
                                               and "ema_" not in k and "discriminator" not in k)
    want, got = chain["summary"]["stages"]["fid"]["figures"], summary["stages"]["fid"]["figures"]
    assert {k: got[k] for k in ("recon_psnr", "recon_fid")} == pytest.approx(
        {k: want[k] for k in ("recon_psnr", "recon_fid")}, abs=1e-9)
    assert summary["stages"]["transformer"]["figures"]["steps"] == 10
    assert f"given (--tokenizer) `{src}`" in open(out / "summary.md").read()

    # the lab's layout: weights only; the recipe's transformer YAML (MaskGit_smoke.yml) names VQGAN_smoke.yml
    assert stored_config(vq) is not None
    plain = tmp_path / "given" / "VQGAN.pt"
    torch.save({k: v for k, v in vq.items()}, plain)
    assert stored_config(torch.load(plain, weights_only=True)) is None
    code, err = run(args_for(chain["world"], chain["recipe"], tmp_path / "lab", "--tokenizer", str(plain),
                             "--stages", "tokenizer,tokens"), capsys)
    assert code == 0, err
    assert stamp(tmp_path / "lab" / "tokenizer" / "vqgan.pt")[0] == stamp(plain)[0]
    # rerun without --tokenizer under a recipe whose own tokenizer (256 tokens) does not fit the transformer
    # (16): the copied file is what runs, so the check reads it, not the recipe's tokenizer section
    unfit = smoke_recipe(tmp_path / "unfit.yml", **{"tokenizer.config": "models/VQGAN/config/VQGAN_small.yml"})
    code, err = run(args_for(chain["world"], unfit, tmp_path / "lab", "--stages", "tokens", "--force", "tokens"),
                    capsys)
    assert code == 0, err
    code, err = run(args_for(chain["world"], unfit, tmp_path / "fresh", "--stages", "tokenizer", "--dry-run"), capsys)
    assert code == 1 and "makes 256 tokens of 1024 codes" in err  # the same recipe, nothing copied: refused
    # ... and with a recipe whose transformer YAML names another architecture, it stops before any work
    other = smoke_recipe(tmp_path / "other.yml", **{"transformer.MaskGitConfig": "config/MaskGit_small.yml"})
    code, err = run(args_for(chain["world"], other, tmp_path / "bad", "--tokenizer", str(plain)), capsys)
    assert code == 1 and f"--tokenizer {plain}" in err and "does not fit the tokenizer config" in err
    assert not os.path.exists(tmp_path / "bad" / "tokenizer")


def test_the_labs_vqgan_layout_is_checked_against_the_transformer_yamls_tokenizer(tmp_path, capsys):
    """The lab's VQGAN.pt (weights only, the lab's architecture): with a recipe whose transformer YAML
    is the lab's config/MaskGit.yml the check passes; with the shipped small recipe it stops before any
    work, naming the file and the first mismatching weights."""
    from models import VQGAN
    from utils.config import load_vqgan_config
    world = make_world(tmp_path / "world", n_train=1, n_val=1, n_test=1)
    lab = tmp_path / "VQGAN.pt"
    torch.save(VQGAN(load_vqgan_config("models/VQGAN/config/VQGAN.yml")).state_dict(), lab)
    with open(os.path.join(REPO_ROOT, "config", "pipeline.yml")) as f:
        recipe = yaml.safe_load(f)
    recipe["transformer"]["args"]["MaskGitConfig"] = "config/MaskGit.yml"
    (tmp_path / "lab.yml").write_text(yaml.safe_dump(recipe))
    for path, ok in ((tmp_path / "lab.yml", True), (os.path.join(REPO_ROOT, "config", "pipeline.yml"), False)):
        code, err = run(["--recipe", str(path), "--out", str(tmp_path / "out"), "--data", world["root"],
                         "--tokenizer", str(lab), "--dry-run"], capsys)
        assert (code == 0) == ok, err
        if not ok:
            assert code == 1 and f"--tokenizer {lab}" in err and "does not fit the tokenizer config" in err
    assert not os.path.exists(tmp_path / "out")


def test_a_given_tokenizer_never_mixes_with_another_in_the_same_folder(chain, tmp_path, capsys):
    """--tokenizer over a folder whose tokenizer was trained (or copied from another file) stops with
    what to do; --force tokenizer replaces it and clears the later stages; a missing file is named."""
    out = tmp_path / "out"
    shutil.copytree(chain["out"], out)
    world, recipe = chain["world"], chain["recipe"]
    src = tmp_path / "other_vqgan.pt"
    shutil.copyfile(out / "tokenizer" / "vqgan.pt", src)
    shutil.copyfile(src, src.with_name("again.pt"))
    before = {s: stamp(out / s / "done.json") for s in STAGES}
    code, err = run(args_for(world, recipe, out, "--tokenizer", str(src)), capsys)
    assert code == 1 and "already holds a tokenizer trained by this pipeline" in err and "--force tokenizer" in err
    assert {s: stamp(out / s / "done.json") for s in STAGES} == before
    code, err = run(args_for(world, recipe, out, "--tokenizer", str(src), "--stages", "tokenizer",
                             "--force", "tokenizer"), capsys)
    assert code == 0, err
    assert sorted(os.listdir(out / "tokenizer")) == ["attempts.json", "done.json", "vqgan.pt"]
    assert [s for s in STAGES if os.path.exists(out / s)] == ["tokenizer"]  # made from the old one: removed
    code, err = run(args_for(world, recipe, out, "--tokenizer", str(out / "nowhere.pt")), capsys)
    assert code == 1 and f"--tokenizer {out / 'nowhere.pt'}: no such file" in err
    code, err = run(args_for(world, recipe, out, "--tokenizer", str(src.with_name("again.pt"))), capsys)
    assert code == 1 and f"copied from {src}" in err  # (the same bytes under another name: still another file)
    code, err = run(args_for(world, recipe, out, "--tokenizer", str(out / "tokenizer" / "vqgan.pt"), "--force",
                             "tokenizer"), capsys)  # would delete the file it is to copy
    assert code == 1 and "this run's own tokenizer folder" in err and os.path.isfile(out / "tokenizer" / "vqgan.pt")


def test_stages_and_force_select_what_runs(chain, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(chain["out"], out)
    world, recipe = chain["world"], chain["recipe"]
    tok_done = yaml.safe_load(open(out / "tokenizer" / "done.json"))  # as if the tokenizer had trained on a GPU
    tok_done.update(device="cuda", budget_minutes=9.5, minutes=3.42)
    (out / "tokenizer" / "done.json").write_text(json.dumps(tok_done))
    before, old_log = {s: stamp(out / s / "done.json") for s in STAGES}, open(out / "pipeline.log").read()
    code, _ = run(args_for(world, recipe, out, "--stages", "inpaint,fid", "--force", "inpaint"), capsys)
    assert code == 0
    summary = yaml.safe_load(open(out / "summary.json"))  # each stage keeps the device and budget it ran with
    assert {k: summary["stages"]["tokenizer"][k] for k in ("device", "budget_minutes", "minutes")} == \
        {"device": "cuda", "budget_minutes": 9.5, "minutes": 3.42}
    assert summary["stages"]["fid"]["device"] == "cpu" and summary["stages"]["fid"]["budget_minutes"] is None
    md = open(out / "summary.md").read()
    assert "| tokenizer | done | cuda, 3.42 min planned of budget 9.5 |" in md and "| fid | done | cpu |" in md
    after = {s: stamp(out / s / "done.json") for s in STAGES}
    assert [s for s in STAGES if after[s] != before[s]] == ["inpaint", "fid"]
    log = open(out / "pipeline.log").read()[len(old_log):]
    assert "inpaint: --force" in log and "inpaint: start" in log and "fid: start" in log
    assert "tokenizer" not in log and "transformer:" not in log  # not selected: not even looked at

    code, _ = run(args_for(world, recipe, out, "--stages", "fid"), capsys)  # finished: skipped
    assert code == 0 and stamp(out / "fid" / "done.json") == after["fid"]
    assert "fid: skipped: done at" in open(out / "pipeline.log").read()

    code, _ = run(args_for(world, recipe, out, "--stages", "fid", "--force", "fid") + ["--gt", ""], capsys)
    summary = yaml.safe_load(open(out / "summary.json"))
    assert code == 0 and not os.path.exists(out / "fid")
    assert summary["stages"]["fid"]["status"] == "not run" and "no originals" in summary["stages"]["fid"]["note"]
    assert "no originals" in open(out / "summary.md").read()

    code, err = run(args_for(world, recipe, out, "--stages", "fid,bogus"), capsys)
    assert code == 2 and "--stages" in err
    code, err = run(args_for(world, recipe, tmp_path / "fresh", "--stages", "inpaint"), capsys)
    assert code == 1 and "the inpaint stage needs the tokenizer, transformer and decoder stages finished" in err
    assert not os.path.exists(tmp_path / "fresh" / "inpaint")


def test_resume_skips_finished_stages_and_continues_the_interrupted_one(tmp_path, monkeypatch, capsys):
    world = make_world(tmp_path / "world")
    recipe = smoke_recipe(tmp_path / "recipe.yml")
    out, argv = tmp_path / "out", args_for(world, recipe, tmp_path / "out", "--stages", "tokenizer,tokens,transformer")
    real_step, steps_run = train_engine.train_step, []

    def interrupted_step(parts, cfg, ids, step):  # Ctrl-C during step 3 of 10: the trainer stops after it
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(parts, cfg, ids, step)

    monkeypatch.setattr(train_engine, "train_step", interrupted_step)
    code, err = run(argv, capsys)
    assert code == 130 and "rerun the same command to continue" in err
    assert not os.path.exists(out / "transformer" / "done.json")
    assert torch.load(out / "transformer" / "last.pt", weights_only=True)["step"] == 4
    first = {s: stamp(out / s / "done.json") for s in ("tokenizer", "tokens")}
    interrupted = yaml.safe_load(open(out / "summary.json"))["stages"]["transformer"]
    assert interrupted["status"] == "interrupted" and interrupted["wall_s"] > 0

    def counted_step(parts, cfg, ids, step):
        steps_run.append(step)
        return real_step(parts, cfg, ids, step)

    monkeypatch.setattr(train_engine, "train_step", counted_step)
    code, _ = run(argv, capsys)
    assert code == 0
    assert {s: stamp(out / s / "done.json") for s in ("tokenizer", "tokens")} == first  # skipped, untouched
    log = open(out / "pipeline.log").read()
    assert "tokenizer: skipped: done at" in log and "tokens: skipped: done at" in log
    assert steps_run == list(range(4, 10))  # continued from its checkpoint, not from step 0
    assert "resumed from" in open(out / "transformer" / "train.log").read()
    done = yaml.safe_load(open(out / "transformer" / "done.json"))
    assert done["figures"]["steps"] == 10 and done["attempts"] == 2
    assert "--resume" in done["commands"][0]

    def terminated(ctx, commands):  # SIGTERM outside a trainer: the pipeline's own handler
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setitem(pipeline_module.RUNNERS, "tokens", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    code, err = run(argv + ["--force", "tokens"], capsys)
    assert code == 130 and "the tokens stage was interrupted (SIGTERM); rerun the same command" in err
    assert yaml.safe_load(open(out / "summary.json"))["stages"]["tokens"]["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) == handler  # restored


@pytest.mark.parametrize("change, expected", [
    ({"bogus": {"minutes": 1}}, "unknown key 'bogus'"),
    ({"tokenizer": {"minuts": 3}}, "unknown key tokenizer.minuts"),
    ({"tokenizer": {"args": {"stepz": 3}}},
     "tokenizer.args.stepz: train_vqgan.py has no option --stepz (did you mean steps? see python train_vqgan.py"),
    ({"tokenizer": {"args": {"frobnicate": 3}}},
     "tokenizer.args.frobnicate: train_vqgan.py has no option --frobnicate (see python train_vqgan.py --help)"),
    ({"transformer": {"args": {"out_d_path": "x"}}},
     "transformer.args.out_d_path: --out_d_path is set by the pipeline"),
    ({"decoder": {"args": {"init": "x.pt"}}},
     "decoder.args.init: --init is set by the pipeline (from the tokenizer stage's vqgan.pt)"),
    ({"decoder": {"args": {"train_part": "all"}}}, "decoder.args.train_part: --train-part is set by the pipeline"),
    ({"inpaint": {"args": {"total_iter": "x"}}}, "inpaint: argument --total-iter: invalid int value"),
    ({"transformer": {"args": {"MaskGitConfig": "config/MaskGit_small.yml"}}},
     "the tokenizer (config/VQGAN_smoke.yml) makes 16 tokens of 64 codes per image but the transformer's "
     "config/MaskGit_small.yml expects 256 of 1024: set model_param.num_image_tokens and num_codebook_vectors"),
    ({"transformer": {"args": {"set": ["model_param.Transformer_param.num_codebook_vectors=32"]}}},
     "expects 16 of 32: set model_param.Transformer_param.num_image_tokens"),
])
def test_recipe_errors_are_one_line_naming_the_file_and_key(tmp_path, capsys, change, expected):
    with open(SMOKE) as f:
        recipe = yaml.safe_load(f)
    for stage, section in change.items():
        for key, value in section.items():
            recipe.setdefault(stage, {})
            if isinstance(value, dict):
                recipe[stage].setdefault(key, {}).update(value)
            else:
                recipe[stage][key] = value
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(recipe))
    world = make_world(tmp_path / "world", n_train=1, n_val=1, n_test=1)
    code, err = run(args_for(world, str(path), tmp_path / "out"), capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"pipeline.py: error: {path}") and expected in err
    assert not os.path.exists(tmp_path / "out")  # checked before anything is written


def test_recipe_keys_become_the_scripts_flags():
    from utils.cli import ArgumentParser
    p = ArgumentParser()
    p.add_argument("--out-dir", "--predicted-path", help="where")
    p.add_argument("--train_d_path")
    p.add_argument("--hflip", action="store_true")
    p.add_argument("--set", nargs="*")
    p.add_argument("--pair", nargs=2)
    flags = parser_flags(p)
    assert flags["--predicted-path"].option == "--out-dir" and flags["--out-dir"].takes_value
    assert not flags["--hflip"].takes_value and flags["--set"].many and not flags["--train_d_path"].many
    assert flags["--pair"].many and not flags["--debug"].takes_value
    # the scripts' own parsers, caught before they parse: every option of the real command lines
    vq = script_flags("train_vqgan.py")
    assert vq["--train-part"].takes_value and not vq["--kmeans-init"].takes_value and vq["--set"].many
    tt = script_flags("training_transformer.py")
    assert tt["--save-per-epoch"].option == tt["--ckpt-interval"].option and tt["--num_workers"].takes_value
    recipe = Recipe("r.yml", {}, {"transformer": {"train_d_path": None, "num_workers": 2, "hflip": True,
                                                  "compile": False, "set": ["a.b=1", "c=2"], "save_per_epoch": 3}})
    with pytest.raises(UserError, match="r.yml: transformer.args.train_d_path: --train_d_path is set by the pipeline"):
        recipe_argv(recipe, "transformer")
    recipe.args["transformer"].pop("train_d_path")
    assert recipe_argv(recipe, "transformer") == ["--num_workers", "2", "--hflip", "--set", "a.b=1", "c=2",
                                                  "--save-per-epoch", "3"]
    recipe.args["transformer"]["hflip"] = "yes"
    with pytest.raises(UserError, match="--hflip is a switch"):
        recipe_argv(recipe, "transformer")


def test_a_transformer_yaml_naming_another_tokenizer_architecture_passes_the_check(tmp_path, capsys):
    """Only the token interface must agree before the run: the tokenizer's architecture comes with
    its vqgan.pt (training_transformer.py reads the config stored there)."""
    with open(os.path.join(REPO_ROOT, "config", "VQGAN_smoke.yml")) as f:
        vq = yaml.safe_load(f)
    vq["model_param"]["dec_channels"] = [8, 16, 16]
    (tmp_path / "vq.yml").write_text(yaml.safe_dump(vq))
    with open(os.path.join(REPO_ROOT, "config", "MaskGit_smoke.yml")) as f:
        mg = yaml.safe_load(f)
    mg["model_param"]["VQ_Configs"]["VQ_config_path"] = str(tmp_path / "vq.yml")
    (tmp_path / "mg.yml").write_text(yaml.safe_dump(mg))
    with open(SMOKE) as f:
        recipe = yaml.safe_load(f)
    recipe["transformer"]["args"]["MaskGitConfig"] = str(tmp_path / "mg.yml")
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    world = make_world(tmp_path / "world", n_train=1, n_val=1, n_test=1)
    res = pipeline.main(args_for(world, str(tmp_path / "recipe.yml"), tmp_path / "out") + ["--dry-run"])
    assert str(tmp_path / "mg.yml") in res["commands"]["transformer"][0]


def test_budget_minutes_scale_every_stage(tmp_path, capsys):
    world = make_world(tmp_path / "world", n_train=1, n_val=1, n_test=1)
    base = ["--recipe", "config/pipeline.yml", "--out", str(tmp_path / "out"), "--data", world["root"], "--dry-run"]

    def budgets(*extra):
        cmds = pipeline.main(base + list(extra))["commands"]
        return {s: float(c[0].split("--time-budget-min ")[1].split()[0]) for s, c in cmds.items()
                if "--time-budget-min" in c[0]}

    with open(os.path.join(REPO_ROOT, "config", "pipeline.yml")) as f:
        minutes = {s: v.get("minutes", 0) for s, v in yaml.safe_load(f).items()}
    assert sum(minutes.values()) == 25 and minutes["tokenizer"] <= 10 and minutes["transformer"] <= 10
    assert budgets() == {"tokenizer": minutes["tokenizer"], "transformer": minutes["transformer"]}
    assert budgets("--budget-minutes", "12.5") == {"tokenizer": minutes["tokenizer"] / 2,
                                                   "transformer": minutes["transformer"] / 2}
    assert budgets("--budget-minutes", "100") == {"tokenizer": minutes["tokenizer"] * 4,
                                                  "transformer": minutes["transformer"] * 4}
    # --minutes replaces the named stages' minutes, then --budget-minutes scales the whole: with the
    # tokenizer at 16 and the transformer at 2, the recipe totals 16 + 1 + 2 + 2 + 4 = 25 again
    assert budgets("--minutes", "tokenizer=5.5", "transformer=2.5") == {"tokenizer": 5.5, "transformer": 2.5}
    assert budgets("--minutes", "transformer=0") == {"tokenizer": minutes["tokenizer"]}  # 0: no budget
    rest = 25 - minutes["tokenizer"] - minutes["transformer"]
    assert budgets("--minutes", f"tokenizer={23 - rest}", "transformer=2", "--budget-minutes", "12.5") == \
        {"tokenizer": (23 - rest) / 2, "transformer": 1.0}
    for bad in ("tokeniser=3", "tokenizer", "tokenizer=-1", "tokenizer=nan", "tokenizer=fast"):
        with pytest.raises(SystemExit) as e:
            pipeline.main(base + ["--minutes", bad])
        assert e.value.code == 2 and f"--minutes {bad}: expected STAGE=MINUTES" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")  # a dry run writes nothing


@pytest.mark.parametrize("recipe, device, stages, warned", [
    ("config/pipeline.yml", "cpu", "tokenizer,tokens,transformer,inpaint,fid", 18),  # 9 + 9, the recipe's
    ("config/pipeline.yml", "cpu", "transformer", 9),  # the selected trainers' minutes
    ("config/pipeline.yml", "cpu", "decoder", 0),  # 0 minutes in the recipe: skipped, nothing timed
    ("config/pipeline.yml", "cpu", "inpaint,fid", 0),  # nothing to train
    ("config/pipeline_smoke.yml", "cpu", "tokenizer,tokens,transformer,inpaint,fid", 0),  # step counts, no minutes
])
def test_a_gpu_timed_recipe_on_the_cpu_warns_once_and_names_the_smoke_recipe(tmp_path, capsys, recipe, device,
                                                                              stages, warned):
    world = make_world(tmp_path / "world", n_train=1, n_val=1, n_test=1)
    pipeline.main(["--recipe", recipe, "--out", str(tmp_path / "out"), "--data", world["root"], "--device", device,
                   "--stages", stages, "--dry-run"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("# warning")]
    assert len(lines) == int(warned > 0)
    if warned:
        assert "config/pipeline.yml" in lines[0] and f"get {warned} minutes" in lines[0]
        assert "--recipe config/pipeline_smoke.yml --device cpu" in lines[0]


def test_cpu_warning_scales_with_the_budget_and_stays_quiet_on_a_gpu(tmp_path, monkeypatch):
    world = make_world(tmp_path / "world", n_train=1, n_val=1, n_test=1)
    opts = pipeline.parse_args(["--out", str(tmp_path / "out"), "--data", world["root"], "--budget-minutes", "5",
                                "--device", "cpu"])
    ctx = pipeline_module.make_context(opts)
    assert "3.6 minutes" in pipeline_module.cpu_warning(ctx)  # (9 + 9) * 5 / 25
    monkeypatch.setattr(pipeline_module, "get_device", lambda name: torch.device("cuda"))  # as on a GPU machine
    assert pipeline_module.cpu_warning(ctx) is None


def test_transformer_time_budget_is_kept_on_resume(tiny_world, tmp_path, monkeypatch):
    """--time-budget-min sets the epochs once; a resumed run keeps them (same step total, same LR
    schedule) instead of measuring again: here its clock runs 10,000x fast, which would give 1 epoch."""
    w, out = tiny_world, str(tmp_path / "t")
    argv = ["--train_d_path", w["train"], "--val_d_path", w["val"], "--MaskGitConfig", w["config"], "--out_d_path",
            out, "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--time-budget-min", "5",
            "--warmup-steps", "2", "--val-batches", "1", "--device", "cpu", "--no-progress"]
    training_transformer.main(argv + ["--stop-after-steps", "40"])  # measured at step 30
    first = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert first["step"] == 40 and first["budgeted"] and first["epochs"] * 12 > 75
    real = time.time
    fast = types.SimpleNamespace(time=lambda: real() * 1e4)
    monkeypatch.setattr(train_engine, "time", fast)
    r = training_transformer.main(argv + ["--resume", "--stop-after-steps", "75"])  # past step 40 + 30
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert r["step"] == ck["step"] == 75 and ck["epochs"] == first["epochs"]


ARGS = ["tokenizer.learning_rate=8e-4", "tokenizer.set=latent_dim=8", "transformer.no_progress=false",
        "transformer.set=model_param.Transformer_param.n_layers=2", "inpaint.total_iter=4", "inpaint.total_iter=5"]


def test_arg_runs_what_the_edited_recipe_runs(tmp_path):
    """--arg STAGE.KEY=VALUE gives every stage the commands of a recipe YAML edited by hand the same way
    (VALUE read as YAML, false drops a flag, a set item joins the recipe's set list, the last of two
    wins), and the token cache's shown command repeats the --arg words, which parse back to themselves."""
    world = make_world(tmp_path / "world", n_train=1, n_val=1, n_test=1)
    with open(SMOKE) as f:
        edited = yaml.safe_load(f)
    edited["tokenizer"]["args"]["set"] = ["codebook_norm=true"]  # a set list of its own, which --arg adds to
    base_recipe = tmp_path / "base.yml"
    base_recipe.write_text(yaml.safe_dump(edited, sort_keys=False))
    tok, trans = edited["tokenizer"]["args"], edited["transformer"]["args"]
    tok["learning_rate"] = 8e-4
    tok["set"] = [*(tok.get("set") or []), "latent_dim=8"]
    trans["no_progress"] = False
    trans["set"] = [*(trans.get("set") or []), "model_param.Transformer_param.n_layers=2"]
    edited["inpaint"]["args"]["total_iter"] = 5
    path = tmp_path / "edited.yml"
    path.write_text(yaml.safe_dump(edited, sort_keys=False))
    base = ["--out", str(tmp_path / "out"), "--data", world["root"], "--device", "cpu", "--dry-run"]
    by_arg = pipeline.main(["--recipe", str(base_recipe), "--arg", *ARGS, *base])["commands"]
    by_yaml = pipeline.main(["--recipe", str(path), *base])["commands"]
    assert by_arg.keys() == by_yaml.keys() == set(STAGES)
    for stage in ("transformer", "inpaint", "fid"):
        assert by_arg[stage] == by_yaml[stage], stage
    # the tokenizer's: the same options once its own parser has read them (YAML reads 8e-4 as text, the
    # edited file holds the float 0.0008: train_vqgan.py gets 8e-4 either way)
    import train_vqgan
    got, want = (vars(train_vqgan.parse_args(shlex.split(c["tokenizer"][0])[2:])) for c in (by_arg, by_yaml))
    assert got == want and got["learning_rate"] == 8e-4 and got["set"] == ["codebook_norm=true", "latent_dim=8"]
    trans_argv = shlex.split(by_arg["transformer"][0])
    assert "--no-progress" not in trans_argv and "vqgan.latent_dim=8" in trans_argv  # the tokenizer's set reaches it
    assert "vqgan.codebook_norm=true" in trans_argv
    shown = shlex.split(by_arg["tokens"][0].split("  #")[0])
    assert pipeline.parse_args(shown[2:]).recipe_args == pipeline.parse_args(["--arg", *ARGS]).recipe_args
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("arg, code, expected", [
    ("tokens.minutes=1", 2, "--arg tokens.minutes=1: expected STAGE.KEY=VALUE with STAGE one of "
                            "tokenizer,transformer,decoder,inpaint,fid"),
    ("tokenizer.learning_rate", 2, "expected STAGE.KEY=VALUE"),
    ("learning_rate=1e-3", 2, "expected STAGE.KEY=VALUE"),
    ("tokenizer.frobnicate=3", 1, "pipeline.py: error: --arg tokenizer.frobnicate: train_vqgan.py has no option "
                                  "--frobnicate"),
    ("tokenizer.out_dir=x", 1, "pipeline.py: error: --arg tokenizer.out_dir: --out-dir is set by the pipeline"),
    ("inpaint.total_iter=x", 1, "and --arg: inpaint: argument --total-iter: invalid int value: 'x'"),
    ("tokenizer.learning_rate=[1", 1, "pipeline.py: error: --arg tokenizer.learning_rate=[1: not a YAML value"),
])
def test_arg_errors_name_the_arg(tmp_path, capsys, arg, code, expected):
    world = make_world(tmp_path / "world", n_train=1, n_val=1, n_test=1)
    got, err = run(args_for(world, SMOKE, tmp_path / "out", "--arg", arg), capsys)
    assert got == code and expected in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "out")


def test_tokenizer_overrides_reach_the_transformer(tmp_path):
    """A recipe that changes the tokenizer config with `set` (e.g. the l2-normalised codebook) trains the
    transformer on that very tokenizer: the check before any work passes and the transformer's resolved
    config carries the override."""
    world = make_world(tmp_path / "world", n_train=1, n_val=1, n_test=1)
    with open(os.path.join(REPO_ROOT, "config", "pipeline.yml")) as f:
        recipe = yaml.safe_load(f)
    recipe["tokenizer"]["args"]["set"] = ["codebook_norm=true"]
    recipe["transformer"]["args"]["set"] = ["model_param.Transformer_param.n_layers=2"]
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    cmds = pipeline.main(["--recipe", str(path), "--out", str(tmp_path / "out"), "--data", world["root"],
                          "--dry-run"])["commands"]
    argv = shlex.split(cmds["transformer"][0])[2:]  # after "python training_transformer.py"
    cfg = training_transformer.model_config(training_transformer.parse_options(argv))
    assert cfg["vqgan"]["codebook_norm"] is True and cfg["model_param"]["Transformer_param"]["n_layers"] == 2


def test_cuda_asked_for_without_cuda_falls_back_once_and_every_stage_gets_cpu(tmp_path, monkeypatch):
    """The device is resolved once for the whole run: one fallback warning, not one per stage and script."""
    import logging
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    warned = []

    class Catch(logging.Handler):
        def emit(self, record):
            warned.append(record.getMessage())
    handler = Catch(logging.WARNING)
    logging.getLogger("maskgit").addHandler(handler)
    try:
        world = make_world(tmp_path / "world", n_train=1, n_val=1, n_test=1)
        res = pipeline.main(["--recipe", "config/pipeline_smoke.yml", "--out", str(tmp_path / "out"),
                             "--data", world["root"], "--gt", world["gt"], "--device", "cuda", "--dry-run"])
    finally:
        logging.getLogger("maskgit").removeHandler(handler)
    assert [w for w in warned if "CUDA requested" in w] == ["CUDA requested (cuda) but not available: using CPU"]
    lines = [line for stage in res["commands"].values() for line in stage]
    with_device = [line for line in lines if "--device" in line]
    assert with_device and all("--device cpu" in line and "--device cuda" not in line for line in with_device)
