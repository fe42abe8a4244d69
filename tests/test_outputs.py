"""The background image writer of utils.outputs: the same bytes as writing in the loop, every write
finished before a run returns, bounded, and a failed write raised with the file's name."""
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from utils import outputs
from utils.build import build_maskgit
from utils.cli import run_cli
from utils.data import MaskedImageSet
from utils.inpaint import InpaintOptions
from utils.outputs import ImageWriter, OutputWriteError, run_inpainting


def _files(root) -> dict:
    """{relative path: bytes} of every file under root."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@pytest.fixture
def tiny_run(tiny_world, tiny_cfg):
    torch.manual_seed(0)
    model = build_maskgit(tiny_cfg, load_vqgan=False).eval()
    for p in model.parameters():  # sharp logits and varied pictures
        p.data.normal_(0, 0.3)
    ds = MaskedImageSet(tiny_world["masked_image"], tiny_world["mask64"], 16)
    return model, ds


def test_background_writes_are_the_bytes_of_the_synchronous_path(tiny_run, tmp_path):
    model, ds = tiny_run
    opts = InpaintOptions(total_iter=4, gif=True, token_choice="sample")
    for workers in (0, 3):
        run_inpainting(model, ds, str(tmp_path / f"w{workers}"), opts, "cpu", batch_size=4, progress=False,
                       write_workers=workers)
    sync, background = _files(tmp_path / "w0"), _files(tmp_path / "w3")
    assert len(sync) == 4 * 6  # test_results, mask_scheduling, imga, gifs for 6 images
    assert sync.keys() == background.keys() and all(sync[k] == background[k] for k in sync)
    # and the files are the lab's: a 4x4 mask per step, masked input + one frame per step
    assert Image.open(tmp_path / "w3" / "mask_scheduling" / "test_5.png").size == (2 + 4 * 6, 8)
    assert Image.open(tmp_path / "w3" / "imga" / "test_5.png").size == (2 + 5 * 18, 20)


def test_writer_output_equals_writing_directly(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(20, 3, 8, 8, generator=g)
    direct, queued = tmp_path / "direct", tmp_path / "queued"
    direct.mkdir()
    queued.mkdir()
    for i, im in enumerate(imgs):
        save_image(im, direct / f"{i}.png")
    outputs.save_png(imgs[0], str(direct / "png.png"))
    with ImageWriter(workers=3, max_pending=4) as w:
        for i, im in enumerate(imgs):
            w.submit(str(queued / f"{i}.png"), save_image, im)
        w.submit(str(queued / "png.png"), outputs.save_png, imgs[0])
    assert _files(direct) == _files(queued)
    assert _files(direct)["0.png"] == _files(direct)["png.png"]  # save_png rounds like save_image


def _slow_write(text, path, delay=0.2):
    time.sleep(delay)
    with open(path, "w") as f:
        f.write(text)


def test_leaving_the_writer_waits_for_every_write(tmp_path):
    t0 = time.perf_counter()
    with ImageWriter(workers=2) as w:
        for i in range(4):
            w.submit(str(tmp_path / f"{i}.txt"), _slow_write, f"file {i}")
        assert time.perf_counter() - t0 < 0.15  # submit did not wait for the writes
    assert sorted(os.listdir(tmp_path)) == [f"{i}.txt" for i in range(4)]
    assert all((tmp_path / f"{i}.txt").read_text() == f"file {i}" for i in range(4))


def test_submit_blocks_when_max_pending_writes_wait(tmp_path):
    release = threading.Event()

    def held(path):
        release.wait(5)
        open(path, "w").close()

    w = ImageWriter(workers=1, max_pending=2)
    w.submit(str(tmp_path / "a"), held)
    w.submit(str(tmp_path / "b"), held)
    third = threading.Thread(target=w.submit, args=(str(tmp_path / "c"), held))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # the queue is full: submit waits
    release.set()
    third.join(5)
    w.close()
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failed_write_raises_naming_the_file(tmp_path, workers):
    missing = str(tmp_path / "no_such_dir" / "image_007.png")
    with pytest.raises(OutputWriteError, match="image_007.png") as e:
        with ImageWriter(workers) as w:
            w.submit(str(tmp_path / "ok.png"), save_image, torch.zeros(3, 4, 4))
            w.submit(missing, save_image, torch.zeros(3, 4, 4))
    assert isinstance(e.value.__cause__, FileNotFoundError) and (tmp_path / "ok.png").exists()

    def buggy(path):
        raise ValueError("a bug")
    with pytest.raises(ValueError, match="a bug") as e:  # not an I/O error: its own type, the file in a note
        with ImageWriter(workers) as w:
            w.submit(str(tmp_path / "x.png"), buggy)
    assert any("x.png" in note for note in e.value.__notes__)


def test_the_error_of_the_loop_wins_over_a_write_error(tmp_path):
    with pytest.raises(KeyError):
        with ImageWriter(2) as w:
            w.submit(str(tmp_path / "missing" / "a.png"), save_image, torch.zeros(3, 4, 4))
            raise KeyError("loop")


def test_inpainting_reports_a_failed_write_by_name(tiny_run, tmp_path, monkeypatch, capsys):
    model, ds = tiny_run
    real = outputs.save_png

    def flaky(x, path):
        if path.endswith("image_003.png"):
            raise PermissionError(13, "Permission denied", path)
        real(x, path)
    monkeypatch.setattr(outputs, "save_png", flaky)
    with pytest.raises(OutputWriteError, match=r"test_results.image_003\.png"):
        run_inpainting(model, ds, str(tmp_path / "o"), InpaintOptions(total_iter=2, visualize=False), "cpu",
                       batch_size=4, progress=False)
    # the command line: one line naming the file, exit status 1
    with pytest.raises(SystemExit) as e:
        run_cli(lambda argv: run_inpainting(model, ds, str(tmp_path / "o2"), InpaintOptions(total_iter=2),
                                            "cpu", 4, progress=False), [])
    assert e.value.code == 1 and "image_003.png" in capsys.readouterr().err


def test_schedule_report_draws_the_kept_decodes_as_it_would_decode_them(tiny_run, tmp_path, monkeypatch):
    """demo.py's path: the runs keep their decodes of the report's images, and the report drawn from
    them is the picture the report decodes itself (batch of 4 there, batch of 1 here); a kept decode
    made with other options (another seed) is decoded again, not drawn."""
    model, ds = tiny_run
    opts = InpaintOptions(total_iter=4, token_choice="sample", seed=3)
    ids, schedules = [1, 4], ["cosine", "square"]
    done = {}
    for s in schedules:
        done[s] = dict.fromkeys(ids)
        run_inpainting(model, ds, str(tmp_path / s), InpaintOptions(**{**opts.__dict__, "mask_func": s, "gif": True}),
                       "cpu", batch_size=4, progress=False, keep=done[s])
    assert all(isinstance(d, outputs.Decoded) for k in done.values() for d in k.values())
    calls = []
    real = outputs.inpaint_batch
    monkeypatch.setattr(outputs, "inpaint_batch", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    outputs.schedule_report(model, ds, ids, schedules, opts, "cpu", str(tmp_path / "kept.png"), done)
    assert calls == []
    outputs.schedule_report(model, ds, ids, schedules, opts, "cpu", str(tmp_path / "fresh.png"))
    assert len(calls) == len(ids) * len(schedules)
    kept, fresh = (torch.from_numpy(np.array(Image.open(tmp_path / f"{n}.png"))).int() for n in ("kept", "fresh"))
    assert kept.shape == fresh.shape and (kept - fresh).abs().max() <= 1
    calls.clear()
    outputs.schedule_report(model, ds, ids, schedules, InpaintOptions(**{**opts.__dict__, "seed": 4}), "cpu",
                            str(tmp_path / "other.png"), done)
    assert len(calls) == len(ids) * len(schedules)
    other = torch.from_numpy(np.array(Image.open(tmp_path / "other.png"))).int()
    assert (other - fresh).abs().max() > 1  # another seed's noise draws other tokens: the check above can fail


def test_keep_needs_step_images(tiny_run, tmp_path):
    model, ds = tiny_run
    with pytest.raises(ValueError, match="keep needs the step images"):
        run_inpainting(model, ds, str(tmp_path), InpaintOptions(visualize=False), "cpu", progress=False, keep={0: None})
