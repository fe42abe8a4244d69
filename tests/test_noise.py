"""The decoding noise (counter-based SplitMix64, models.decoding.ImageNoise) and the selection of the
least confident tokens (topk), against closed forms and independent references."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from models import decoding, gamma_func, image_noise
from models.decoding import (CONFIDENCE_STREAM, SAMPLE_STREAM, bits_to_gumbel, counter_bits, decode_step,
                             least_confident, least_confident_sorted, splitmix64, splitmix64_int)

EULER_GAMMA = 0.5772156649015329


def _u(seed=0, indices=range(32), step=0, stream=SAMPLE_STREAM, shape=(256, 128)):
    """(B, *shape) float64 uniforms as numpy."""
    return image_noise(seed, indices, "cpu").at_step(step).uniform(shape, stream).numpy()


def _corr_ok(a, b):
    """|Pearson r| of two equal-size samples below 5 standard errors of r = 0."""
    a, b = np.ravel(a), np.ravel(b)
    r = np.corrcoef(a, b)[0, 1]
    return abs(r) < 5 / math.sqrt(a.size), r


def test_splitmix64_is_the_published_sequence_and_matches_python():
    # SplitMix64 seeded with 0 (Steele et al.; e.g. the seeding generator of xoshiro): the first three outputs
    golden = 0x9E3779B97F4A7C15
    assert [splitmix64_int(golden * i) for i in (1, 2, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
                                                                0x06C45D188009454F]
    # the int64 tensor version (wrapping *, masked >>) equals unbounded Python ints mod 2**64, signs included
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([0, 1, -1, 2**63 - 1, -2**63, 2**62, -2**62]),
                   torch.randint(-2**63, 2**63 - 1, (2000,), generator=g, dtype=torch.int64)])
    want = [splitmix64_int(v % 2**64) for v in x.tolist()]
    got = [v % 2**64 for v in splitmix64(x.clone()).tolist()]
    assert got == want


def test_counter_bits_take_24_bits_from_each_half_of_each_hash():
    # seed 0: hash i is output i of the published sequence; word 2i = bits 8..31, word 2i + 1 = bits 40..63
    bits = counter_bits(torch.tensor([0]), 5)[0].tolist()
    assert bits == [0x7B1DCD, 0xE220A8, 0xA1B965, 0x6E789E, 0x800945]
    assert counter_bits(torch.tensor([0]), 4).dtype == torch.int32


def test_uniform_moments_ks_and_grid():
    u = _u()  # (32, 256, 128): 1M draws
    n = u.size
    assert 0 < u.min() and u.max() < 1
    k = u * 2**24 - 0.5  # the grid (k + 1/2) / 2**24, k an integer in [0, 2**24)
    assert np.array_equal(k, np.round(k)) and k.min() >= 0 and k.max() <= 2**24 - 1
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * math.sqrt((1 / 80 - 1 / 144) / n)  # Var(s^2) = (mu4 - sigma^4) / n
    assert stats.kstest(u.ravel()[:200_000], "uniform").pvalue > 1e-3
    # every position of an image on its own is uniform too (catches a counter that repeats)
    assert stats.kstest(u[:, 5, 7], "uniform").pvalue > 1e-3 and len(np.unique(u[0])) > 0.99 * u[0].size


def test_uniform_no_correlation_between_neighbours():
    u = _u(shape=(256, 128))  # (B, N, K); positions 2i, 2i + 1 of a row come from one hash
    flat = u.reshape(len(u), -1)
    checks = {
        "same hash (2i, 2i+1)": (flat[:, 0::2], flat[:, 1::2]),
        "next hash (2i+1, 2i+2)": (flat[:, 1:-1:2], flat[:, 2::2]),
        "next token": (u[:, :-1], u[:, 1:]),
        "next image": (u[:-1], u[1:]),
        "next step": (u, _u(step=1)),
        "other stream": (u, _u(stream=CONFIDENCE_STREAM)),
        "next seed": (u, _u(seed=1)),
        "next image index, alone": (_u(indices=[7]), _u(indices=[8])),
    }
    for name, (a, b) in checks.items():
        ok, r = _corr_ok(a, b)
        assert ok, (name, r)
    # beyond linear: the two words of one hash are jointly uniform (16 x 16 cells, chi-square)
    a, b = flat[:, 0::2].ravel(), flat[:, 1::2].ravel()
    counts = np.histogram2d(a, b, bins=16, range=[[0, 1], [0, 1]])[0].ravel()
    assert stats.chisquare(counts).pvalue > 1e-3


def test_gumbel_moments_and_the_transform_of_the_same_uniforms():
    noise = image_noise(3, range(32), "cpu").at_step(2)
    g = noise.gumbel((256, 128), SAMPLE_STREAM)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    x = g.double().numpy().ravel()
    n = x.size
    var = math.pi**2 / 6
    assert abs(x.mean() - EULER_GAMMA) < 5 * math.sqrt(var / n)
    assert abs(x.var() - var) < 5 * math.sqrt(4.4 * var**2 / n)  # Gumbel kurtosis 5.4: Var(s^2) = 4.4 sigma^4 / n
    assert stats.kstest(x[:200_000], "gumbel_r").pvalue > 1e-3
    # the same draws as -log(-log u) of the uniforms, computed here in float64
    u = noise.uniform((256, 128), SAMPLE_STREAM)
    torch.testing.assert_close(g.double(), -torch.log(-torch.log(u)), atol=2e-6, rtol=2e-6)
    # the grid's ends: u = 2**-25 and 1 - 2**-25 (where float32 u would round to 1 and give inf)
    ends = bits_to_gumbel(torch.tensor([0, 2**24 - 1], dtype=torch.int32)).double()
    want = torch.tensor([-math.log(-math.log(2.0**-25)), -math.log(-math.log1p(-2.0**-25))], dtype=torch.float64)
    torch.testing.assert_close(ends, want, atol=0, rtol=1e-6)


def test_an_image_draws_the_same_noise_alone_or_in_any_batch():
    shapes = {SAMPLE_STREAM: (16, 31), CONFIDENCE_STREAM: (16,)}  # odd sizes: a half-used last hash
    for stream, shape in shapes.items():
        for step in (0, 5):
            alone = {i: image_noise(9, [i], "cpu").at_step(step).gumbel(shape, stream)[0] for i in (0, 3, 41)}
            for batch in ([0, 3, 41], [41, 0, 3], [3], [41, 7, 8, 0, 3, 3]):
                got = image_noise(9, batch, "cpu").at_step(step).gumbel(shape, stream)
                for b, i in enumerate(batch):
                    if i in alone:
                        assert torch.equal(got[b], alone[i]), (stream, step, batch, i)
    assert image_noise(-1, [0], "cpu").image_keys.tolist() == image_noise(2**64 - 1, [0], "cpu").image_keys.tolist()
    with pytest.raises(ValueError, match="-2"):
        image_noise(0, [-2], "cpu")


@pytest.mark.parametrize("seed", range(4))
def test_least_confident_equals_the_stable_sort(seed):
    g = torch.Generator().manual_seed(seed)
    B, N = 64, 37
    score = torch.randint(0, 5, (B, N), generator=g).float()  # many ties
    score[torch.rand(B, N, generator=g) < 0.3] = math.inf  # known tokens
    n_keep = torch.randint(0, N + 1, (B,), generator=g)
    n_keep[:3] = torch.tensor([0, N, 1])
    n_keep = torch.minimum(n_keep, torch.isfinite(score).sum(1))  # as masked_count: never more than the hole
    want = least_confident_sorted(score, n_keep)
    assert torch.equal(want.sum(1), n_keep)
    for k in (None, int(n_keep.max()), int(n_keep.max()) + 1, N):
        assert torch.equal(least_confident(score, n_keep, k), want), k


def test_least_confident_ties_go_to_the_lower_position():
    score = torch.tensor([[1.0, 0.5, 1.0, 1.0, 0.5, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    got = least_confident(score, torch.tensor([3, 2]), 3)
    assert got.tolist() == [[True, True, False, False, True, False], [True, True, False, False, False, False]]
    assert not least_confident(score, torch.tensor([0, 0]), 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("confidence", ["prob", "logprob"])
def test_confidence_without_noise_keeps_the_least_probable_as_the_softmax_says(dtype, confidence):
    g = torch.Generator().manual_seed(1)
    B, N, V = 5, 16, 33
    logits = (2 * torch.randn(B, N, V, generator=g)).to(dtype)
    ids = torch.randint(0, V - 1, (B, N), generator=g)
    mask = torch.rand(B, N, generator=g) < 0.7
    new_ids, new_mask = decode_step(logits, ids, mask, mask.sum(1), 0.3, gamma_func("cosine"),
                                    image_noise(0, range(B), "cpu"), choice_temperature=0.0, confidence=confidence)
    # reference: the full fp32 softmax of the real codes, p of the argmax code
    p = logits[..., :-1].float().softmax(-1)  # (B, N, K)
    chosen = p.argmax(-1)
    assert torch.equal(new_ids, torch.where(mask, chosen, ids))
    score = p.gather(-1, chosen[..., None]).squeeze(-1)  # (B, N)
    score = torch.where(mask, score, torch.full_like(score, math.inf))
    n_keep = decoding.masked_count(gamma_func("cosine"), 0.3, mask.sum(1), mask.sum(1))
    assert torch.equal(new_mask, least_confident_sorted(score, n_keep))


def test_sample_inverts_the_softmax_cdf_at_the_sample_stream_and_confidence_uses_the_other():
    g = torch.Generator().manual_seed(2)
    B, N, V = 4, 16, 33
    logits = torch.randn(B, N, V, generator=g).to(torch.bfloat16)  # half precision: the CDF is built in fp32
    ids, mask = torch.zeros(B, N, dtype=torch.long), torch.ones(B, N, dtype=torch.bool)
    noise = image_noise(4, [10, 11, 12, 13], "cpu").at_step(3)
    new_ids, new_mask = decode_step(logits, ids, mask, mask.sum(1), 0.5, gamma_func("linear"), noise, 4.5, "sample")
    # reference in float64: the first code whose cumulative probability exceeds u = k / 2**24 of the sample stream
    u = counter_bits(noise._keys(SAMPLE_STREAM), N).double() / 2 ** 24  # (B, N)
    cdf = logits[..., :-1].double().softmax(-1).cumsum(-1)  # (B, N, K)
    want = (cdf <= u[..., None]).sum(-1)  # (B, N)
    margin = (cdf - u[..., None]).abs().amin(-1)  # distance of u to the nearest CDF step
    assert margin.min() > 1e-6  # no draw is decided by float32 rounding here
    assert torch.equal(new_ids, want)
    lp = logits[..., :-1].float().log_softmax(-1).gather(-1, want[..., None]).squeeze(-1)
    score = lp.exp() + 4.5 * 0.5 * noise.gumbel((N,), CONFIDENCE_STREAM)
    assert torch.equal(new_mask, least_confident_sorted(score, torch.full((B,), N // 2)))


def test_sampled_codes_follow_the_softmax():
    """50,000 draws (one per image and token, identical logits): the code frequencies pass a
    chi-square test against softmax(logits), including a code of probability ~1e-3 and a masked-out
    column of probability 0 that is never drawn."""
    logits = torch.tensor([2.0, 1.0, 0.0, -0.5, -4.0, 1.5, -30.0, 0.5]).double()
    p = logits.softmax(-1)
    B, N = 200, 250
    u = image_noise(7, range(B), "cpu").at_step(2).unit_float((N,), SAMPLE_STREAM)  # (B, N)
    codes = decoding.sample_codes(logits.float().expand(B, N, -1), u)  # (B, N)
    counts = torch.bincount(codes.flatten(), minlength=len(p)).double()
    assert counts[6] == 0  # p = 5e-14: not drawn in 50,000
    keep = torch.tensor([i != 6 for i in range(len(p))])
    expected = p[keep] / p[keep].sum() * counts.sum()
    assert stats.chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-3
    assert counts[4] > 0  # p ~ 1.6e-3: ~80 draws expected
    # shifting every logit changes nothing (no overflow of exp at large logits)
    big = decoding.sample_codes(logits.float().expand(B, N, -1) + 1000.0, u)
    assert torch.equal(big, codes)
    # u just below 1 still gives the last code of positive weight, and u = 0 the first
    edge = decoding.sample_codes(torch.tensor([[[0.0, 0.0, -200.0]]]), torch.tensor([[1 - 2 ** -24]]))
    assert edge.item() == 1
    assert decoding.sample_codes(torch.tensor([[[-200.0, 0.0, 0.0]]]), torch.tensor([[0.0]])).item() == 1


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_codes_follow_the_tempered_softmax(temperature):
    """--sample-temperature: 50,000 draws pass a chi-square test against softmax(logits / temperature),
    and fail it against the untempered softmax (so the temperature really reaches the draw)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -0.5, -2.0, 1.5, 0.5]).double()
    B, N = 200, 250
    u = image_noise(9, range(B), "cpu").at_step(1).unit_float((N,), SAMPLE_STREAM)  # (B, N)
    codes = decoding.sample_codes(logits.float().expand(B, N, -1), u, temperature)  # (B, N)
    counts = torch.bincount(codes.flatten(), minlength=len(logits)).double()
    for t, passes in ((temperature, True), (1.0, False)):
        expected = (logits / t).softmax(-1) * counts.sum()
        assert (stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3) == passes, t
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            decoding.sample_codes(logits.float().expand(1, 1, -1), u[:1, :1], bad)


