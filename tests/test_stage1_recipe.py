"""Stage-1 recipe: the training step, budget probe, resume state, codebook paths and GAN terms of
train_vqgan.py and models/VQGAN/training.py, each against a closed form or a direct computation.
Written from a mutation pass: every test here fails on a plausible bug that tests/test_stage1.py
lets through (47 mutations tried, all caught by the two files together)."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train_vqgan
from conftest import TINY_VQ
from models import VQGAN
from models.VQGAN.training import EMACodebook, restart_dead_codes
from utils.data import TRAIN_MEAN, TRAIN_STD

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _args(*argv):
    args = train_vqgan.parse_args(["--device", "cpu", "--no-progress", *argv])
    args.precision = "fp32"
    return args


def _stage1(*argv, norm=False):
    torch.manual_seed(0)
    args = _args(*argv)
    return train_vqgan.build(args, {**TINY_VQ, "codebook_norm": norm}, CPU), args


def _images(n=2, seed=0):
    """Normalized images (n, 3, 16, 16) of [0, 1] pixels."""
    u = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    m, s = torch.tensor(TRAIN_MEAN).view(1, 3, 1, 1), torch.tensor(TRAIN_STD).view(1, 3, 1, 1)
    return (u - m) / s


def _to01(x):
    """Normalized -> [0, 1] with the training statistics, written out here (not utils.data)."""
    m = torch.tensor(TRAIN_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(TRAIN_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (x.double() * s + m).clamp(0, 1)


def _ssim_mean_direct(x, y, window, sigma=1.5):
    """Mean SSIM by explicit loops over pixels (Gaussian window, reflect padding, K1 0.01, K2 0.03), float64."""
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - window // 2) ** 2) / (2 * sigma ** 2))
    w = torch.outer(g, g) / g.sum() ** 2
    r = window // 2
    xp, yp = F.pad(x, (r,) * 4, mode="reflect"), F.pad(y, (r,) * 4, mode="reflect")
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            px, py = xp[:, :, i:i + window, j:j + window], yp[:, :, i:i + window, j:j + window]
            mx, my = (px * w).sum((-1, -2)), (py * w).sum((-1, -2))
            vx, vy = (px * px * w).sum((-1, -2)) - mx ** 2, (py * py * w).sum((-1, -2)) - my ** 2
            cxy = (px * py * w).sum((-1, -2)) - mx * my
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return torch.stack(vals).mean()


# ---- models/VQGAN/training.py ----

def test_ema_codebook_laplace_smoothing_closed_form():
    """code_k = m_k / N~_k with N~_k = (N_k + eps) / (sum N + K eps) * sum N; an empty code stays finite."""
    K, d, eps = 3, 0.5, 0.25  # a large eps makes the smoothing visible
    cb = EMACodebook(torch.nn.Embedding(K, 2), decay=d, eps=eps)
    N0 = torch.tensor([2.0, 4.0, 0.0], dtype=torch.float64)
    m0 = torch.tensor([[2.0, 2.0], [4.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    cb.cluster_size.copy_(N0)
    cb.embed_sum.copy_(m0)
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 8.0]])
    cb.update(z, torch.tensor([0, 0, 1]))
    N = d * N0 + (1 - d) * torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    m = d * m0 + (1 - d) * torch.tensor([[4.0, 2.0], [0.0, 8.0], [0.0, 0.0]], dtype=torch.float64)
    smoothed = (N + eps) / (N.sum() + K * eps) * N.sum()
    torch.testing.assert_close(cb.weight.double(), m / smoothed[:, None], rtol=1e-6, atol=1e-6)
    assert torch.isfinite(cb.weight).all()


def test_ema_codebook_kmeans_init_statistics():
    """After init_kmeans on two separated clusters each code is the mean of its points, N_k is the
    number of its points and m_k = N_k code_k, so a following EMA step starts from those sums."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 3, generator=g) * 0.1 + torch.tensor([5.0, 0.0, 0.0])
    b = torch.randn(10, 3, generator=g) * 0.1 + torch.tensor([0.0, 5.0, 0.0])
    z = torch.cat([a, b])
    cb = EMACodebook(torch.nn.Embedding(2, 3), decay=0.5, eps=1e-12)
    cb.init_kmeans(z, torch.Generator().manual_seed(0))
    ia = torch.cdist(a.mean(0, keepdim=True), cb.weight).argmin().item()
    assert {ia, 1 - ia} == {0, 1}
    torch.testing.assert_close(cb.weight[ia], a.mean(0))
    torch.testing.assert_close(cb.weight[1 - ia], b.mean(0))
    torch.testing.assert_close(cb.cluster_size[[ia, 1 - ia]], torch.tensor([30.0, 10.0]))
    torch.testing.assert_close(cb.embed_sum[[ia, 1 - ia]], torch.stack([a.sum(0), b.sum(0)]))
    # one more EMA step with the same batch leaves the codes where they are
    idx = torch.tensor([ia] * 30 + [1 - ia] * 10)
    cb.update(z, idx)
    torch.testing.assert_close(cb.weight[[ia, 1 - ia]], torch.stack([a.mean(0), b.mean(0)]))


