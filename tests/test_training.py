import copy
import csv
import math
import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

import training_transformer as tt
import utils.train_engine as engine
from conftest import ROOT, TINY_VQ
from models import MaskGit
from models.Transformer import BidirectionalTransformer
from utils.checkpoint import atomic_save, half_state_dict, load_checkpoint
from utils.cli import run_cli
from utils.train_engine import StepConfig, evaluate, make_parts, masked_token_loss, train_step
from utils.train_options import RunConfig
from utils.checkpoint import CONFIG_KEY, stored_config
from utils.train_utils import EMA


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(w, out, *extra):
    return ["--train_d_path", w["train"], "--val_d_path", w["val"], "--MaskGitConfig", w["config"],
            "--out_d_path", str(out), "--cache-dir", str(out) + "_cache", "--batch-size", "8", "--epochs", "3",
            "--warmup-steps", "2", "--learning-rate", "1e-3", "--device", "cpu", "--no-progress", "--seed", "3",
            *extra]


def _metric_rows(out, key):
    with open(out / "metrics.csv") as f:
        return [(int(float(r["step"])), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def _signal_at_step(monkeypatch, at):
    """Deliver SIGINT to this process right after training step ``at`` (as Ctrl-C would); returns
    the unpatched step."""
    orig = engine.train_step

    def step(parts, cfg, ids, step):
        out = orig(parts, cfg, ids, step)
        if step + 1 == at:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(engine, "train_step", step)
    return orig


@pytest.mark.parametrize("hole_frac", ["0", "0.5"])
def test_resume_is_exact(tiny_world, tmp_path, monkeypatch, hole_frac):
    monkeypatch.setattr(engine, "HOLE_BANK_SIZE", 256)  # 4,096 generated holes take ~20 s at 16x16
    full = tt.main(_args(tiny_world, tmp_path / "full", "--hole-frac", hole_frac, "--ema", "0.9"))
    assert full["step"] == 18 and len(full["losses"]) == 18
    if hole_frac == "0":  # stopped by --stop-after-steps
        part = tt.main(_args(tiny_world, tmp_path / "part", "--stop-after-steps", "8", "--hole-frac", hole_frac,
                             "--ema", "0.9"))
        assert part["stopped"] and part["step"] == 8
        assert max(abs(a - b) for a, b in zip(full["losses"], part["losses"])) < 1e-6
    else:  # stopped by Ctrl-C: last.pt saved, exit status 130
        orig = _signal_at_step(monkeypatch, 8)
        with pytest.raises(SystemExit) as e:
            run_cli(tt.main, _args(tiny_world, tmp_path / "part", "--hole-frac", hole_frac, "--ema", "0.9"))
        assert e.value.code == 130
        monkeypatch.setattr(engine, "train_step", orig)
    assert load_checkpoint(str(tmp_path / "part" / "last.pt"))["step"] == 8
    rest = tt.main(_args(tiny_world, tmp_path / "part", "--resume", "--hole-frac", hole_frac, "--ema", "0.9"))
    assert rest["step"] == 18 and len(rest["losses"]) == 10
    assert max(abs(a - b) for a, b in zip(full["losses"][8:], rest["losses"])) < 1e-6
    a = torch.load(tmp_path / "full" / "transformer_last.pth")
    b = torch.load(tmp_path / "part" / "transformer_last.pth")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the EMA weights (its warmup resumes at step 8)
    # the epoch mean of epoch 2 (steps 7-12, resumed after step 8) averages all six steps
    full_means, part_means = (_metric_rows(tmp_path / d, "epoch_train_loss") for d in ("full", "part"))
    assert [s for s, _ in part_means] == [6, 12, 18]
    assert max(abs(x - y) for (_, x), (_, y) in zip(full_means, part_means)) < 1e-6


def test_outputs_cache_and_lab_layout(tiny_world, tmp_path, monkeypatch):
    steps, update = [], EMA.update
    monkeypatch.setattr(EMA, "update", lambda self, model, step=None: (steps.append(step), update(self, model, step)))
    res = tt.main(_args(tiny_world, tmp_path / "run", "--epochs", "2", "--ckpt-interval", "1", "--hflip",
                        "--ema", "0.9"))
    out = tmp_path / "run"
    for name in ("last.pt", "best.pt", "transformer_last.pth", "transformer_best.pth", "epoch_1.pth", "epoch_2.pth",
                 "metrics.csv", "loss.png"):
        assert (out / name).exists(), name
    assert any(p.startswith("events") for p in os.listdir(out / "tb"))
    ck = load_checkpoint(str(out / "last.pt"))  # weights_only=True
    cfg = ck["config"]
    assert cfg["model_param"]["Transformer_param"]["dim"] == 32 and ck["epoch"] == 2
    for name in ("transformer_best.pth", "transformer_last.pth", "epoch_1.pth"):
        raw = torch.load(out / name, weights_only=True)
        assert "blocks.0.Attention.qkv.weight" in raw and "pos_emb" in raw  # raw lab layout, no wrapper
        assert all(v.device.type == "cpu" for v in raw.values())
        assert raw._metadata[CONFIG_KEY]["config"] == cfg and stored_config(raw) == cfg  # config rides along
        net = BidirectionalTransformer(cfg["model_param"]["Transformer_param"])
        net.load_state_dict(raw)  # the lab's strict load_state_dict(torch.load(path)) still works
    # loss.png plots like with like: the unsmoothed train CE per epoch at the steps of the val loss
    ce, val = _metric_rows(out, "epoch_train_ce"), _metric_rows(out, "val_loss")
    assert [s for s, _ in ce] == [s for s, _ in val][1:] == [12, 24]  # 96 sequences with flips: 12 steps/epoch
    assert steps == list(range(24))  # the weight EMA is told each step (its warmup), 0-based
    assert all(x > y for (_, x), (_, y) in zip(_metric_rows(out, "epoch_train_loss"), ce))  # label smoothing is on
    # validation reported on all val and on val images that never occur in train (12 of 16)
    assert {"val_loss", "val_unseen_loss", "val_acc"} <= set(res["history"][0]) and res["history"][0]["step"] == 0
    cache = str(out) + "_cache"
    assert len([c for c in os.listdir(cache) if c.startswith("tokens_")]) == 2  # train (with flips) + val
    unseen = load_checkpoint(os.path.join(cache, next(c for c in os.listdir(cache) if c.startswith("unseen"))))
    assert unseen.tolist() == list(range(4, 16))
    # a changed tokenizer changes the cache key: the stale cache is not used; --partial encodes only what it uses
    vq = torch.load(tiny_world["vqgan"])
    vq["codebook.embedding.weight"] += 1
    torch.save(vq, tiny_world["vqgan"])
    tt.main(_args(tiny_world, tmp_path / "run2", "--epochs", "1", "--cache-dir", cache, "--partial", "0.5"))
    new = [load_checkpoint(os.path.join(cache, c)) for c in os.listdir(cache) if c.startswith("tokens_")]
    assert len(new) == 4 and sorted(len(c["ids"]) for c in new) == [16, 16, 24, 96]


def test_a_tokenizer_file_that_stores_its_config_brings_its_architecture(tiny_world, tmp_path, capfd):
    """train_vqgan.py's vqgan.pt stores its config: training_transformer.py --vqgan-ckpt builds the
    tokenizer from it even where the YAML names another (lab's strict load still works); a file
    without one (the lab's layout) must fit the YAML, and the error names what differs."""
    import train_vqgan
    from models import VQGAN
    from utils.build import load_vqgan_weights
    from utils.checkpoint import CONFIG_KEY, stored_config
    from models.convert import CheckpointLayoutError
    other = dict(TINY_VQ, dec_channels=[8, 16, 16], enc_num_res_blocks=2)  # same token grid, other layers
    torch.manual_seed(1)
    vq = VQGAN(other)
    path = tmp_path / "vqgan.pt"
    torch.save(train_vqgan.tokenizer_state_dict(vq), path)
    raw = torch.load(path, weights_only=True)
    assert raw._metadata[CONFIG_KEY]["config"] == vq.cfg.to_dict()
    VQGAN(other).load_state_dict(raw, strict=True)  # the lab's strict load of the exported file
    tt.main(_args(tiny_world, tmp_path / "run", "--epochs", "1", "--vqgan-ckpt", str(path)))
    assert f"tokenizer config: the one stored in {path} (the YAML's differs in dec_channels, enc_num_res_blocks)" \
        in capfd.readouterr().err
    ck = torch.load(tmp_path / "run" / "transformer_last.pth", weights_only=True)
    assert stored_config(ck)["vqgan"]["dec_channels"] == [8, 16, 16]  # inference rebuilds the same tokenizer
    torch.save(vq.state_dict(), tmp_path / "plain.pt")  # no stored config: the YAML's must fit
    with pytest.raises(CheckpointLayoutError, match="plain.pt does not fit") as e:
        tt.main(_args(tiny_world, tmp_path / "run2", "--epochs", "1", "--vqgan-ckpt", str(tmp_path / "plain.pt")))
    assert "stores the config" not in str(e.value)
    with pytest.raises(CheckpointLayoutError, match=r"differs from this one in dec_channels \(\[8, 16, 16\] in the "
                                                    r"file, \[16, 32, 32\] here\), enc_num_res_blocks \(2 in"):
        load_vqgan_weights(VQGAN(TINY_VQ), str(path))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_world, tmp_path, monkeypatch, capsys):
    tt.main(_args(tiny_world, tmp_path / "nan", "--epochs", "1"))
    before = (tmp_path / "nan" / "last.pt").read_bytes()
    calls = {"n": 0}
    orig = engine.masked_token_loss

    def poisoned(*a, **k):  # calls 1-2: the step-0 validation; NaN from the second training step on
        calls["n"] += 1
        loss, *rest = orig(*a, **k)
        return (loss * float("nan") if calls["n"] > 3 else loss, *rest)

    monkeypatch.setattr(engine, "masked_token_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        run_cli(tt.main, _args(tiny_world, tmp_path / "nan", "--epochs", "1"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "error: " in err.splitlines()[-1] and "nan" in err.splitlines()[-1]
    assert "Traceback" not in err
    assert (tmp_path / "nan" / "last.pt").read_bytes() == before


def test_input_errors_are_one_line_before_any_output(tiny_world, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_cli(tt.main, _args(tiny_world, out, "--train_d_path", str(tmp_path / "missing")))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "does not exist" in err and "missing" in err and len(err.splitlines()) == 1
    (tmp_path / "bad.png").write_bytes(b"not a png")
    os.replace(tmp_path / "bad.png", os.path.join(tiny_world["train"], "image_99999.png"))
    with pytest.raises(SystemExit) as e:
        run_cli(tt.main, _args(tiny_world, out))
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert e.value.code == 1 and "image_99999.png" in last and "--skip-bad-images" in last and "Traceback" not in err
    assert not out.exists()  # nothing written before the check failed
    res = tt.main(_args(tiny_world, out, "--skip-bad-images", "--epochs", "1"))
    assert res["step"] == 6  # the 48 good images: 6 steps of 8


def test_every_option_has_help():
    assert all(f.metadata["help"] for f in dataclasses.fields(RunConfig))
    with pytest.raises(dataclasses.FrozenInstanceError):
        tt.parse_options([]).epochs = 3  # read once, never changed


# --- the training step, against closed forms ---------------------------------------------------

def _tiny_model(tiny_cfg, seed=0, dropout=0.0):
    cfg = copy.deepcopy(tiny_cfg)
    cfg["model_param"]["Transformer_param"].update(dropout=dropout, attn_dropout=dropout)
    torch.manual_seed(seed)
    return MaskGit(cfg["model_param"], cfg["vqgan"])


def _ids(n, seed=1):
    return torch.randint(0, 32, (n, 16), generator=torch.Generator().manual_seed(seed))


def test_step_masks_are_the_lab_mvtm_keyed_on_seed_and_step(tiny_cfg):
    parts = make_parts(_tiny_model(tiny_cfg), torch.device("cpu"), "fp32", lr=1e-3)
    cfg = StepConfig(seed=5)
    m0, m0_again, m1 = (engine.step_masks(parts, cfg, 64, s) for s in (0, 0, 1))
    assert torch.equal(m0, m0_again) and not torch.equal(m0, m1)  # a new draw every step, reproducible
    counts = m0.sum(1)
    assert counts.min() >= 1 and counts.max() <= 16 and len(set(counts.tolist())) > 4  # r ~ U(0, 1) per row
    assert torch.equal(engine.step_masks(parts, StepConfig(seed=6), 64, 0), m0) is False


def test_loss_falls_when_overfitting_a_tiny_batch(tiny_cfg):
    model = _tiny_model(tiny_cfg)
    parts = make_parts(model, torch.device("cpu"), "fp32", lr=1e-2, weight_decay=0.0)
    ids = _ids(2).repeat(2, 1)  # two sequences, twice
    before = evaluate(model, model.transformer, ids)["loss"]  # ~ln(33): chance
    for step in range(40):
        train_step(parts, StepConfig(batch_size=4, label_smoothing=0.0), ids, step)
    after = evaluate(model, model.transformer, ids)["loss"]  # ~0.5 (which of the two, when all is masked)
    assert after < 0.25 * before, (before, after)


def test_cpu_evaluation_in_chunks_equals_one_pass(tiny_cfg, monkeypatch):
    """The CPU validation forward runs CPU_EVAL_CHUNK sequences at a time: the same loss and accuracy as
    one pass over the batch (a tail shorter than a chunk included), and the same masks."""
    model = _tiny_model(tiny_cfg, dropout=0.1)  # dropout on in training: evaluate must still be deterministic
    ids = _ids(2 * engine.CPU_EVAL_CHUNK + 3, seed=7)
    calls = []
    net = model.transformer
    monkeypatch.setattr(net, "forward", lambda x, f=net.forward: calls.append(len(x)) or f(x))
    chunked = evaluate(model, net, ids, batch_size=len(ids))
    assert calls == [engine.CPU_EVAL_CHUNK, engine.CPU_EVAL_CHUNK, 3]
    monkeypatch.setattr(engine, "CPU_EVAL_CHUNK", 10**6)
    whole = evaluate(model, net, ids, batch_size=len(ids))
    assert calls[3:] == [len(ids)]
    assert whole["acc"] == chunked["acc"] and 0 < whole["acc"] < 1
    assert whole["loss"] == pytest.approx(chunked["loss"], rel=1e-6)


def test_gradient_accumulation_equals_the_larger_batch(tiny_cfg):
    """Same masks (keyed on seed and step over the step's global batch), fp32, no dropout: 2 x 6
    accumulated equals one batch of 12, in the gradients and in the weights after two steps."""
    ids = _ids(12)
    grads, weights = [], []
    for accum in (1, 2, 3):
        model = _tiny_model(tiny_cfg)
        parts = make_parts(model, torch.device("cpu"), "fp32", lr=1e-3)
        cfg = StepConfig(batch_size=12 // accum, accum_grad=accum, clip_grad=1e9, label_smoothing=0.1)
        for step in range(2):
            train_step(parts, cfg, ids, step)
        grads.append(torch.cat([p.grad.flatten() for p in model.transformer.parameters()]))
        weights.append(torch.cat([p.detach().flatten() for p in model.transformer.parameters()]))
    for g, w in zip(grads[1:], weights[1:]):
        assert (g - grads[0]).abs().max() < 1e-6 and (w - weights[0]).abs().max() < 1e-6


def test_label_smoothing_against_its_closed_form():
    torch.manual_seed(0)
    B, N, V, eps = 3, 5, 7, 0.2
    logits, ids = torch.randn(B, N, V) * 3, torch.randint(0, V, (B, N))
    mask = torch.rand(B, N) < 0.5
    logits[~mask] = 1e4 * torch.randn(int((~mask).sum()), V)  # garbage where not masked: must not count
    idx = mask.reshape(-1).nonzero().squeeze(1)
    loss, ce = masked_token_loss(logits, ids, idx, eps)[:2]
    expected, plain = 0.0, 0.0
    for b in range(B):
        for n in range(N):
            if mask[b, n]:
                p = torch.softmax(logits[b, n].double(), 0)
                nll = -torch.log(p[ids[b, n]])
                expected += (1 - eps) * nll + eps * (-torch.log(p)).mean()
                plain += nll
    assert abs(loss.item() - float(expected)) < 1e-4 and abs(ce.item() - float(plain)) < 1e-4
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V)[idx], ids.reshape(-1)[idx], label_smoothing=eps,
                                            reduction="sum")
    assert abs(loss.item() - ref.item()) < 1e-4


@pytest.mark.parametrize("with_step", [False, True])
def test_weight_ema_follows_the_formula(with_step):
    torch.manual_seed(0)
    net, d = torch.nn.Linear(3, 2), 0.9
    ema = EMA(net, d)
    expected = [p.detach().clone() for p in net.parameters()]
    for step in range(12):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net, step if with_step else None)
        # warmup: d_t = min(d, (1 + t) / (10 + t)): 0.1, 0.18, 0.25, ... until it reaches 0.9 at t = 80
        dt = min(d, (1 + step) / (10 + step)) if with_step else d
        expected = [dt * e + (1 - dt) * p.detach() for e, p in zip(expected, net.parameters())]
    for e, got in zip(expected, ema.model.parameters()):
        assert torch.allclose(got, e, atol=1e-6)


def test_weight_ema_warmup_forgets_the_initial_weights():
    """At decay 0.999 a plain EMA still holds 0.999^200 = 82% of the initial weights after 200
    steps; with the warmup the initial weights' share is prod d_t = 1/10 * 2/11 * 3/12 ... = 6e-16."""
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    plain, warm = EMA(net, 0.999), EMA(net, 0.999)
    with torch.no_grad():
        net.weight.fill_(1.0)  # the model moves to 1 at once and stays there
    for step in range(200):
        plain.update(net)
        warm.update(net, step)
    assert plain.model.weight.item() == pytest.approx(1 - 0.999 ** 200, rel=1e-4)  # 0.181
    # share of the initial weights: prod_t d_t = prod_t (1+t)/(10+t) = 9! * 200! / 209! (t < 200, all below 0.999)
    share = math.exp(math.lgamma(10) + math.lgamma(201) - math.lgamma(210))
    assert warm.model.weight.item() == pytest.approx(1 - share, abs=1e-6)
    assert warm.model.weight.item() > 0.999


def test_half_state_dict_keeps_config_and_integer_tensors(tiny_cfg, tmp_path):
    from utils.checkpoint import lab_state_dict
    net = BidirectionalTransformer(tiny_cfg["model_param"]["Transformer_param"])
    sd = lab_state_dict(net, tiny_cfg)
    sd["counter"] = torch.tensor([3, 70000])  # an integer buffer stays as it is
    half = half_state_dict(sd)
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], sd[k].half()) for k in sd if k != "counter")
    assert half["counter"].dtype == torch.int64 and half["counter"].tolist() == [3, 70000]
    torch.save(half, tmp_path / "h.pth")
    back = torch.load(tmp_path / "h.pth", weights_only=True)
    assert stored_config(back) == tiny_cfg and all(v.device.type == "cpu" for v in back.values())
    del back["counter"]
    net.load_state_dict({k: v.float() for k, v in back.items()})  # the lab's strict load


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"a": torch.ones(2)}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unpicklable()}, str(path))
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temp file left behind


