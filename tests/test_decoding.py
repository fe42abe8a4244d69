import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import inpainting
from conftest import ROOT, TINY_T, TINY_VQ
from models import BidirectionalTransformer, gamma_func, halton_order, image_noise, iterative_decode
from models import decoding
from models.decoding import decode_step
from utils.inpaint import InpaintOptions


def _model(seed=0):
    torch.manual_seed(seed)
    m = BidirectionalTransformer(TINY_T).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _mixed_batch(B=6, N=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (B, N), generator=g)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):  # different hole sizes per image, including 1 and all tokens
        n = [1, 3, 7, 11, 16, 5][b % 6]
        mask[b, torch.randperm(N, generator=g)[:n]] = True
    return ids, mask


@pytest.mark.parametrize("mode", ["cosine", "linear", "square", "cubic", "sqrt", "log", "exp"])
@pytest.mark.parametrize("choice,order", [("sample", "confidence"), ("argmax", "confidence"), ("argmax", "halton")])
def test_schedule_counts_known_tokens_and_full_unmask(mode, choice, order):
    ids, mask = _mixed_batch()
    T = 7
    res = iterative_decode(_model(), ids, mask, gamma_func(mode), T, image_noise(0, range(6), "cpu"), 32,
                           token_choice=choice, order=order)
    n_hole = mask.sum(1).tolist()
    unknown = list(n_hole)
    for t, (step_ids, step_mask) in enumerate(zip(res.ids_per_step, res.mask_per_step)):
        r = (t + 1) / T
        # the official count: max(1, min(unknown - 1, floor(N gamma(r, N)))) before the last step, 0 at it
        unknown = [0 if t == T - 1 else min(u, max(1, min(u - 1, math.floor(n * gamma_func(mode)(r, n)))))
                   for u, n in zip(unknown, n_hole)]
        assert step_mask.sum(1).tolist() == unknown, (t, step_mask.sum(1), unknown)
        assert torch.equal(step_ids[~mask], ids[~mask])  # known tokens never change
        assert not (step_mask & ~mask).any()  # only hole tokens can be masked
        assert (step_ids < 32).all()  # the mask id is never emitted
    assert res.steps == T and not res.mask.any()
    # a token, once decoded (unmasked), keeps its value to the end
    for t in range(T - 1):
        done = ~res.mask_per_step[t] & mask
        assert torch.equal(res.ids_per_step[t][done], res.ids_per_step[-1][done])


@pytest.mark.parametrize("kw", [{}, {"confidence": "logprob"}, {"order": "halton", "token_choice": "sample"},
                                {"token_choice": "sample", "confidence": "logprob"}])
def test_batched_equals_batch_one(kw):
    ids, mask = _mixed_batch(B=6, seed=3)
    m = _model(1)
    full = iterative_decode(m, ids, mask, gamma_func("cosine"), 8, image_noise(5, range(6), "cpu"), 32, **kw)
    for b in range(6):
        one = iterative_decode(m, ids[b:b + 1], mask[b:b + 1], gamma_func("cosine"), 8,
                               image_noise(5, [b], "cpu"), 32, **kw)
        assert torch.equal(one.ids[0], full.ids[b]) and torch.equal(one.mask_per_step[2][0], full.mask_per_step[2][b])
    again = iterative_decode(m, ids, mask, gamma_func("cosine"), 8, image_noise(5, range(6), "cpu"), 32, **kw)
    assert torch.equal(again.ids, full.ids)  # deterministic given the seed
    if kw.get("order") != "halton" or kw.get("token_choice") == "sample":  # the seed matters where noise does
        other = iterative_decode(m, ids, mask, gamma_func("cosine"), 8, image_noise(6, range(6), "cpu"), 32,
                                 **kw)
        assert not torch.equal(other.ids, full.ids)


@pytest.mark.parametrize("choice", ["argmax", "sample"])
@pytest.mark.parametrize("order", ["confidence", "halton"])
def test_an_image_decodes_the_same_in_batches_of_any_size_and_position(choice, order):
    """One seed per image: image i gives the same tokens (every step) decoded alone, in a larger
    batch, at another position of a batch, or next to a copy of itself."""
    ids, mask = _mixed_batch(B=6, seed=5)
    m = _model(3)

    def decode(batch):
        return iterative_decode(m, ids[batch], mask[batch], gamma_func("cosine"), 6, image_noise(11, batch, "cpu"),
                                32, token_choice=choice, order=order)
    alone = {i: decode([i]) for i in range(6)}
    for batch in ([5, 4, 3, 2, 1, 0], [2, 0], [0, 2], [4, 1, 4], [3, 5, 0, 1]):
        res = decode(batch)
        for b, i in enumerate(batch):
            assert torch.equal(res.ids[b], alone[i].ids[0]), (batch, i)
            assert all(torch.equal(s[b], a[0]) for s, a in zip(res.mask_per_step, alone[i].mask_per_step)), (batch, i)


def test_sweet_spot_stops_early_and_keeps_decoded_tokens():
    ids, mask = _mixed_batch()
    m = _model()
    full = iterative_decode(m, ids, mask, gamma_func("linear"), 10, image_noise(0, range(6), "cpu"), 32)
    part = iterative_decode(m, ids, mask, gamma_func("linear"), 10, image_noise(0, range(6), "cpu"), 32,
                            sweet_spot=4)
    assert part.steps == 4 and len(part.ids_per_step) == 4
    for t in range(4):  # identical trajectory up to the sweet spot
        assert torch.equal(part.ids_per_step[t], full.ids_per_step[t])
    # holes 1, 3, 7, 11, 16, 5; floor((1 - r) N) at r = .1 .. .4 with the clamp (see test_schedules.py):
    # 7: 6, 5, 4, 4 -> 3; 5: 4, 4 -> 3, 3 -> 2, 3 -> 1; 1 and 3 wait at 1
    assert part.mask.sum(1).tolist() == [1, 1, 3, 6, 9, 1]
    assert torch.equal(part.ids[~mask], ids[~mask])