def test_kmeans_empty_cluster_keeps_its_centre():
    """Duplicated points give duplicated seeds; the copies that win no point keep their centre
    (a data point), they are not moved to the origin."""
    from models.VQGAN.training import kmeans
    z = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    centres, counts = kmeans(z, 4, 5, torch.Generator().manual_seed(0))  # k = M: every row is a seed
    assert sorted(counts.tolist()) == [0.0, 0.0, 1.0, 3.0]
    assert torch.cdist(centres, z.unique(dim=0)).min(1).values.max() < 1e-6
    centres, counts = kmeans(z[:2], 5, 3, torch.Generator().manual_seed(0))  # k > M: seeds drawn with replacement
    torch.testing.assert_close(centres, torch.ones(5, 2))
    assert counts.sum() == 2


def test_gradient_restart_puts_codes_next_to_latents():
    """Restarted codes are batch latents plus noise of 1% of the latents' std."""
    z = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)) * 3
    emb = torch.nn.Embedding(32, 8)
    counts = torch.zeros(32, dtype=torch.long)
    counts[:4] = 1
    assert restart_dead_codes(emb, counts, z, torch.Generator().manual_seed(1)) == 28
    nearest = torch.cdist(emb.weight.detach()[4:], z).min(1).values  # (28,)
    # |noise| of 8 standard normals stays far below 8 (chi(8) tail); 1% of std 3 times 8 = 0.24
    assert nearest.max() < 0.08 * z.std()


# ---- the l2-normalised codebook (models/VQGAN/vqgan.py) ----

def test_normalised_codebook_forward_closed_form():
    """With codebook_norm the forward pass quantizes unit latents to unit codes (highest cosine):
    z_q = normalize(e)[idx], loss = (1 + beta) * mse(normalize(e)[idx], normalize(z))."""
    m = VQGAN({**TINY_VQ, "codebook_norm": True})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.codebook.embedding.weight.copy_(torch.randn(32, 8, generator=g) * torch.linspace(0.1, 3, 32)[:, None])
    z = torch.randn(2, 8, 4, 4, generator=g) * 5
    z_q, idx, loss = m.codebook(z)
    zu = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8).double(), dim=1)
    eu = F.normalize(m.codebook.embedding.weight.detach().double(), dim=1)
    assert torch.equal(idx, (zu @ eu.t()).argmax(1))
    expect = eu[idx]  # (32, 8)
    torch.testing.assert_close(z_q.permute(0, 2, 3, 1).reshape(-1, 8).double(), expect, rtol=1e-5, atol=1e-5)
    beta = TINY_VQ["beta"]
    torch.testing.assert_close(loss.double(), (1 + beta) * (expect - zu).pow(2).mean(), rtol=1e-5, atol=1e-7)