def test_ddp_two_processes_equal_one_process_of_the_same_global_batch(tiny_world, tmp_path):
    """2 processes x 4 rows (gloo, CPU) against 1 process x 8 rows: the masks depend only on (seed,
    step, place in the global batch), the loss is normalised by the global masked count, and
    dropout is off, so the weights agree to float rounding."""
    cfg = yaml.safe_load(open(tiny_world["config"]))
    cfg["model_param"]["Transformer_param"].update(dropout=0.0, attn_dropout=0.0)
    cfg_path = tmp_path / "no_dropout.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out, single = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           os.path.join(ROOT, "training_transformer.py"),
           *_args(tiny_world, out, "--epochs", "1", "--MaskGitConfig", str(cfg_path), "--log-every", "1")]
    (tmp_path / "tmp").mkdir()  # torchrun's own temp folders (torchelastic_*) go here, not in /tmp
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TMPDIR=str(tmp_path / "tmp"))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    check = json.loads((out / "ddp_check.json").read_text())
    assert len(check["weight_sums"]) == 2 and check["weight_sums"][0] == check["weight_sums"][1]
    res = tt.main(_args(tiny_world, single, "--epochs", "1", "--MaskGitConfig", str(cfg_path),
                        "--cache-dir", str(out) + "_cache", "--log-every", "1"))
    assert len(res["losses"]) == 6 and max(abs(a - b) for a, b in zip(check["losses"], res["losses"])) < 1e-5
    norms = [[x for _, x in _metric_rows(d, "grad_norm")] for d in (out, single)]  # the gradients' scale too
    assert len(norms[0]) == 6 and max(abs(a - b) for a, b in zip(*norms)) < 1e-5
    a, b = (torch.load(d / "transformer_last.pth") for d in (out, single))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.gpu
def test_cuda_step_has_no_host_sync_and_matches_the_cpu_step(tiny_cfg):
    """The device path (token cache on the GPU, masks drawn on the CPU, fused AdamW, foreach EMA)
    never waits for the GPU inside a step, and in fp32 gives the CPU step's loss (same masks)."""
    ids, losses = _ids(8), []
    for device in ("cpu", "cuda"):
        model = _tiny_model(tiny_cfg).to(device)
        parts = make_parts(model, torch.device(device), "fp32", lr=1e-3, warmup_steps=2, total_steps=lambda: 10,
                           ema=0.9)
        cfg, batch = StepConfig(batch_size=8), ids.to(device)
        stats = [train_step(parts, cfg, batch, 0)[0]]  # warm-up (library initialisation may sync)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            stats += [train_step(parts, cfg, batch, s)[0] for s in range(1, 4)]
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        losses.append(torch.stack(stats).cpu())
    assert torch.allclose(losses[0], losses[1], atol=1e-4)