def test_confidence_picks_most_probable_without_noise():
    # with zero temperature the least probable hole tokens stay masked
    B, N, V = 1, 6, 5
    logits = torch.full((B, N, V), -10.0)
    probs = [0.9, 0.2, 0.45, 0.95, 0.3, 0.1]
    for n, p in enumerate(probs):
        logits[0, n, 0] = math.log(p)
        logits[0, n, 1] = math.log(1 - p)
    ids = torch.zeros(B, N, dtype=torch.long)
    mask = torch.ones(B, N, dtype=torch.bool)
    new_ids, new_mask = decode_step(logits, ids, mask, mask.sum(1), 0.5, gamma_func("linear"),
                                    image_noise(0, [0], "cpu"), choice_temperature=0.0, token_choice="argmax")
    # argmax picks code 0 where p>0.5 else 1; confidence = max(p, 1-p): .9 .8 .55 .95 .7 .9 -> 3 least stay masked
    assert new_mask[0].tolist() == [False, True, True, False, True, False]
    assert new_ids[0].tolist() == [0, 1, 1, 0, 1, 1]


def _two_code_logits(p_chosen, mask_logit=50.0):
    """(B, N, 3) logits: code 0 with probability p, code 1 with 1 - p, and a large mask-token column
    that must never be chosen."""
    p = torch.tensor(p_chosen, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log(), torch.full_like(p, mask_logit)], -1).float()


def _fixed_noise(monkeypatch, sample=None, confidence=None):
    """Replace the draws of decode_step by fixed tensors: (B, N) uniforms for token sampling,
    (B, N) Gumbel values for the confidence noise."""
    def fake(kind):
        def draw(noise, shape, stream):
            assert stream == {"uniform": decoding.SAMPLE_STREAM, "gumbel": decoding.CONFIDENCE_STREAM}[kind]
            fixed = {"uniform": sample, "gumbel": confidence}[kind]
            assert fixed is not None and tuple(fixed.shape[1:]) == tuple(shape), (stream, shape)
            return fixed.clone()
        return draw
    monkeypatch.setattr(decoding, "uniform_like", fake("uniform"))
    monkeypatch.setattr(decoding, "gumbel_like", fake("gumbel"))


@pytest.mark.parametrize("confidence", ["prob", "logprob"])
def test_sample_draws_with_the_noise_and_scores_the_drawn_token(monkeypatch, confidence):
    # token 0: p = .5 .3 .2, token 1: p = .4 .35 .25; the CDF is inverted at u: u = .6 on token 0
    # falls in [.5, .8): code 1 is drawn; u = .39 on token 1 falls in [0, .4): code 0.
    # Confidence (no confidence noise): p(drawn) = .3 < .4 -> token 0 stays masked. Argmax draws codes
    # 0, 0 with p = .5, .4 -> token 1 stays masked (as would scoring the most probable code, not the drawn one).
    logits = torch.tensor([[[.5, .3, .2, 1e9], [.4, .35, .25, 1e9]]]).log()
    logits[..., -1] = 50.0  # the mask token: never chosen
    _fixed_noise(monkeypatch, sample=torch.tensor([[0.6, 0.39]]), confidence=torch.zeros(1, 2))
    ids, mask = torch.tensor([[7, 7]]), torch.ones(1, 2, dtype=torch.bool)
    for choice, want_ids, want_mask in (("sample", [1, 0], [True, False]), ("argmax", [0, 0], [False, True])):
        new_ids, new_mask = decode_step(logits, ids, mask, mask.sum(1), 0.5, gamma_func("linear"), [None], 4.5,
                                        choice, confidence)
        assert new_ids[0].tolist() == want_ids and new_mask[0].tolist() == want_mask, choice


def test_sample_temperature_sharpens_the_draw_but_not_the_confidence(monkeypatch):
    """By hand. Token A: p = .5 .5, token B: p = .45 .3 .25; at u = .48 A draws code 0 (.48 < .5) at
    any temperature; B draws code 1 at temperature 1 (.48 in [.45, .75)) but code 0 at 0.5 (p ~ p^2:
    .571 .254 .176, .48 < .571). Confidence is the model's own p(drawn): .5 for A, .45 for B at 0.5,
    so B stays masked (the tempered p of B, .571, would have masked A instead)."""
    logits = torch.tensor([[[.5, .5, 1e-30, 1.0], [.45, .3, .25, 1.0]]]).log()
    logits[..., -1] = 50.0  # the mask token: never chosen
    _fixed_noise(monkeypatch, sample=torch.tensor([[0.48, 0.48]]), confidence=torch.zeros(1, 2))
    ids, mask = torch.tensor([[7, 7]]), torch.ones(1, 2, dtype=torch.bool)
    for temperature, want_ids, want_mask in ((1.0, [0, 1], [False, True]), (0.5, [0, 0], [False, True])):
        new_ids, new_mask = decode_step(logits, ids, mask, mask.sum(1), 0.5, gamma_func("linear"), [None], 4.5,
                                        "sample", sample_temperature=temperature)
        assert new_ids[0].tolist() == want_ids and new_mask[0].tolist() == want_mask, temperature
    with pytest.raises(ValueError, match="sample_temperature must be > 0"):
        InpaintOptions(token_choice="sample", sample_temperature=0.0)