def test_normalised_codebook_search_is_scale_invariant():
    """The cosine search must not depend on the latents' norm: encoder latents scaled by 1e4 (where
    ||z||^2 would swamp the cross term in fp32 if z were not projected first) pick the same codes."""
    m = VQGAN({**TINY_VQ, "codebook_norm": True})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.codebook.embedding.weight.copy_(torch.randn(32, 8, generator=g))
    z = torch.randn(200, 8, generator=g)
    cos = F.normalize(z.double(), dim=1) @ F.normalize(m.codebook.embedding.weight.detach().double(), dim=1).t()
    for scale in (1e-3, 1.0, 1e4):
        assert torch.equal(m.codebook.quantize_indices(z * scale), cos.argmax(1)), scale


# ---- train_vqgan.py ----

def test_ema_codebook_is_not_in_the_generator_optimizer():
    st, args = _stage1("--ema-codebook", "0.9", "--steps", "10")
    weight = st.model.codebook.embedding.weight
    in_opt = {id(p) for group in st.opt_g.param_groups for p in group["params"]}
    assert id(weight) not in in_opt
    assert in_opt == {id(p) for p in st.model.parameters() if p is not weight}
    before = weight.detach().clone()
    train_vqgan.generator_step(st, _images(), args, CPU)
    assert torch.equal(weight, before)  # only the EMA update moves it


def test_ssim_term_is_computed_on_01_pixels_with_the_chosen_window():
    st, args = _stage1("--l1-weight", "0", "--l2-weight", "0", "--ssim-weight", "2", "--ssim-window", "3", "--steps", "10")
    x = _images()
    out = train_vqgan.generator_step(st, x, args, CPU)
    expect = 2 * (1 - _ssim_mean_direct(_to01(out["xr"]), _to01(x), 3))
    assert out["rec"].item() == pytest.approx(expect.item(), rel=1e-5, abs=1e-6)


def test_adaptive_gan_weight_closed_form():
    """gan_w = disc_weight * ||d rec / d W|| / (||d g_gan / d W|| + 1e-4), W the decoder's last conv."""
    st, args = _stage1("--disc-start", "0", "--disc-weight", "0.3", "--l2-weight", "0.5", "--steps", "10")
    x = _images()
    m = st.model
    last = m.decoder.model[-1]
    assert isinstance(last, torch.nn.Conv2d) and last.out_channels == 3
    z_q, _, _ = m.codebook(m.quant_conv(m.encoder(x)))
    xr = m.decode(z_q)
    rec = (xr - x).abs().mean() + 0.5 * (xr - x).pow(2).mean()
    g_gan = -st.disc(xr).mean()  # hinge generator loss
    g_rec = torch.autograd.grad(rec, last.weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_gan, last.weight)[0]
    expect = 0.3 * g_rec.norm() / (g_adv.norm() + 1e-4)
    out = train_vqgan.generator_step(st, x, args, CPU)
    assert out["use_disc"]
    assert out["gan_w"].item() == pytest.approx(expect.item(), rel=1e-4)


def test_discriminator_step_adds_the_weighted_lecam_term():
    st, args = _stage1("--lecam-weight", "0.3", "--disc-start", "0", "--steps", "10")
    x = _images(seed=0)
    xr = _images(seed=1)
    with torch.no_grad():
        real, fake = st.disc(x).double(), st.disc(xr).double()
    hinge = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    a_real, a_fake = 0.01 * real.mean(), 0.01 * fake.mean()  # EMAs (decay 0.99) after one step from 0
    reg = F.relu(real - a_fake).pow(2).mean() + F.relu(a_real - fake).pow(2).mean()
    d_loss = train_vqgan.discriminator_step(st, x, xr, args, CPU)
    assert d_loss.item() == pytest.approx((hinge + 0.3 * reg).item(), rel=1e-5)


def _hooked_features(disc, x):
    """The discriminator's activations after each LeakyReLU, read by forward hooks (not by
    PatchDiscriminator.features), and its logits."""
    feats = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: feats.append(out.clone()))
             for m in disc.modules() if isinstance(m, torch.nn.LeakyReLU)]
    logits = disc(x)
    for h in hooks:
        h.remove()
    return feats, logits