@pytest.mark.gpu
def test_cuda_noise_equals_cpu_noise():
    cpu, cuda = (image_noise(5, [0, 7, 300], d).at_step(4) for d in ("cpu", "cuda"))
    assert torch.equal(counter_bits(cuda._keys(SAMPLE_STREAM), 1001).cpu(), counter_bits(cpu._keys(SAMPLE_STREAM), 1001))
    torch.testing.assert_close(cuda.gumbel((7, 11), CONFIDENCE_STREAM).cpu(), cpu.gumbel((7, 11), CONFIDENCE_STREAM),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
def test_cuda_sampling_matches_the_float64_reference():
    """Inverse-CDF sampling on CUDA (bf16 logits, the autocast dtype) draws the codes of a float64
    CDF wherever the uniform is not within float32 rounding of a CDF step."""
    g = torch.Generator().manual_seed(3)
    B, N, K = 64, 256, 1024
    logits = (3 * torch.randn(B, N, K, generator=g)).to(torch.bfloat16)
    noise = image_noise(9, range(B), "cuda").at_step(1)
    u = noise.unit_float((N,), SAMPLE_STREAM)  # (B, N) on CUDA
    got = decoding.sample_codes(logits.cuda(), u).cpu()
    cdf = logits.double().softmax(-1).cumsum(-1)  # (B, N, K)
    ud = u.cpu().double()[..., None]
    want = (cdf <= ud).sum(-1)
    clear = (cdf - ud).abs().amin(-1) > 1e-5  # (B, N) draws not decided by rounding
    assert clear.float().mean() > 0.95
    assert torch.equal(got[clear], want[clear])