def test_confidence_noise_annealed_and_p_versus_log_p(monkeypatch):
    """Two images of two hole tokens A, B (argmax picks code 0 with probability p); one stays masked
    (linear, N = 2, at r = 1/4 and 3/4). Noise 0 on A, g on B, temperature 2, so A stays masked iff
    s(p_A) - s(p_B) < 2 (1 - r) g, with s = p or log p.
      X: p = .9, .6, g = .5: diff .30 (p), .405 (log p); threshold .75 at r = 1/4, .25 at r = 3/4
      Y: p = .9, .55, g = .8: diff .35 (p), .49 (log p); threshold 1.2 at r = 1/4, .4 at r = 3/4
    Without the (1 - r) annealing X keeps A masked at 3/4; with p and log p swapped Y flips at 3/4."""
    logits = _two_code_logits([[0.9, 0.6], [0.9, 0.55]])
    _fixed_noise(monkeypatch, confidence=torch.tensor([[0.0, 0.5], [0.0, 0.8]]))
    ids, mask = torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool)
    A, B = [True, False], [False, True]
    expected = {("prob", 0.25): [A, A], ("prob", 0.75): [B, A],
                ("logprob", 0.25): [A, A], ("logprob", 0.75): [B, B]}
    for (confidence, r), want in expected.items():
        new_ids, new_mask = decode_step(logits, ids, mask, mask.sum(1), r, gamma_func("linear"), [None, None],
                                        choice_temperature=2.0, confidence=confidence)
        assert new_mask.tolist() == want, (confidence, r)
        assert new_ids.tolist() == [[0, 0], [0, 0]]  # argmax: code 0, never the mask column


class _FixedLogits(torch.nn.Module):
    """A stand-in transformer: the same logits whatever the input; argmax of token n is code n."""
    def forward(self, inputs):
        B, N = inputs.shape
        logits = torch.zeros(B, N, 33)
        logits[:, torch.arange(N), torch.arange(N)] = 5.0
        return logits  # (B, N, V)


def test_halton_order_commits_the_hole_in_halton_order():
    # 4x4 grid, Halton order 6, 9, 3, 4, 14, 1, 11, 12, 2, 5, 0, ... (test_schedules.py); hole = those first
    # eight plus 0 and 15. Linear, T = 4, N = 10: 7, 5, 2, 0 stay masked -> 3, 5, 8, 10 committed
    hole = [6, 9, 3, 4, 14, 1, 11, 12, 0, 15]
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, hole] = True
    ids = torch.full((2, 16), 20)
    res = iterative_decode(_FixedLogits(), ids, mask, gamma_func("linear"), 4, image_noise(0, range(2), "cpu"),
                           32, order="halton")
    committed = [[6, 9, 3], [6, 9, 3, 4, 14], [6, 9, 3, 4, 14, 1, 11, 12], hole]
    for t, want in enumerate(committed):
        done = (mask[0] & ~res.mask_per_step[t][0]).nonzero().flatten().tolist()
        assert sorted(done) == sorted(want), t
    assert res.ids[0, hole].tolist() == hole  # tokens still chosen by argmax (code n at token n)
    assert torch.equal(res.ids[1], ids[1]) and not any(m[1].any() for m in res.mask_per_step)  # no hole: unchanged
    # any hole: the first tokens committed are the hole's first ones in halton_order
    mask = torch.rand(1, 16, generator=torch.Generator().manual_seed(1)) < 0.6
    res = iterative_decode(_FixedLogits(), ids[:1], mask, gamma_func("cosine"), 3, image_noise(0, [0], "cpu"),
                           32, order="halton")
    in_order = [i for i in halton_order(4) if mask[0, i]]
    k = int((mask[0] & ~res.mask_per_step[0][0]).sum())
    assert 1 <= k < len(in_order)
    assert sorted((mask[0] & ~res.mask_per_step[0][0]).nonzero().flatten().tolist()) == sorted(in_order[:k])


def test_cubic_clamp_no_wasted_step_end_to_end():
    """cubic, T = 10 (the issue's case): every step before the last commits at least one token of
    every hole with more than one left, and none unmasks its whole hole early."""
    ids, mask = _mixed_batch()
    res = iterative_decode(_model(), ids, mask, gamma_func("cubic"), 10, image_noise(0, range(6), "cpu"), 32)
    before = mask.sum(1)
    for t, m in enumerate(res.mask_per_step):
        after = m.sum(1)
        if t < 9:
            assert (after >= 1).all() and (after[before > 1] < before[before > 1]).all(), t
        before = after
    assert not res.mask.any()