def test_discriminator_features_are_its_hidden_activations_and_logits():
    from models.VQGAN.discriminator import PatchDiscriminator
    torch.manual_seed(0)
    disc = PatchDiscriminator(base=8)
    x = _images(3)
    feats = disc.features(x)
    ref, logits = _hooked_features(disc, x)
    assert len(feats) == len(ref) + 1 == 4  # 3 LeakyReLUs of the default n_layers=3, then the logits
    assert all(torch.equal(a, b) for a, b in zip(feats, ref)) and torch.equal(feats[-1], logits)


def test_feature_matching_loss_against_a_direct_computation():
    from models.VQGAN.discriminator import PatchDiscriminator, feature_matching_loss
    torch.manual_seed(0)
    disc = PatchDiscriminator(base=8)
    x, xr = _images(2, seed=0), _images(2, seed=1)
    (real, _), (fake, _) = _hooked_features(disc, x), _hooked_features(disc, xr)
    expect = sum((f.double() - r.double()).abs().sum() / f.numel() for r, f in zip(real, fake)) / len(real)
    got = feature_matching_loss(disc.features(x), disc.features(xr))
    assert got.item() == pytest.approx(expect.item(), rel=1e-6)
    assert feature_matching_loss(disc.features(x), disc.features(x)).item() == 0.0
    x.requires_grad_(True)
    xr.requires_grad_(True)
    feature_matching_loss(disc.features(x), disc.features(xr)).backward()
    params = list(disc.parameters())
    assert xr.grad.abs().sum() > 0 and all(p.grad is not None for p in params[:-2])
    assert x.grad is None  # the real activations are targets
    assert params[-2].grad is None and params[-1].grad is None  # the logits layer is left out