def test_inpainting_script_writes_lab_outputs(tiny_world, tmp_path):
    import training_transformer as tt
    tt.main(["--train_d_path", tiny_world["train"], "--val_d_path", tiny_world["val"], "--MaskGitConfig",
             tiny_world["config"], "--out_d_path", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
             "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--no-progress"])
    out = tmp_path / "inpaint"
    gt = tmp_path / "gt"
    gt.mkdir()
    for i in (0, 2):  # ground truth for two of the six images
        Image.open(os.path.join(tiny_world["masked_image"], f"image_{i:03d}.png")).save(gt / f"image_{i:03d}.png")
    s = inpainting.main(["--load-transformer-ckpt-path", str(tmp_path / "run" / "transformer_last.pth"),
                         "--MaskGitConfig", tiny_world["config"], "--data", tiny_world["root"], "--mask-func", "cosine",
                         "--total-iter", "5", "--batch-size", "4", "--out-dir", str(out), "--device", "cpu",
                         "--gif", "--report-ids", "0,1", "--gt-path", str(gt), "--unconditional", "3",
                         "--no-progress"])
    assert sorted(os.listdir(out / "test_results")) == [f"image_{i:03d}.png" for i in range(6)] + [
        "inpainting_summary.json"]  # the lab's images, and our run summary beside them
    assert sorted(os.listdir(out / "mask_scheduling")) == sorted(f"test_{i}.png" for i in range(6))
    assert sorted(os.listdir(out / "imga")) == sorted(f"test_{i}.png" for i in range(6))
    assert len(os.listdir(out / "gifs")) == 6 and (out / "report.png").exists()
    assert len([f for f in os.listdir(out / "generated") if f.startswith("image_")]) == 3
    im = Image.open(out / "test_results" / "image_000.png")
    assert im.size == (16, 16) and im.mode == "RGB"
    assert s["gt_matched"] == 2 and (out / "metrics.csv").exists()
    # imga: masked input + one frame per step; mask_scheduling: one 4x4 mask per step (nrow 10)
    assert Image.open(out / "imga" / "test_0.png").size == (2 + 6 * 18, 20)
    assert Image.open(out / "mask_scheduling" / "test_0.png").size == (2 + 5 * 6, 8)
    # our checkpoints carry their config: no --MaskGitConfig needed
    s2 = inpainting.main(["--load-transformer-ckpt-path", str(tmp_path / "run" / "last.pt"), "--data",
                          tiny_world["root"], "--out-dir", str(tmp_path / "o2"), "--device", "cpu", "--no-vis",
                          "--total-iter", "3", "--no-progress"])
    assert s2["images"] == 6
    # --paste-known: the known pixels are the input's exactly, whatever the blend; the holes differ
    outs = {}
    for extra in (["--blend", "hard", "--prefill", "gray"], ["--blend", "seamless"],
                  ["--blend", "biharmonic", "--prefill", "biharmonic"]):
        d = tmp_path / f"paste_{extra[1]}"
        inpainting.main(["--load-transformer-ckpt-path", str(tmp_path / "run" / "last.pt"), "--data",
                         tiny_world["root"], "--out-dir", str(d), "--device", "cpu", "--no-vis", "--total-iter", "3",
                         "--no-progress", "--paste-known", *extra])
        outs[extra[1]] = np.asarray(Image.open(d / "test_results" / "image_001.png"))
    known = np.asarray(Image.open(os.path.join(tiny_world["mask64"], "mask_001.png")).convert("L")) >= 128
    given = np.asarray(Image.open(os.path.join(tiny_world["masked_image"], "image_001.png")).convert("RGB"))
    for out in outs.values():
        assert np.array_equal(out[known], given[known])
    assert not np.array_equal(outs["hard"][~known], outs["seamless"][~known])
    assert not np.array_equal(outs["seamless"][~known], outs["biharmonic"][~known])


SAMPLED = ["model_param.token_choice=sample", "model_param.sample_temperature=0.7"]


def test_order_and_confidence_reach_the_decoder_from_the_cli_and_the_bench(tiny_world, tmp_path, monkeypatch):
    import inspect
    seen, orig = set(), decoding.decode_step
    sig = inspect.signature(orig)

    def spy(*a, **k):
        b = sig.bind(*a, **k)
        b.apply_defaults()
        seen.add((b.arguments["order"], b.arguments["confidence"], b.arguments["token_choice"],
                  b.arguments["sample_temperature"], b.arguments["choice_temperature"]))
        return orig(*a, **k)
    monkeypatch.setattr(decoding, "decode_step", spy)
    torch.save(BidirectionalTransformer(TINY_T).state_dict(), tmp_path / "t.pth")
    base = ["--load-transformer-ckpt-path", str(tmp_path / "t.pth"), "--MaskGitConfig", tiny_world["config"],
            "--data", tiny_world["root"], "--device", "cpu", "--no-vis", "--total-iter", "2", "--no-progress"]
    for extra, want in (([], ("confidence", "prob", "argmax", 1.0, 4.5)),  # the config's choice temperature
                        (["--order", "halton"], ("halton", "prob", "argmax", 1.0, 4.5)),
                        (["--confidence", "logprob"], ("confidence", "logprob", "argmax", 1.0, 4.5)),
                        (["--token-choice", "sample", "--sample-temperature", "0.6"],
                         ("confidence", "prob", "sample", 0.6, 4.5)),
                        (["--token-choice", "sample"], ("confidence", "prob", "sample", 1.0, 4.5)),  # config: none
                        # a config that names a token choice: the default, each flag still overrides its part
                        (["--set", *SAMPLED], ("confidence", "prob", "sample", 0.7, 4.5)),
                        (["--set", *SAMPLED, "--token-choice", "argmax"], ("confidence", "prob", "argmax", 1.0, 4.5)),
                        (["--set", *SAMPLED, "--sample-temperature", "0.3"],
                         ("confidence", "prob", "sample", 0.3, 4.5)),
                        (["--choice-temperature", "2"], ("confidence", "prob", "argmax", 1.0, 2.0)),
                        (["--set", "model_param.choice_temperature=0"], ("confidence", "prob", "argmax", 1.0, 0.0))):
        seen.clear()
        out = tmp_path / "_".join(map(str, want))
        inpainting.main(base + ["--out-dir", str(out)] + extra)
        assert seen == {want}, extra
        with open(out / "test_results" / "inpainting_summary.json") as f:  # the run records what it decoded with
            summary = json.load(f)
        assert (summary["token_choice"], summary["sample_temperature"], summary["choice_temperature"]) == want[2:]
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from run import parse_combos
    combos = parse_combos(None, "cosine:10,exp:4:halton,cosine:10:logprob,linear:8:logprob:halton,"
                                "cosine:10:prefill=biharmonic,cosine:10:sample=0.7,linear:8:sample:halton,"
                                "cosine:10:choice=2:sample=0.4,cosine:10:choice=0,cosine:10:refine=10:sample=0.4")
    assert [(c.options().mask_func, c.options().total_iter, c.options().order, c.options().confidence,
             c.options().prefill, c.options().token_choice, c.options().sample_temperature) for c in combos] == [
        ("cosine", 10, "confidence", "prob", "smooth", "argmax", 1.0),
        ("exp", 4, "halton", "prob", "smooth", "argmax", 1.0),
        ("cosine", 10, "confidence", "logprob", "smooth", "argmax", 1.0),
        ("linear", 8, "halton", "logprob", "smooth", "argmax", 1.0),
        ("cosine", 10, "confidence", "prob", "biharmonic", "argmax", 1.0),
        ("cosine", 10, "confidence", "prob", "smooth", "sample", 0.7),
        ("linear", 8, "halton", "prob", "smooth", "sample", 1.0),
        ("cosine", 10, "confidence", "prob", "smooth", "sample", 0.4),
        ("cosine", 10, "confidence", "prob", "smooth", "argmax", 1.0),
        ("cosine", 10, "confidence", "prob", "smooth", "sample", 0.4)]
    assert [c.choice for c in combos] == [None] * 7 + [2.0, 0.0, None]
    assert [c.options().refine for c in combos] == [0] * 9 + [10]
    assert combos[9].label() == "cosine T=10 sample=0.4 refine=10" and combos[9].dirname().endswith("_refine-10")
    assert combos[4].dirname() == "ours_cosine_T10_prefill-biharmonic"
    assert combos[5].label() == "cosine T=10 sample=0.7" and combos[6].label() == "linear T=8 halton sample=1"
    assert combos[7].label() == "cosine T=10 sample=0.4 choice=2" and combos[8].dirname() == "ours_cosine_T10_choice-0"

    class Parser:
        def error(self, msg):
            raise SystemExit(msg)
    assert parse_combos(None, "none") == []  # the tokenizer's reconstruction only
    for bad in ("cosine:10:prefill=blur", "cosine:10:prefill=gray:prefill=smooth", "cosine:10:biharmonic",
                "cosine:10:sample=0", "cosine:10:sample=x", "cosine:10:sample:sample=0.5", "cosine:10:sample=inf",
                "cosine:10:choice=-1", "cosine:10:choice=x", "cosine:10:choice=1:choice=2", "cosine:10:choice=nan",
                "cosine:10:refine=-1", "cosine:10:refine=x", "cosine:10:refine=1.5", "cosine:10:refine=2:refine=3"):
        with pytest.raises(SystemExit, match="--combos"):
            parse_combos(Parser(), bad)


def test_bench_choice_temperature_and_blends_reach_the_run(lab3, tmp_path, monkeypatch):
    """bench/run.py on two real val images: a combo's choice=C is the choice temperature its decoding runs at,
    a combo without one decodes at the config's (4.5, also after another combo's), and --blends scores only
    the named composites (the FID itself stubbed: this is about what is run)."""
    import models.VQGAN_Transformer as vt
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import run
    seen, current, real_run, real_decode = [], {}, run.run_inpainting, vt.iterative_decode

    def spy(model, ds, d, opts, *a, **k):
        current.clear()
        out = real_run(model, ds, d, opts, *a, **k)
        seen.append((current["choice"], model.choice_temperature, opts.token_choice, opts.sample_temperature))
        return out

    def decode_spy(*a, **k):  # the choice temperature iterative_decode is called with (its 8th argument)
        assert current.setdefault("choice", a[7]) == a[7]  # one value per combo
        return real_decode(*a, **k)
    monkeypatch.setattr(run, "run_inpainting", spy)
    monkeypatch.setattr(vt, "iterative_decode", decode_spy)
    monkeypatch.setattr(run, "compute_fid", lambda *a, **k: 0.0)
    rows = run.main(["--sets", "val-unseen", "--n", "2", "--combos", "cosine:2:choice=0,cosine:2:sample=0.4,"
                     "cosine:2:choice=9", "--blends", "biharmonic", "--skip-speed", "--only-ours", "--device", "cpu",
                     "--data", lab3, "--out", str(tmp_path)])
    # decoded at 0 / the config's / 9; the model's own value (its config's) never changed
    assert seen == [(0.0, 4.5, "argmax", 1.0), (4.5, 4.5, "sample", 0.4), (9.0, 4.5, "argmax", 1.0)]
    assert [r["protocol"] for r in rows] == ["no holes"] + ["lab (no paste)", "composited, biharmonic"] * 3
    assert all(r["images"] == 2 for r in rows)
    with pytest.raises(SystemExit):
        run.main(["--blends", "poisson"])