def test_r1_penalty_closed_forms():
    from models.VQGAN.discriminator import r1_penalty
    x = torch.randn(3, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    # D(x) = x^2 per pixel, 60 "patch logits" per image: the score's gradient is 2x / 60
    assert r1_penalty(lambda t: t.pow(2), x).item() == pytest.approx(
        (4 / 60 ** 2) * x.pow(2).sum((1, 2, 3)).mean().item(), rel=1e-6)
    # a 1x1 convolution w, 20 patches: every pixel's gradient is w / 20, so 20 ||w||^2 / 400 for every image
    conv = torch.nn.Conv2d(3, 1, 1)
    assert r1_penalty(conv, x).item() == pytest.approx(conv.weight.pow(2).sum().item() / 20, rel=1e-6)
    r1_penalty(conv, x).backward()  # differentiable in the discriminator's weights: d/dw = 2 w / 20
    assert torch.allclose(conv.weight.grad, conv.weight.detach() / 10, rtol=1e-5)


def test_discriminator_step_adds_lazy_r1_on_schedule(monkeypatch):
    import copy
    st, args = _stage1("--r1-weight", "2.0", "--r1-every", "4", "--disc-start", "3", "--steps", "20")
    x, xr = _images(seed=0), _images(seed=1)
    first = copy.deepcopy(st.disc)
    # step 3 is the first GAN step: R1 is applied, scaled by gamma / 2 * every = 4
    st.step = 3
    d_loss = train_vqgan.discriminator_step(st, x, xr, args, CPU)
    real, fake = first(x), first(xr)
    hinge = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    assert d_loss.item() == pytest.approx(hinge.item(), rel=1e-5)  # the returned loss leaves R1 out
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(first(xg).mean((1, 2, 3)).sum(), xg, create_graph=True)
    (hinge + 4.0 * g.pow(2).flatten(1).sum(1).mean()).backward()
    for p_ref, p in zip(first.parameters(), st.disc.parameters()):
        assert torch.allclose(p.grad, p_ref.grad, rtol=1e-4, atol=1e-7)
    calls = []
    monkeypatch.setattr(train_vqgan, "r1_penalty", lambda disc, x: calls.append(st.step) or torch.zeros(()))
    for step in range(3, 16):
        st.step = step
        train_vqgan.discriminator_step(st, x, xr, args, CPU)
    assert calls == [3, 7, 11, 15]


def test_generator_step_adds_the_weighted_feature_matching_term():
    x = _images(seed=0)
    outs = {}
    for w in ("0", "2.5"):
        st, args = _stage1("--fm-weight", w, "--disc-start", "0", "--steps", "10")
        with torch.no_grad():
            (real, _), (fake, _) = _hooked_features(st.disc, x), _hooked_features(st.disc, st.model(x)[0])
        expect = sum((f - r).abs().mean() for r, f in zip(real, fake)) / len(real)
        outs[w] = train_vqgan.generator_step(st, x, args, CPU)
        if w != "0":
            assert outs[w]["fm"].item() == pytest.approx(expect.item(), rel=1e-5)
    assert outs["0"]["fm"].item() == 0.0
    assert outs["2.5"]["gan_w"].item() == pytest.approx(outs["0"]["gan_w"].item(), rel=1e-5)
    assert (outs["2.5"]["loss"] - outs["0"]["loss"]).item() == pytest.approx(2.5 * outs["2.5"]["fm"].item(), rel=1e-4)


def _codebook_state(step: int):
    """What codebook_step reads: a gradient-codebook tiny VQGAN at ``step`` of 100, restarts every 10
    steps, and a batch of latents (2, D, 4, 4). Returns (state, args, z_e)."""
    st = SimpleNamespace(model=VQGAN(TINY_VQ), counts=torch.zeros(32, dtype=torch.long), ema_codebook=None,
                         gen=torch.Generator().manual_seed(0), step=step, total_steps=100)
    return st, SimpleNamespace(restart_every=10, train_part="all"), torch.randn(2, TINY_VQ["latent_dim"], 4, 4)


def test_codebook_step_restarts_on_schedule_and_resets_counts():
    st, args, z_e = _codebook_state(9)
    codes = torch.zeros(32, dtype=torch.long)  # every latent assigned to code 0
    assert train_vqgan.codebook_step(st, z_e, codes, args) is None and st.counts[0] == 32  # not a restart step
    st.step = 10
    assert train_vqgan.codebook_step(st, z_e, codes, args) == 31  # all codes but 0 were unused
    assert st.counts.sum() == 0  # usage starts again after a restart
    st.step = 95  # no restarts in the last 10% of training
    assert train_vqgan.codebook_step(st, z_e, codes, args) is None


def test_a_decoder_finetune_never_restarts_codes():
    st, args, z_e = _codebook_state(10)  # a restart step
    args.train_part = "decoder"
    before = st.model.codebook.embedding.weight.detach().clone()
    assert train_vqgan.codebook_step(st, z_e, torch.zeros(32, dtype=torch.long), args) is None
    assert torch.equal(st.model.codebook.embedding.weight, before) and st.counts[0] == 32  # usage still counted


def test_usage_counts_accumulate_between_restarts():
    """A code used on any step since the last restart is alive, not only one used on the restart step."""
    st, args, z_e = _codebook_state(9)
    m = st.model
    before = m.codebook.embedding.weight.detach().clone()
    assert train_vqgan.codebook_step(st, z_e, torch.zeros(32, dtype=torch.long), args) is None
    st.step = 10
    assert train_vqgan.codebook_step(st, z_e, torch.ones(32, dtype=torch.long), args) == 30
    after = m.codebook.embedding.weight.detach()
    assert torch.equal(after[:2], before[:2]) and not torch.equal(after[2:], before[2:])


def test_no_restart_in_the_last_tenth_of_training():
    """Restart steps (multiples of restart_every) before 90% of the total restart; from 90% on they do not."""
    st, args, z_e = _codebook_state(80)
    m = st.model
    codes = torch.zeros(32, dtype=torch.long)
    assert train_vqgan.codebook_step(st, z_e, codes, args) == 31  # step 80 < 90: restart
    before = m.codebook.embedding.weight.detach().clone()
    for step in (90, 100):  # multiples of 10 at or after 0.9 * 100
        st.step = step
        assert train_vqgan.codebook_step(st, z_e, codes, args) is None
    assert torch.equal(m.codebook.embedding.weight, before) and st.counts[0] == 64


class _FixedLatents(torch.nn.Module):
    """Stands in for the encoder: half of each image's 4x4 latents are 5a, the other half 3b."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        z = torch.empty(x.shape[0], len(self.a), 4, 4)
        z[:, :, :2], z[:, :, 2:] = 5 * self.a[None, :, None, None], 3 * self.b[None, :, None, None]
        return z


@pytest.mark.parametrize("ema_codebook", [False, True])
def test_kmeans_init_runs_on_projected_latents(ema_codebook):
    """init_codebook seeds the codes by k-means on the latents as the codebook searches them: with
    codebook_norm and two distinct latents, every code is one of the two unit latents, both used."""
    st, args = _stage1(*(["--ema-codebook", "0.9"] if ema_codebook else []), "--steps", "10", norm=True)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    st.model.encoder = _FixedLatents(a, b)
    with torch.no_grad():  # quant_conv = identity
        st.model.quant_conv.weight.copy_(torch.eye(8)[:, :, None, None])
        st.model.quant_conv.bias.zero_()
    train_vqgan.init_codebook(st, torch.zeros(2, 3, 16, 16))
    w = st.model.codebook.embedding.weight.detach()
    units = torch.stack([F.normalize(a, dim=0), F.normalize(b, dim=0)])  # (2, 8)
    dist = (w[:, None] - units[None]).norm(dim=-1)  # (32, 2), exact near 0 (cdist is not)
    assert dist.min(1).values.max() < 1e-5
    assert set(dist.argmin(1).tolist()) == {0, 1}
    if ema_codebook:
        assert st.ema_codebook.initialised
        # m_k = N_k code_k, and the 16 + 16 latents are counted once each (codes with none count 1)
        torch.testing.assert_close(st.ema_codebook.embed_sum, w * st.ema_codebook.cluster_size[:, None])
        assert sorted(st.ema_codebook.cluster_size.tolist()) == [1.0] * 30 + [16.0, 16.0]


def test_budget_probe_sets_total_gan_start_and_schedule(monkeypatch):
    """Timed steps 20..80 take 30 s (2 steps/s, GAN steps 1.5x): with 2 minutes and the GAN from a
    quarter of the run, T/4 steps at 0.5 s + 3T/4 at 0.75 s = 120 s, so T = 174 (174.55 rounded
    down) and the GAN starts at int(174 / 4) = 43."""
    st, args = _stage1("--disc-start-frac", "0.25", "--steps", "100000", "--warmup-steps", "5")
    clock = iter([100.0, 130.0])
    monkeypatch.setattr(train_vqgan, "time", SimpleNamespace(time=lambda: next(clock)))
    probe = train_vqgan.BudgetProbe(2.0, 0)
    fixed = []
    for step in range(81):
        st.step = step
        fixed.append(probe(st, args))
    assert fixed == [False] * 80 + [True]
    assert st.total_steps == 174 and st.disc_start == 43 and st.budget_fixed
    # the LR schedule follows the new total: warmup 5, cosine to 5% at step 174
    lam = st.sched.lr_lambdas[0]
    for s in (50, 100, 173):
        t = (s - 5) / (174 - 5)
        assert lam(s) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def test_stage1_state_roundtrips_every_field(tmp_path):
    opts = ("--ema-codebook", "0.9", "--lecam-weight", "0.1", "--ema", "0.9")
    a, _ = _stage1(*opts, "--steps", "50")
    a.step, a.total_steps, a.disc_start, a.budget_fixed = 7, 123, 45, True
    a.counts.copy_(torch.arange(32))
    a.ema_codebook.cluster_size.copy_(torch.linspace(1, 2, 32))
    a.ema_codebook.embed_sum.normal_()
    a.ema_codebook.initialised = True
    a.lecam(torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 4.0]))  # EMAs 0.02 and 0.01
    with torch.no_grad():
        for p in a.ema.model.parameters():
            p.add_(1.0)
    torch.save(a.state_dict(), tmp_path / "last.pt")
    torch.manual_seed(1)
    b = train_vqgan.build(_args(*opts, "--steps", "1000", "--seed", "1"), dict(TINY_VQ), CPU)
    b.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True))
    assert (b.step, b.total_steps, b.disc_start, b.budget_fixed) == (7, 123, 45, True)
    assert torch.equal(b.counts, torch.arange(32))
    assert torch.equal(b.ema_codebook.cluster_size, a.ema_codebook.cluster_size)
    assert torch.equal(b.ema_codebook.embed_sum, a.ema_codebook.embed_sum) and b.ema_codebook.initialised
    assert b.lecam.ema_real.item() == pytest.approx(0.02) and b.lecam.ema_fake.item() == pytest.approx(0.01)
    for (k, va), vb in zip(a.ema.model.state_dict().items(), b.ema.model.state_dict().values()):
        assert torch.equal(va, vb), k
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert torch.equal(b.gen.get_state(), a.gen.get_state())


def test_resume_with_more_steps_moves_the_gan_start(tiny_world, tmp_path):
    """Without a time budget, --resume --steps N sets the total to N and the GAN start to frac * N."""
    import yaml
    cfg = tmp_path / "vq.yml"
    cfg.write_text(yaml.safe_dump({"model_param": TINY_VQ}))
    common = ["--data", tiny_world["train"], "--config", str(cfg), "--out-dir", str(tmp_path / "vq"), "--batch-size", "4",
              "--device", "cpu", "--no-progress", "--eval-every", "1000", "--disc-start-frac", "0.5", "--limit", "8"]
    train_vqgan.main(common + ["--steps", "4"])
    ck = torch.load(tmp_path / "vq" / "last.pt", weights_only=True)
    assert (ck["step"], ck["total_steps"], ck["disc_start"]) == (4, 4, 2)
    assert train_vqgan.main(common + ["--steps", "8", "--resume"])["step"] == 8
    ck = torch.load(tmp_path / "vq" / "last.pt", weights_only=True)
    assert (ck["step"], ck["total_steps"], ck["disc_start"], ck["budget_fixed"]) == (8, 8, 4, False)


def test_budget_fixed_total_is_kept_and_not_reprobed_on_resume(tiny_world, tmp_path, monkeypatch):
    """A run whose time budget fixed 10 steps, interrupted at step 4, resumes to step 10: neither
    --steps nor a new probe (which this slow clock would make stop at step 8) changes the total."""
    import yaml
    cfg = tmp_path / "vq.yml"
    cfg.write_text(yaml.safe_dump({"model_param": TINY_VQ}))
    common = ["--data", tiny_world["train"], "--config", str(cfg), "--out-dir", str(tmp_path / "vq"), "--batch-size", "4",
              "--device", "cpu", "--no-progress", "--eval-every", "1000", "--limit", "8"]
    train_vqgan.main(common + ["--steps", "4"])
    path = tmp_path / "vq" / "last.pt"
    ck = torch.load(path, weights_only=True)
    ck["total_steps"], ck["budget_fixed"] = 10, True
    torch.save(ck, path)
    monkeypatch.setattr(train_vqgan, "BUDGET_WARMUP", 1)
    monkeypatch.setattr(train_vqgan, "BUDGET_PROBE", 2)

    class Clock:  # 1000 s per reading: a probe over steps 5..7 would measure < 0.002 steps/s
        t = 0.0

        def time(self):
            self.t += 1000.0
            return self.t

    monkeypatch.setattr(train_vqgan, "time", Clock())
    res = train_vqgan.main(common + ["--steps", "12", "--time-budget-min", "1", "--resume"])
    assert res["step"] == 10
    assert torch.load(path, weights_only=True)["total_steps"] == 10