def test_bench_seeds_spread():
    """bench/run.py --seeds: parsed strictly, passed to the decoding options, and summarised per
    (set, method, protocol) with the sample standard deviation (checked against statistics.stdev)."""
    import statistics
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from run import Combo, parse_seeds, seed_summary

    class Parser:
        def error(self, msg):
            raise SystemExit(msg)
    assert parse_seeds(Parser(), "0, 1,2") == [0, 1, 2]
    for bad in ("", "0,0", "1,-2", "a"):
        with pytest.raises(SystemExit, match="--seeds"):
            parse_seeds(Parser(), bad)
    assert Combo("cosine", 10).options(3).seed == 3 and Combo("cosine", 10).options().seed == 0
    fids, psnrs = [46.9, 45.2, 47.4], [16.2, 16.0, 16.5]
    rows = [{"set": "test", "method": "ours cosine T=10", "protocol": "lab (no paste)", "FID": f, "psnr_hole": p,
             "seed": s} for s, (f, p) in enumerate(zip(fids, psnrs))]
    rows += [{"set": "test", "method": "ours cosine T=10", "protocol": "composited", "FID": 20.0, "psnr_hole": 1.0,
              "seed": 0},  # one seed only: no spread row
             {"set": "test", "method": "OpenCV Telea", "protocol": "composited", "FID": 18.5, "psnr_hole": 20.3}]
    (row,) = seed_summary(rows)
    assert (row["protocol"], row["seeds"], row["FID min"], row["FID max"]) == ("lab (no paste)", 3, 45.2, 47.4)
    assert row["FID mean"] == pytest.approx(statistics.mean(fids))
    assert row["FID std"] == pytest.approx(statistics.stdev(fids))
    assert row["hole PSNR std"] == pytest.approx(statistics.stdev(psnrs))


def test_inpainting_clear_errors(tiny_world, tmp_path):
    from utils.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="transformer checkpoint not found"):
        inpainting.main(["--load-transformer-ckpt-path", str(tmp_path / "none.pth"), "--MaskGitConfig",
                         tiny_world["config"], "--data", tiny_world["root"], "--device", "cpu"])
    big = BidirectionalTransformer(dict(TINY_T, n_layers=3)).state_dict()
    torch.save(big, tmp_path / "big.pth")
    with pytest.raises(ValueError, match=r"big.pth.*unexpected keys"):
        inpainting.main(["--load-transformer-ckpt-path", str(tmp_path / "big.pth"), "--MaskGitConfig",
                         tiny_world["config"], "--data", tiny_world["root"], "--device", "cpu"])
    os.remove(os.path.join(tiny_world["mask64"], "mask_005.png"))
    torch.save(BidirectionalTransformer(TINY_T).state_dict(), tmp_path / "ok.pth")
    with pytest.raises(ValueError, match="6 masked images .* but 5 masks"):
        inpainting.main(["--load-transformer-ckpt-path", str(tmp_path / "ok.pth"), "--MaskGitConfig",
                         tiny_world["config"], "--data", tiny_world["root"], "--device", "cpu"])


@pytest.mark.gpu
def test_cuda_bf16_batched_equals_batch_one():
    from utils.runtime import autocast
    ids, mask = _mixed_batch(B=6, seed=4)
    m = _model(2).cuda()
    ids, mask = ids.cuda(), mask.cuda()
    ctx = lambda: autocast(torch.device("cuda"), "bf16")  # noqa: E731
    full = iterative_decode(m, ids, mask, gamma_func("cosine"), 8, image_noise(1, range(6), "cuda"), 32,
                            autocast_ctx=ctx)
    assert not full.mask.any() and torch.equal(full.ids[~mask], ids[~mask])
    same = sum(torch.equal(iterative_decode(m, ids[b:b + 1], mask[b:b + 1], gamma_func("cosine"), 8,
                                            image_noise(1, [b], "cuda"), 32, autocast_ctx=ctx).ids[0], full.ids[b])
               for b in range(6))
    assert same >= 5  # bf16 kernels may differ by batch size; rare argmax ties can flip


def test_bench_seed_loop_does_the_same_work_as_ours(tiny_cfg):
    """bench/decode_throughput.py times the lab's seed loop (re-encode + decode every step) against
    our batched path; the ratio is only fair if both produce the same images."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from decode_throughput import seed_loop_image

    from utils.build import build_maskgit
    from utils.data import TEST_MEAN, TEST_STD, denormalize
    from utils.inpaint import InpaintOptions, inpaint_batch

    torch.manual_seed(0)
    model = build_maskgit(tiny_cfg, load_vqgan=False).eval()
    for p in model.transformer.parameters():  # sharp logits, so the decoded tokens depend on the input
        p.data.normal_(0, 0.3)
    x = torch.randn(4, 3, 16, 16)
    pm = torch.ones(4, 1, 16, 16)
    for b, (y, w) in enumerate([(0, 4), (4, 8), (2, 12), (8, 16)]):
        pm[b, :, y:y + 6, 2:2 + w] = 0
    x = x * pm
    opts = InpaintOptions(total_iter=6, prefill="gray")  # the seed encodes the gray-holed image
    out, res, _, steps = inpaint_batch(model, x, pm, range(4), opts, "cpu", with_steps=True)
    out_only, res_only, _, none = inpaint_batch(model, x, pm, range(4), opts, "cpu")
    assert none is None and steps.shape == (4, 6, 3, 16, 16)
    assert torch.equal(res.ids, res_only.ids)
    torch.testing.assert_close(out, out_only, atol=1e-5, rtol=0)  # final image = last step's decode
    torch.testing.assert_close(steps[:, -1], out, atol=0, rtol=0)
    for b in range(4):
        seed_img = denormalize(seed_loop_image(model, x[b:b + 1], pm[b:b + 1], b, 6), TEST_MEAN, TEST_STD)
        torch.testing.assert_close(seed_img[0], out[b], atol=1e-5, rtol=0)


def test_choice_temperature_option_decodes_as_the_config_would_and_changes_no_model(tiny_cfg):
    """InpaintOptions.choice_temperature C decodes exactly as a model whose config says C (the independent
    route), leaves the model's own value alone, and None means the config's; C must be a finite number >= 0."""
    from utils.build import build_maskgit
    from utils.inpaint import InpaintOptions, generate_images, inpaint_batch

    torch.manual_seed(0)
    model = build_maskgit(tiny_cfg, load_vqgan=False).eval()
    x = torch.randn(4, 3, 16, 16)
    pm = torch.ones(4, 1, 16, 16)
    pm[:, :, 2:14, 2:14] = 0

    def tokens(opts):
        return inpaint_batch(model, x, pm, range(4), opts, "cpu")[1].ids, generate_images(model, 4, opts, "cpu")[1].ids

    by_option = {c: tokens(InpaintOptions(total_iter=4, token_choice="sample", choice_temperature=c))
                 for c in (0.0, 30.0)}
    assert model.choice_temperature == 4.5
    for c, (ids, gen) in by_option.items():
        model.choice_temperature = c
        want_ids, want_gen = tokens(InpaintOptions(total_iter=4, token_choice="sample"))
        assert torch.equal(ids, want_ids) and torch.equal(gen, want_gen), c
    for a, b in zip(by_option[0.0], by_option[30.0]):  # the option reaches both decodings at all
        assert not torch.equal(a, b)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="choice_temperature must be None or a finite number >= 0"):
            InpaintOptions(choice_temperature=bad)


@pytest.mark.parametrize("bad", [{"prefill": "blur"}, {"blend": "poisson"}, {"confidence": "logit"},
                                 {"order": "raster"}])
def test_inpaint_options_reject_unknown_prefill_or_blend(bad):
    from utils.inpaint import InpaintOptions
    with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
        InpaintOptions(**bad)


def test_bench_scores_a_given_transformer_checkpoint(tiny_world, tmp_path):
    """bench/run.py --transformer-ckpt: the scored model is that checkpoint's transformer, built from
    the config it stores (a tiny one, not the bundled or the lab's), with the tokenizer of
    --vqgan-ckpt; without it, the bundled small models."""
    import types
    import training_transformer as tt
    from utils.checkpoint import load_checkpoint
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from run import load_model
    tt.main(["--train_d_path", tiny_world["train"], "--val_d_path", tiny_world["val"], "--MaskGitConfig",
             tiny_world["config"], "--out_d_path", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
             "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--no-progress"])
    ckpt = str(tmp_path / "run" / "transformer_last.pth")
    args = types.SimpleNamespace(transformer_ckpt=ckpt, config=None, vqgan_ckpt=tiny_world["vqgan"])
    model = load_model(args)
    assert not model.training and model.transformer.cfg.dim == TINY_T["dim"]
    stored = load_checkpoint(ckpt, "transformer checkpoint")
    weights = stored.get("state_dict", stored) if isinstance(stored, dict) else stored
    for name, p in model.transformer.state_dict().items():
        torch.testing.assert_close(p, weights[name].to(p.dtype), atol=0, rtol=0, msg=name)
    vq = torch.load(tiny_world["vqgan"], map_location="cpu", weights_only=True)
    vq_sd = vq.get("state_dict", vq)
    k = next(k for k in model.vqgan.state_dict() if k in vq_sd)
    torch.testing.assert_close(model.vqgan.state_dict()[k], vq_sd[k].float(), atol=0, rtol=0)
    bundled = load_model(types.SimpleNamespace(transformer_ckpt=None, config=None, vqgan_ckpt=None))
    assert (bundled.transformer.cfg.dim, bundled.transformer.cfg.n_layers) == (256, 8)  # MaskGit_small.yml
    from utils.cli import UserError
    from utils.build import BUNDLED_TRANSFORMER
    bare = load_checkpoint(os.path.join(ROOT, BUNDLED_TRANSFORMER), "transformer checkpoint")
    no_config = str(tmp_path / "raw_state_dict.pth")  # a lab-style raw state dict stores no config: the YAML
    torch.save(dict(bare), no_config)  # must be named, not guessed (a plain dict: no _metadata config)
    with pytest.raises(UserError, match="stores no config.*--config.*config/MaskGit_small.yml"):
        load_model(types.SimpleNamespace(transformer_ckpt=no_config, config=None, vqgan_ckpt=tiny_world["vqgan"]))
    with pytest.raises(UserError, match="needs --vqgan-ckpt"):
        load_model(types.SimpleNamespace(transformer_ckpt=ckpt, config=None, vqgan_ckpt=None))


def test_bench_scores_a_tokenizer_of_another_architecture(tmp_path):
    """bench/run.py --vqgan-ckpt with the bundled transformer (gpu_session.sh score-tok: a tokenizer
    scored alone): a file of ours is built as the config it stores says (here the narrow decoder of
    VQGAN_small.yml, not the bundled 1.5x one) with its weights, bit for bit; a file without a config
    (a lab-style raw dict) of another architecture is refused naming the file."""
    import types
    from models import VQGAN
    from models.convert import CheckpointLayoutError
    from utils.checkpoint import lab_state_dict
    from utils.config import load_yaml
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from run import load_model
    cfg = load_yaml(os.path.join(ROOT, "models/VQGAN/config/VQGAN_small.yml"))["model_param"]
    torch.manual_seed(3)
    vq = VQGAN(cfg)
    ours = str(tmp_path / "vqgan.pt")
    torch.save(lab_state_dict(vq, vq.cfg.to_dict()), ours)
    model = load_model(types.SimpleNamespace(transformer_ckpt=None, config=None, vqgan_ckpt=ours))
    assert model.vqgan.cfg.dec_channels == list(cfg["dec_channels"]) != [48, 96, 192]
    for name, p in vq.state_dict().items():
        torch.testing.assert_close(model.vqgan.state_dict()[name], p, atol=0, rtol=0, msg=name)
    bare = str(tmp_path / "VQGAN.pt")
    torch.save(dict(vq.state_dict()), bare)  # no _metadata: the bundled config is assumed, and does not fit
    with pytest.raises(CheckpointLayoutError, match="VQGAN.pt does not fit"):
        load_model(types.SimpleNamespace(transformer_ckpt=None, config=None, vqgan_ckpt=bare))


def _refine_case(B=3, seed=0, **vq):
    """A tiny tokenizer (4x4 tokens of 16x16 images), B images, their pixel masks (1 = known) and random tokens."""
    from models import VQGAN
    torch.manual_seed(seed)
    model = VQGAN(dict(TINY_VQ, **vq)).eval()
    x, ids = torch.randn(B, 3, 16, 16), torch.randint(0, 32, (B, 16))
    pm = (torch.rand(B, 1, 16, 16) > 0.4).float()
    return model, x, pm, ids


def test_refine_decode_reaches_the_least_squares_latent_of_a_linear_decoder(monkeypatch):
    """With a decoder that copies each latent cell to its 4x4 pixel block (3 latent channels), the known-pixel MSE
    is minimised by the mean of each block's known pixels, in closed form: the fit reaches it, a block with no
    known pixel keeps its code exactly, and so does every block of an image with no known pixel."""
    from utils.inpaint import refine_decode
    vq, x, pm, ids = _refine_case(B=3, latent_dim=3)
    pm[:, :, :4, :4] = 0  # block (0, 0) fully in the hole
    pm[2] = 0  # image 2: nothing known
    monkeypatch.setattr(vq, "decode", lambda z: torch.nn.functional.interpolate(z, scale_factor=4, mode="nearest"))
    code = vq.codebook.lookup(ids, 4, 4).detach()
    block_known = torch.nn.functional.avg_pool2d(pm, 4)  # (B, 1, 4, 4) share of known pixels per block
    want = torch.where(block_known > 0, torch.nn.functional.avg_pool2d(x * pm, 4) / block_known.clamp_min(1e-8), code)
    got = refine_decode(vq, ids, x, pm, 400)[:, :, ::4, ::4]  # one pixel per block
    assert torch.allclose(got[:2], want[:2], atol=2e-3)
    assert torch.equal(got[:, :, 0, 0], code[:, :, 0, 0]) and torch.equal(got[2], code[2])


def test_refine_decode_fits_the_known_pixels_and_leaves_the_model_alone():
    """On a real (tiny) tokenizer: the known pixels' error falls well below the plain decode of the same tokens;
    0 steps is the plain decode; the weights, their requires_grad and their (absent) gradients are as before; an
    image's result does not depend on the batch around it."""
    from utils.inpaint import refine_decode
    vq, x, pm, ids = _refine_case(B=4)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    with torch.no_grad():
        plain = vq.decode_indices(ids)

    def err(y):
        return ((y - x).pow(2) * pm).flatten(1).sum(1) / pm.flatten(1).sum(1)
    fitted = refine_decode(vq, ids, x, pm, 30)
    assert (err(fitted) < 0.7 * err(plain)).all() and not fitted.requires_grad
    assert torch.equal(refine_decode(vq, ids, x, pm, 0), plain)
    assert all(torch.equal(v, before[k]) for k, v in vq.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in vq.parameters())
    for i in (0, 3):
        alone = refine_decode(vq, ids[i:i + 1], x[i:i + 1], pm[i:i + 1], 30)
        assert torch.allclose(alone, fitted[i:i + 1], atol=1e-4)


def test_refine_option_keeps_the_tokens_and_refits_only_the_final_image(tiny_cfg):
    """inpaint_batch with refine: the same tokens as without, the final image (also the last step's) is
    refine_decode's of them, the earlier steps' images are the plain decodes; a bad step count is an error."""
    from utils.build import build_maskgit
    from utils.data import TEST_MEAN, TEST_STD, denormalize
    from utils.inpaint import inpaint_batch, refine_decode

    torch.manual_seed(0)
    model = build_maskgit(tiny_cfg, load_vqgan=False).eval()
    x = torch.randn(2, 3, 16, 16)
    pm = torch.ones(2, 1, 16, 16)
    pm[:, :, 4:12, 2:14] = 0
    plain = inpaint_batch(model, x, pm, range(2), InpaintOptions(total_iter=3), "cpu", with_steps=True)
    fit = inpaint_batch(model, x, pm, range(2), InpaintOptions(total_iter=3, refine=5), "cpu", with_steps=True)
    assert torch.equal(plain[1].ids, fit[1].ids)
    want = denormalize(refine_decode(model.vqgan, fit[1].ids, x, pm, 5), TEST_MEAN, TEST_STD)
    assert torch.allclose(fit[0], want, atol=1e-6) and torch.allclose(fit[3][:, -1], want, atol=1e-6)
    assert torch.equal(fit[3][:, :-1], plain[3][:, :-1]) and not torch.allclose(fit[0], plain[0], atol=1e-3)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="refine must be a whole number of steps >= 0"):
            InpaintOptions(refine=bad)
